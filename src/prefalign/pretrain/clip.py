"""``prefalign pretrain clip``: train the world's CLIP image encoder against the frozen MiniLM
sentence space.

Data: every step renders a fresh batch from the world's *training* split (held-out colour–shape
combinations never appear, not even as negative text): ``style_probability`` of the scenes carry a
style, ``defect_probability`` of the renders one uniformly chosen quality defect. Like web alt-text,
the caption of a defective render *sometimes* names the defect (``defect_caption_probability``):
``"<prompt>, blurry"``. That keeps image quality visible in the embedding, which reward models read
(real CLIP features are quality-aware for the same reason).

Loss: symmetric InfoNCE (CLIP) with a learned temperature,

    logits_ij = exp(s) · ⟨f(x_i), g(c_j)⟩,   L = ½ [CE_rows(logits) + CE_cols(logits)]

where f is the image tower, g the frozen text tower and identical captions in a batch are not
negatives of each other. With ``hard_negatives`` each image's row also holds captions of its own
scene with one attribute changed (colour, shape, size, position, background, style; for a caption
naming a defect: the clean caption) — the same contrasts zero-shot classification
asks about.

AdamW, linear warm-up then cosine decay, gradient clipping; resumable from atomic checkpoints and
bit-identical on CPU (each step's data is drawn from a generator seeded by (seed, step)).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from prefalign.rewards.clip import ClipConfig, ShapesClip, attribute_options, zero_shot_report
from prefalign.training.checkpoint import latest_checkpoint, load_checkpoint, optimizer_state_from_tensors, optimizer_state_to_tensors, save_checkpoint
from prefalign.worlds.shapes.prompts import HELD_OUT_COMBINATIONS, Scene, sample_scenes
from prefalign.worlds.shapes.render import DEFECTS, render

# What an alt-text might say about each defect.
DEFECT_PHRASES: dict[str, str] = {
    "blur": "blurry",
    "noise": "noisy and grainy",
    "colour_shift": "with a colour cast",
    "wrong_size": "with the wrong size",
    "off_position": "misplaced",
    "cut_by_border": "cut off at the edge",
    "low_contrast": "washed out, low contrast",
    "blockiness": "blocky compression artifacts",
}
SWAP_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background", "style")


class PretrainClipConfig(BaseModel):
    """Settings of ``prefalign pretrain clip`` (defaults = the shipped ``shapes-clip``)."""

    image_size: int = Field(32, ge=8)
    channels: tuple[int, int, int, int] = (32, 64, 96, 128)
    head_channels: int = Field(64, ge=1)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=2)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_logit_scale: float = Field(4.6052, description="clamp of the learned log temperature (log 100, as CLIP)")
    style_probability: float = Field(0.3, ge=0, le=1)
    defect_probability: float = Field(0.5, ge=0, le=1)
    defect_caption_probability: float = Field(0.5, ge=0, le=1, description="share of defective renders whose caption names the defect")
    hard_negatives: bool = Field(True, description="add attribute-swapped captions of each image's own scene as negatives")
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(150, ge=1, description="zero-shot accuracy on clean renders every N steps (TensorBoard)")
    eval_renders: int = Field(512, ge=8, description="renders per attribute in the final zero-shot report")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    warm_text_cache: bool = Field(True, description="encode every training prompt once up front (fast batches afterwards)")

    def clip_config(self) -> ClipConfig:
        return ClipConfig(image_size=self.image_size, channels=self.channels, head_channels=self.head_channels)


def lr_at(step: int, config: PretrainClipConfig) -> float:
    """Linear warm-up, then cosine decay from the peak to ``min_lr_ratio`` × peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr_ratio
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    same_caption: torch.Tensor | None = None,
    hard_negative_embeddings: torch.Tensor | None = None,
    hard_negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3), optionally with per-image hard
    negatives on the image→text side.

    image_embeddings, text_embeddings: [B, D], L2-normalised; pair i is (image i, caption i).
    logit_scale: scalar s, logits = exp(s)·cos.  same_caption: [B, B] bool, True where captions i
    and j are identical (those j ≠ i are not negatives).  hard_negative_embeddings: [B, K, D];
    hard_negative_mask: [B, K] bool, True = use.
    """
    scale = logit_scale.exp()
    logits = scale * image_embeddings @ text_embeddings.T  # [B, B]
    batch = logits.shape[0]
    if same_caption is not None:
        off_diagonal = same_caption & ~torch.eye(batch, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off_diagonal, float("-inf"))
    targets = torch.arange(batch, device=logits.device)
    text_to_image = F.cross_entropy(logits.T, targets)
    if hard_negative_embeddings is not None:
        hard = scale * torch.einsum("bd,bkd->bk", image_embeddings, hard_negative_embeddings)  # [B, K]
        if hard_negative_mask is not None:
            hard = hard.masked_fill(~hard_negative_mask, float("-inf"))
        logits = torch.cat([logits, hard], 1)  # [B, B + K]
    image_to_text = F.cross_entropy(logits, targets)
    return 0.5 * (image_to_text + text_to_image)


def _swap(scene: Scene, attribute: str, generator: torch.Generator) -> Scene | None:
    """``scene`` with ``attribute`` changed to another allowed value (never a held-out combination)."""
    options = [v for v in attribute_options(attribute) if v != getattr(scene, attribute)]
    allowed = [v for v in options if ((v if attribute == "colour" else scene.colour), (v if attribute == "shape" else scene.shape)) not in HELD_OUT_COMBINATIONS]
    if not allowed:
        return None
    return replace(scene, **{attribute: allowed[int(torch.randint(0, len(allowed), (1,), generator=generator))]})


def caption(scene: Scene, defect: str | None) -> str:
    return scene.prompt if defect is None else f"{scene.prompt}, {DEFECT_PHRASES[defect]}"


def clip_training_batch(step: int, config: PretrainClipConfig) -> tuple[torch.Tensor, list[str], list[list[str | None]]]:
    """Images [B, 3, S, S], captions [B] and hard-negative captions [B][K] (None = unused) of
    ``step``; deterministic in (seed, step)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 7)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    scenes = sample_scenes(config.batch_size, seed, "train", config.style_probability)
    draws = torch.rand(config.batch_size, generator=generator)
    picks = torch.randint(0, len(DEFECTS), (config.batch_size,), generator=generator)
    defects = [DEFECTS[int(k)] if float(d) < config.defect_probability else None for d, k in zip(draws, picks)]
    images = render(scenes, size=config.image_size, defects=defects, generator=generator).images
    named = torch.rand(config.batch_size, generator=generator) < config.defect_caption_probability
    captions, negatives = [], []
    for scene, defect, name in zip(scenes, defects, named.tolist()):
        shown = defect if (defect is not None and name) else None
        captions.append(caption(scene, shown))
        if not config.hard_negatives:
            negatives.append([])
        elif shown is None:
            swaps = [_swap(scene, a, generator) for a in SWAP_ATTRIBUTES]
            negatives.append([s.prompt if s is not None else None for s in swaps])
        else:
            negatives.append([scene.prompt] + [None] * (len(SWAP_ATTRIBUTES) - 1))
    return images, captions, negatives


def clip_step_loss(model: ShapesClip, images: torch.Tensor, captions: list[str], negatives: list[list[str | None]]) -> torch.Tensor:
    """The contrastive loss of one batch (text embeddings from the frozen, cached text tower)."""
    image_embeddings = model.encode_images(images)
    text_embeddings = model.encode_text(captions)
    same = torch.tensor([[a == b for b in captions] for a in captions])
    hard, mask = None, None
    width = max((len(n) for n in negatives), default=0)
    if width:
        flat = [n if n is not None else captions[i] for i, row in enumerate(negatives) for n in row]
        hard = model.encode_text(flat).view(len(captions), width, -1)
        mask = torch.tensor([[n is not None for n in row] for row in negatives])
    return contrastive_loss(image_embeddings, text_embeddings, model.logit_scale, same, hard, mask)


@torch.no_grad()
def defect_zero_shot_accuracy(model: ShapesClip, count: int = 256, seed: int = 4242) -> float:
    """Zero-shot defect recognition: for a render with one defect, is its captioned defect the
    nearest among the clean caption and the 8 defect captions? (reported, no bar)"""
    scenes = sample_scenes(count, seed, "train")
    generator = torch.Generator().manual_seed(seed)
    defects = [DEFECTS[int(i)] for i in torch.randint(0, len(DEFECTS), (count,), generator=generator)]
    images = render(scenes, seed=seed, size=model.config.image_size, defects=defects).images
    options = [None, *DEFECTS]
    embeddings = model.encode_images(images)
    text = model.encode_text([caption(s, d) for s in scenes for d in options]).view(count, len(options), -1)
    predicted = torch.einsum("bd,bkd->bk", embeddings, text).argmax(1)
    truth = torch.tensor([options.index(d) for d in defects])
    return float((predicted == truth).float().mean())


def clip_report(model: ShapesClip, count: int = 512) -> dict:
    """Zero-shot accuracies on held-in and held-out-combination clean renders, and defect
    recognition."""
    model.eval()
    report = {
        "held_in": zero_shot_report(model, count, seed=12345, split="train"),
        "held_out_combinations": zero_shot_report(model, count, seed=54321, split="held_out"),
        "defect_accuracy": defect_zero_shot_accuracy(model, min(count, 256)),
    }
    held_in = report["held_in"]
    report["bars"] = {
        "colour_accuracy>=0.90": held_in["colour_accuracy"] >= 0.90,
        "shape_accuracy>=0.90": held_in["shape_accuracy"] >= 0.90,
        "style_accuracy>=0.90": held_in["style_accuracy"] >= 0.90,
    }
    return report


def clip_card(config: PretrainClipConfig, report: dict, wall_time_s: float, parameters: int) -> str:
    """The README.md model card of a trained CLIP folder."""
    rows = []
    for attribute in ("colour", "shape", "size", "position", "background", "style"):
        key = f"{attribute}_accuracy"
        rows.append(f"| {attribute} | {report['held_in'][key]:.1%} | {report['held_out_combinations'][key]:.1%} |")
    bars = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in report["bars"].items())
    return "\n".join(
        [
            "# shapes-clip — the shapes world's CLIP image encoder",
            "",
            "A small convolutional image encoder (coordinate channels, 4 residual stages, flattened 1×1 head) "
            f"that maps 32×32 renders into the 384-d sentence space of the frozen text encoder "
            f"({ClipConfig().text_encoder}). Trained by `prefalign pretrain clip` (symmetric InfoNCE with "
            "attribute-swapped hard negatives) on fresh renders of the world's training split with styles "
            f"({config.style_probability:.0%}) and quality defects ({config.defect_probability:.0%}; "
            f"{config.defect_caption_probability:.0%} of their captions name the defect).",
            "",
            f"- parameters: {parameters:,}; steps: {config.steps} × batch {config.batch_size}; seed {config.seed}; "
            f"CPU wall time: {wall_time_s / 60:.1f} min",
            "- uses: features of reward models (PrefPaint §4), image embeddings for RPO, CLIP score, style metrics",
            "",
            "## Zero-shot accuracy",
            "",
            "Nearest prompt embedding among candidate prompts that differ only in the attribute; clean renders "
            f"({config.eval_renders} per split); style: renders uniform over plain + 3 styles.",
            "",
            "| attribute | held-in prompts | held-out colour–shape combinations |",
            "| --- | --- | --- |",
            *rows,
            "",
            f"Defect recognition (clean vs 8 defect captions, defective renders): {report['defect_accuracy']:.1%}.",
            "",
            f"Bars (held-in, ≥ 90 %): {bars}.",
            "",
        ]
    )


def warm_text_cache(model: ShapesClip, config: PretrainClipConfig, progress: bool = True) -> None:
    """Encode every training-split prompt (plain and styled) once, in large batches: afterwards
    only captions naming a defect are new to the text tower's cache."""
    from tqdm.auto import tqdm

    from prefalign.worlds.shapes.prompts import STYLES, all_scenes

    scenes = all_scenes("train") if config.style_probability < 1 else []
    styled = [s.with_style(style) for s in all_scenes("train") for style in STYLES] if config.style_probability > 0 else []
    prompts = [s.prompt for s in scenes + styled]
    for start in tqdm(range(0, len(prompts), 1024), desc="encoding prompts", disable=not progress):
        model.encode_text(prompts[start : start + 1024])


def pretrain_clip(config: PretrainClipConfig, run_dir: Path, resume: bool = True, progress: bool = True) -> ShapesClip:
    """Train; returns the model (also saved with its card to ``run_dir/model``)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))

    torch.manual_seed(config.seed)
    model = ShapesClip(config.clip_config()).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate
    )
    start_step, elapsed_before = 0, 0.0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        tensors, state = load_checkpoint(checkpoint)
        model.load_state_dict(tensors["clip"])
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"]))
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)

    if config.warm_text_cache:
        warm_text_cache(model, config, progress)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="pretrain clip", disable=not progress)
    started = time.time()
    losses: list[float] = []
    for step in bar:
        images, captions, negatives = clip_training_batch(step, config)
        loss = clip_step_loss(model, images, captions, negatives)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; lower the learning rate and resume")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=config.max_logit_scale)
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            mean_loss = sum(losses[-config.log_every :]) / config.log_every
            writer.add_scalar("train/loss", mean_loss, step + 1)
            writer.add_scalar("train/grad_norm", float(grad_norm), step + 1)
            writer.add_scalar("train/lr", lr_at(step, config), step + 1)
            writer.add_scalar("train/logit_scale", float(model.logit_scale.detach().exp()), step + 1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", T=f"{float(model.logit_scale.detach().exp()):.1f}")
        if (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            model.eval()
            quick = zero_shot_report(model, 128, seed=999, split="train")
            model.train()
            for key, value in quick.items():
                writer.add_scalar(f"zero_shot/{key}", value, step + 1)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            opt_tensors, opt_state = optimizer_state_to_tensors(optimizer)
            save_checkpoint(
                run_dir,
                step + 1,
                {"clip": model.state_dict(), "optimizer": opt_tensors},
                {"optimizer": opt_state, "elapsed_s": elapsed_before + time.time() - started},
            )
    writer.close()

    elapsed = elapsed_before + time.time() - started
    model.eval()
    report = clip_report(model, config.eval_renders)
    parameters = sum(p.numel() for p in model.parameters())
    model.metadata = {"name": "shapes-clip", "pretrain": {**config.model_dump(), "wall_time_s": round(elapsed, 1)}, "metrics": report}
    model.save_pretrained(run_dir / "model", card=clip_card(config, report, elapsed, parameters))
    summary = {"steps": config.steps, "wall_time_s": elapsed, "final_loss": losses[-1] if losses else None, "metrics": report}
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return model.requires_grad_(False)


__all__ = ["PretrainClipConfig", "pretrain_clip", "contrastive_loss", "clip_training_batch", "clip_report", "DEFECT_PHRASES"]
