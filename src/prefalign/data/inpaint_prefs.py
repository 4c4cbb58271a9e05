"""``prefalign prefs make-inpaint``: PrefPaint's dataset in the shapes world (METHODS.md §4).

For each masked prompt image — a clean render of a world prompt with a mask of one of PrefPaint's
two kinds (``outpaint`` boundary bands, ``warp`` disocclusion holes; ``both`` alternates them) — the
base inpainting model makes ``per_prompt`` completions (PrefPaint: 3), the known region is kept
(:func:`prefalign.inpainting.inpaint`), and every completion is scored **pointwise**: by the
annotator on its 1–7 scale with rater noise (``Annotator.rate``), or by any other scorer's score.
The completions of one masked image form a group and are ranked within it (1 = best; ties share
the rank) — the PrefPaint record shape of :mod:`prefalign.data.pointwise` (image, masked_image,
mask, score, rank, group_id, mask_kind, caption).

Defaults: the policy sees the masked image only (``prompt_mode = "empty"``, PrefPaint's image-only
prompts; the caption is still stored: it is what the annotator judges against), DDIM with 20 steps
and η = 0 (``eta`` > 0 samples the stochastic policy RL uses), completion i of the dataset starts
from the noise of seed ``seed + i``. A ``test_fraction`` of the masked images (never a group's
members separately) goes to the ``test`` split.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from prefalign.data.card import write_card
from prefalign.data.pointwise import POINTWISE_SCHEMA, point_records
from prefalign.data.storage import ShardWriter, prepare_output_folder, write_meta
from prefalign.errors import PrefalignError


class MakeInpaintPrefsConfig(BaseModel):
    """Settings of ``prefalign prefs make-inpaint`` (defaults: PrefPaint's dataset shape)."""

    model: str = Field("shapes-inpaint", description="the base inpainting model (shipped name, shapes folder or diffusers inpainting pipeline)")
    prompts: int = Field(512, ge=1, description="masked prompt images (world prompts drawn from the grammar)")
    per_prompt: int = Field(3, ge=1, description="completions per masked prompt image (PrefPaint: 3)")
    mask_kind: Literal["both", "outpaint", "warp"] = "both"
    prompt_mode: Literal["empty", "caption"] = Field("empty", description="the model's text: empty (PrefPaint) or the caption")
    scorer: str = Field("annotator", description="annotator[:persona] (1–7 ratings with rater noise) or another scorer (its score)")
    seed: int = 0
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(1.0, ge=0)
    eta: float = Field(0.0, ge=0, description="DDIM η of the completions (0: deterministic DDIM)")
    prompt_split: Literal["train", "held_out", "all"] = "train"
    test_fraction: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1000, ge=1)
    device: str = "cpu"


def held_out_groups(count: int, fraction: float, seed: int) -> set[int]:
    """Indices of the masked prompt images whose groups go to the test split."""
    size = int(math.ceil(count * fraction)) if fraction > 0 else 0
    if 0 < fraction < 1 and count > 1:
        size = min(size, count - 1)
    return set(random.Random(seed + 17).sample(range(count), size))


def make_inpaint_preferences(config: MakeInpaintPrefsConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Sample, score, rank and write the dataset + its card (see the module docstring)."""
    from prefalign.backbones.loading import load_backbone
    from prefalign.inpainting import inpaint, world_inpaint_prompts
    from prefalign.rewards.base import AnnotatorScorer, load_scorer
    from prefalign.training.trainer import pixel_resolution
    from prefalign.worlds.shapes.prompts import sample_prompts

    backbone = load_backbone(config.model, device=config.device)
    if not backbone.is_inpainting:
        raise PrefalignError(f"{config.model!r} is not an inpainting model; pass --model shapes-inpaint (or an inpainting model folder)")
    scorer = load_scorer(config.scorer, device=config.device)
    size = pixel_resolution(backbone)
    captions = sample_prompts(config.prompts, seed=config.seed, split=config.prompt_split)
    test = held_out_groups(len(captions), config.test_fraction, config.seed)
    out = prepare_output_folder(out, overwrite)
    splits = ["test"] if len(test) == len(captions) else (["train", "test"] if test else ["train"])
    writers = {split: ShardWriter(out, split, POINTWISE_SCHEMA, config.shard_size) for split in splits}

    chunk = max(1, config.batch_size // config.per_prompt)
    for start in tqdm(range(0, len(captions), chunk), desc="prefs make-inpaint", disable=not progress):
        rows = list(range(start, min(start + chunk, len(captions))))
        kinds = [("outpaint" if i % 2 == 0 else "warp") if config.mask_kind == "both" else config.mask_kind for i in rows]
        items = world_inpaint_prompts([captions[i] for i in rows], size[0], seed=config.seed + start, kinds=kinds)
        expanded = items.repeat_interleave(config.per_prompt)
        images = inpaint(backbone, expanded, seed=config.seed + start * config.per_prompt, steps=config.steps, guidance_scale=config.guidance_scale,
                         eta=config.eta, prompt_mode=config.prompt_mode, batch_size=config.batch_size)
        masked = expanded.masked_images
        if isinstance(scorer, AnnotatorScorer):
            scores = scorer.annotator.rate(images, expanded.prompts, seed=config.seed + start)
        else:
            scores = scorer.score_batched(images, expanded.prompts, masked_images=masked, masks=expanded.masks)
        groups = [str(i) for i in rows for _ in range(config.per_prompt)]
        records = point_records(list(images), scores.tolist(), groups, expanded.prompts, list(masked), list(expanded.masks), expanded.kinds)
        for record, group in zip(records, groups):
            writers["test" if int(group) in test else "train"].write(record)
    counts = {}
    for split, writer in writers.items():
        writer.close()
        counts[split] = writer.count
    write_meta(out, {
        "kind": "pointwise",
        "schema": "prefpaint",
        "inpainting": True,
        "splits": counts,
        "image_size": list(size),
        "origin": {**config.model_dump(), "command": "prefs make-inpaint", "prompt_count": len(captions)},
    })
    persona = scorer.persona if isinstance(scorer, AnnotatorScorer) else None
    return write_card(out, persona=persona)


__all__ = ["MakeInpaintPrefsConfig", "make_inpaint_preferences", "held_out_groups"]
