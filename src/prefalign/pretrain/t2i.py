"""``prefalign pretrain t2i``: train the shapes world's text-to-image model from scratch.

Data: every step renders a fresh batch from the world's *training* split (held-out colour–shape
combinations never appear): ``defect_probability`` of the renders carry one uniformly chosen quality
defect (so the model, like a web-trained one, samples both clean and defective images),
``style_probability`` carry a style suffix, and ``empty_prompt_probability`` of the prompts are
replaced by "" so the model supports classifier-free guidance. Loss: MSE of the network output
against its target at t ~ U{0..T-1} — v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 by default, or ε (the DDPM
objective) with ``prediction_type="epsilon"``.

Why v by default: the cosine schedule reaches ᾱ_T ≈ 2e-9 (zero terminal SNR), where an ε-model's
x̂_0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ is undetermined, so the first DDIM steps — which fix the image's
low-frequency content (background colour, where the shape sits) — rest on amplified noise. An
ε-model trained 4400 steps reached only chance background accuracy (0.28) and 0.47 position
accuracy; a v-model predicts x̂_0 ≈ −v directly at T (Lin et al. 2024, "Common diffusion noise
schedules and sample steps are flawed"; Salimans & Ho 2022).

``init_from`` starts from an existing model's weights (e.g. fine-tune an ε-model into a v-model:
the network changes behaviour only where ᾱ_t is small, so this converges much faster than from
scratch). AdamW, linear warm-up then cosine decay, gradient clipping, EMA of the weights
(the EMA is what gets shipped).

Resumable: checkpoints (atomic) every ``checkpoint_every`` steps; ``resume=True`` continues from the
latest one and reaches bit-identical weights on CPU, because each step's data, noise and timesteps
are drawn from a generator seeded by (seed, step).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from prefalign.backbones.base import Conditioning
from prefalign.diffusion.schedule import v_target
from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
from prefalign.training.checkpoint import latest_checkpoint, load_checkpoint, optimizer_state_from_tensors, optimizer_state_to_tensors, save_checkpoint
from prefalign.worlds.shapes.prompts import sample_scenes
from prefalign.worlds.shapes.render import DEFECTS, render


class PretrainT2IConfig(BaseModel):
    """Settings of ``prefalign pretrain t2i`` (defaults = the shipped model)."""

    image_size: int = Field(32, ge=8, description="image side in pixels")
    block_out_channels: tuple[int, int, int] = (32, 64, 64)
    steps: int = Field(2400, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(6e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor, as a fraction of the peak")
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = Field(0.998, ge=0, lt=1)
    defect_probability: float = Field(0.5, ge=0, le=1)
    style_probability: float = Field(0.15, ge=0, le=1)
    empty_prompt_probability: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    prediction_type: Literal["v_prediction", "epsilon"] = Field("v_prediction", description="what the UNet predicts")
    init_from: str | None = Field(None, description="start from this model's UNet weights (a folder or shipped name)")


def shapes_scheduler_config(prediction_type: str) -> dict:
    """The sampler settings written with a shapes model: x̂_0 clipping (``clip_sample``) on for
    ε-models, off for v-models. An ε-model's x̂_0 at ᾱ_t ≈ 0 is amplified noise and must be clipped;
    a v-model's x̂_0 is well-behaved, and clipping it under CFG pushes the clipped excess into the
    re-derived ε at every step, which drags 50-step CFG-3 samples towards grey (measured: white
    backgrounds at 0.35 instead of 0.9 in [−1, 1], black at −0.1 instead of −0.9; 10 steps were
    unaffected)."""
    return {**DEFAULT_SCHEDULER_CONFIG, "prediction_type": prediction_type, "clip_sample": prediction_type == "epsilon"}


def lr_at(step: int, config: PretrainT2IConfig) -> float:
    """Linear warm-up, then cosine decay from the peak to ``min_lr_ratio`` × peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr_ratio
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def training_batch(step: int, config: PretrainT2IConfig) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """The batch of ``step``: images in [0, 1] and prompts; deterministic in (seed, step)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    scenes = sample_scenes(config.batch_size, seed, "train", config.style_probability)
    draws = torch.rand(config.batch_size, generator=generator)
    picks = torch.randint(0, len(DEFECTS), (config.batch_size,), generator=generator)
    defects = [DEFECTS[int(k)] if float(d) < config.defect_probability else None for d, k in zip(draws, picks)]
    images = render(scenes, size=config.image_size, defects=defects, generator=generator).images
    drop = torch.rand(config.batch_size, generator=generator) < config.empty_prompt_probability
    prompts = ["" if bool(d) else s.prompt for s, d in zip(scenes, drop)]
    return images, prompts, generator


def pretrain_t2i(config: PretrainT2IConfig, run_dir: Path, resume: bool = True, progress: bool = True) -> ShapesBackbone:
    """Train; returns the backbone holding the EMA weights (also saved to ``run_dir/model``)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    unet_config = shapes_unet_config(config.image_size, block_out_channels=config.block_out_channels)
    unet = new_shapes_unet(unet_config).train()
    if config.init_from:
        unet.load_state_dict(_init_weights(config.init_from, unet_config))
    scheduler_config = shapes_scheduler_config(config.prediction_type)
    backbone = ShapesBackbone(unet, scheduler_config, config.image_size, model_config={"pretrain": config.model_dump()})

    def batch(step: int) -> tuple[torch.Tensor, Conditioning, torch.Generator]:
        images, prompts, generator = training_batch(step, config)
        return backbone.images_to_latents(images), backbone.encode_prompts(prompts), generator

    return run_pretraining(config, Path(run_dir), backbone, batch, lambda summary: model_card(config, summary), "pretrain t2i", resume, progress)


def run_pretraining(
    config: PretrainT2IConfig,
    run_dir: Path,
    backbone: ShapesBackbone,
    batch: Callable[[int], tuple[torch.Tensor, Conditioning, torch.Generator]],
    card: Callable[[dict], str],
    description: str,
    resume: bool = True,
    progress: bool = True,
) -> ShapesBackbone:
    """The pretraining loop shared by the shapes models (``pretrain t2i``, ``pretrain inpaint``).

    ``batch(step)`` returns the step's clean latents x_0 [B, 3, S, S], their condition (text, and for
    inpainting the mask + masked-image channels) and the step's generator, from which the loop then
    draws t ~ U{0..T−1} [B] and ε [B, 3, S, S] (in that order). Loss: MSE of the UNet output against
    v or ε (``backbone.schedule.prediction_type``). AdamW with :func:`lr_at`, gradient clipping, EMA;
    atomic checkpoints every ``checkpoint_every`` steps; the EMA model is saved to ``run_dir/model``
    with the card ``card(summary)``. Resuming (``resume``) continues from the latest checkpoint and
    reaches bit-identical weights on CPU (every step's draws are seeded by (seed, step)).
    """
    from diffusers.training_utils import EMAModel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    unet = backbone.unet.train()
    schedule = backbone.schedule
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)

    start_step, elapsed_before = 0, 0.0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        tensors, state = load_checkpoint(checkpoint)
        unet.load_state_dict(tensors["unet"])
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"]))
        shadow = tensors["ema"]
        ema.shadow_params = [shadow[f"{i}"].clone() for i in range(len(ema.shadow_params))]
        ema.optimization_step = state["ema_optimization_step"]
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=description, disable=not progress)
    started = time.time()
    losses: list[float] = []
    for step in bar:
        x0, cond, generator = batch(step)
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, eps, t).float()
        target = v_target(x0, eps, schedule.alpha_bar(t)).float() if schedule.prediction_type == "v_prediction" else eps
        loss = torch.nn.functional.mse_loss(backbone.model_output(x_t, t, cond), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; lower the learning rate and resume")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            mean_loss = sum(losses[-config.log_every :]) / config.log_every
            writer.add_scalar("train/loss", mean_loss, step + 1)
            writer.add_scalar("train/grad_norm", float(grad_norm), step + 1)
            writer.add_scalar("train/lr", lr_at(step, config), step + 1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            opt_tensors, opt_state = optimizer_state_to_tensors(optimizer)
            save_checkpoint(
                run_dir,
                step + 1,
                {"unet": unet.state_dict(), "ema": {f"{i}": p for i, p in enumerate(ema.shadow_params)}, "optimizer": opt_tensors},
                {"optimizer": opt_state, "ema_optimization_step": ema.optimization_step, "elapsed_s": elapsed_before + time.time() - started},
            )
    writer.close()

    ema.copy_to(unet.parameters())
    unet.eval()
    elapsed = elapsed_before + time.time() - started
    backbone.model_config["pretrain"]["wall_time_s"] = round(elapsed, 1)
    summary = {"steps": config.steps, "wall_time_s": elapsed, "final_loss": losses[-1] if losses else None}
    backbone.save_pretrained(run_dir / "model", card=card(summary))
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return backbone


def _init_weights(source: str, unet_config: dict) -> dict:
    """UNet weights of the model ``source`` (folder or shipped name); its architecture must match."""
    from prefalign.backbones.shapes import load_shapes_backbone
    from prefalign.errors import PrefalignError

    unet = load_shapes_backbone(source).unet
    mismatched = [k for k in ("block_out_channels", "sample_size", "in_channels") if _as_list(unet.config[k]) != _as_list(unet_config[k])]
    if mismatched:
        raise PrefalignError(f"init_from={source!r} has a different architecture ({', '.join(mismatched)}); match image_size/block_out_channels")
    return unet.state_dict()


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


_PREDICTION_NAMES = {"v_prediction": "v-prediction", "epsilon": "ε-prediction"}

METRICS_START, METRICS_END = "<!-- metrics:start -->", "<!-- metrics:end -->"


def model_card(config: PretrainT2IConfig, summary: dict) -> str:
    """The model card written next to the weights; the metrics section is filled in by
    ``benchmarks/base_model.py --update-card``."""
    hours = summary["wall_time_s"] / 3600
    defaults = PretrainT2IConfig()
    changed = {k: v for k, v in config.model_dump().items() if v != getattr(defaults, k) and k != "threads"}
    overrides = "".join(f" --set {k}={v}" for k, v in changed.items())
    init_line = f"- Initialised from `{config.init_from}` (its weights; the optimiser and EMA start fresh).\n" if config.init_from else ""
    return f"""# shapes-t2i — the shapes world's text-to-image model

A pixel-space diffusers `UNet2DConditionModel` ({config.image_size}×{config.image_size} RGB, block widths
{list(config.block_out_channels)}, cross-attention at 1/2 and 1/4 resolution only) conditioned on
all-MiniLM-L6-v2 token states (24 tokens × 384). {_PREDICTION_NAMES[config.prediction_type]}, cosine (`squaredcos_cap_v2`) schedule
with 1000 steps, sampled with DDIM on the `trailing` grid.

## How it was made

    prefalign pretrain t2i --out runs/pretrain-t2i{overrides}

- Data: rendered on the fly from the world's training split (the 8 held-out colour–shape combinations
  never appear). {config.defect_probability:.0%} of renders carry one uniformly chosen quality defect,
  {config.style_probability:.0%} carry a style suffix, {config.empty_prompt_probability:.0%} of prompts
  are replaced by "" (for classifier-free guidance).
- Optimisation: {config.steps} steps × batch {config.batch_size} ({config.steps * config.batch_size:,} images),
  AdamW (lr {config.learning_rate:g}, weight decay {config.weight_decay:g}), {config.warmup_steps} warm-up
  steps then cosine decay to {config.min_lr_ratio:g}× the peak, gradient clipping {config.grad_clip:g},
  EMA decay {config.ema_decay:g} (the EMA weights are shipped). Seed {config.seed}.
{init_line}- Final training loss ({_PREDICTION_NAMES[config.prediction_type]} MSE): {summary["final_loss"]:.4f}. Wall time: {hours:.2f} h on 2 CPU cores
  (shared with other work), torch {torch.__version__}.

## Metrics

{METRICS_START}
(not measured yet: run `python benchmarks/base_model.py --update-card`)
{METRICS_END}
"""
