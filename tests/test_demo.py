"""``prefalign evaluate`` on fixed tiny models (win rate and interval against a hand computation) and
``prefalign demo --quick`` end to end (the integration test: data → reward → align → evaluate → report)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
from prefalign.cli import app

runner = CliRunner()
PROMPTS = [
    "a small red circle at the center on a white background",
    "a large blue star in the top left on a beige background",
    "a medium green triangle in the bottom right on a gray background",
]


def tiny_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    unet = new_shapes_unet(shapes_unet_config(16, block_out_channels=(8, 16, 16)))
    ShapesBackbone(unet, DEFAULT_SCHEDULER_CONFIG, 16).save_pretrained(path)
    return path


def invoke_json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_uses_the_same_seeds_for_both_models_and_reports_the_wilson_interval(tmp_path):
    from prefalign.backbones.loading import load_backbone
    from prefalign.sampling import generate
    from prefalign.worlds.shapes.annotator import Annotator

    a, b = tiny_model(tmp_path / "a", seed=0), tiny_model(tmp_path / "b", seed=1)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    common = ["--prompts", str(prompts_file), "--per-prompt", "2", "--steps", "2", "--seed", "5", "--json"]
    result = invoke_json(["evaluate", str(a), "--against", str(b), *common])

    # by hand: image i of prompt list [p0, p0, p1, p1, p2, p2] starts from seed 5 + i for both models
    expanded = [p for p in PROMPTS for _ in range(2)]
    annotator = Annotator()
    scores = {m: annotator.score(generate(load_backbone(m), expanded, seed=5, steps=2, guidance_scale=3.0), expanded) for m in (a, b)}
    difference = scores[a].double() - scores[b].double()  # |Δ| ≤ 1e-4 is a tie
    wins, ties, n = int((difference > 1e-4).sum()), int((difference.abs() <= 1e-4).sum()), 6
    p = (wins + 0.5 * ties) / n
    z = 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    rate = result["win_rates"]["annotator"]
    assert (rate["wins"], rate["ties"], rate["n"]) == (wins, ties, n)
    assert rate["win_rate"] == pytest.approx(p)
    assert rate["ci95"] == pytest.approx([max(0.0, centre - half), min(1.0, centre + half)], abs=1e-9)
    assert result["metrics"]["model"]["scores"]["annotator"]["mean"] == pytest.approx(float(scores[a].mean()), abs=1e-6)
    assert result["metrics"]["against"]["scores"]["annotator"]["median"] == pytest.approx(float(scores[b].median()), abs=1e-6)
    assert 0 <= result["metrics"]["model"]["attribute_accuracy"] <= 1 and result["metrics"]["model"]["diversity"] > 0
    assert result["settings"]["interval"].startswith("Wilson")

    # a model against itself: identical noise → identical images → every comparison a tie
    self_result = invoke_json(["evaluate", str(a), "--against", str(a), *common])
    assert self_result["win_rates"]["annotator"]["ties"] == 6 and self_result["win_rates"]["annotator"]["win_rate"] == 0.5

    # a plain model has no base: a one-line error that says what to do
    error = runner.invoke(app, ["evaluate", str(a), "--prompts", "2", "--steps", "1"])
    assert error.exit_code != 0 and "--against" in str(error.exception)


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    started = time.time()
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    first_run = time.time() - started
    assert result.exit_code == 0, result.output
    report = out / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    text = report.read_text()
    assert text.count("class='run-row'") == 3 and "data:image/png;base64," in text
    assert (out / "summary.txt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["dpo", "rpo", "inpo"]
    for row in summary["rows"]:
        for key in ("annotator_win_rate", "reward_win_rate", "annotator_score", "base_annotator_score", "attribute_accuracy", "diversity", "train_implicit_accuracy"):
            assert _finite(row[key]), (row["method"], key, row[key])
        low, high = row["annotator_win_rate_ci95"]
        assert 0 <= low <= row["annotator_win_rate"] <= high <= 1
        assert row["steps"] == 8
        assert (out / "runs" / row["method"] / "export" / "prefalign.json").is_file()
    for name in ("prefs-pairs", "reward-pairs", "align-dpo", "align-rpo", "align-inpo", "evaluate-dpo", "report"):
        assert (out / "stages" / f"{name}.json").is_file()
    assert (out / "reward" / "error_vs_bound.png").is_file()
    assert "annotator win rate" in result.output  # the summary table was printed

    # re-running reuses every finished stage: nothing is retrained or re-evaluated
    metrics_mtime = (out / "runs" / "dpo" / "metrics.json").stat().st_mtime
    started = time.time()
    again = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "runs" / "dpo" / "metrics.json").stat().st_mtime == metrics_mtime
    assert "stages reused: prefs-pairs, reward-pairs, align-dpo" in again.output
    assert time.time() - started < first_run / 3
