"""Built-in evaluation hooks of the trainer (periodic, on the main process; see ``eval:`` in the config).

``annotator_hook`` (shapes text-to-image models): images for a fixed set of prompts with fixed seeds,
scored by the world's annotator — mean score, attribute accuracy, and the win rate against the base
model (the policy at step 0, or the reference network when the run resumed), ties counted as ½.
"""

from __future__ import annotations

from typing import Any

import torch


def annotator_hook(context) -> dict[str, Any]:
    backbone = context.backbone
    if not backbone.kind.startswith("shapes") or backbone.is_inpainting:
        return {}
    from prefalign.sampling import generate
    from prefalign.worlds.shapes.annotator import Annotator
    from prefalign.worlds.shapes.prompts import sample_prompts

    config = context.config.eval
    state = context.state
    prompts = state.setdefault("prompts", sample_prompts(config.prompts, config.prompt_seed, config.split))
    annotator = state.setdefault("annotator", Annotator(config.persona))

    def sample() -> torch.Tensor:
        return generate(backbone, prompts, seed=config.prompt_seed, steps=config.sampling_steps, guidance_scale=config.guidance_scale)

    if "base_scores" not in state:
        if context.step == 0:
            state["base_scores"] = annotator.score(sample(), prompts)
        else:
            try:
                with context.reference():
                    state["base_scores"] = annotator.score(sample(), prompts)
            except Exception:  # no reference network (e.g. SFT with full fine-tuning, resumed)
                state["base_scores"] = None
    images = sample()
    scores = annotator.score(images, prompts)
    checks = annotator.attribute_checks(images, prompts)
    content = torch.stack([checks[k].float() for k in ("colour", "shape", "size", "position", "background")])
    out: dict[str, Any] = {
        "annotator_score": float(scores.mean()),
        "attribute_accuracy": float(content.mean()),
        "all_attributes_correct": float(content.all(0).float().mean()),
    }
    base = state.get("base_scores")
    if base is not None:
        wins = (scores > base).float() + 0.5 * (scores == base).float()
        out["annotator_win_rate"] = float(wins.mean())
    return out
