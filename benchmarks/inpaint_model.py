"""Quality of the shipped inpainting model (issue 6: "card with its metrics … by mask kind").

Masked prompt images: clean renders of world prompts (held-in split, fixed seed) with PrefPaint's
two mask kinds — outpainting bands and warping holes. For each, completions by the model (20-step
DDIM, the known region kept) with the caption and with the empty prompt (PrefPaint's image-only
prompt), next to two references: the ground-truth render (ceiling) and the hole filled with the
mean colour of the known region (floor). Per mask kind:

- annotator: mean noiseless annotator score of the completed image against its caption;
- attributes: share of completions with all five content attributes right (colour, shape, size,
  position, background);
- seam: mean step across the mask boundary minus the ground truth's (0 = as smooth as the real
  image; :func:`prefalign.inpainting.seam_error`);
- hole_mse: mean squared error to the ground truth inside the hole (fidelity; inpainting is
  ambiguous, so this is informative, not a target);
- known_kept: max |completion − source| over the known region (must be 0).

    python benchmarks/inpaint_model.py [--model shapes-inpaint] [--prompts 256] [--steps 20] [--quick] [--update-card]

Prints a table and writes benchmarks/results/inpaint_model.json (``--update-card`` also fills the
metrics section of the model's card).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import table, write_json  # noqa: E402

from prefalign.backbones.loading import load_backbone  # noqa: E402
from prefalign.inpainting import InpaintPrompts, inpaint, seam_error, world_inpaint_prompts  # noqa: E402
from prefalign.worlds.shapes.annotator import Annotator  # noqa: E402
from prefalign.worlds.shapes.prompts import sample_prompts  # noqa: E402

CONTENT = ("colour", "shape", "size", "position", "background")


def mean_fill(items: InpaintPrompts) -> torch.Tensor:
    """The floor: the hole filled with the mean colour of the known region."""
    known = 1 - items.masks
    colour = (items.sources * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
    return items.sources * known + colour * items.masks


def measure(images: torch.Tensor, items: InpaintPrompts, annotator: Annotator) -> dict[str, torch.Tensor]:
    """Per-image metrics [N] of completed images."""
    checks = annotator.attribute_checks(images, items.prompts)
    hole = items.masks.expand_as(images)
    known = 1 - hole
    return {
        "annotator": annotator.score(images, items.prompts),
        "attributes": torch.stack([checks[k] for k in CONTENT]).all(0).float(),
        "seam": seam_error(images, items.sources, items.masks),
        "hole_mse": ((images - items.sources) ** 2 * hole).flatten(1).sum(1) / hole.flatten(1).sum(1).clamp(min=1),
        "known_kept": ((images - items.sources).abs() * known).flatten(1).amax(1),
    }


def evaluate(model: str, prompts: int, steps: int, seed: int, progress: bool = True) -> tuple[list[dict], dict]:
    backbone = load_backbone(model)
    annotator = Annotator()
    captions = sample_prompts(prompts, seed=seed + 7, split="train")
    items = world_inpaint_prompts(captions, backbone.latent_shape[-1], seed=seed)
    variants: dict[str, torch.Tensor] = {"ground truth": items.sources, "mean fill": mean_fill(items)}
    timing = {}
    for mode in ("caption", "empty"):
        started = time.time()
        variants[f"model ({mode} prompt)"] = inpaint(backbone, items, seed=seed, steps=steps, prompt_mode=mode, progress=progress)
        timing[mode] = prompts / (time.time() - started)
    rows = []
    for name, images in variants.items():
        metrics = measure(images, items, annotator)
        for kind in ("outpaint", "warp", "all"):
            rows_of_kind = [i for i, k in enumerate(items.kinds) if kind in ("all", k)]
            row = {"completion": name, "mask": kind, "n": len(rows_of_kind)}
            row.update({k: float(v[rows_of_kind].mean()) for k, v in metrics.items() if k != "known_kept"})
            row["known_kept"] = float(metrics["known_kept"][rows_of_kind].max())
            rows.append(row)
    return rows, {"images_per_s": timing, "hole_share": {k: float(items.masks[[i for i, x in enumerate(items.kinds) if x == k]].mean()) for k in ("outpaint", "warp")}}


def update_card(model: str, rows: list[dict], args) -> None:
    from prefalign.backbones.shapes import resolve_shapes_model_path
    from prefalign.pretrain.t2i import METRICS_END, METRICS_START

    card = resolve_shapes_model_path(model) / "README.md"
    text = card.read_text()
    lines = [
        f"`python benchmarks/inpaint_model.py --prompts {args.prompts} --steps {args.steps}`: {args.prompts} held-in world prompts",
        "(clean renders), masks alternating outpainting / warping, 20-step DDIM, known region kept.",
        "annotator = mean noiseless annotator score; attributes = share with colour, shape, size, position and background",
        "all right; seam = step across the mask boundary minus the ground truth's (0 = invisible); hole MSE vs the ground truth.",
        "",
        "| completion | mask | annotator | attributes | seam | hole MSE |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['completion']} | {row['mask']} | {row['annotator']:.3f} | {row['attributes']:.2f} | {row['seam']:+.3f} | {row['hole_mse']:.4f} |")
    start, end = text.index(METRICS_START) + len(METRICS_START), text.index(METRICS_END)
    card.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])
    print(f"updated {card}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-inpaint")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="32 prompts, 10 steps")
    parser.add_argument("--name", default="inpaint_model", help="results file name")
    parser.add_argument("--update-card", action="store_true", help="write the metrics into the model's card")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.steps = 32, 10
    rows, extra = evaluate(args.model, args.prompts, args.steps, args.seed)
    print(table(rows, ["completion", "mask", "n", "annotator", "attributes", "seam", "hole_mse", "known_kept"]))
    path = write_json(args.name, {"settings": vars(args), "rows": rows, **extra})
    print(f"wrote {path}")
    if args.update_card:
        update_card(args.model, rows, args)


if __name__ == "__main__":
    main()
