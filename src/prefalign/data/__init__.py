"""Preference data on disk and in memory.

- :mod:`.preference` — pairwise comparisons, Pick-a-Pic v2 schema (caption, jpg_0, jpg_1, label_0,
  label_1; ties allowed and filterable);
- :mod:`.pointwise` — scored images, PrefPaint's shape (image, masked prompt image, mask, score,
  rank within its group, group id, mask kind);
- :mod:`.storage` — Parquet shards per split, read through 🤗 datasets (memory-mapped or streamed);
- :mod:`.importing` — a folder of images + a CSV/JSONL table → a dataset;
- :mod:`.validation` — bad records are counted and reported with their row ids, never dropped
  silently; a dataset with none usable is a clear error;
- :mod:`.card` — the dataset card (counts, tie rate, agreement with the noiseless annotator).
- :mod:`.style` — style pairs for Diffusion-RPO's style alignment (``prefs make-style``).
"""

from __future__ import annotations

from pathlib import Path

from prefalign.data.pointwise import POINTWISE_REQUIRED, PointBatch, PointwiseDataset, load_pointwise, point_records
from prefalign.data.preference import PAIRWISE_REQUIRED, PairBatch, PairwiseDataset, load_pairwise, pair_record, stream_pairwise
from prefalign.data.storage import ShardWriter, read_meta, shard_columns, shard_files
from prefalign.data.validation import BadRecord, ValidationReport, decode_image, encode_image
from prefalign.errors import PrefalignError


def dataset_kind(path: str | Path, split: str = "train") -> str:
    """"pairwise" or "pointwise", from the dataset's metadata or, for a foreign folder, its columns."""
    meta = read_meta(path)
    if meta.get("kind") in ("pairwise", "pointwise"):
        return meta["kind"]
    columns = set(shard_columns(shard_files(path, split)))
    if set(PAIRWISE_REQUIRED) <= columns:
        return "pairwise"
    if set(POINTWISE_REQUIRED) <= columns:
        return "pointwise"
    raise PrefalignError(
        f"{path} is neither a pairwise dataset ({', '.join(PAIRWISE_REQUIRED)}) nor a pointwise one "
        f"({', '.join(POINTWISE_REQUIRED)}); its columns are {', '.join(sorted(columns))}"
    )


def load_preference_data(path: str | Path, split: str = "train", **options) -> PairwiseDataset | PointwiseDataset:
    """Load a split of either kind (options: drop_ties (pairwise), image_size, cache_dir, progress)."""
    if dataset_kind(path, split) == "pairwise":
        return load_pairwise(path, split, **options)
    options.pop("drop_ties", None)
    return load_pointwise(path, split, **options)


__all__ = [
    "BadRecord",
    "ValidationReport",
    "PairBatch",
    "PairwiseDataset",
    "PointBatch",
    "PointwiseDataset",
    "ShardWriter",
    "dataset_kind",
    "load_preference_data",
    "load_pairwise",
    "load_pointwise",
    "stream_pairwise",
    "pair_record",
    "point_records",
    "encode_image",
    "decode_image",
]
