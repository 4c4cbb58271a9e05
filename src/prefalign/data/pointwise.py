"""Pointwise scored datasets in PrefPaint's shape.

One record is one scored image::

    image         bytes  the (inpainted or generated) image, PNG/JPEG
    masked_image  bytes  the masked prompt image the inpainting model was given (null for t2i)
    mask          bytes  greyscale PNG, white = region that was repainted (null for t2i)
    score         float  the human (annotator) rating, e.g. 1–7
    rank          int    rank of the score within its group, 1 = best (ties share the lowest rank)
    group_id      str    the images generated for one prompt / masked image form a group
    mask_kind     str    "outpaint" | "warp" (PrefPaint's two mask kinds), null for t2i
    caption       str    the text prompt ("" for PrefPaint's image-only prompts)

Validation follows :mod:`prefalign.data.preference`: bad records (unreadable image, missing field,
size mismatch between image, masked image and mask or with the dataset) are skipped and reported
with their row ids.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from prefalign.data.preference import _check_columns, as_image_bytes
from prefalign.data.storage import iter_rows, load_split, read_meta, shard_files
from prefalign.data.validation import BadRecord, ValidationReport, decode_image, image_size_of, most_common_size, number_reason

POINTWISE_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("masked_image", pa.binary()),
        ("mask", pa.binary()),
        ("score", pa.float64()),
        ("rank", pa.int64()),
        ("group_id", pa.string()),
        ("mask_kind", pa.string()),
        ("caption", pa.string()),
    ]
)
POINTWISE_REQUIRED: tuple[str, ...] = ("image", "score")
_CHECKED = ("image", "masked_image", "mask", "score", "rank", "group_id", "mask_kind", "caption")


def ranks_within_groups(scores: Sequence[float], group_ids: Sequence[Any]) -> list[int]:
    """Rank of each score within its group: 1 = highest; equal scores share the lowest rank
    (competition ranking: 7, 5, 5, 3 → 1, 2, 2, 4)."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, group in enumerate(group_ids):
        groups[group].append(index)
    ranks = [0] * len(scores)
    for members in groups.values():
        for i in members:
            ranks[i] = 1 + sum(1 for j in members if scores[j] > scores[i])
    return ranks


def point_records(
    images: Sequence[torch.Tensor | bytes],
    scores: Sequence[float],
    group_ids: Sequence[str],
    captions: Sequence[str] | None = None,
    masked_images: Sequence[torch.Tensor | bytes] | None = None,
    masks: Sequence[torch.Tensor | bytes] | None = None,
    mask_kinds: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:
    """PrefPaint rows, with ranks computed within the groups of this call."""
    ranks = ranks_within_groups([float(s) for s in scores], group_ids)
    rows = []
    for i, image in enumerate(images):
        rows.append(
            {
                "image": as_image_bytes(image),
                "masked_image": None if masked_images is None else as_image_bytes(masked_images[i]),
                "mask": None if masks is None else as_image_bytes(masks[i]),
                "score": float(scores[i]),
                "rank": ranks[i],
                "group_id": str(group_ids[i]),
                "mask_kind": None if mask_kinds is None else mask_kinds[i],
                "caption": "" if captions is None else captions[i],
            }
        )
    return rows


def check_point(row: dict[str, Any], require_masks: bool) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """((field, reason) or None, image size) of one record."""
    reason = number_reason(row.get("score"))
    if reason:
        return ("score", reason), None
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        return ("caption", f"is not text ({type(caption).__name__})"), None
    rank = row.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        return ("rank", f"is {rank!r}, not a positive integer"), None
    size, reason = image_size_of(row.get("image"))
    if reason:
        return ("image", reason), None
    for name in ("masked_image", "mask"):
        value = row.get(name)
        if value is None:
            if require_masks:
                return (name, "is missing (an inpainting dataset needs it)"), None
            continue
        other, reason = image_size_of(value)
        if reason:
            return (name, reason), None
        if other != size:
            return (name, f"is {other[0]}×{other[1]} but image is {size[0]}×{size[1]} (size mismatch)"), None
    return None, size


def validate_points(rows: Iterator[dict[str, Any]], source: str, require_masks: bool, image_size: tuple[int, int] | None = None, total: int | None = None, progress: bool = False) -> tuple[ValidationReport, list[int]]:
    """Check every record; returns the report and the row ids of the usable ones."""
    report = ValidationReport(source)
    sizes: dict[int, tuple[int, int]] = {}
    bad: dict[int, BadRecord] = {}
    for row_id, row in enumerate(tqdm(rows, total=total, desc="checking records", disable=not progress, leave=False)):
        report.total += 1
        problem, size = check_point(row, require_masks)
        if problem is not None:
            bad[row_id] = BadRecord(row_id, *problem)
        else:
            sizes[row_id] = size
    expected = tuple(image_size) if image_size is not None else most_common_size(list(sizes.values()))
    for row_id, size in sizes.items():
        if size != expected:
            bad[row_id] = BadRecord(row_id, "image", f"is {size[0]}×{size[1]} but the dataset's images are {expected[0]}×{expected[1]} (size mismatch)")
    report.bad = [bad[k] for k in sorted(bad)]
    report.image_size = expected
    return report, [r for r in sorted(sizes) if r not in bad]


@dataclass
class PointBatch:
    """A decoded batch of scored images."""

    captions: list[str]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    masked_images: torch.Tensor | None  # [B, 3, H, W]
    masks: torch.Tensor | None  # [B, 1, H, W], 1 = repainted
    scores: torch.Tensor  # [B]
    group_ids: list[str]
    mask_kinds: list[str | None]
    rows: torch.Tensor  # [B]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def condition(self) -> dict[str, torch.Tensor]:
        """The scorer keyword arguments of this batch (empty for text-to-image)."""
        return {} if self.masked_images is None else {"masked_images": self.masked_images, "masks": self.masks}


class PointwiseDataset:
    """The usable records of one split (memory-mapped; images decoded lazily)."""

    def __init__(self, dataset, rows: Sequence[int], report: ValidationReport, path: Path, split: str, inpainting: bool):
        self.raw = dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dataset = dataset.select(self.rows) if len(self.rows) != len(dataset) else dataset
        self.report, self.path, self.split, self.inpainting = report, path, split, inpainting
        self._columns = set(dataset.column_names)

    def __len__(self) -> int:
        return len(self.rows)

    def _column(self, name: str, default: Any) -> list:
        return list(self.dataset[name]) if name in self._columns else [default] * len(self)

    @property
    def scores(self) -> torch.Tensor:
        return torch.tensor(self._column("score", 0.0), dtype=torch.float32)

    @property
    def group_ids(self) -> list[str]:
        ids = self._column("group_id", None)
        return [str(g) if g is not None else f"row-{r}" for g, r in zip(ids, self.rows)]

    @property
    def captions(self) -> list[str]:
        return [c or "" for c in self._column("caption", "")]

    @property
    def mask_kinds(self) -> list[str | None]:
        return self._column("mask_kind", None)

    def batch(self, indices: Sequence[int]) -> PointBatch:
        indices = [int(i) for i in indices]
        columns = [c for c in _CHECKED if c in self._columns]
        records = self.dataset.select_columns(columns)[indices]
        get = lambda name, default: records[name] if name in records else [default] * len(indices)  # noqa: E731
        masked = masks = None
        if self.inpainting:
            masked = torch.stack([decode_image(b) for b in records["masked_image"]])
            masks = torch.stack([decode_image(b, channels=1) for b in records["mask"]]).round()
        return PointBatch(
            captions=[c or "" for c in get("caption", "")],
            images=torch.stack([decode_image(b) for b in records["image"]]),
            masked_images=masked,
            masks=masks,
            scores=torch.tensor(records["score"], dtype=torch.float32),
            group_ids=[str(g) for g in get("group_id", "")],
            mask_kinds=list(get("mask_kind", None)),
            rows=torch.as_tensor(self.rows[indices]),
        )

    def batches(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0, indices: Sequence[int] | None = None) -> Iterator[PointBatch]:
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        if shuffle:
            order = order[np.random.default_rng(seed).permutation(len(order))]
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])

    def group_pairs(self) -> list[tuple[int, int]]:
        """(i, j) with i better than j within a group (PrefPaint's ranking pairs)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, group in enumerate(self.group_ids):
            groups[group].append(index)
        scores = self.scores.tolist()
        return [(i, j) for members in groups.values() for i in members for j in members if scores[i] > scores[j]]


def load_pointwise(
    path: str | Path,
    split: str = "train",
    image_size: tuple[int, int] | int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> PointwiseDataset:
    """Read and validate a pointwise split (see :func:`prefalign.data.preference.load_pairwise`)."""
    path = Path(path)
    files = shard_files(path, split)
    columns = _check_columns(files, POINTWISE_REQUIRED, "pointwise (PrefPaint)")
    meta = read_meta(path)
    inpainting = bool(meta.get("inpainting", "mask" in columns and "masked_image" in columns and meta.get("kind") is None))
    dataset = load_split(path, split, cache_dir=cache_dir)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    report, keep = validate_points(iter_rows(dataset, [c for c in _CHECKED if c in columns]), f"{path} [{split}]", inpainting, size, len(dataset), progress)
    report.raise_if_unusable("pointwise dataset")
    return PointwiseDataset(dataset, keep, report, path, split, inpainting)


__all__ = [
    "POINTWISE_SCHEMA",
    "POINTWISE_REQUIRED",
    "ranks_within_groups",
    "point_records",
    "check_point",
    "validate_points",
    "PointBatch",
    "PointwiseDataset",
    "load_pointwise",
]
