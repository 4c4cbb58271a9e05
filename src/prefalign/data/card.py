"""Dataset cards: ``card.json`` + ``README.md`` with counts, tie rate and how well the labels agree
with the world's noiseless annotator (for shapes-world prompts).

Label agreement of a pairwise set = the share of non-tie comparisons whose winner has the higher
noiseless annotator score: the accuracy of a perfect reward model on these noisy labels (the
ceiling reward models are measured against). For a pointwise set: Spearman's ρ of the scores with
the noiseless annotator score, and the share of within-group pairs ordered the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.data.stats import binomial_interval, pairwise_agreement, spearman_correlation
from prefalign.data.storage import available_splits, read_meta


def _annotator_for(meta: dict[str, Any], persona: str | None):
    from prefalign.worlds.shapes.annotator import Annotator

    if persona is None:  # the persona of the dataset's own labeller, else the balanced one
        scorer = str(meta.get("origin", {}).get("scorer", meta.get("scorer", "annotator")))
        persona = scorer.split(":", 1)[1] if scorer.startswith("annotator:") else "balanced"
    return Annotator(persona), persona


def _world_prompts(captions: list[str]) -> bool:
    from prefalign.worlds.shapes.prompts import try_parse_prompt

    return bool(captions) and all(try_parse_prompt(c) is not None for c in captions)


def pairwise_split_card(data, annotator=None, max_pairs: int = 4000, batch_size: int = 256) -> dict[str, Any]:
    """Counts, ties, position bias and (with ``annotator``) label agreement of a
    :class:`~prefalign.data.preference.PairwiseDataset`."""
    labels = data.label_0
    captions = data.captions
    ties = int((labels == 0.5).sum())
    card: dict[str, Any] = {
        "records": data.report.total,
        "usable": len(data),
        "bad_records": len(data.report.bad),
        "bad_reasons": data.report.reason_counts(),
        "prompts": len(set(captions)),
        "ties": ties,
        "tie_rate": ties / max(1, len(data)),
        "image_0_win_rate": float((labels[labels != 0.5] > 0.5).float().mean()) if len(data) > ties else None,
        "image_size": list(data.image_size) if data.image_size else None,
    }
    if annotator is None or not _world_prompts(captions):
        card["annotator_agreement"] = None
        return card
    count = min(len(data), max_pairs)
    differences, used = [], []
    for batch in data.batches(batch_size, indices=np.arange(count)):
        differences.append(annotator.score(batch.images_0, batch.captions) - annotator.score(batch.images_1, batch.captions))
        used.append(batch.label_0)
    difference, label = torch.cat(differences), torch.cat(used)
    agreement, compared = pairwise_agreement(difference, label)
    card["annotator_agreement"] = agreement
    card["annotator_agreement_ci95"] = binomial_interval(agreement, compared)
    card["annotator_agreement_pairs"] = compared
    card["mean_abs_score_difference"] = float(difference.abs().mean())
    return card


def pointwise_split_card(data, annotator=None, max_records: int = 4000, batch_size: int = 256) -> dict[str, Any]:
    scores = data.scores
    kinds = [k for k in data.mask_kinds if k]
    card: dict[str, Any] = {
        "records": data.report.total,
        "usable": len(data),
        "bad_records": len(data.report.bad),
        "bad_reasons": data.report.reason_counts(),
        "groups": len(set(data.group_ids)),
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "score_histogram": {f"{v:g}": int(c) for v, c in zip(*np.unique(scores.numpy(), return_counts=True))} if len(np.unique(scores.numpy())) <= 20 else None,
        "mask_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "inpainting": data.inpainting,
        "image_size": list(data.report.image_size) if data.report.image_size else None,
    }
    captions = data.captions
    if annotator is None or not _world_prompts(captions):
        card["annotator_spearman"] = None
        return card
    count = min(len(data), max_records)
    truth = torch.cat([annotator.score(b.images, b.captions) for b in data.batches(batch_size, indices=np.arange(count))])
    card["annotator_spearman"] = spearman_correlation(scores[:count], truth)
    return card


def card_markdown(card: dict[str, Any]) -> str:
    lines = [f"# {card.get('name', 'preference dataset')}", ""]
    origin = card.get("origin") or {}
    kind = card.get("kind", "?")
    schema = "Pick-a-Pic v2 (caption, jpg_0, jpg_1, label_0, label_1)" if kind == "pairwise" else "PrefPaint (image, masked_image, mask, score, rank, group_id, mask_kind)"
    lines += [f"- kind: **{kind}** — schema {schema}; Parquet shards under `data/`, read with 🤗 datasets"]
    for key in ("model", "scorer", "style", "source", "caption", "prompts", "per_prompt", "steps", "guidance_scale", "seed"):
        if key in origin:
            lines.append(f"- {key.replace('_', ' ')}: `{origin[key]}`")
    check = card.get("style_check")
    if check:
        lines.append(
            f"- style pairs: winner = the `{check['style']}` image, loser = the plain one ({check['source']}); caption = the {check['caption']} prompt; "
            f"style check {'on' if check['enabled'] else 'off'}: {check['kept']} of {check['checked']} pairs kept"
        )
    lines.append("")
    for split, info in card.get("splits", {}).items():
        lines.append(f"## split `{split}`")
        lines.append("")
        for key, value in info.items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], float):
                value = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
            lines.append(f"- {key.replace('_', ' ')}: {value}")
        lines.append("")
    if kind == "pairwise" and card.get("annotator_persona") is not None:
        lines.append(
            "Annotator agreement = share of non-tie pairs whose winner has the higher *noiseless* annotator score "
            "(the ceiling accuracy of a reward model on these labels)."
        )
    return "\n".join(lines) + "\n"


def write_card(path: str | Path, persona: str | None = None, max_records: int = 4000, name: str | None = None, extra: dict | None = None, annotator: bool = True) -> dict[str, Any]:
    """Compute the card of every split of the dataset at ``path``; write card.json and README.md.

    ``annotator=False`` leaves out the agreement with the noiseless annotator (for data whose
    labels are not a judgement of image against caption, e.g. style pairs)."""
    from prefalign.data import load_preference_data

    path = Path(path)
    meta = read_meta(path)
    judge, persona = _annotator_for(meta, persona) if annotator else (None, None)
    card: dict[str, Any] = {"name": name or path.name, "kind": None, "origin": meta.get("origin", {}), "annotator_persona": persona, "splits": {}}
    for split in sorted(available_splits(path), key=lambda s: (s != "train", s)):
        data = load_preference_data(path, split)
        card["kind"] = "pairwise" if hasattr(data, "label_0") else "pointwise"
        if card["kind"] == "pairwise":
            card["splits"][split] = pairwise_split_card(data, judge, max_records)
        else:
            card["splits"][split] = pointwise_split_card(data, judge, max_records)
    card.update(extra or {})
    (path / "card.json").write_text(json.dumps(card, indent=2, default=float))
    (path / "README.md").write_text(card_markdown(card))
    return card


__all__ = ["pairwise_split_card", "pointwise_split_card", "card_markdown", "write_card"]
