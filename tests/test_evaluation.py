"""The evaluation metrics on fixed inputs: win rate with ties ½ and its Wilson interval, score
summaries, diversity, attribute accuracy, the CLIP style metric, and model resolution."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.evaluation import (
    attribute_accuracy,
    evaluation_prompts,
    mean_pairwise_distance,
    resolve_model,
    score_summary,
    style_alignment,
    wilson_interval,
    win_counts,
    win_rate,
)


def test_win_rate_counts_ties_half_and_has_the_wilson_interval_computed_by_hand():
    # 10 comparisons: 6 wins, 2 ties, 2 losses → successes 6 + ½·2 = 7, p = 0.7
    model = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.1, 0.0])
    base = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.3, 0.2, 0.5])
    assert win_counts(model, base) == (6, 2, 10)
    result = win_rate(model, base)
    assert result["win_rate"] == pytest.approx(0.7)
    assert (result["wins"], result["ties"], result["n"]) == (6, 2, 10)
    # by hand, z = 1.96: z²/n = 0.38415; centre = (0.7 + 0.192075)/1.38415 = 0.644492;
    # half = 1.96·√(0.7·0.3/10 + 3.8415/400)/1.38415 = 1.96·0.174939/1.38415 = 0.247716
    low, high = result["ci95"]
    assert low == pytest.approx(0.396778, abs=2e-5)
    assert high == pytest.approx(0.892209, abs=2e-5)


def test_wilson_interval_matches_scipy_for_whole_successes():
    from scipy.stats import binomtest

    for successes, n in [(0, 5), (3, 7), (40, 64), (64, 64), (300, 512)]:
        reference = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(successes, n)
        assert low == pytest.approx(reference.low, abs=1e-9)
        assert high == pytest.approx(reference.high, abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_differences_within_the_tie_tolerance_are_ties():
    base = torch.tensor([0.5, 0.5, 0.5, 0.5])
    model = base + torch.tensor([1e-6, -5e-5, 2e-4, -3e-4])  # tie, tie, win, loss
    assert win_counts(model, base) == (1, 2, 4)
    assert win_counts(model, base, tie_tolerance=0.0) == (2, 0, 4)


def test_win_rate_needs_paired_scores():
    with pytest.raises(PrefalignError, match="paired"):
        win_rate(torch.zeros(3), torch.zeros(4))


def test_score_summary():
    summary = score_summary(torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0]))
    assert summary["mean"] == pytest.approx(3.0)
    assert summary["median"] == pytest.approx(3.0)
    assert summary["std"] == pytest.approx(math.sqrt(2.5))


def test_diversity_is_the_mean_pairwise_rms_distance_within_prompts():
    flat = lambda value: torch.full((3, 4, 4), value)  # noqa: E731
    # prompt 1: values 0, 0.2, 0.6 → distances 0.2, 0.6, 0.4 (mean 0.4); prompt 2: identical → 0
    images = torch.stack([flat(0.0), flat(0.2), flat(0.6), flat(0.5), flat(0.5), flat(0.5)])
    assert mean_pairwise_distance(images, 3) == pytest.approx((0.4 + 0.0) / 2, abs=1e-6)  # float32 inputs
    # a non-constant pair: half the pixels differ by 1 → RMS √0.5
    a, b = torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)
    b[:, 0] = 1.0
    assert mean_pairwise_distance(torch.stack([a, b]), 2) == pytest.approx(math.sqrt(0.5))
    assert mean_pairwise_distance(images, 1) is None


def test_attribute_accuracy():
    checks = {
        "colour": torch.tensor([True, True, False, True]),
        "shape": torch.tensor([True, False, False, True]),
        "size": torch.tensor([True, True, True, True]),
        "position": torch.tensor([True, True, False, False]),
        "background": torch.tensor([True, True, True, True]),
        "style": torch.tensor([False, False, False, False]),  # not a content attribute
    }
    out = attribute_accuracy(checks)
    assert out["colour_accuracy"] == pytest.approx(0.75)
    assert out["attribute_accuracy"] == pytest.approx((3 + 2 + 4 + 2 + 4) / 20)
    assert out["all_attributes_correct"] == pytest.approx(0.25)  # only image 0


def test_style_metric_tells_styled_renders_from_plain_ones_and_keeps_content():
    from prefalign.rewards.clip import load_clip
    from prefalign.worlds.shapes.prompts import sample_scenes
    from prefalign.worlds.shapes.render import render

    clip = load_clip("shapes-clip")
    scenes = sample_scenes(16, seed=3, split="train")
    prompts = [s.prompt for s in scenes]
    winter = render([s.with_style("winter") for s in scenes], seed=3, size=32).images
    plain = render(scenes, seed=3, size=32).images
    styled = style_alignment(clip, winter, prompts, "winter")
    unstyled = style_alignment(clip, plain, prompts, "winter")
    assert styled["style_share"] >= 0.9
    assert unstyled["style_share"] <= 0.1
    assert unstyled["style_counts"]["None"] >= 15
    for result in (styled, unstyled):
        assert result["colour_accuracy"] >= 0.8 and result["shape_accuracy"] >= 0.8
    assert styled["content_preservation"] == pytest.approx((styled["colour_accuracy"] + styled["shape_accuracy"]) / 2)
    with pytest.raises(PrefalignError, match="unknown style"):
        style_alignment(clip, plain, prompts, "cubist")


def test_evaluation_prompts_are_distinct_seeded_and_leave_out_training_captions():
    first = evaluation_prompts(20, seed=1)
    assert len(set(first)) == 20 and first == evaluation_prompts(20, seed=1) and first != evaluation_prompts(20, seed=2)
    excluded = set(first[:10])
    assert not excluded & set(evaluation_prompts(20, seed=1, exclude=excluded))
    held_out = evaluation_prompts(10, seed=1, split="held_out")
    from prefalign.worlds.shapes.prompts import parse_prompt

    assert all(parse_prompt(p).held_out for p in held_out)


def test_resolve_model_reads_run_folders_and_exports(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text("method: dpo\nmodel: shapes-t2i\ndata: {path: /somewhere/prefs}\n")
    (run / "export" / "prefalign_export.json").write_text(json.dumps({"method": "dpo", "base_model": "shapes-t2i", "steps": 7}))
    (run / "export" / "prefalign.json").write_text("{}")
    resolved = resolve_model(run)
    assert (resolved.load, resolved.base, resolved.method, resolved.steps) == (str(run / "export"), "shapes-t2i", "dpo", 7)
    assert resolved.data == "/somewhere/prefs" and resolved.run_dir == str(run)
    # a diffusers LoRA export goes on top of its base pipeline
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "prefalign_export.json").write_text(json.dumps({"method": "rpo", "base_model": "/models/sd15"}))
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert (resolve_model(lora).load, resolve_model(lora).lora) == ("/models/sd15", str(lora))
    # plain specs pass through; an unfinished run is a clear error
    assert resolve_model("shapes-t2i").load == "shapes-t2i" and resolve_model("shapes-t2i").base is None
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: dpo\n")
    with pytest.raises(PrefalignError, match="--resume"):
        resolve_model(unfinished)


def test_evaluate_an_inpainting_model_on_masked_renders(tmp_path):
    """An inpainting model is sampled on a render of each prompt with an outpainting / warping mask,
    and a scorer receives the masked images and masks."""
    from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
    from prefalign.evaluation import EvaluationSettings, SamplingSettings, evaluate

    torch.manual_seed(0)
    unet = new_shapes_unet(shapes_unet_config(16, in_channels=7, block_out_channels=(8, 16, 16)))
    folder = ShapesBackbone(unet, DEFAULT_SCHEDULER_CONFIG, 16, kind="shapes-inpaint").save_pretrained(tmp_path / "inpaint")
    prompts = ["a small red circle at the center on a white background", "a large blue star in the top left on a beige background"]
    settings = EvaluationSettings(prompts=prompts, scorers=["annotator", "test_evaluation:masked_share"], sampling=SamplingSettings(per_prompt=2, steps=2))
    (result,) = evaluate([folder], str(folder), settings, progress=False)
    assert result["win_rates"]["annotator"]["ties"] == 4  # same model, same seeds
    # the scorer saw the masks: the mean masked share is the share of repainted pixels, in (0, 1)
    share = result["metrics"]["model"]["scores"]["test_evaluation:masked_share"]["mean"]
    assert 0.0 < share < 1.0


def masked_share(images, prompts, masks=None, **cond):
    """A scorer for the test above: the share of pixels the mask repaints."""
    assert masks is not None and masks.shape == (images.shape[0], 1, *images.shape[-2:])
    return masks.flatten(1).mean(1)
