"""Cached (optionally precomputed) VAE latents of the preference images: ``data.latent_cache: DIR``.

Every step of the offline methods encodes its images with the frozen VAE (``pair_latents``: the
winners and losers of the micro-batch). Pick-a-Pic runs go over the data ~5 times (2000 steps × 2048
pairs over ~0.85 M pairs), so from the second epoch on that work can be read back instead. The cache is
a folder of memory-mapped ``.npy`` arrays, one slot per (dataset row, image 0/1, flipped or not)::

    latents.npy   float16 [rows, 2, F, C, h, w]   F = 2 with data.random_flip, else 1
    filled.npy    uint8   [rows, 2, F]             1 once the slot holds a latent
    checks.npy    float32 [rows, 2, F, 2]          mean and mean square of the image the latent came from
    cache.json    what the cache is for (model, resolution, rows, shape): a mismatch is an error

The files are sparse until filled (disk use grows with the slots written; SD1.5 at 512²: 32 kB per
image, ~56 GB for all of Pick-a-Pic v2) and memory-mapped (memory does not grow with the dataset).

How it plugs in without touching the methods: the trainer tells the cache which (row, image, flip)
slots the micro-batch's winners and losers are (:meth:`LatentCache.expect`), and the backbone's
``images_to_latents`` is wrapped (:meth:`LatentCache.attach`): a call with exactly those images (2B:
winners then losers, as ``pair_latents``; or B: the winners, as SFT) reads filled slots and encodes
and stores the others. The slot's stored checksums must equal the images' (to a relative 1e-5; else
the VAE runs and the slot is rewritten), so a call with other images never gets a wrong latent. Every latent — cached or
fresh — is rounded through float16, so a run gives the same numbers whether a slot was a hit or not
(resume and multi-process agreement hold).

Several processes on one machine share the folder (each writes the rows of its own samples); for
several machines, give each a folder on its local disk. :func:`precompute_latents` fills a cache
before training (one pass over the data with the VAE).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.errors import PrefalignError

META_FILE = "cache.json"


def image_checksums(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] → [N, 2] float32 on the CPU: per-image mean and mean of squares."""
    flat = images.detach().float().flatten(1)
    return torch.stack([flat.mean(1), flat.pow(2).mean(1)], dim=1).cpu()


def pair_slots(rows: Sequence[int], first_wins: Sequence[bool], flips: Sequence[bool] | None) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(row, image index, flip) of each winner and each loser of a micro-batch."""
    flips = flips if flips is not None else [False] * len(rows)
    winners = [(int(r), 0 if bool(w) else 1, int(bool(f))) for r, w, f in zip(rows, first_wins, flips)]
    losers = [(r, 1 - i, f) for r, i, f in winners]
    return winners, losers


class LatentCache:
    """The cache folder (see the module docstring). Open with :meth:`open`."""

    def __init__(self, folder: Path, meta: dict[str, Any], mode: str = "r+"):
        self.folder, self.meta = folder, meta
        self.latents = np.load(folder / "latents.npy", mmap_mode=mode)
        self.filled = np.load(folder / "filled.npy", mmap_mode=mode)
        self.checks = np.load(folder / "checks.npy", mmap_mode=mode)
        self.hits = self.misses = 0
        self._expected: tuple[list, list] | None = None
        self._original = None

    @classmethod
    def open(cls, folder: str | Path, rows: int, latent_shape: Sequence[int], flips: bool, model: str, resolution: Sequence[int]) -> LatentCache:
        """Open the cache in ``folder``, creating it when absent. PrefalignError when it was made for
        another model, resolution, dataset size or flip setting."""
        folder = Path(folder).expanduser()
        meta = {"model": str(model), "resolution": list(resolution), "rows": int(rows), "latent_shape": list(latent_shape), "flips": 2 if flips else 1, "dtype": "float16"}
        file = folder / META_FILE
        if file.is_file():
            saved = json.loads(file.read_text())
            different = [k for k in meta if saved.get(k) != meta[k]]
            if different:
                raise PrefalignError(
                    f"the latent cache {folder} was made for other settings ({', '.join(f'{k}: {saved.get(k)} ≠ {meta[k]}' for k in different)}); "
                    "give data.latent_cache a new folder (or delete this one)"
                )
            return cls(folder, meta)
        folder.mkdir(parents=True, exist_ok=True)
        slots = (int(rows), 2, meta["flips"])
        np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=np.float16, shape=(*slots, *latent_shape)).flush()
        np.lib.format.open_memmap(folder / "filled.npy", mode="w+", dtype=np.uint8, shape=slots).flush()
        np.lib.format.open_memmap(folder / "checks.npy", mode="w+", dtype=np.float32, shape=(*slots, 2)).flush()
        file.write_text(json.dumps(meta, indent=2))  # written last: a folder without it is incomplete
        return cls(folder, meta)

    # ---- the micro-batch the trainer is about to run -------------------------------------------
    def expect(self, rows: Sequence[int], first_wins: Sequence[bool], flips: Sequence[bool] | None) -> None:
        self._expected = pair_slots(rows, first_wins, flips)

    def clear(self) -> None:
        self._expected = None

    def _slots_for(self, count: int) -> list[tuple[int, int, int]] | None:
        if self._expected is None:
            return None
        winners, losers = self._expected
        if count == len(winners) + len(losers):
            return winners + losers
        if count == len(winners):
            return winners
        return None

    # ---- reading and filling -------------------------------------------------------------------
    def latents_for(self, images: torch.Tensor, slots: Sequence[tuple[int, int, int]], encode) -> torch.Tensor:
        """Latents of ``images`` (in ``slots``): filled slots whose checksums match are read, the
        others encoded with ``encode`` and stored. Float16-rounded, on the images' device."""
        checks = image_checksums(images)  # [N, 2]
        out: list[torch.Tensor | None] = [None] * len(slots)
        missing = []
        for i, (row, image, flip) in enumerate(slots):
            if self.filled[row, image, flip] and torch.allclose(torch.from_numpy(np.array(self.checks[row, image, flip])), checks[i], rtol=1e-5, atol=1e-7):
                out[i] = torch.from_numpy(np.array(self.latents[row, image, flip], dtype=np.float32))
                self.hits += 1
            else:
                missing.append(i)
        if missing:
            fresh = encode(images[missing]).detach().to("cpu", torch.float16)
            self.misses += len(missing)
            for j, i in enumerate(missing):
                row, image, flip = slots[i]
                self.latents[row, image, flip] = fresh[j].numpy()
                self.checks[row, image, flip] = checks[i].numpy()
                self.filled[row, image, flip] = 1
                out[i] = fresh[j].float()
        return torch.stack(out).to(device=images.device, dtype=images.dtype)

    def attach(self, backbone) -> None:
        """Wrap ``backbone.images_to_latents`` (an instance attribute; :meth:`detach` removes it)."""
        original = backbone.images_to_latents
        self._original = original

        def images_to_latents(images: torch.Tensor) -> torch.Tensor:
            slots = self._slots_for(images.shape[0])
            if slots is None:
                return original(images)
            return self.latents_for(images, slots, original).to(backbone.device)

        backbone.images_to_latents = images_to_latents

    def detach(self, backbone) -> None:
        if "images_to_latents" in vars(backbone):
            del backbone.images_to_latents
        self._original = None

    def flush(self) -> None:
        for array in (self.latents, self.filled, self.checks):
            array.flush()

    def filled_fraction(self) -> float:
        return float(np.asarray(self.filled).mean())


@torch.no_grad()
def precompute_latents(cache: LatentCache, pairs, backbone, resolution: Sequence[int], batch_size: int = 32, progress: bool = True) -> int:
    """Fill every slot of ``cache`` from ``pairs`` (a PairwiseDataset / LazyPairs) before training:
    both images of every usable pair, unflipped (and flipped when the cache has flips). Returns the
    number of latents encoded."""
    from tqdm.auto import tqdm

    from prefalign.training.pairs import resize_images

    encode = cache._original or backbone.images_to_latents
    encoded = 0
    for start in tqdm(range(0, len(pairs), batch_size), desc="precomputing latents", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(pairs))))
        batch = pairs.batch(indices, size=tuple(resolution)) if getattr(pairs, "resizes", False) else pairs.batch(indices)
        for image_index, images in enumerate((batch.images_0, batch.images_1)):
            images = resize_images(images, tuple(resolution))
            for flip in range(cache.meta["flips"]):
                view = images.flip(-1) if flip else images
                slots = [(int(r), image_index, flip) for r in batch.rows]
                before = cache.misses
                cache.latents_for(view.to(backbone.device), slots, encode)
                encoded += cache.misses - before
    cache.flush()
    return encoded


__all__ = ["LatentCache", "image_checksums", "pair_slots", "precompute_latents"]
