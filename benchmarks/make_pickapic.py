"""Write a synthetic dataset in the Pick-a-Pic v2 schema, of any size.

    python benchmarks/make_pickapic.py --pairs 100000 --out /data/synthetic-pickapic [--image-size 32]

Layout and columns are those of the Hugging Face download of ``yuvalkirstain/pickapic_v2``:
``OUT/data/train-00000-of-000NN.parquet`` shards (``--shard-size`` rows each) with caption, jpg_0,
jpg_1 (encoded image bytes; PNG here, JPEG in the real data), label_0, label_1 (1/0, 0/1, or 0.5/0.5
for a tie), ranking_id, model_0, model_1, image_0_uid, image_1_uid, are_different, has_label — the
:data:`prefalign.data.preference.PAIRWISE_SCHEMA`, so every reader of the project takes it.

What the data is (every choice seeded by ``--seed``; the same arguments give the same bytes):
- captions are shapes-world prompts, ``--pairs-per-prompt`` pairs per prompt on average (Pick-a-Pic
  v2: ~851 k pairs over ~59 k prompts, about 14), so prompt caches behave as on the real data;
- images are blocky colour fields (a random 4×4 colour grid scaled up) plus Gaussian pixel noise
  (``--noise``, in 0–255 units; it sets how well the PNGs compress: the default 6 gives ~2.5 kB at
  32×32); the preferred image of a pair has half the noise, so a model can learn something;
- ``--tie-rate`` of the pairs are ties (0.5/0.5); the others are 1/0 or 0/1 with equal probability;
- ``--mixed-size-rate`` of the pairs have images of size ``--mixed-size`` (as Pick-a-Pic mixes 512²,
  768² and 1024² images), for the lazy reader's per-image resizing.

Writes ~10 k pairs/s on one core at 32×32 (PNG encoding dominates).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("sd-1.5", "sd-2.1", "sdxl-beta", "sdxl")


def png_bytes(array: np.ndarray) -> bytes:
    """[H, W, 3] uint8 → PNG bytes (fastest zlib level: generation speed over file size)."""
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def synthetic_image(rng: np.random.Generator, size: int, noise: float) -> np.ndarray:
    """A 4×4 random colour grid upscaled to size×size, plus N(0, noise²) per pixel; uint8 [H, W, 3]."""
    grid = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    cell = -(-size // 4)
    image = np.repeat(np.repeat(grid, cell, 0), cell, 1)[:size, :size]
    if noise > 0:
        image = image + rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def labels(rng: np.random.Generator, count: int, tie_rate: float) -> np.ndarray:
    """label_0 per pair: 0.5 with probability tie_rate, else 1 or 0 with equal probability."""
    draws = rng.random(count)
    out = np.where(rng.random(count) < 0.5, 1.0, 0.0)
    out[draws < tie_rate] = 0.5
    return out


def make_pickapic(
    out: Path,
    pairs: int,
    image_size: int = 32,
    seed: int = 0,
    shard_size: int = 2000,
    tie_rate: float = 0.1,
    pairs_per_prompt: float = 14.0,
    noise: float = 6.0,
    mixed_size_rate: float = 0.0,
    mixed_size: int = 48,
    progress: bool = True,
) -> dict:
    """Write the dataset (see the module docstring); returns counts, bytes and seconds."""
    from prefalign.data.preference import PAIRWISE_SCHEMA, pair_record
    from prefalign.data.storage import ShardWriter, prepare_output_folder
    from prefalign.worlds.shapes.prompts import sample_prompts

    start = time.time()
    out = prepare_output_folder(out, overwrite=True)
    rng = np.random.default_rng([seed, 0x91C])
    prompts = sample_prompts(max(1, round(pairs / pairs_per_prompt)), seed=seed, split="train")
    prompt_of = rng.integers(0, len(prompts), pairs)
    label_0 = labels(rng, pairs, tie_rate)
    big = rng.random(pairs) < mixed_size_rate
    writer = ShardWriter(out, "train", PAIRWISE_SCHEMA, shard_size=shard_size)
    counts = {"ties": 0, "mixed_size": 0}
    for i in range(pairs):
        size = mixed_size if big[i] else image_size
        label = float(label_0[i])
        # the preferred image (label 1, or image 0 of a tie) has half the noise
        noise_0 = noise / 2 if label >= 0.5 else noise
        noise_1 = noise / 2 if label < 0.5 else noise
        image_0 = png_bytes(synthetic_image(rng, size, noise_0))
        image_1 = png_bytes(synthetic_image(rng, size, noise_1))
        models = rng.choice(len(MODELS), 2)
        writer.write(
            pair_record(
                prompts[int(prompt_of[i])], image_0, image_1, label, ranking_id=i,
                model_0=MODELS[models[0]], model_1=MODELS[models[1]], seed_0=2 * i, seed_1=2 * i + 1,
            )
        )
        counts["ties"] += label == 0.5
        counts["mixed_size"] += bool(big[i])
        if progress and (i + 1) % 10000 == 0:
            print(f"  {i + 1}/{pairs} pairs ({time.time() - start:.0f} s)", flush=True)
    shards = writer.close()
    return {
        "pairs": pairs,
        "prompts": len(prompts),
        "ties": int(counts["ties"]),
        "mixed_size": int(counts["mixed_size"]),
        "shards": len(shards),
        "bytes": sum(p.stat().st_size for p in shards),
        "seconds": round(time.time() - start, 2),
        "path": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--tie-rate", type=float, default=0.1)
    parser.add_argument("--pairs-per-prompt", type=float, default=14.0)
    parser.add_argument("--noise", type=float, default=6.0)
    parser.add_argument("--mixed-size-rate", type=float, default=0.0)
    parser.add_argument("--mixed-size", type=int, default=48)
    args = parser.parse_args()
    result = make_pickapic(
        args.out, args.pairs, args.image_size, args.seed, args.shard_size, args.tie_rate, args.pairs_per_prompt,
        args.noise, args.mixed_size_rate, args.mixed_size,
    )
    print(result)


if __name__ == "__main__":
    main()
