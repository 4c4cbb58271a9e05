"""Style preference pairs for Diffusion-RPO's style alignment (METHODS.md §2, "Style alignment";
``prefalign prefs make-style``).

For each prompt of the world (unstyled, from the ``prompt_split`` grammar split) one pair in the
Pick-a-Pic v2 schema: the **winner** is the image in the target style, the **loser** the plain
image of the same content:

- ``source="render"`` (default): two renders of the scene with the same seed — identical geometry,
  colours and jitter; only the style transform differs (the cleanest signal);
- ``source="model"``: two samples of a text-to-image model with the same initial noise, one for the
  styled prompt ("…, winter style") and one for the plain prompt.

The caption is the **plain** prompt by default (``caption="plain"``, as in Diffusion-RPO: the
aligned model should produce the style without being asked, and evaluation measures how often its
generations on held-out plain prompts are classified as the style); ``caption="styled"`` stores the
styled prompt instead. Which image is ``jpg_0`` is a fair coin per pair (seeded), and ``label_0``
says which one won.

Style check (``check_style``, default on): the annotator classifies the style of both images
(:meth:`Annotator.classify_style`, against renders of the prompt's content in every style); a pair
is kept only if the winner is classified as the target style and the loser is not. Renders always
pass; for model samples this drops pairs whose styled sample does not show the style. The card
records the counts (``style_check``) — a dataset with no pair left is a clear error. The card has
no annotator agreement: the annotator judges against the caption, and a plain caption makes it
prefer the plain image by construction.

A ``test_fraction`` of the prompts (never their images) goes to the ``test`` split.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from prefalign.data.preference import PAIRWISE_SCHEMA, pair_record
from prefalign.data.storage import ShardWriter, prepare_output_folder, write_meta
from prefalign.errors import PrefalignError


class StylePrefsConfig(BaseModel):
    """Settings of ``prefalign prefs make-style`` (defaults in the field descriptions)."""

    style: Literal["sketch", "winter", "starry"] = Field(..., description="the preferred style")
    prompts: int = Field(512, ge=1, description="world prompts drawn (with replacement), one pair each")
    source: Literal["render", "model"] = Field("render", description="render: two renders of the scene; model: two samples of --model")
    caption: Literal["plain", "styled"] = Field("plain", description="caption stored with the pair (RPO: the plain prompt)")
    prompt_split: Literal["train", "held_out", "all"] = "train"
    image_size: int = Field(32, ge=8, description="render size (source=render; a model samples at its own size)")
    model: str = "shapes-t2i"
    steps: int = Field(30, ge=1)
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    check_style: bool = Field(True, description="keep only pairs whose winner the annotator classifies as the style and whose loser it does not")
    test_fraction: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1000, ge=1)
    device: str = "cpu"


def styled_prompt(prompt: str, style: str) -> str:
    """The world prompt with the style suffix ("…, winter style"); PrefalignError for a prompt that
    is not of the world's grammar."""
    from prefalign.worlds.shapes.prompts import parse_prompt

    return parse_prompt(prompt).with_style(style).prompt


def style_pair_images(config: StylePrefsConfig, plain_prompts: list[str], seed: int, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(styled, plain) images [B, 3, S, S] of the same content; image i of a chunk uses ``seed + i``
    (model) or the chunk's ``seed`` (render: same seed for both, so only the style differs)."""
    from prefalign.worlds.shapes.prompts import parse_prompt

    if config.source == "render":
        from prefalign.worlds.shapes.render import render

        scenes = [parse_prompt(p) for p in plain_prompts]
        plain = render(scenes, seed=seed, size=config.image_size).images
        styled = render([s.with_style(config.style) for s in scenes], seed=seed, size=config.image_size).images
        return styled, plain
    from prefalign.sampling import generate

    options = dict(seed=seed, steps=config.steps, guidance_scale=config.guidance_scale, sampler=config.sampler, batch_size=config.batch_size)
    styled = generate(backbone, [styled_prompt(p, config.style) for p in plain_prompts], **options)
    plain = generate(backbone, plain_prompts, **options)
    return styled, plain


def style_check(styled: torch.Tensor, plain: torch.Tensor, plain_prompts: list[str], style: str) -> torch.Tensor:
    """[B] bool: the annotator classifies ``styled`` as ``style`` and ``plain`` as not ``style``."""
    from prefalign.worlds.shapes.annotator import Annotator

    annotator = Annotator()
    winners = annotator.classify_style(styled, plain_prompts)
    losers = annotator.classify_style(plain, plain_prompts)
    return torch.tensor([w == style and l != style for w, l in zip(winners, losers)], dtype=torch.bool)


def make_style_preferences(config: StylePrefsConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the style dataset (see module docstring); returns its card."""
    from prefalign.data.card import write_card
    from prefalign.rewards.labelling import world_prompts

    prompts = world_prompts(config.prompts, config.seed, config.prompt_split, 0.0)
    backbone = None
    model_name = "render"
    if config.source == "model":
        from prefalign.backbones.loading import load_backbone

        backbone = load_backbone(config.model, device=config.device)
        model_name = config.model
    out = prepare_output_folder(out, overwrite)
    unique = sorted(set(prompts))
    test_count = int(math.ceil(len(unique) * config.test_fraction)) if config.test_fraction > 0 else 0
    if 0 < config.test_fraction < 1 and len(unique) > 1:
        test_count = min(test_count, len(unique) - 1)
    test = set(random.Random(config.seed + 17).sample(unique, test_count))
    writers: dict[str, ShardWriter] = {}
    coin = torch.Generator().manual_seed(config.seed + 29)
    checked = failed = 0
    chunk_size = config.batch_size * 4
    for start in tqdm(range(0, len(prompts), chunk_size), desc="prefs make-style", disable=not progress):
        chunk = prompts[start : start + chunk_size]
        styled, plain = style_pair_images(config, chunk, config.seed + start, backbone)
        keep = style_check(styled, plain, chunk, config.style) if config.check_style else torch.ones(len(chunk), dtype=torch.bool)
        checked += len(chunk)
        failed += int((~keep).sum())
        styled_first = torch.rand(len(chunk), generator=coin) < 0.5
        for i, prompt in enumerate(chunk):
            if not keep[i]:
                continue
            caption = prompt if config.caption == "plain" else styled_prompt(prompt, config.style)
            first = bool(styled_first[i])
            images = (styled[i], plain[i]) if first else (plain[i], styled[i])
            names = (f"{model_name}+{config.style}", model_name) if first else (model_name, f"{model_name}+{config.style}")
            split = "test" if prompt in test else "train"
            if split not in writers:
                writers[split] = ShardWriter(out, split, PAIRWISE_SCHEMA, config.shard_size)
            seed_i = config.seed + start + i if config.source == "model" else config.seed + start
            writers[split].write(pair_record(caption, *images, 1.0 if first else 0.0, ranking_id=start + i, model_0=names[0], model_1=names[1], seed_0=seed_i, seed_1=seed_i))
    counts = {split: writer.count for split, writer in writers.items()}
    for writer in writers.values():
        writer.close()
    if not counts:
        raise PrefalignError(
            f"no pair passed the style check ({failed} of {checked} styled images were not classified as {config.style!r} "
            "or the plain ones were); the model does not produce this style — use --source render, or --no-check-style to keep them"
        )
    side = config.image_size if backbone is None else _image_side(backbone)
    write_meta(
        out,
        {
            "kind": "pairwise",
            "schema": "pick-a-pic-v2",
            "inpainting": False,
            "splits": counts,
            "image_size": [side, side],
            "origin": {"kind": "style", "scorer": f"style:{config.style}", **config.model_dump(exclude=_UNUSED[config.source]), "prompt_count": len(prompts)},
        },
    )
    summary = {"style": config.style, "source": config.source, "caption": config.caption, "checked": checked, "failed": failed, "kept": checked - failed, "enabled": config.check_style}
    return write_card(out, annotator=False, extra={"style_check": summary})


# Settings that do not apply to a source (left out of the dataset's provenance).
_UNUSED = {"render": {"model", "steps", "guidance_scale", "sampler", "device"}, "model": {"image_size"}}


def _image_side(backbone) -> int:
    from prefalign.rewards.labelling import image_side

    return image_side(backbone)


__all__ = ["StylePrefsConfig", "make_style_preferences", "style_pair_images", "style_check", "styled_prompt"]
