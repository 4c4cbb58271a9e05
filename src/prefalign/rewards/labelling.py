"""Make preference data: sample a model, label the samples with a scorer, write the dataset + card
(``prefalign prefs make``).

Pairwise (Pick-a-Pic v2 schema): ``per_prompt`` images per prompt (image i of the run uses seed
``seed + i``), paired either all-against-all (K(K−1)/2 pairs per prompt) or adjacently ((0, 1),
(2, 3), …). Labels:
- the annotator (``annotator[:persona]``) → its own Bradley–Terry draws with ties
  (``Annotator.label_pairs``: P(a ≻ b) = σ((s_a − s_b)/T_annotator), ties at its tie rate);
- any other scorer (a reward model folder, ``module:function``) → label_0 ~ Bernoulli(σ((s_a −
  s_b)/T)) with ``temperature`` T (default 1, the logit scale of a reward model), and ties with
  probability ``tie_rate`` (default 0).

Pointwise (PrefPaint shape): the ``per_prompt`` images of a prompt form a group; the score is the
annotator's 1–7 rating with rater noise (another scorer: its score). With an inpainting model the
group shares one masked prompt image (a clean render of the prompt with a mask of ``mask_kind``).

Prompts come from the world's grammar (``split`` train / held_out / all, optional styles) or from a
prompts file; a ``test_fraction`` of the prompts (never their images) goes to the ``test`` split.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from prefalign.data.pointwise import POINTWISE_SCHEMA, point_records
from prefalign.data.preference import PAIRWISE_SCHEMA, pair_record
from prefalign.data.storage import ShardWriter, prepare_output_folder, write_meta
from prefalign.errors import PrefalignError
from prefalign.rewards.base import AnnotatorScorer, Scorer, load_scorer


class MakePrefsConfig(BaseModel):
    """Settings of ``prefalign prefs make``."""

    format: Literal["pairwise", "pointwise"] = "pairwise"
    prompts: int = Field(64, ge=1, description="prompts drawn from the world's grammar (ignored with a prompts file)")
    per_prompt: int = Field(2, ge=1, description="images sampled per prompt")
    pairing: Literal["all", "adjacent"] = "all"
    scorer: str = "annotator"
    model: str = "shapes-t2i"
    seed: int = 0
    steps: int = Field(30, ge=1)
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    prompt_split: Literal["train", "held_out", "all"] = Field("train", description="world prompts: held-in, held-out combinations, or all")
    style_probability: float = Field(0.0, ge=0, le=1)
    test_fraction: float = Field(0.1, ge=0, le=1, description="share of prompts whose records go to the test split (1: an evaluation-only set)")
    temperature: float = Field(1.0, gt=0, description="Bradley–Terry temperature for non-annotator scorers")
    tie_rate: float = Field(0.0, ge=0, lt=1, description="tie probability for non-annotator scorers")
    mask_kind: Literal["outpaint", "warp", "both"] = "both"
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1000, ge=1)
    device: str = "cpu"


def world_prompts(count: int, seed: int, split: str, style_probability: float) -> list[str]:
    from prefalign.worlds.shapes.prompts import sample_prompts

    return sample_prompts(count, seed=seed, split=split, style_probability=style_probability)


def pair_indices(per_prompt: int, pairing: str) -> list[tuple[int, int]]:
    """Image index pairs within one prompt's ``per_prompt`` images."""
    if per_prompt < 2:
        raise PrefalignError("pairwise data needs --per-prompt of at least 2")
    if pairing == "all":
        return list(itertools.combinations(range(per_prompt), 2))
    if pairing == "adjacent":
        return [(i, i + 1) for i in range(0, per_prompt - 1, 2)]
    raise PrefalignError(f"unknown pairing {pairing!r}; use all or adjacent")


def bradley_terry_labels(scores_a: torch.Tensor, scores_b: torch.Tensor, temperature: float, tie_rate: float, generator: torch.Generator) -> torch.Tensor:
    """label_0 ∈ {1, 0, 0.5}: a Bernoulli draw of σ((s_a − s_b)/T), replaced by a tie with
    probability ``tie_rate``. [B], [B] → [B]."""
    p = torch.sigmoid((scores_a - scores_b) / temperature)
    wins = (torch.rand(p.shape, generator=generator) < p).float()
    ties = torch.rand(p.shape, generator=generator) < tie_rate
    return torch.where(ties, torch.full_like(wins, 0.5), wins)


def label_pairs(scorer: Scorer, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], seed: int, temperature: float, tie_rate: float) -> torch.Tensor:
    """Pairwise labels from any scorer (the annotator uses its own BT labels with ties)."""
    if isinstance(scorer, AnnotatorScorer):
        return scorer.annotator.label_pairs(images_a, images_b, prompts, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return bradley_terry_labels(scorer.score_batched(images_a, prompts), scorer.score_batched(images_b, prompts), temperature, tie_rate, generator)


def _test_prompts(prompts: list[str], fraction: float, seed: int) -> set[str]:
    unique = sorted(set(prompts))
    count = int(math.ceil(len(unique) * fraction)) if fraction > 0 else 0
    if 0 < fraction < 1 and len(unique) > 1:
        count = min(count, len(unique) - 1)
    return set(random.Random(seed + 17).sample(unique, count))


def image_side(backbone) -> int:
    """Pixel side of the images a backbone samples (a diffusers pipeline: its resolution, not the
    latent size; the shapes models: their image size)."""
    resolution = getattr(backbone, "resolution", None)
    if resolution is not None:
        return int(resolution[-1])
    return int(getattr(backbone, "image_size", backbone.latent_shape[-1]))


def _inpainting_inputs(backbone, prompts: list[str], config: MakePrefsConfig, seed: int):
    """Source renders, masks and masked images for an inpainting model (one per prompt; the
    render jitter and the masks are drawn from ``seed``)."""
    from prefalign.worlds.shapes.masks import make_masks
    from prefalign.worlds.shapes.prompts import parse_prompt
    from prefalign.worlds.shapes.render import render

    scenes = [parse_prompt(p) for p in prompts]
    sources = render(scenes, seed=seed, size=image_side(backbone)).images
    kinds = ["outpaint" if (config.mask_kind == "outpaint" or (config.mask_kind == "both" and i % 2 == 0)) else "warp" for i in range(len(prompts))]
    masks = torch.zeros(len(prompts), 1, *sources.shape[-2:])
    for kind in set(kinds):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        masks[rows] = make_masks(kind, sources[rows], seed=seed + len(kind))
    masked = sources * (1 - masks)
    return sources, masks, masked, kinds


def make_preferences(config: MakePrefsConfig, out: str | Path, prompts: list[str] | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Sample, label and write a dataset (see module docstring); returns its card."""
    from prefalign.backbones.loading import load_backbone
    from prefalign.data.card import write_card
    from prefalign.sampling import generate

    if config.format == "pairwise":
        pairs = pair_indices(config.per_prompt, config.pairing)
    scorer = load_scorer(config.scorer, device=config.device)
    prompts = prompts or world_prompts(config.prompts, config.seed, config.prompt_split, config.style_probability)
    if not prompts:
        raise PrefalignError("no prompts to sample; give --prompts N or --prompts-file")
    backbone = load_backbone(config.model, device=config.device)
    inpainting = backbone.is_inpainting
    out = prepare_output_folder(out, overwrite)
    test = _test_prompts(prompts, config.test_fraction, config.seed)
    schema = PAIRWISE_SCHEMA if config.format == "pairwise" else POINTWISE_SCHEMA
    splits = ["test"] if len(test) == len(set(prompts)) else (["train", "test"] if test else ["train"])
    writers = {split: ShardWriter(out, split, schema, config.shard_size) for split in splits}

    # Prompts are processed in chunks so that memory stays bounded for large datasets.
    chunk_prompts = max(1, config.batch_size * 4 // config.per_prompt)
    chunks = range(0, len(prompts), chunk_prompts)
    for chunk_index, start in enumerate(tqdm(chunks, desc="prefs make", disable=not progress)):
        chunk = prompts[start : start + chunk_prompts]
        expanded = [p for p in chunk for _ in range(config.per_prompt)]
        first_seed = config.seed + start * config.per_prompt
        condition = None
        if inpainting:
            sources, masks, masked, kinds = _inpainting_inputs(backbone, chunk, config, seed=config.seed + start)

            def condition(cond, rows, masks=masks.repeat_interleave(config.per_prompt, 0), sources=sources.repeat_interleave(config.per_prompt, 0)):
                return backbone.inpaint_conditioning(cond, sources[rows], masks[rows])

        images = generate(backbone, expanded, seed=first_seed, steps=config.steps, guidance_scale=config.guidance_scale, sampler=config.sampler, batch_size=config.batch_size, condition=condition)
        images = images.view(len(chunk), config.per_prompt, *images.shape[1:])
        if config.format == "pairwise":
            a = torch.stack([images[p, i] for p in range(len(chunk)) for i, _ in pairs])
            b = torch.stack([images[p, j] for p in range(len(chunk)) for _, j in pairs])
            pair_prompts = [prompt for prompt in chunk for _ in pairs]
            labels = label_pairs(scorer, a, b, pair_prompts, config.seed + chunk_index, config.temperature, config.tie_rate)
            row = 0
            for p, prompt in enumerate(chunk):
                for i, j in pairs:
                    seed_i = first_seed + p * config.per_prompt
                    writers["test" if prompt in test else "train"].write(
                        pair_record(prompt, a[row], b[row], float(labels[row]), ranking_id=start * len(pairs) + row, model_0=config.model, model_1=config.model, seed_0=seed_i + i, seed_1=seed_i + j)
                    )
                    row += 1
        else:
            flat = images.flatten(0, 1)
            extra: dict[str, Any] = {}
            if inpainting:
                extra = {"masked_images": masked.repeat_interleave(config.per_prompt, 0), "masks": masks.repeat_interleave(config.per_prompt, 0)}
            if isinstance(scorer, AnnotatorScorer):
                scores = scorer.annotator.rate(flat, expanded, seed=config.seed + chunk_index)
            else:
                scores = scorer.score_batched(flat, expanded, **extra)
            groups = [f"{start + p}" for p in range(len(chunk)) for _ in range(config.per_prompt)]
            records = point_records(
                list(flat), scores.tolist(), groups, expanded,
                list(extra["masked_images"]) if inpainting else None,
                list(extra["masks"]) if inpainting else None,
                [k for k in kinds for _ in range(config.per_prompt)] if inpainting else None,
            )
            for record, prompt in zip(records, expanded):
                writers["test" if prompt in test else "train"].write(record)
    counts = {}
    for split, writer in writers.items():
        writer.close()
        counts[split] = writer.count
    write_meta(
        out,
        {
            "kind": config.format,
            "schema": "pick-a-pic-v2" if config.format == "pairwise" else "prefpaint",
            "inpainting": bool(inpainting and config.format == "pointwise"),
            "splits": counts,
            "image_size": [image_side(backbone)] * 2,
            "origin": {**config.model_dump(), "prompt_count": len(prompts)},
        },
    )
    persona = scorer.persona if isinstance(scorer, AnnotatorScorer) else None
    return write_card(out, persona=persona)


__all__ = ["MakePrefsConfig", "make_preferences", "label_pairs", "bradley_terry_labels", "pair_indices", "world_prompts"]
