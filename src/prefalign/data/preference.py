"""Pairwise preference datasets in the Pick-a-Pic v2 schema.

One record is one comparison::

    caption   str    the prompt
    jpg_0     bytes  first image, PNG or JPEG bytes (Pick-a-Pic stores JPEG; the world writes PNG)
    jpg_1     bytes  second image
    label_0   float  1 = image 0 preferred, 0 = image 1 preferred, 0.5 = tie
    label_1   float  1 − label_0 (optional when reading)

plus optional Pick-a-Pic columns (``ranking_id``, ``model_0``, ``model_1``, ``image_0_uid``,
``image_1_uid``, ``are_different``, ``has_label``) and this project's provenance columns
(``seed_0``, ``seed_1``). Ties are kept on disk and can be filtered when reading (``drop_ties``).

Reading validates every record once (images are decoded to check them, then dropped): bad records
are skipped and reported with their row ids (see :mod:`prefalign.data.validation`); images are
decoded again, lazily, only when a record or batch is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from prefalign.data.storage import iter_rows, load_split, shard_columns, shard_files
from prefalign.data.validation import BadRecord, ValidationReport, decode_image, encode_image, image_size_of, most_common_size, number_reason
from prefalign.errors import PrefalignError

PAIRWISE_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("ranking_id", pa.int64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("are_different", pa.bool_()),
        ("has_label", pa.bool_()),
        ("seed_0", pa.int64()),
        ("seed_1", pa.int64()),
    ]
)
PAIRWISE_REQUIRED: tuple[str, ...] = ("caption", "jpg_0", "jpg_1", "label_0")
_CHECKED = (*PAIRWISE_REQUIRED, "label_1", "has_label")
TIE = 0.5


def as_image_bytes(image: torch.Tensor | bytes, format: str = "PNG") -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else encode_image(image, format)


def pair_record(
    caption: str,
    image_0: torch.Tensor | bytes,
    image_1: torch.Tensor | bytes,
    label_0: float,
    ranking_id: int | None = None,
    model_0: str | None = None,
    model_1: str | None = None,
    seed_0: int | None = None,
    seed_1: int | None = None,
    image_format: str = "PNG",
) -> dict[str, Any]:
    """One Pick-a-Pic v2 row (images as tensors [3, H, W] in [0, 1] or encoded bytes)."""
    label_0 = float(label_0)
    jpg_0, jpg_1 = as_image_bytes(image_0, image_format), as_image_bytes(image_1, image_format)
    return {
        "caption": caption,
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "ranking_id": ranking_id,
        "model_0": model_0,
        "model_1": model_1,
        "image_0_uid": None if seed_0 is None else f"{ranking_id}-0",
        "image_1_uid": None if seed_1 is None else f"{ranking_id}-1",
        "are_different": jpg_0 != jpg_1,
        "has_label": True,
        "seed_0": seed_0,
        "seed_1": seed_1,
    }


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def check_pair(row: dict[str, Any]) -> tuple[str, str] | None:
    """(field, reason) of the first problem of a pair record apart from image sizes, or None."""
    caption = row.get("caption")
    if caption is None:
        return "caption", "is missing"
    if not isinstance(caption, str):
        return "caption", f"is not text ({type(caption).__name__})"
    if row.get("has_label") is False:
        return "has_label", "is false (an unlabelled comparison)"
    reason = number_reason(row.get("label_0"), 0.0, 1.0)
    if reason:
        return "label_0", reason
    label_1 = row.get("label_1")
    if label_1 is not None:
        reason = number_reason(label_1, 0.0, 1.0)
        if reason:
            return "label_1", reason
        if abs(float(row["label_0"]) + float(label_1) - 1.0) > 1e-6:
            return "label_1", f"is {float(label_1):g} but label_0 is {float(row['label_0']):g} (they must sum to 1)"
    return None


def validate_pairs(rows: Iterator[dict[str, Any]], source: str, image_size: tuple[int, int] | None = None, drop_ties: bool = False, total: int | None = None, progress: bool = False) -> tuple[ValidationReport, list[int]]:
    """Check every record; returns the report and the row ids of the usable ones.

    A record is bad when a field is missing or malformed, an image does not decode, its two images
    differ in size, or they differ from ``image_size`` (default: the most common size)."""
    report = ValidationReport(source)
    sizes: dict[int, tuple[int, int]] = {}
    ties: set[int] = set()
    bad: dict[int, BadRecord] = {}
    for row_id, row in enumerate(tqdm(rows, total=total, desc="checking records", disable=not progress, leave=False)):
        report.total += 1
        problem = check_pair(row)
        if problem is None:
            size_0, reason_0 = image_size_of(row.get("jpg_0"))
            size_1, reason_1 = image_size_of(row.get("jpg_1"))
            if reason_0 or reason_1:
                problem = ("jpg_0", reason_0) if reason_0 else ("jpg_1", reason_1)
            elif size_0 != size_1:
                problem = ("jpg_1", f"is {size_1[0]}×{size_1[1]} but jpg_0 is {size_0[0]}×{size_0[1]} (size mismatch)")
            else:
                sizes[row_id] = size_0
        if problem is not None:
            bad[row_id] = BadRecord(row_id, *problem)
        elif float(row["label_0"]) == TIE:
            ties.add(row_id)
    expected = tuple(image_size) if image_size is not None else most_common_size(list(sizes.values()))
    for row_id, size in sizes.items():
        if size != expected:
            bad[row_id] = BadRecord(row_id, "jpg_0", f"is {size[0]}×{size[1]} but the dataset's images are {expected[0]}×{expected[1]} (size mismatch)")
    report.bad = [bad[k] for k in sorted(bad)]
    report.image_size = expected
    keep = [r for r in sorted(sizes) if r not in bad and not (drop_ties and r in ties)]
    report.ties_dropped = len([r for r in ties if r not in bad]) if drop_ties else 0
    return report, keep


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """A decoded batch of comparisons."""

    captions: list[str]
    images_0: torch.Tensor  # [B, 3, H, W] in [0, 1]
    images_1: torch.Tensor  # [B, 3, H, W]
    label_0: torch.Tensor  # [B] in {0, 0.5, 1} (or any probability)
    rows: torch.Tensor  # [B] row ids in the split

    def __len__(self) -> int:
        return len(self.captions)


class PairwiseDataset:
    """The usable comparisons of one split: a memory-mapped ``datasets.Dataset`` with lazy image
    decoding. ``report`` says what was skipped and why."""

    def __init__(self, dataset, rows: Sequence[int], report: ValidationReport, path: Path, split: str):
        self.raw = dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dataset = dataset.select(self.rows) if len(self.rows) != len(dataset) else dataset
        self.report = report
        self.path, self.split = path, split

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def captions(self) -> list[str]:
        return list(self.dataset["caption"])

    @property
    def label_0(self) -> torch.Tensor:
        return torch.tensor(list(self.dataset["label_0"]), dtype=torch.float32)

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.report.image_size

    def batch(self, indices: Sequence[int]) -> PairBatch:
        """Decode the records at ``indices`` (positions among the usable records)."""
        indices = [int(i) for i in indices]
        records = self.dataset.select_columns(["caption", "jpg_0", "jpg_1", "label_0"])[indices]
        return PairBatch(
            captions=list(records["caption"]),
            images_0=torch.stack([decode_image(b) for b in records["jpg_0"]]),
            images_1=torch.stack([decode_image(b) for b in records["jpg_1"]]),
            label_0=torch.tensor(records["label_0"], dtype=torch.float32),
            rows=torch.as_tensor(self.rows[indices]),
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.batch([index])
        return {"caption": batch.captions[0], "image_0": batch.images_0[0], "image_1": batch.images_1[0], "label_0": float(batch.label_0[0]), "row": int(batch.rows[0])}

    def batches(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0, indices: Sequence[int] | None = None) -> Iterator[PairBatch]:
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        if shuffle:
            order = order[np.random.default_rng(seed).permutation(len(order))]
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])


def _check_columns(files: list[Path], required: Sequence[str], schema_name: str) -> list[str]:
    columns = shard_columns(files)
    missing = [c for c in required if c not in columns]
    if missing:
        raise PrefalignError(
            f"{files[0].parent.parent if files[0].parent.name == 'data' else files[0].parent} is not a {schema_name} dataset: "
            f"no {', '.join(missing)} column(s) (it has {', '.join(columns)}); expected {', '.join(required)}"
        )
    return columns


def load_pairwise(
    path: str | Path,
    split: str = "train",
    drop_ties: bool = False,
    image_size: tuple[int, int] | int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> PairwiseDataset:
    """Read and validate a pairwise split. Bad records are skipped and listed in ``.report``;
    PrefalignError when a required column is missing or no record is usable."""
    path = Path(path)
    files = shard_files(path, split)
    columns = _check_columns(files, PAIRWISE_REQUIRED, "pairwise (Pick-a-Pic v2)")
    dataset = load_split(path, split, cache_dir=cache_dir)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    report, keep = validate_pairs(iter_rows(dataset, [c for c in _CHECKED if c in columns]), f"{path} [{split}]", size, drop_ties, len(dataset), progress)
    report.raise_if_unusable("pairwise dataset")
    return PairwiseDataset(dataset, keep, report, path, split)


def stream_pairwise(path: str | Path, split: str = "train", batch_size: int = 64, drop_ties: bool = False, image_size: tuple[int, int] | None = None, report: ValidationReport | None = None) -> Iterator[PairBatch]:
    """Stream decoded batches straight from the shards (no cache, constant memory). Records are
    validated as they pass; bad ones are skipped and added to ``report`` (give one to read it).
    The dataset's image size is ``image_size`` or that of the first good record."""
    path = Path(path)
    files = shard_files(path, split)
    _check_columns(files, PAIRWISE_REQUIRED, "pairwise (Pick-a-Pic v2)")
    report = report if report is not None else ValidationReport(f"{path} [{split}] (streamed)")
    expected = tuple(image_size) if image_size is not None else None
    pending: list[tuple[int, dict[str, Any]]] = []
    for row_id, row in enumerate(load_split(path, split, streaming=True)):
        report.total += 1
        problem = check_pair(row)
        if problem is None:
            size_0, reason_0 = image_size_of(row["jpg_0"])
            size_1, reason_1 = image_size_of(row["jpg_1"])
            if reason_0 or reason_1:
                problem = ("jpg_0", reason_0) if reason_0 else ("jpg_1", reason_1)
            elif size_0 != size_1:
                problem = ("jpg_1", f"is {size_1[0]}×{size_1[1]} but jpg_0 is {size_0[0]}×{size_0[1]} (size mismatch)")
            else:
                expected = expected or size_0
                if size_0 != expected:
                    problem = ("jpg_0", f"is {size_0[0]}×{size_0[1]} but the dataset's images are {expected[0]}×{expected[1]} (size mismatch)")
        if problem is not None:
            report.bad.append(BadRecord(row_id, *problem))
            continue
        if drop_ties and float(row["label_0"]) == TIE:
            report.ties_dropped += 1
            continue
        pending.append((row_id, row))
        if len(pending) == batch_size:
            yield _decode_rows(pending)
            pending = []
    report.image_size = expected
    if pending:
        yield _decode_rows(pending)
    report.raise_if_unusable("pairwise dataset")


def _decode_rows(rows: list[tuple[int, dict[str, Any]]]) -> PairBatch:
    return PairBatch(
        captions=[r["caption"] for _, r in rows],
        images_0=torch.stack([decode_image(r["jpg_0"]) for _, r in rows]),
        images_1=torch.stack([decode_image(r["jpg_1"]) for _, r in rows]),
        label_0=torch.tensor([float(r["label_0"]) for _, r in rows]),
        rows=torch.tensor([i for i, _ in rows]),
    )


__all__ = [
    "PAIRWISE_SCHEMA",
    "PAIRWISE_REQUIRED",
    "TIE",
    "pair_record",
    "check_pair",
    "validate_pairs",
    "PairBatch",
    "PairwiseDataset",
    "load_pairwise",
    "stream_pairwise",
]
