"""Preference pairs → training micro-batches (prompt, preferred image, rejected image).

Rows come from :mod:`prefalign.data` (Pick-a-Pic v2 schema, validated; ties dropped when reading or
oriented at random here). The order is a pure function of (seed, step): global sample n (counted
over steps, micro-steps and the global micro-batch) is pair ``perm_e[n mod N]`` of epoch e = n div N,
perm_e a permutation seeded by (seed, e). So a resumed run sees exactly the batches an
uninterrupted run would, and 1 process or P processes split the same global batches.

Images are decoded (and resized to the model's resolution when they differ) in DataLoader
workers: :class:`StepPairBatches` is a map-style dataset whose item k is the micro-batch of this
process at optimiser step ``start_step + k // accumulation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prefalign.errors import PrefalignError
from prefalign.methods.base import seeded_generator

TIE = 0.5


def open_pairs(source: Any, ties: str = "drop", progress: bool = False, validate: str = "full", cache_dir: str | None = None):
    """A :class:`prefalign.data.PairwiseDataset` from a dataset folder / Parquet file, or ``source``
    itself when it already is one. ``validate="lazy"``: a :class:`prefalign.data.loader.LazyPairs`
    (small columns checked at open, images when read, resized per image: the scale path)."""
    from prefalign.data.loader import LazyPairs, open_lazy_pairs
    from prefalign.data.preference import PairwiseDataset, load_pairwise

    if isinstance(source, (PairwiseDataset, LazyPairs)):
        return source
    if source is None:
        raise PrefalignError("no preference data: pass --data DIR (a folder made by `prefalign prefs make` or `prefs import`)")
    if validate == "lazy":
        return open_lazy_pairs(Path(source), "train", drop_ties=ties == "drop", cache_dir=cache_dir)
    return load_pairwise(Path(source), "train", drop_ties=ties == "drop", progress=progress, cache_dir=cache_dir)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] → [B, 3, *size]: scale the shorter side (bicubic, antialiased), centre-crop."""
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    scale = max(size[0] / height, size[1] / width)
    new = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return images[..., top : top + size[0], left : left + size[1]]


@dataclass(frozen=True)
class BatchLayout:
    """How global samples map to processes: ``batch_size`` pairs per process per micro-step."""

    batch_size: int
    num_processes: int
    process_index: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def positions(self) -> tuple[int, ...]:
        """Positions of this process's samples within the global micro-batch."""
        start = self.process_index * self.batch_size
        return tuple(range(start, start + self.batch_size))

    def flat_indices(self, step: int, micro: int) -> np.ndarray:
        base = (step * self.accumulation + micro) * self.global_batch
        return base + np.asarray(self.positions(), dtype=np.int64)


class PairOrder:
    """Epoch-wise seeded permutations of N pairs (or the identity without shuffling)."""

    def __init__(self, count: int, seed: int, shuffle: bool = True):
        if count < 1:
            raise PrefalignError("the preference dataset has no usable pairs")
        self.count, self.seed, self.shuffle = count, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        out = np.empty_like(flat)
        for k, n in enumerate(flat):
            epoch, position = divmod(int(n), self.count)
            if not self.shuffle:
                out[k] = position
                continue
            if epoch not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                self._perms[epoch] = np.random.default_rng([self.seed, epoch, 0x9A1B]).permutation(self.count)
            out[k] = self._perms[epoch][position]
        return out


class StepPairBatches(torch.utils.data.Dataset):
    """Item k: this process's micro-batch at step ``start_step + k // accumulation``, micro-step
    ``k % accumulation``, as a dict (prompts, images_w, images_l, rows, step, micro)."""

    def __init__(
        self,
        pairs,
        layout: BatchLayout,
        start_step: int,
        steps: int,
        seed: int,
        resolution: tuple[int, int],
        shuffle: bool = True,
        random_flip: bool = False,
        limit: int | None = None,
    ):
        self.pairs = pairs
        self.layout = layout
        self.start_step, self.steps = start_step, steps
        self.seed = seed
        self.resolution = tuple(resolution)
        self.random_flip = random_flip
        count = len(pairs) if limit is None else min(limit, len(pairs))
        self.order = PairOrder(count, seed, shuffle)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.layout.accumulation

    def __getitem__(self, k: int) -> dict[str, Any]:
        step = self.start_step + k // self.layout.accumulation
        micro = k % self.layout.accumulation
        flat = self.layout.flat_indices(step, micro)
        indices = self.order(flat)
        batch = self.pairs.batch(indices, size=self.resolution) if getattr(self.pairs, "resizes", False) else self.pairs.batch(indices)
        images_0 = resize_images(batch.images_0, self.resolution)
        images_1 = resize_images(batch.images_1, self.resolution)
        label = batch.label_0
        coins = torch.tensor(
            [
                float(torch.rand(1, generator=seeded_generator(self.seed, step, micro, int(p), 0x71E)))
                for p in self.layout.positions()
            ]
        )
        first_wins = torch.where(label == TIE, coins < 0.5, label > TIE)  # [B]
        mask = first_wins[:, None, None, None]
        images_w = torch.where(mask, images_0, images_1)
        images_l = torch.where(mask, images_1, images_0)
        flips = None
        if self.random_flip:
            flips = torch.tensor(
                [
                    float(torch.rand(1, generator=seeded_generator(self.seed, step, micro, int(p), 0xF11B)))
                    for p in self.layout.positions()
                ]
            ) < 0.5
            images_w = torch.where(flips[:, None, None, None], images_w.flip(-1), images_w)
            images_l = torch.where(flips[:, None, None, None], images_l.flip(-1), images_l)
        return {
            "prompts": list(batch.captions),
            "images_w": images_w.contiguous(),
            "images_l": images_l.contiguous(),
            "rows": batch.rows,
            "first_wins": first_wins,  # [B] bool: image 0 is the winner (latent-cache keys)
            "flips": flips,  # [B] bool or None
            "step": step,
            "micro": micro,
        }


def identity_collate(item: dict[str, Any]) -> dict[str, Any]:
    return item


def pair_loader(dataset: StepPairBatches, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=identity_collate,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
