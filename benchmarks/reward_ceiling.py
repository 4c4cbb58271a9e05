"""What limits a reward model on the world's preference data: perception, or labels and data size?

A diagnostic for issue 4's bar (held-out accuracy ≥ 95 % of the annotator's ceiling on ~4k pairs).
It gives a reward model **perfect perception**: instead of an encoder's embedding, the image token is
the annotator's own prompt-free pixel measurements (background and object colour, object mass,
centroid, area, edge sharpness, background spread, block-grid energy, border share and the five
style statistics — :func:`prefalign.worlds.shapes.annotator.measure`, 19 numbers). The head is the
PrefPaint shape used by ``rewards/prefpaint.py``: tokens [measurements (through a small MLP), the
world's CLIP embedding, the prompt's MiniLM embedding] + one transformer-encoder layer + linear MLP
→ z ∈ R^256 + bias-free head, Bradley–Terry on the pairs.

Trained on the benchmark's pairs (``--data``, made by ``benchmarks/reward_model.py``) with the noisy
annotator labels and with the noiseless order, on a share of the training pairs each
(``--fractions``). Reported on the test split: accuracy on its noisy labels, the ratio to the
ceiling (the noiseless annotator's accuracy on the same labels), and true-order accuracy.

If even perfect perception stays under the bar at the bar's data size, no encoder will reach it:
what is missing is the mapping from (measurements, prompt) to the annotator's score — reference
renders, shape IoU, nine weighted features — learned from Bradley–Terry draws whose score gaps
(median 0.025) are near the label temperature (0.03).

    python benchmarks/reward_ceiling.py --data runs/bench-reward-800x4/pairs --name reward_ceiling_800x4

Writes benchmarks/results/NAME.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import table, write_json  # noqa: E402
from torch import nn  # noqa: E402

from prefalign.data import load_preference_data  # noqa: E402
from prefalign.data.stats import pairwise_agreement  # noqa: E402
from prefalign.rewards.clip import load_clip  # noqa: E402
from prefalign.rewards.training import bradley_terry_loss  # noqa: E402
from prefalign.worlds.shapes.annotator import Annotator, Measurements, measure  # noqa: E402

MEASUREMENT_DIM = 19


def measurement_vector(m: Measurements) -> torch.Tensor:
    """The prompt-free measurements of a batch as [B, 19] (masks left out: they are images)."""
    scalars = [m.mass / 100, m.area, m.edge_sharpness, m.background_spread, m.block_energy_share, m.border_share]
    return torch.cat([m.background, m.foreground_colour, m.centroid, torch.stack(scalars, 1), m.style_stats], 1)


@torch.no_grad()
def encode(path: Path, split: str, clip, annotator) -> dict[str, torch.Tensor]:
    """Per pair: measurements [N, 2, 19], CLIP embeddings [N, 2, 384], prompt embedding [N, 384],
    noiseless scores [N, 2] and the noisy label_0 [N]."""
    data = load_preference_data(path, split)
    parts: dict[str, list] = {"measurements": [], "images": [], "truth": [], "label_0": []}
    captions: list[str] = []
    for batch in data.batches(256):
        sides = (batch.images_0, batch.images_1)
        parts["measurements"].append(torch.stack([measurement_vector(measure(x)) for x in sides], 1))
        parts["images"].append(torch.stack([clip.encode_images(x) for x in sides], 1))
        parts["truth"].append(torch.stack([annotator.score(x, batch.captions) for x in sides], 1))
        parts["label_0"].append(batch.label_0.float())
        captions += batch.captions
    return {**{k: torch.cat(v) for k, v in parts.items()}, "prompts": clip.encode_text(captions)}


class PerfectPerceptionReward(nn.Module):
    """PrefPaint's head over [measurements, CLIP image, prompt] tokens (see the module docstring)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, width: int = 128):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.measurements = nn.Sequential(nn.Linear(MEASUREMENT_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.image = nn.Linear(384, width)
        self.prompt = nn.Linear(384, width)
        self.layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(3 * width, 256), nn.Dropout(0.1), nn.Linear(256, 256))  # linear: z
        self.head = nn.Linear(256, 1, bias=False)

    def forward(self, measurements: torch.Tensor, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([self.measurements((measurements - self.mean) / self.std), self.image(image), self.prompt(prompt)], 1)
        return self.head(self.mlp(self.layer(tokens).flatten(1))).squeeze(-1)


def train_and_test(train: dict, test: dict, labels: str, fraction: float, args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if labels == "annotator":
        target, usable = train["label_0"], train["label_0"] != 0.5
    else:  # the noiseless order
        target, usable = (train["truth"][:, 0] > train["truth"][:, 1]).float(), train["truth"][:, 0] != train["truth"][:, 1]
    rows = torch.nonzero(usable).squeeze(1)
    rows = rows[torch.randperm(len(rows), generator=generator)[: int(round(fraction * len(rows)))]]
    flat = train["measurements"].flatten(0, 1)
    model = PerfectPerceptionReward(flat.mean(0), flat.std(0) + 1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.01)

    def reward(data: dict, index: torch.Tensor, side: int) -> torch.Tensor:
        return model(data["measurements"][index, side], data["images"][index, side], data["prompts"][index])

    for _ in range(args.epochs):
        model.train()
        order = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(order), 128):
            batch = order[start : start + 128]
            loss = bradley_terry_loss(reward(train, batch, 0), reward(train, batch, 1), target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        everything = torch.arange(len(test["label_0"]))
        difference = reward(test, everything, 0) - reward(test, everything, 1)
    gap = test["truth"][:, 0] - test["truth"][:, 1]
    true_label_0 = torch.where(gap > 0, 1.0, torch.where(gap < 0, 0.0, 0.5))  # noiseless ties are not counted
    accuracy, ceiling = pairwise_agreement(difference, test["label_0"])[0], pairwise_agreement(gap, test["label_0"])[0]
    return {
        "labels": labels,
        "train_pairs": len(rows),
        "accuracy": accuracy,
        "ceiling": ceiling,
        "share_of_ceiling": accuracy / ceiling,
        "true_order_acc": pairwise_agreement(difference, true_label_0)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bench-reward-800x4/pairs"), help="pairs made by benchmarks/reward_model.py")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="reward_ceiling")
    parser.add_argument("--quick", action="store_true", help="smoke test: all pairs only, 3 epochs (results file NAME-quick)")
    args = parser.parse_args()
    if args.quick:
        args.fractions, args.epochs, args.name = [1.0], 3, args.name + "-quick"
    torch.set_num_threads(1)
    started = time.time()
    clip, annotator = load_clip().eval(), Annotator("balanced")
    train, test = encode(args.data, "train", clip, annotator), encode(args.data, "test", clip, annotator)
    gaps = (test["truth"][:, 0] - test["truth"][:, 1]).abs()
    rows = [train_and_test(train, test, labels, fraction, args) for labels in ("annotator", "noiseless") for fraction in args.fractions]
    summary = {"test_pairs_untied": int((test["label_0"] != 0.5).sum()), "median_score_gap": float(gaps.median()), "wall_time_s": round(time.time() - started, 1)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_json(args.name, {"settings": settings, "summary": summary, "rows": rows})
    print(table(rows))
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
