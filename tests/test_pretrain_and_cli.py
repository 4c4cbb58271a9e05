"""Pretraining (resume is bit-identical), the CLI's commands and its error handling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.commands.common import load_config, parse_overrides, read_prompts
from prefalign.errors import PrefalignError
from prefalign.pretrain.t2i import PretrainT2IConfig, pretrain_t2i
from prefalign.training.checkpoint import latest_checkpoint, list_checkpoints

runner = CliRunner()


def _tiny_config(**overrides) -> PretrainT2IConfig:
    values = dict(steps=4, batch_size=4, image_size=16, checkpoint_every=2, log_every=1, warmup_steps=1)
    values.update(overrides)
    return PretrainT2IConfig(**values)


def test_pretraining_resumes_bit_identically(tmp_path):
    config = _tiny_config()
    straight = pretrain_t2i(config, tmp_path / "straight", progress=False)
    # "kill" a run after step 2: train fully, drop the last checkpoint, resume from step 2
    pretrain_t2i(config, tmp_path / "killed", progress=False)
    checkpoints = list_checkpoints(tmp_path / "killed")
    assert [p.name for p in checkpoints] == ["step-00000002", "step-00000004"]
    shutil.rmtree(checkpoints[-1])
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000002"
    resumed = pretrain_t2i(config, tmp_path / "killed", progress=False, resume=True)
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different seed gives different weights (the comparison above can fail)
    other = pretrain_t2i(_tiny_config(seed=1), tmp_path / "other", progress=False)
    assert not all(torch.equal(a[k], other.unet.state_dict()[k]) for k in a)
    # the exported model folder loads and samples
    from prefalign.backbones.loading import load_backbone
    from prefalign.sampling import generate

    loaded = load_backbone(tmp_path / "straight" / "model")
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], a["conv_in.weight"])
    images = generate(loaded, ["a small red circle at the center on a gray background"], steps=2)
    assert images.shape == (1, 3, 16, 16)


def test_config_overrides_and_validation(tmp_path):
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=x"]) == {"a": {"b": 3}, "c": [1, 2], "d": "x"}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 10\nbatch_size: 8\n")
    config = load_config(PretrainT2IConfig, yaml_file, ["batch_size=16"], steps=None)
    assert (config.steps, config.batch_size) == (10, 16)
    with pytest.raises(PrefalignError, match="batch_size"):
        load_config(PretrainT2IConfig, None, ["batch_size=0"])
    with pytest.raises(PrefalignError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(PrefalignError, match="config file not found"):
        load_config(PretrainT2IConfig, tmp_path / "missing.yaml", None)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"caption": "b"}\n')
    (tmp_path / "p.csv").write_text("id,caption\n1,x\n2,y\n")
    assert read_prompts(["z"], tmp_path / "p.txt") == ["z", "one", "two"]
    assert read_prompts(None, tmp_path / "p.jsonl") == ["a", "b"]
    assert read_prompts(None, tmp_path / "p.csv") == ["x", "y"]
    with pytest.raises(PrefalignError, match="not found"):
        read_prompts(None, tmp_path / "nope.txt")


def test_world_show_writes_a_grid(tmp_path):
    result = runner.invoke(app, ["world", "show", "--out", str(tmp_path / "w.png")])
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(tmp_path / "w.png") as image:
        assert image.width > 1000 and image.height > 300


def test_sample_with_the_shipped_model(tmp_path):
    prompt = "a large blue square at the center on a white background"
    result = runner.invoke(app, ["sample", "--prompt", prompt, "--n", "2", "--steps", "4", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["images"] == 2
    assert (tmp_path / "0000.png").is_file() and (tmp_path / "0001.png").is_file() and (tmp_path / "grid.png").is_file()
    assert 0 <= summary["annotator_mean_score"] <= 1


def test_user_errors_are_one_line_without_traceback(tmp_path):
    command = [sys.executable, "-m", "prefalign.cli", "sample", "--prompt", "x", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("sample", "world", "pretrain", "demo"):
        assert command in result.output
    assert "--cfg" in runner.invoke(app, ["sample", "--help"]).output
