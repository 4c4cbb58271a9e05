"""Quality of the shipped text-to-image model (issue: Foundation, "the bar").

On 512 held-in and 512 held-out-combination prompts, 50-step DDIM with CFG 3: attribute accuracy
(colour, shape, size, position, background) and mean annotator score, next to the mean annotator
score of clean renders and of defective renders of the same prompts — the base model should land
between the two (it learned the data's quality mix; alignment closes the gap).

    python benchmarks/base_model.py [--prompts 512] [--steps 50] [--cfg 3] [--model shapes-t2i]

Prints a table and writes benchmarks/results/base_model.json.
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
from prefalign.sampling import generate  # noqa: E402
from prefalign.worlds.shapes.annotator import Annotator  # noqa: E402
from prefalign.worlds.shapes.prompts import parse_prompt, sample_prompts  # noqa: E402
from prefalign.worlds.shapes.render import DEFECTS, render  # noqa: E402


def evaluate_split(backbone, annotator: Annotator, split: str, count: int, steps: int, cfg: float, seed: int) -> dict:
    prompts = sample_prompts(count, seed=seed, split=split)
    started = time.time()
    samples = generate(backbone, prompts, seed=seed, steps=steps, guidance_scale=cfg, progress=True)
    seconds = time.time() - started
    scores = annotator.score(samples, prompts)
    checks = annotator.attribute_checks(samples, prompts)
    scenes = [parse_prompt(p) for p in prompts]
    clean_scores = annotator.score(render(scenes, seed=seed).images, prompts)
    generator = torch.Generator().manual_seed(seed)
    defects = [DEFECTS[int(i)] for i in torch.randint(0, len(DEFECTS), (count,), generator=generator)]
    defective_scores = annotator.score(render(scenes, seed=seed, defects=defects).images, prompts)
    return {
        "split": split,
        "prompts": count,
        **{f"{k}_acc": float(v.float().mean()) for k, v in checks.items() if k != "style"},
        "annotator_mean": float(scores.mean()),
        "clean_render_mean": float(clean_scores.mean()),
        "defective_render_mean": float(defective_scores.mean()),
        "images_per_s": count / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-t2i")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="base_model", help="results file name")
    parser.add_argument("--update-card", action="store_true", help="write the metrics into the shipped model's card")
    args = parser.parse_args()

    backbone = load_backbone(args.model)
    annotator = Annotator()
    rows = [evaluate_split(backbone, annotator, split, args.prompts, args.steps, args.cfg, args.seed) for split in ("train", "held_out")]
    rows[0]["split"] = "held-in"
    bar = {
        "colour_acc_held_in>=0.90": rows[0]["colour_acc"] >= 0.90,
        "shape_acc_held_in>=0.80": rows[0]["shape_acc"] >= 0.80,
        "between_defective_and_clean": rows[0]["defective_render_mean"] < rows[0]["annotator_mean"] < rows[0]["clean_render_mean"],
    }
    print(table(rows))
    print("bar:", bar)
    path = write_json(args.name, {"settings": vars(args), "rows": rows, "bar": bar})
    print(f"wrote {path}")
    if args.update_card:
        update_card(args, rows, bar)


def update_card(args, rows: list[dict], bar: dict) -> None:
    from prefalign.backbones.shapes import resolve_shapes_model_path
    from prefalign.pretrain.t2i import METRICS_END, METRICS_START

    card = resolve_shapes_model_path(args.model) / "README.md"
    text = card.read_text()
    columns = ["split", "colour_acc", "shape_acc", "size_acc", "position_acc", "background_acc", "annotator_mean", "clean_render_mean", "defective_render_mean"]
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    lines = ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |" for r in rows]
    body = (
        f"Measured by `python benchmarks/base_model.py` on {args.prompts} held-in and {args.prompts} held-out "
        f"prompts, {args.steps}-step DDIM, CFG {args.cfg:g}, seed {args.seed} (accuracies are the annotator's "
        "attribute checks; scores are the balanced annotator's, in [0, 1]; clean/defective = renders of the "
        "same prompts, defects drawn uniformly):\n\n" + header + "\n" + "\n".join(lines) + "\n\n"
        f"Bar (held-in): colour ≥ 90 %: {'met' if bar['colour_acc_held_in>=0.90'] else 'NOT met'}; "
        f"shape ≥ 80 %: {'met' if bar['shape_acc_held_in>=0.80'] else 'NOT met'}; mean annotator score between "
        f"defective and clean renders: {'yes' if bar['between_defective_and_clean'] else 'NO'}."
    )
    start, end = text.index(METRICS_START) + len(METRICS_START), text.index(METRICS_END)
    card.write_text(text[:start] + "\n" + body + "\n" + text[end:])
    print(f"updated {card}")


if __name__ == "__main__":
    main()
