"""Reward models: losses, the V⁻¹ bound and γ against direct computations, scorers, training,
evaluation and the `reward` commands (tiny randomly initialised encoders, so it runs in seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from prefalign.data import load_pairwise, pair_record, point_records
from prefalign.data.pointwise import POINTWISE_SCHEMA
from prefalign.data.preference import PAIRWISE_SCHEMA
from prefalign.data.storage import ShardWriter, write_meta
from prefalign.errors import PrefalignError
from prefalign.rewards.base import AnnotatorScorer, CallableScorer, Scorer, load_scorer
from prefalign.rewards.clip import ClipConfig, ShapesClip
from prefalign.rewards.prefpaint import (
    RewardModel,
    RewardModelConfig,
    accumulate_ridge_matrix,
    bound_reference,
    bound_theory,
    confidence_bound,
    inverse_ridge_matrix,
    ridge_matrix,
    trust_gamma,
)
from prefalign.rewards.training import RewardTrainConfig, bound_analysis, bradley_terry_loss, evaluate_reward_model, quantile_line, regression_loss, train_reward_model
from prefalign.worlds.shapes.annotator import Annotator
from prefalign.worlds.shapes.prompts import sample_scenes
from prefalign.worlds.shapes.render import DEFECTS, render

PROMPT = "a large blue square at the center on a white background"


def tiny_clip(seed: int = 0) -> ShapesClip:
    torch.manual_seed(seed)
    return ShapesClip(ClipConfig(image_size=16, channels=(8, 8, 8, 8), head_channels=4, groups=4)).eval()


def tiny_config(**overrides) -> RewardModelConfig:
    values = dict(d_model=32, num_heads=2, feedforward_dim=32, mlp_dims=(32,), feature_dim=16)
    values.update(overrides)
    return RewardModelConfig(**values)


def mean_brightness(images, prompts):
    """A module:function scorer for load_scorer."""
    return images.mean((1, 2, 3))


def masked_difference(images, prompts, masked_images=None):
    """An inpainting module:function scorer (declares masked_images)."""
    return (images - masked_images).mean((1, 2, 3))


def wrong_shape(images, prompts):
    return torch.zeros(len(prompts), 2)


# ---- losses ----------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_hand_computation():
    r0, r1, label = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 0.5])
    # pair 1: a wins by margin 2 → log(1 + e^-2); pair 2: b wins by margin 1 → log(1 + e^-1); tie at margin 0 → log 2
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert bradley_terry_loss(r0, r1, label).item() == pytest.approx(expected, rel=1e-6)
    # swapping the images and the label gives the same loss; a wrong label costs more
    assert bradley_terry_loss(r1, r0, 1 - label).item() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(r0, r1, 1 - label).item() > expected + 0.5


def test_regression_loss_matches_hand_computation():
    assert regression_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 5.0])).item() == pytest.approx(8 / 3)


# ---- the bound and γ -------------------------------------------------------------------------


def test_ridge_matrix_and_both_bounds_match_numpy():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(40, 6, generator=generator)
    queries = torch.randn(5, 6, generator=generator)
    ridge_lambda = 0.01
    z = train.double().numpy()
    v = ridge_lambda * np.eye(6) + z.T @ z
    v_inv = np.linalg.inv(v)
    q = queries.double().numpy()
    theory = np.sqrt(np.einsum("bi,ij,bj->b", q, v_inv, q))
    reference = np.linalg.norm(q @ v_inv.T, axis=1)

    matrix = ridge_matrix(train, ridge_lambda)
    assert np.allclose(matrix.numpy(), v, rtol=1e-12, atol=1e-12)
    inverse = inverse_ridge_matrix(matrix)
    assert np.allclose(inverse.numpy(), v_inv, rtol=1e-9, atol=1e-12)
    assert np.allclose(bound_theory(queries, inverse).numpy(), theory, rtol=1e-9)
    assert np.allclose(bound_reference(queries, inverse).numpy(), reference, rtol=1e-9)
    assert torch.equal(confidence_bound(queries, inverse, "theory"), bound_theory(queries, inverse))
    # built in pieces = built at once
    pieces = accumulate_ridge_matrix(ridge_matrix(train[:15], ridge_lambda), train[15:])
    assert torch.allclose(pieces, matrix, atol=1e-10)
    # a direction never seen in training gets a much wider bound
    flat = torch.cat([torch.randn(50, 3, generator=generator), torch.zeros(50, 3)], 1)
    flat_inverse = inverse_ridge_matrix(ridge_matrix(flat, ridge_lambda))
    seen, unseen = torch.tensor([[1.0, 0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0, 0, 0]])
    assert bound_theory(unseen, flat_inverse) > 50 * bound_theory(seen, flat_inverse)
    with pytest.raises(PrefalignError, match="unknown bound norm"):
        confidence_bound(queries, inverse, "euclid")


def test_trust_gamma_matches_the_reference_formula():
    def reference(b, k=0.05, beta=0.7, gamma_max=2.21):
        return min(max(math.exp(-k * b + beta), 1.0), gamma_max)

    points = [0.0, 1.0, 5.0, 10.0, 14.0, 20.0, 100.0]
    gammas = trust_gamma(torch.tensor(points)).tolist()
    assert gammas == pytest.approx([reference(b) for b in points], rel=1e-6)
    assert gammas[0] == pytest.approx(math.exp(0.7)) and gammas[-1] == 1.0  # trusted ~2×, untrusted 1
    assert trust_gamma(torch.tensor([0.0]), trust_gamma_max=1.5).item() == pytest.approx(1.5)
    assert trust_gamma(torch.tensor([2.0]), trust_k=0.3, trust_beta=1.0).item() == pytest.approx(reference(2.0, 0.3, 1.0))


# ---- the model as a scorer ---------------------------------------------------------------------


def test_reward_model_is_differentiable_and_round_trips(tmp_path):
    model = RewardModel(tiny_config(), clip=tiny_clip()).eval()
    assert isinstance(model, Scorer) and model.differentiable
    images = torch.rand(3, 3, 16, 16, requires_grad=True)
    rewards = model.score(images, [PROMPT] * 3)
    assert rewards.shape == (3,)
    rewards.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # the prompt conditions the reward
    other = model.score(images.detach(), ["a small red circle in the top left on a black background"] * 3)
    assert not torch.allclose(rewards.detach(), other)
    # features are linear-headed: r = wᵀz with no bias
    z = model.features(images.detach(), [PROMPT] * 3)
    assert z.shape == (3, 16) and model.head.bias is None
    assert torch.allclose(model.reward_from_features(z), z @ model.head.weight[0], atol=1e-6)
    model.set_confidence(torch.randn(50, 16))
    result = model.score_with_confidence(images.detach(), [PROMPT] * 3)
    assert torch.allclose(result["trust_gamma"], trust_gamma(bound_reference(result["features"], model.ridge_inverse)).float())
    model.save_pretrained(tmp_path / "rm")
    loaded = load_scorer(str(tmp_path / "rm"))
    assert isinstance(loaded, RewardModel)
    assert torch.allclose(loaded.score(images.detach(), [PROMPT] * 3), rewards.detach(), atol=1e-6)
    assert torch.equal(loaded.ridge_inverse, model.ridge_inverse) and int(loaded.ridge_count) == 50
    # a loaded reward model is a frozen scorer: gradients reach the images, never its parameters
    assert loaded.has_confidence and not any(p.requires_grad for p in loaded.parameters())
    images = images.detach().requires_grad_(True)
    loaded(images, [PROMPT] * 3).sum().backward()
    assert images.grad.abs().sum() > 0 and all(p.grad is None for p in loaded.parameters())
    result = loaded.score_with_confidence(images.detach(), [PROMPT] * 3)
    assert torch.allclose(result["bound"], bound_theory(result["features"], model.ridge_inverse).float())
    # the trust factor with the theory's norm √(zᵀV⁻¹z) when configured so
    loaded.config = loaded.config.model_copy(update={"trust_bound": "theory", "trust_k": 0.5})
    assert torch.allclose(loaded.trust_gamma(result["features"]), trust_gamma(result["bound"].double(), trust_k=0.5).float())


def test_image_statistics_token_sees_what_the_embedding_ignores(tmp_path):
    """The statistics token: channel mean/std of every residual block of the frozen tower, cached
    with the embedding; the cached path (training) and the direct path (scoring) agree; it needs a
    frozen encoder; a saved model loads back with it."""
    clip = tiny_clip()
    images = torch.rand(4, 3, 16, 16)
    embedding, stats = clip.encode_images_with_statistics(images)
    torch.testing.assert_close(embedding, clip.encode_images(images))
    assert stats.shape == (4, clip.statistics_dim) and clip.statistics_dim == 2 * (8 + 8 + 8 + 8)
    x, expected = clip._input(images), []
    for block in clip.blocks:
        x = block(x)
        if type(block).__name__ == "ResidualBlock":
            expected += [x.mean((2, 3)), x.std((2, 3))]
    torch.testing.assert_close(stats, torch.cat(expected, 1))
    model = RewardModel(tiny_config(image_statistics=True), clip=clip).eval()
    assert model.token_kinds == ["image", "image_statistics", "prompt"]
    cached = model.cache_input(images)
    assert cached.shape == (4, clip.config.embed_dim + clip.statistics_dim)
    direct = model.score(images, [PROMPT] * 4)
    via_cache = model.reward_from_features(model.features_from_embeddings(model.embed_cached(cached), model.prompt_embeddings([PROMPT] * 4)))
    torch.testing.assert_close(direct, via_cache)
    # a blurred image keeps much of its embedding but moves its statistics
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    assert not torch.allclose(clip.encode_images_with_statistics(blurred)[1], stats, atol=1e-3)
    with pytest.raises(PrefalignError, match="bare embedding"):
        model.features_from_embeddings(clip.encode_images(images), model.prompt_embeddings([PROMPT] * 4))
    with pytest.raises(PrefalignError, match="fix_rate 1"):
        RewardModel(tiny_config(image_statistics=True, fix_rate=0.7), clip=tiny_clip())
    model.set_confidence(torch.randn(40, 16))
    model.save_pretrained(tmp_path / "rm")
    torch.testing.assert_close(RewardModel.from_pretrained(tmp_path / "rm").score(images, [PROMPT] * 4), direct)


def test_inpainting_reward_model_takes_the_masked_prompt_image():
    model = RewardModel(tiny_config(inpainting=True), clip=tiny_clip()).eval()
    images, masked = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    reward = model.score(images, ["", ""], masked_images=masked, masks=torch.ones(2, 1, 16, 16))
    reward.sum().backward()
    assert masked.grad.abs().sum() > 0
    with pytest.raises(PrefalignError, match="masked_images"):
        model.score(images, ["", ""])


def test_load_scorer_resolves_every_spec_kind(tmp_path):
    annotator = load_scorer("annotator")
    assert isinstance(annotator, AnnotatorScorer) and annotator.persona == "balanced" and not annotator.differentiable
    literal = load_scorer("annotator:literal")
    assert literal.persona == "literal"
    images = render(sample_scenes(2, 0), seed=0, size=16).images
    prompts = [s.prompt for s in sample_scenes(2, 0)]
    assert torch.allclose(literal.score(images, prompts), Annotator("literal").score(images, prompts))
    custom = load_scorer("test_rewards:mean_brightness")
    assert isinstance(custom, CallableScorer)
    assert torch.allclose(custom(images, prompts), images.mean((1, 2, 3)))
    assert custom(images, prompts, masked_images=torch.zeros_like(images)).shape == (2,)  # conditions it does not declare are not passed
    # a callable that declares masked_images gets it; one returning the wrong shape is a clear error
    inpaint = load_scorer("test_rewards:masked_difference")
    assert torch.allclose(inpaint(images, prompts, masked_images=images * 0.5), 0.5 * images.mean((1, 2, 3)))
    with pytest.raises(PrefalignError, match="one score per image"):
        load_scorer("test_rewards:wrong_shape")(images, prompts)
    # only reward models have the confidence bound
    assert not annotator.has_confidence and annotator.features(images, prompts) is None
    with pytest.raises(PrefalignError, match="no confidence bound"):
        annotator.score_with_confidence(images, prompts)
    assert torch.allclose(annotator.score_batched(images, prompts, batch_size=1), annotator(images, prompts))
    with pytest.raises(PrefalignError, match="unknown annotator persona"):
        load_scorer("annotator:grumpy")
    with pytest.raises(PrefalignError, match="cannot import module"):
        load_scorer("no_such_module_xyz:f")
    with pytest.raises(PrefalignError, match="no attribute"):
        load_scorer("test_rewards:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrefalignError, match="not a reward model folder"):
        load_scorer(str(tmp_path / "empty"))
    with pytest.raises(PrefalignError, match="unknown scorer"):
        load_scorer("definitely-not-a-scorer")


# ---- training and evaluation -------------------------------------------------------------------


def _world_pairs_dataset(folder, count: int, seed: int = 0):
    """Clean vs defective renders labelled by the annotator (Bradley–Terry with ties), train + test."""
    scenes = sample_scenes(count, seed)
    prompts = [s.prompt for s in scenes]
    generator = torch.Generator().manual_seed(seed)
    defects = [DEFECTS[int(i)] for i in torch.randint(0, len(DEFECTS), (count,), generator=generator)]
    clean = render(scenes, seed=seed, size=16).images
    defective = render(scenes, seed=seed + 1, size=16, defects=defects).images
    swap = torch.rand(count, generator=generator) < 0.5
    a = torch.where(swap[:, None, None, None], defective, clean)
    b = torch.where(swap[:, None, None, None], clean, defective)
    labels = Annotator().label_pairs(a, b, prompts, seed=seed)
    for split, rows in (("train", range(0, count - count // 4)), ("test", range(count - count // 4, count))):
        writer = ShardWriter(folder, split, PAIRWISE_SCHEMA, 1000)
        writer.write_many(pair_record(prompts[i], a[i], b[i], float(labels[i])) for i in rows)
        writer.close()
    write_meta(folder, {"kind": "pairwise", "origin": {"scorer": "annotator"}})


def test_pairwise_training_learns_and_evaluation_reports_the_ceiling(tmp_path):
    _world_pairs_dataset(tmp_path / "data", 96)
    clip_dir = tiny_clip().save_pretrained(tmp_path / "clip")
    config = RewardTrainConfig(epochs=12, batch_size=32, learning_rate=2e-3, warmup_steps=5, model=tiny_config(encoder=str(clip_dir)), tensorboard=False)
    model, summary = train_reward_model(tmp_path / "data", tmp_path / "rm", config, progress=False)
    assert summary["train_records"] + summary["validation_records"] == 72
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert int(model.ridge_count) == 2 * summary["train_records"]
    assert (tmp_path / "rm" / "confidence.safetensors").is_file() and (tmp_path / "rm" / "encoder" / "clip.json").is_file()
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    result = evaluate_reward_model(loaded, tmp_path / "data", plot=tmp_path / "fig2.png", progress=False)
    assert result["split"] == "test" and result["records"] == 24
    assert 0.5 < result["ceiling_accuracy"] <= 1.0  # clean beats defective most of the time
    assert 0 <= result["accuracy"] <= 1 and result["accuracy_over_ceiling"] == pytest.approx(result["accuracy"] / result["ceiling_accuracy"])
    assert -1 <= result["spearman_with_annotator"] <= 1
    assert 0 <= result["bound"]["share_under_line"] <= 1 and (tmp_path / "fig2.png").stat().st_size > 1000
    # partly unfrozen encoder (fix_rate 0.7): the trainable blocks change, the frozen ones do not
    config = config.model_copy(update={"epochs": 2, "model": config.model.model_copy(update={"fix_rate": 0.7})})
    tuned, _ = train_reward_model(tmp_path / "data", tmp_path / "rm-tuned", config, progress=False)
    reference = tiny_clip()
    assert tuned.frozen_blocks == 5
    assert torch.equal(tuned.clip.blocks[0].weight, reference.blocks[0].weight)
    assert not torch.equal(tuned.clip.projection.weight, reference.projection.weight)
    assert torch.equal(RewardModel.from_pretrained(tmp_path / "rm-tuned").clip.projection.weight, tuned.clip.projection.weight)


def test_pointwise_training_on_an_inpainting_dataset(tmp_path):
    scenes = sample_scenes(16, 3)
    images = render(scenes, seed=3, size=16, defects=[None, "blur"] * 8).images
    masks = torch.zeros(16, 1, 16, 16)
    masks[:, :, :, :5] = 1
    rows = point_records(list(images), Annotator().rate(images, [s.prompt for s in scenes]).tolist(), [str(i // 2) for i in range(16)], [""] * 16, list(images * (1 - masks)), list(masks), ["outpaint"] * 16)
    writer = ShardWriter(tmp_path / "data", "train", POINTWISE_SCHEMA, 100)
    writer.write_many(rows)
    writer.close()
    write_meta(tmp_path / "data", {"kind": "pointwise", "inpainting": True})
    config = RewardTrainConfig(objective="pointwise", epochs=2, batch_size=8, model=tiny_config(encoder=str(tiny_clip().save_pretrained(tmp_path / "clip"))), tensorboard=False)
    model, summary = train_reward_model(tmp_path / "data", tmp_path / "rm", config, progress=False)
    assert model.config.inpainting and model.token_kinds == ["image", "prompt", "masked_image"]
    assert summary["score_normalisation"]["std"] > 0
    with pytest.raises(PrefalignError, match="pointwise"):
        train_reward_model(tmp_path / "pairs-missing", tmp_path / "x", config, progress=False)


def test_bound_analysis_and_the_upper_line():
    generator = torch.Generator().manual_seed(0)
    bound = torch.rand(2000, generator=generator)
    truth = torch.rand(2000, generator=generator)
    error = 0.05 * torch.randn(2000, generator=generator).abs() * bound  # error grows with the bound
    rewards = 2 * (truth + error * torch.where(torch.rand(2000, generator=generator) < 0.5, -1.0, 1.0)) + 3
    result = bound_analysis(rewards, truth, bound)
    assert result["calibration"]["slope"] == pytest.approx(0.5, abs=0.05)
    assert result["error_bound_spearman"] > 0.5
    assert 0.9 < result["share_under_line"] < 0.99 and result["upper_line"]["slope"] > 0
    # β_δ of error ≤ β_δ·b: error/b = 0.05·|N(0, 1)|, whose 0.95 quantile is 0.05·1.96
    assert result["beta_delta"] == pytest.approx(0.05 * 1.96, rel=0.15) and 0.9 < result["share_under_beta_delta_bound"] < 0.99
    # an upper bound never falls with the bound: data with a falling trend get a flat line
    falling = quantile_line(np.linspace(0, 1, 500), 2 - np.linspace(0, 1, 500))
    assert falling[1] == 0 and falling[0] == pytest.approx(np.quantile(2 - np.linspace(0, 1, 500), 0.95))
    # within-prompt ρ ignores offsets between prompts (which pairwise training cannot identify)
    from prefalign.rewards.training import within_group_spearman

    values, truth_ = torch.tensor([1.0, 2, 3, 10, 11, 12, 0]), torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 5])
    assert within_group_spearman(values, truth_, ["a"] * 3 + ["b"] * 3 + ["c"]) == pytest.approx(0.0)  # (1 + (−1)) / 2; "c" too small
    a, c = quantile_line(np.linspace(0, 1, 1000), np.linspace(0, 1, 1000) * 2 + 1)
    assert (a, c) == (pytest.approx(1, abs=0.02), pytest.approx(2, abs=0.05))


def test_reward_commands(tmp_path):
    from prefalign.commands import reward

    _world_pairs_dataset(tmp_path / "data", 48, seed=1)
    clip_dir = tiny_clip().save_pretrained(tmp_path / "clip")
    app = typer.Typer()
    app.add_typer(reward.app, name="reward")
    runner = CliRunner()
    args = ["reward", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "rm"), "--encoder", str(clip_dir), "--epochs", "2", "--json", "--image-statistics"]
    args += ["--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.feature_dim=16", "--set", "model.mlp_dims=[32]", "--set", "tensorboard=false"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["objective"] == "pairwise" and "accuracy" in summary["test"]
    saved = json.loads((tmp_path / "rm" / "reward_model.json").read_text())["config"]
    assert saved["feature_dim"] == 16 and saved["image_statistics"] is True
    assert "Evaluation" in (tmp_path / "rm" / "README.md").read_text()
    result = runner.invoke(app, ["reward", "eval", str(tmp_path / "rm"), "--data", str(tmp_path / "data"), "--json", "--plot", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    assert {"accuracy", "ceiling_accuracy", "spearman_with_annotator", "bound"} <= set(metrics) and (tmp_path / "f.png").is_file()
    assert len(load_pairwise(tmp_path / "data", split="test")) == 12


def test_prefs_make_then_reward_train_then_reward_eval(tmp_path):
    """The user's path end to end: sample a model, label with the annotator, train, evaluate."""
    from prefalign.commands import prefs, reward
    from test_data import _tiny_shapes_model

    app = typer.Typer()
    app.add_typer(prefs.app, name="prefs")
    app.add_typer(reward.app, name="reward")
    runner = CliRunner()
    model = _tiny_shapes_model(tmp_path / "t2i")
    clip_dir = tiny_clip().save_pretrained(tmp_path / "clip")
    steps = [
        ["prefs", "make", "--prompts", "8", "--per-prompt", "3", "--model", str(model), "--steps", "2", "--test-fraction", "0.25", "--scorer", "annotator:literal", "--out", str(tmp_path / "data")],
        ["reward", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "rm"), "--encoder", str(clip_dir), "--epochs", "2", "--no-evaluate",
         "--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.feature_dim=16", "--set", "model.mlp_dims=[32]", "--set", "tensorboard=false"],
        ["reward", "eval", str(tmp_path / "rm"), "--data", str(tmp_path / "data"), "--json", "--record"],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    assert metrics["split"] == "test" and metrics["labeller"] == "annotator:literal" and metrics["records"] == 2 * 3
    assert (tmp_path / "rm" / "error_vs_bound-data.png").is_file() and "Evaluation" in (tmp_path / "rm" / "README.md").read_text()
