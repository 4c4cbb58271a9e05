"""Bad-record reporting: every record that cannot be used is counted and reported with its row id,
never silently dropped; a dataset with no usable record is a :class:`PrefalignError`.

A record is bad when a required field is missing (null), an image cannot be decoded, a label or
score is not a finite number in range, or image sizes disagree (within a record, or with the
dataset's image size).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prefalign.errors import PrefalignError


@dataclass(frozen=True)
class BadRecord:
    """One unusable record: its row id (position in the split, counting from 0), the field at fault
    and why."""

    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.field} {self.reason}"


@dataclass
class ValidationReport:
    """Outcome of validating a dataset split."""

    source: str
    total: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (width, height) every usable image has
    ties_dropped: int = 0

    @property
    def usable(self) -> int:
        return self.total - len(self.bad) - self.ties_dropped

    @property
    def bad_rows(self) -> list[int]:
        return sorted({b.row for b in self.bad})

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(f"{b.field} {b.reason}" for b in self.bad))

    def summary(self, limit: int = 8) -> str:
        """One line: counts and the first ``limit`` bad rows."""
        if not self.bad:
            text = f"{self.source}: {self.total} records, all usable"
        else:
            shown = "; ".join(str(b) for b in self.bad[:limit])
            more = f"; … {len(self.bad) - limit} more" if len(self.bad) > limit else ""
            text = f"{self.source}: {len(self.bad)} of {self.total} records are bad and were skipped ({shown}{more})"
        if self.ties_dropped:
            text += f"; {self.ties_dropped} ties dropped"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "total": self.total,
            "usable": self.usable,
            "bad": len(self.bad),
            "ties_dropped": self.ties_dropped,
            "image_size": list(self.image_size) if self.image_size else None,
            "reasons": self.reason_counts(),
            "bad_records": [asdict(b) for b in self.bad],
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def raise_if_unusable(self, what: str = "dataset") -> None:
        """PrefalignError when no record is usable (the message names the main reasons)."""
        if self.total == 0:
            raise PrefalignError(f"{what} {self.source} has no records; write some with `prefalign prefs make` or `prefalign prefs import`")
        if self.usable <= 0:
            reasons = ", ".join(f"{k} ({v}×)" for k, v in sorted(self.reason_counts().items(), key=lambda kv: -kv[1])[:3])
            hint = " (all were ties, and ties are dropped)" if self.ties_dropped and not self.bad else ""
            raise PrefalignError(
                f"{what} {self.source} has no usable records: all {self.total} are bad{hint}{': ' + reasons if reasons else ''}; "
                "fix or re-import the data"
            )


# ---------------------------------------------------------------------------------------------
# Field checks (each returns a reason string, or None when the value is fine)
# ---------------------------------------------------------------------------------------------


def image_size_of(data: Any) -> tuple[tuple[int, int] | None, str | None]:
    """Decode image bytes fully; ((width, height), None) or (None, reason)."""
    if data is None:
        return None, "is missing"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, f"is not image bytes (got {type(data).__name__})"
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            image.load()
            return image.size, None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return None, f"is not a readable image ({error.__class__.__name__})"


def number_reason(value: Any, low: float | None = None, high: float | None = None) -> str | None:
    """Why ``value`` is not a finite number in [low, high], or None."""
    if value is None:
        return "is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"is not a number ({value!r})"
    value = float(value)
    if not math.isfinite(value):
        return "is not finite"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"is {value:g}, outside [{low:g}, {high:g}]"
    return None


def most_common_size(sizes: list[tuple[int, int] | None]) -> tuple[int, int] | None:
    counts = Counter(s for s in sizes if s is not None)
    return counts.most_common(1)[0][0] if counts else None


# ---------------------------------------------------------------------------------------------
# Image codec
# ---------------------------------------------------------------------------------------------


def encode_image(image: torch.Tensor, format: str = "PNG") -> bytes:
    """[3, H, W] in [0, 1] (RGB) or [1, H, W] (a mask, stored greyscale) → PNG/JPEG bytes."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), mode="RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format=format, **({"quality": 95} if format.upper() in ("JPEG", "JPG") else {}))
    return buffer.getvalue()


def decode_image(data: bytes, channels: int = 3) -> torch.Tensor:
    """Image bytes → [channels, H, W] float in [0, 1] (channels 3: RGB; 1: greyscale mask)."""
    with Image.open(io.BytesIO(bytes(data))) as image:
        converted = image.convert("RGB" if channels == 3 else "L")
    array = np.asarray(converted, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1).contiguous() if channels == 3 else tensor[None]


__all__ = [
    "BadRecord",
    "ValidationReport",
    "image_size_of",
    "number_reason",
    "most_common_size",
    "encode_image",
    "decode_image",
]
