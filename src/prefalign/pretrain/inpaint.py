"""``prefalign pretrain inpaint``: the shapes world's inpainting model (DESIGN.md "Inpainting").

Made as SD-inpainting was made from SD: start from the text-to-image model (``init_from``, default
the shipped ``shapes-t2i``), copy every weight, and widen the first convolution from 3 to 7 input
channels — [x_t, mask, masked image] — with the 4 new input channels' kernels **zero-initialised**
(:func:`widen_conv_in`), so at step 0 the model is exactly the text-to-image model; then fine-tune
on the world's data mix with masks of both kinds (PrefPaint's outpainting bands and view-warping
holes, :mod:`prefalign.worlds.shapes.masks`).

Data of step s: the text-to-image batch of :func:`prefalign.pretrain.t2i.training_batch` (clean and
defective renders, styles, ``empty_prompt_probability`` empty prompts — 0.5 here, so the model works
with a caption and with PrefPaint's image-only prompt), then per image a mask kind (``outpaint`` with
probability ``outpaint_share``, else ``warp``; or only the kind of ``mask_kinds``) and masks drawn
with a seed from the step's generator. Loss: the network's native target (v or ε, as the init
model) on the whole image — the known region is cheap to predict since it is an input.

The noise schedule (and prediction type) is the init model's; so are the image size and block
widths. Everything else — EMA, warm-up + cosine learning rate, atomic checkpoints, bit-identical
resume — is the loop of ``pretrain t2i`` (:func:`prefalign.pretrain.t2i.run_pretraining`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from prefalign.backbones.base import Conditioning
from prefalign.backbones.shapes import ShapesBackbone, load_shapes_backbone
from prefalign.errors import PrefalignError
from prefalign.pretrain.t2i import METRICS_END, METRICS_START, PretrainT2IConfig, run_pretraining, training_batch
from prefalign.worlds.shapes.masks import make_masks

#: Extra input channels of an inpainting model: mask (1) + masked image (3).
INPAINT_EXTRA_CHANNELS = 4


class PretrainInpaintConfig(PretrainT2IConfig):
    """Settings of ``prefalign pretrain inpaint`` (defaults = the shipped model). Fields shared
    with ``pretrain t2i`` mean the same; ``image_size``/``block_out_channels`` must match the init
    model, whose noise schedule and prediction type are kept."""

    init_from: str = Field("shapes-t2i", description="the text-to-image model to widen (shipped name or folder), or an inpainting model to continue")
    steps: int = Field(1000, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    empty_prompt_probability: float = Field(0.5, ge=0, le=1, description="share of captions replaced by '' (PrefPaint's prompts are images only)")
    mask_kinds: Literal["both", "outpaint", "warp"] = Field("both", description="mask kinds in the training data")
    outpaint_share: float = Field(0.5, ge=0, le=1, description="with mask_kinds=both: share of outpainting masks")
    prediction_type: Literal["v_prediction", "epsilon"] | None = Field(None, description="ignored: the init model's prediction type is kept")


def widen_conv_in(unet: torch.nn.Module, extra_channels: int = INPAINT_EXTRA_CHANNELS) -> torch.nn.Module:
    """A copy of ``unet`` with ``extra_channels`` more input channels whose ``conv_in`` kernels are
    zero: for any extra input the output equals the original UNet's on the first channels."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = int(config["in_channels"]) + extra_channels
    wide = UNet2DConditionModel.from_config(config)
    state = dict(unet.state_dict())
    weight = state["conv_in.weight"]  # [out, in, k, k]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra_channels, *weight.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide


def initial_inpaint_backbone(config: PretrainInpaintConfig) -> ShapesBackbone:
    """The step-0 model: ``init_from`` widened to 7 input channels (or continued as is when it
    already is an inpainting model), kind ``shapes-inpaint``."""
    source = load_shapes_backbone(config.init_from)
    if source.image_size != config.image_size:
        raise PrefalignError(f"init_from={config.init_from!r} works at {source.image_size}px but image_size={config.image_size}; set image_size={source.image_size}")
    widths = list(source.unet.config.block_out_channels)
    if widths != list(config.block_out_channels):
        raise PrefalignError(f"init_from={config.init_from!r} has block_out_channels={widths}; set block_out_channels to match")
    unet = source.unet if source.is_inpainting else widen_conv_in(source.unet)
    model_config = {"pretrain": config.model_dump(), "init_from": str(config.init_from)}
    return ShapesBackbone(unet.train(), source.scheduler_config, source.image_size, "shapes-inpaint", source.max_tokens, model_config)


def inpaint_training_batch(step: int, config: PretrainInpaintConfig) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str], torch.Generator]:
    """(images [B, 3, S, S], masks [B, 1, S, S], prompts, mask kinds, generator) of ``step``;
    deterministic in (seed, step). The images and prompts are those of the text-to-image batch."""
    images, prompts, generator = training_batch(step, config)
    draws = torch.rand(config.batch_size, generator=generator)
    mask_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    if config.mask_kinds == "both":
        kinds = ["outpaint" if float(d) < config.outpaint_share else "warp" for d in draws]
    else:
        kinds = [config.mask_kinds] * config.batch_size
    masks = torch.zeros(config.batch_size, 1, *images.shape[-2:])
    for offset, kind in enumerate(("outpaint", "warp")):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            masks[rows] = make_masks(kind, images[rows], seed=mask_seed + offset)
    return images, masks, prompts, kinds, generator


def pretrain_inpaint(config: PretrainInpaintConfig, run_dir: str | Path, resume: bool = True, progress: bool = True) -> ShapesBackbone:
    """Train; returns the backbone holding the EMA weights (also saved to ``run_dir/model``)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    backbone = initial_inpaint_backbone(config)

    def batch(step: int) -> tuple[torch.Tensor, Conditioning, torch.Generator]:
        images, masks, prompts, _, generator = inpaint_training_batch(step, config)
        cond = backbone.inpaint_conditioning(backbone.encode_prompts(prompts), images, masks)
        return backbone.images_to_latents(images), cond, generator

    return run_pretraining(config, Path(run_dir), backbone, batch, lambda summary: model_card(config, backbone, summary), "pretrain inpaint", resume, progress)


def model_card(config: PretrainInpaintConfig, backbone: ShapesBackbone, summary: dict) -> str:
    """The card written next to the weights; ``benchmarks/inpaint_model.py --update-card`` fills in
    the metrics section."""
    defaults = PretrainInpaintConfig()
    changed = {k: v for k, v in config.model_dump().items() if v != getattr(defaults, k) and k != "threads"}
    overrides = "".join(f" --set {k}={v}" for k, v in changed.items())
    prediction = backbone.schedule.prediction_type.replace("_prediction", "-prediction").replace("epsilon", "ε-prediction")
    kinds = "outpainting bands and warping holes" if config.mask_kinds == "both" else f"{config.mask_kinds} masks only"
    return f"""# shapes-inpaint — the shapes world's inpainting model

A pixel-space diffusers `UNet2DConditionModel` ({config.image_size}×{config.image_size} RGB, block widths
{list(config.block_out_channels)}) with **7 input channels**: noisy image, mask (1 = repaint) and masked
image (the hole set to 0 in [-1, 1]) — the layout of SD-inpainting's 9 latent channels. Conditioned on
all-MiniLM-L6-v2 token states like shapes-t2i; {prediction}, the noise schedule of `{config.init_from}`.
Works with a caption or with the empty prompt (PrefPaint's image-only prompts).

## How it was made

    prefalign pretrain inpaint --out runs/pretrain-inpaint{overrides}

- Initialised from `{config.init_from}`: every weight copied, `conv_in` widened from 3 to 7 input
  channels with the 4 new channels' kernels set to zero (as SD-inpainting was made from SD), so
  training starts from the text-to-image model.
- Data: the world's pretraining mix ({config.defect_probability:.0%} defective renders, {config.style_probability:.0%} styled,
  {config.empty_prompt_probability:.0%} empty prompts) with {kinds}
  ({config.outpaint_share:.0%} outpainting when both).
- Optimisation: {config.steps} steps × batch {config.batch_size}, AdamW (lr {config.learning_rate:g}, weight decay
  {config.weight_decay:g}), {config.warmup_steps} warm-up steps then cosine decay to {config.min_lr_ratio:g}× the peak,
  gradient clipping {config.grad_clip:g}, EMA decay {config.ema_decay:g} (the EMA weights are shipped). Seed {config.seed}.
- Final training loss: {summary["final_loss"]:.4f}. Wall time: {summary["wall_time_s"] / 60:.1f} min on 2 CPU cores
  (shared with other work), torch {torch.__version__}.

Sampling keeps the known region: the completion is composited into the masked prompt image
(`prefalign.inpainting.inpaint`).

## Metrics

{METRICS_START}
(not measured yet: run `python benchmarks/inpaint_model.py --update-card`)
{METRICS_END}
"""
