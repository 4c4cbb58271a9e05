"""Diff-Instruct++ (METHODS.md §6): the IKL gradient and its sign, the TA loss, the one-step generator
at initialisation against diffusers' own x̂_0, runs through the trainer (shapes model and a tiny SD
pipeline), bit-identical resume, the NaN guard, the export and ``prefalign sample --steps 1``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from test_trainer import make_tiny_shapes_model
from tiny_pipelines import make_tiny_sd

from prefalign.backbones.loading import load_backbone
from prefalign.backbones.one_step import OneStepSpec, generator_x0
from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
from prefalign.cli import app
from prefalign.diffusion.schedule import NoiseSchedule, predicted_x0
from prefalign.errors import PrefalignError
from prefalign.methods.base import StepRandomness, randn_per_sample, replace_nonfinite_gradients_
from prefalign.methods.diff_instruct_pp import (
    DiffInstructPP,
    DiffInstructPPConfig,
    draw_prompts,
    generator_objective,
    ikl_gradient,
    ikl_surrogate,
    ikl_weight,
    sample_levels,
    ta_lambda,
    ta_loss,
)
from prefalign.training.checkpoint import load_checkpoint
from prefalign.training.config import FinetuneConfig, load_align_config
from prefalign.training.lora import prepare_finetuning
from prefalign.training.trainer import NonFiniteLossError, Trainer

runner = CliRunner()
PROMPT = "a small red circle in the centre on a white background"


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """A differentiable toy reward (mean brightness) for ``module:function`` specs."""
    return images.mean((1, 2, 3))


brightness.differentiable = True


def nan_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean((1, 2, 3)) * float("nan")


nan_reward.differentiable = True


from test_methods import LocalModels as _Models  # noqa: E402  (the single-process TrainingModels)


def _setup(backbone, mode: str = "lora", **options):
    switch = prepare_finetuning(backbone, FinetuneConfig(mode=mode, rank=4), needs_reference=True)
    method = DiffInstructPP(DiffInstructPPConfig(**options))
    models = _Models(backbone, switch)
    models.learning_rate = 1e-3
    method.setup(models)
    return method, models


def _policy_parameters(backbone):
    return [p for n, p in backbone.unet.named_parameters() if p.requires_grad and ".ta." not in n]


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("dipp") / "model")


def _tiny_shapes(prediction_type: str = "epsilon", seed: int = 0) -> ShapesBackbone:
    torch.manual_seed(seed)
    unet = new_shapes_unet(shapes_unet_config(16, block_out_channels=(8, 16, 16)))
    return ShapesBackbone(unet, {**DEFAULT_SCHEDULER_CONFIG, "prediction_type": prediction_type}, 16)


# --------------------------------------------------------------------------------------------------
# The equations on fixed tensors
# --------------------------------------------------------------------------------------------------


def test_generator_loss_gradient_wrt_x_t_is_the_weighted_score_difference():
    g = torch.Generator().manual_seed(0)
    x0, eps_ta, eps_cfg, noise = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(4))
    schedule = NoiseSchedule.from_config(DEFAULT_SCHEDULER_CONFIG)
    t = torch.tensor([30, 400, 900])
    alpha_bar = schedule.alpha_bar(t)
    x_t = schedule.add_noise(x0, noise, t).requires_grad_(True)
    x0_ref = predicted_x0(x_t.detach(), eps_cfg, alpha_bar)
    # w(t) by hand: DMD's σ/(ᾱ·m) with m = mean |x0 − x̂0_cfg|
    m = torch.stack([(x0[i] - x0_ref[i]).abs().mean() for i in range(3)])
    w = torch.stack([math.sqrt(1 - float(alpha_bar[i])) / float(alpha_bar[i]) / m[i] for i in range(3)])
    weight = ikl_weight(x0, x0_ref, alpha_bar, "dmd")
    assert torch.allclose(weight, w.float(), rtol=1e-5)
    assert torch.allclose(ikl_weight(x0, x0_ref, alpha_bar, "mean_abs"), 1 / m, rtol=1e-5)
    assert torch.equal(ikl_weight(x0, x0_ref, alpha_bar, "none"), torch.ones(3))

    loss = generator_objective(ikl_surrogate(x_t, ikl_gradient(eps_ta, eps_cfg, weight)), None, 0.0)
    (grad,) = torch.autograd.grad(loss, x_t)
    expected = w.float().view(3, 1, 1, 1) * (eps_cfg - eps_ta) / 3  # mean over the batch of 3
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7)
    # through x_t = √ᾱ x0 + σ ε the gradient on x0 is DMD's (x̂0_ψ − x̂0_cfg)/m (per sample, ×B)
    x0_leaf = x0.clone().requires_grad_(True)
    loss = generator_objective(ikl_surrogate(schedule.add_noise(x0_leaf, noise, t), ikl_gradient(eps_ta, eps_cfg, weight)), None, 0.0)
    (grad_x0,) = torch.autograd.grad(loss, x0_leaf)
    x0_ta = predicted_x0(x_t.detach(), eps_ta, alpha_bar)
    assert torch.allclose(grad_x0 * 3, (x0_ta - x0_ref) / m.view(3, 1, 1, 1), rtol=1e-4, atol=1e-6)
    # the reward term: −α_rew·mean r
    reward = torch.tensor([1.0, 2.0, 6.0])
    assert torch.isclose(generator_objective(torch.zeros(3), reward, 0.5), torch.tensor(-1.5))


def test_ikl_gradient_moves_a_gaussian_generator_onto_the_reference():
    """Every score is known for Gaussians: data N(μ, I), generator x0 = θ + z, so p_t = N(√ᾱ·μ, I) and
    ε(x_t) = σ_t·(x_t − √ᾱ_t·mean). Descending the surrogate must bring θ to μ — and the sign written in
    METHODS.md §6 (ε_ψ − ε_cfg) would push it away."""
    schedule = NoiseSchedule.from_config(DEFAULT_SCHEDULER_CONFIG)
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def run(sign: float, steps: int = 150) -> float:
        theta = torch.zeros(4, requires_grad=True)
        optimizer = torch.optim.SGD([theta], lr=0.5)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            z, eps = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
            t = torch.randint(20, 980, (64,), generator=g)
            alpha_bar = schedule.alpha_bar(t)
            a, s = alpha_bar.sqrt().float()[:, None], (1 - alpha_bar).sqrt().float()[:, None]
            x0 = theta + z
            x_t = a * x0 + s * eps
            with torch.no_grad():
                eps_cfg = s * (x_t - a * mu)
                eps_ta = s * (x_t - a * theta)
                weight = ikl_weight(x0.detach(), predicted_x0(x_t, eps_cfg, alpha_bar), alpha_bar, "dmd")
            loss = generator_objective(ikl_surrogate(x_t, sign * ikl_gradient(eps_ta, eps_cfg, weight)), None, 0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float((theta.detach() - mu).norm() / mu.norm())

    assert run(+1.0) < 0.05
    assert run(-1.0, steps=20) > 1.5  # the flipped sign ascends the KL


def test_ta_loss_weights():
    alpha_bar = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert torch.equal(ta_lambda(alpha_bar, "epsilon"), torch.ones(2))
    assert torch.allclose(ta_lambda(alpha_bar, "snr"), torch.tensor([1 / 3, 1.0]))
    pred, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert torch.isclose(ta_loss(pred, eps, torch.tensor([1.0, 3.0])), torch.tensor(8.0))  # mean(1·4, 3·4)


def test_nonfinite_gradients_are_replaced_as_the_reference():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
    replace_nonfinite_gradients_([p])
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]


# --------------------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_generator_at_init_is_the_reference_x0_at_t_star(prediction_type):
    """g(z, c) = diffusers' ``DDPMScheduler.step(...).pred_original_sample`` at t* from
    ``add_noise(0, z, t*)`` (the SiD-LSG generator), and after set-up (LoRA) the policy's generator
    equals the reference's."""
    from diffusers import DDPMScheduler

    backbone = _tiny_shapes(prediction_type)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 1.5
    cond = backbone.encode_prompts([PROMPT, "a large blue square in the top left on a beige background"])
    t_star = 625
    spec = OneStepSpec(t_star, clip_range=1.0)
    scheduler = DDPMScheduler.from_config({k: v for k, v in DEFAULT_SCHEDULER_CONFIG.items() if not k.startswith("_")} | {"prediction_type": prediction_type})
    with torch.no_grad():
        x = scheduler.add_noise(torch.zeros_like(z), z, torch.tensor([t_star]))
        expected = scheduler.step(backbone.model_output(x, t_star, cond), t_star, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        got = generator_x0(backbone, z, cond, spec)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.abs().max() <= 1.0 and not torch.allclose(got, generator_x0(backbone, z, cond, OneStepSpec(t_star)))  # the clamp acts

    method, models = _setup(backbone, generator_timestep=t_star)
    assert method.spec == OneStepSpec(t_star, 1.0, "diff_instruct_pp", 3.0) and backbone.one_step is method.spec
    with torch.no_grad():
        policy = generator_x0(backbone, z, cond, method.spec)
        with models.reference() as reference:
            base = generator_x0(reference, z, cond, method.spec)
    assert torch.equal(policy, base) and torch.allclose(policy, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ta_step_is_eps_mse_on_detached_generator_samples(mode):
    backbone = _tiny_shapes()
    method, models = _setup(backbone, mode=mode, ta_learning_rate=1e-2)
    rng = StepRandomness(seed=5, step=0, micro_step=0, positions=(0, 1, 2))
    # the loss by hand, with the same draws (the TA starts as the reference)
    prompts = draw_prompts(method.pool, rng.per_sample("ta0_prompt"))
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts)
        x0 = generator_x0(backbone, randn_per_sample(rng.per_sample("ta0_z"), (3, 16, 16)), cond, method.spec)
        t = sample_levels(rng.per_sample("ta0_t"), 20, 980)
        eps = randn_per_sample(rng.per_sample("ta0_eps"), (3, 16, 16))
        x_t = backbone.schedule.add_noise(x0, eps, t)
        with models.reference() as reference:
            expected = float((reference.predict_eps(x_t, t, cond) - eps).pow(2).flatten(1).sum(1).mean())
    policy = _policy_parameters(backbone)
    before_policy = [p.detach().clone() for p in policy]
    before_ta = [p.detach().clone() for p in method.ta.parameters]
    metrics = method.teaching_assistant_steps(rng, models)
    assert metrics["ta_loss"] == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is None for p in policy)  # no gradient reached the generator
    assert all(torch.equal(a, b) for a, b in zip(before_policy, policy))
    assert any(not torch.equal(a, p) for a, p in zip(before_ta, method.ta.parameters))  # the TA learned
    assert all(p.requires_grad for p in policy)  # adapter switching left the policy trainable


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_zero_ikl_gradient_without_reward_or_guidance_when_ta_is_reference(mode):
    backbone = _tiny_shapes()
    method, models = _setup(backbone, mode=mode, guidance_scale=1.0, alpha_rew=0.0)
    batch_rng = StepRandomness(seed=0, step=0, micro_step=1, positions=(0, 1))
    from prefalign.methods.base import PreferenceBatch

    batch = PreferenceBatch([], torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long), batch_rng)
    output = method.loss(batch, models)
    output.loss.backward()
    policy = _policy_parameters(backbone)
    assert float(output.metrics["score_gap"]) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in policy)
    # control: with guidance the teacher differs from the TA and the gradient does not vanish
    for p in policy:
        p.grad = None
    method.config.guidance_scale = 3.0
    method.loss(batch, models).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy)


# --------------------------------------------------------------------------------------------------
# Through the trainer
# --------------------------------------------------------------------------------------------------


def _config(model, steps: int = 2, **extra):
    values = {"logging.progress": False, "logging.every": 1, "logging.tensorboard": False, "eval.annotator": False, "checkpoint.every": 2, "optimizer.learning_rate": 1e-3}
    values.update(extra)
    return load_align_config(None, [f"{k}={v}" for k, v in values.items()], method="diff-instruct-pp", model=str(model), steps=steps, batch_size=2)


def test_shapes_two_steps_export_and_one_step_sampling_cli(shapes_model, tmp_path):
    run = tmp_path / "run"
    args = ["align", "diff-instruct-pp", "--model", str(shapes_model), "--steps", "2", "--batch-size", "2", "--reward", "test_diff_instruct_pp:brightness",
            "--alpha-rew", "0.5", "--cfg", "2", "--out", str(run), "--set", "logging.progress=false", "--set", "eval.annotator=false",
            "--set", "finetune.mode=full", "--set", "diff_instruct_pp.ta_steps=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["steps"] == 2 and all(math.isfinite(final[k]) for k in ("loss", "reward", "ta_loss")) and final["grad_norm"] > 0
    assert list((run / "tensorboard").rglob("events.out.tfevents*")) or list(run.rglob("events.out.tfevents*"))
    saved = load_align_config(run / "config.yaml")
    assert saved.method == "diff_instruct_pp" and saved.diff_instruct_pp.alpha_rew == 0.5 and saved.diff_instruct_pp.guidance_scale == 2.0
    assert saved.optimizer.betas == (0.0, 0.999) and saved.ema.enabled  # the method's trainer defaults

    export = run / "export"
    generator = load_backbone(export)
    assert generator.one_step == OneStepSpec(625, 1.0, "diff_instruct_pp", 2.0)
    calls = []
    handle = generator.unet.register_forward_hook(lambda *_: calls.append(1))
    from prefalign.sampling import generate, initial_noise

    images = generate(generator, [PROMPT] * 3, seed=7, steps=1, guidance_scale=3.0)
    handle.remove()
    assert len(calls) == 1  # one network call for the batch
    with torch.no_grad():
        x0 = generator_x0(generator, initial_noise(generator, 3, 7), generator.encode_prompts([PROMPT] * 3), generator.one_step)
    assert torch.allclose(images, generator.latents_to_images(x0), atol=1e-6)
    with pytest.raises(PrefalignError, match="--steps 1"):
        generate(generator, [PROMPT], steps=20)

    result = runner.invoke(app, ["sample", "--model", str(export), "--steps", "1", "--prompt", PROMPT, "--n", "2", "--out", str(tmp_path / "samples"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["images"] == 2 and summary["one_step_generator"]["timestep"] == 625
    result = runner.invoke(app, ["sample", "--model", str(export), "--prompt", PROMPT, "--out", str(tmp_path / "bad")])
    assert isinstance(result.exception, PrefalignError) and "--steps 1" in str(result.exception)


def test_resume_is_bit_identical(shapes_model, tmp_path):
    straight = Trainer(_config(shapes_model, steps=4), tmp_path / "straight").train()
    Trainer(_config(shapes_model, steps=2), tmp_path / "killed").train()
    resumed = Trainer(_config(shapes_model, steps=4), tmp_path / "killed").train(resume=True)
    assert straight.steps == resumed.steps == 4
    a, _ = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-00000004")
    b, _ = load_checkpoint(tmp_path / "killed" / "checkpoints" / "step-00000004")
    assert set(a) == set(b) >= {"trainable", "optimizer", "ema", "method_ta", "method_ta_optimizer"}
    for group in a:
        assert set(a[group]) == set(b[group]) and all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group
    first, _ = load_checkpoint(tmp_path / "killed" / "checkpoints" / "step-00000002")
    assert any(not torch.equal(first["method_ta"][k], a["method_ta"][k]) for k in a["method_ta"])  # the TA trained on


def test_nonfinite_loss_stops_clearly(shapes_model, tmp_path):
    config = _config(shapes_model, **{"diff_instruct_pp.reward": "test_diff_instruct_pp:nan_reward", "diff_instruct_pp.alpha_rew": 1.0})
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        Trainer(config, tmp_path / "run").train()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "stopped"
    with pytest.raises(PrefalignError, match="needs a reward"):
        Trainer(_config(shapes_model, **{"diff_instruct_pp.alpha_rew": 1.0}), tmp_path / "run2").train()


def test_tiny_sd_pipeline_two_steps_with_a_reward_through_the_vae(tmp_path):
    folder = make_tiny_sd(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe blue dog\na green tree\n")
    # the reward's gradient reaches the generator through the VAE decoder: with ω = 1 and TA = reference
    # the IKL gradient is zero, so every gradient below comes from the reward
    backbone = load_backbone(folder)
    method, models = _setup(backbone, guidance_scale=1.0, alpha_rew=1.0, reward="test_diff_instruct_pp:brightness", prompts=str(prompts))
    from prefalign.methods.base import PreferenceBatch

    batch = PreferenceBatch([], torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long), StepRandomness(0, 0, 1, (0, 1)))
    method.loss(batch, models).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in _policy_parameters(backbone))

    run = tmp_path / "run"
    config = _config(folder, **{"diff_instruct_pp.reward": "test_diff_instruct_pp:brightness", "diff_instruct_pp.alpha_rew": 0.1, "diff_instruct_pp.prompts": str(prompts)})
    result = Trainer(config, run).train()
    final = result.metrics["final"]
    assert result.steps == 2 and math.isfinite(final["loss"]) and math.isfinite(final["ta_loss"]) and final["grad_norm"] > 0
    export = load_backbone(run / "export")  # the whole pipeline, generator UNet merged, marked one-step
    assert export.one_step is not None and (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    from prefalign.sampling import generate

    images = generate(export, ["a red cat"], steps=1)
    assert images.shape == (1, 3, *export.resolution) and torch.isfinite(images).all()
