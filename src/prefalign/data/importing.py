"""Import preferences from a folder of images plus a table (CSV or JSONL).

Pairwise table (one row per comparison)::

    caption (or prompt), image_0, image_1, label_0 [, label_1] [, split]

Pointwise table (one row per scored image, PrefPaint's shape)::

    image, score [, masked_image, mask, group_id, mask_kind, caption (or prompt), split]

Image columns hold paths relative to the folder (absolute paths work too); the image bytes are
stored unchanged (PNG stays PNG, JPEG stays JPEG). ``label_0``: 1 = image_0 preferred, 0 = image_1,
0.5 = tie. The optional ``split`` column sends a row to that split (default ``--split``).

Every row is checked (missing field, missing or unreadable file, size mismatch); bad rows are
skipped and reported with their row ids (data rows counted from 0, the header excluded) in the
returned report and in ``import_report.json``; if none is usable nothing is written and a
PrefalignError says why.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from prefalign.data.pointwise import POINTWISE_SCHEMA, ranks_within_groups, validate_points
from prefalign.data.preference import PAIRWISE_SCHEMA, validate_pairs
from prefalign.data.storage import ShardWriter, prepare_output_folder, write_meta
from prefalign.data.validation import BadRecord, ValidationReport
from prefalign.errors import PrefalignError

_SPLIT_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def read_table(table: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv (header row) or .jsonl/.json file as dicts."""
    table = Path(table).expanduser()
    if not table.is_file():
        raise PrefalignError(f"table file not found: {table}; give a .csv or .jsonl file listing the images")
    suffix = table.suffix.lower()
    text = table.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    if suffix in (".jsonl", ".json"):
        try:
            rows = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise PrefalignError(f"{table} is not valid JSON{' lines' if suffix == '.jsonl' else ''} ({error})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PrefalignError(f"{table} must hold one JSON object per row")
        return rows
    raise PrefalignError(f"{table}: unsupported table format {suffix!r}; use .csv or .jsonl")


def detect_kind(rows: list[dict[str, Any]]) -> str:
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    if {"image_0", "image_1"} <= columns or {"jpg_0", "jpg_1"} <= columns:
        return "pairwise"
    if "image" in columns and "score" in columns:
        return "pointwise"
    raise PrefalignError(
        f"cannot tell the table's kind from its columns ({', '.join(sorted(columns)) or 'none'}); a pairwise table needs "
        "caption, image_0, image_1, label_0 and a pointwise table image, score"
    )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _number(value: Any) -> Any:
    """CSV gives strings: numbers become floats; anything else is left for validation to report."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_file(folder: Path, value: Any) -> tuple[bytes | None, str | None]:
    if _blank(value):
        return None, "is missing"
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        return None, f"file not found: {path}"
    return path.read_bytes(), None


def _split_of(row: dict[str, Any], default: str) -> tuple[str, str | None]:
    split = row.get("split")
    if _blank(split):
        return default, None
    split = str(split).strip()
    if not set(split) <= _SPLIT_NAME_OK:
        return default, f"is {split!r}, not a split name (letters, digits, _)"
    return split, None


def _pairwise_record(folder: Path, row: dict[str, Any]) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    caption = row.get("caption", row.get("prompt"))
    if caption is None:
        return None, ("caption", "is missing")
    images = {}
    for name, aliases in (("jpg_0", ("image_0", "jpg_0")), ("jpg_1", ("image_1", "jpg_1"))):
        value = next((row[a] for a in aliases if a in row), None)
        data, reason = _read_file(folder, value)
        if reason:
            return None, (aliases[0], reason)
        images[name] = data
    label_0 = None if _blank(row.get("label_0")) else _number(row.get("label_0"))
    label_1 = None if _blank(row.get("label_1")) else _number(row.get("label_1"))
    if label_0 is None and isinstance(label_1, float):
        label_0 = 1.0 - label_1
    record = {"caption": str(caption), **images, "label_0": label_0, "label_1": label_1}
    return record, None


def _pointwise_record(folder: Path, row: dict[str, Any]) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    record: dict[str, Any] = {}
    data, reason = _read_file(folder, row.get("image"))
    if reason:
        return None, ("image", reason)
    record["image"] = data
    for name in ("masked_image", "mask"):
        if _blank(row.get(name)):
            record[name] = None
            continue
        data, reason = _read_file(folder, row.get(name))
        if reason:
            return None, (name, reason)
        record[name] = data
    record["score"] = None if _blank(row.get("score")) else _number(row.get("score"))
    record["group_id"] = None if _blank(row.get("group_id")) else str(row.get("group_id"))
    record["mask_kind"] = None if _blank(row.get("mask_kind")) else str(row.get("mask_kind"))
    caption = row.get("caption", row.get("prompt"))
    record["caption"] = "" if caption is None else str(caption)
    record["rank"] = None
    return record, None


def import_preferences(
    folder: str | Path,
    table: str | Path,
    out: str | Path,
    kind: str | None = None,
    split: str = "train",
    image_size: tuple[int, int] | int | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> ValidationReport:
    """Import ``table`` (rows pointing at images in ``folder``) as a dataset at ``out``; returns the
    validation report over all rows (also written to ``out/import_report.json``)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PrefalignError(f"image folder not found: {folder}")
    rows = read_table(table)
    kind = kind or detect_kind(rows)
    if kind not in ("pairwise", "pointwise"):
        raise PrefalignError(f"unknown dataset kind {kind!r}; use pairwise or pointwise")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size

    report = ValidationReport(f"{table}")
    report.total = len(rows)
    by_split: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for row_id, row in enumerate(rows):
        target, split_problem = _split_of(row, split)
        build = _pairwise_record if kind == "pairwise" else _pointwise_record
        record, problem = (None, ("split", split_problem)) if split_problem else build(folder, row)
        if problem is not None:
            report.bad.append(BadRecord(row_id, *problem))
        else:
            by_split[target].append((row_id, record))

    # Validate the assembled records together (one image size for the whole dataset).
    candidates = [(s, row_id, record) for s, items in by_split.items() for row_id, record in items]
    inpainting = kind == "pointwise" and any(r.get("mask") is not None for _, _, r in candidates)
    if kind == "pairwise":
        checked, keep = validate_pairs(iter(r for _, _, r in candidates), str(table), size)
    else:
        checked, keep = validate_points(iter(r for _, _, r in candidates), str(table), inpainting, size)
    report.bad += [BadRecord(candidates[b.row][1], b.field, b.reason) for b in checked.bad]
    report.bad.sort(key=lambda b: b.row)
    report.image_size = checked.image_size
    report.raise_if_unusable("table")

    out = prepare_output_folder(out, overwrite)
    schema = PAIRWISE_SCHEMA if kind == "pairwise" else POINTWISE_SCHEMA
    kept = [candidates[i] for i in keep]
    splits: dict[str, int] = {}
    for split_name in sorted({s for s, _, _ in kept}):
        records = [r for s, _, r in kept if s == split_name]
        if kind == "pointwise":
            groups = [r["group_id"] if r["group_id"] is not None else f"{split_name}-{i}" for i, r in enumerate(records)]
            for record, group, rank in zip(records, groups, ranks_within_groups([float(r["score"]) for r in records], groups)):
                record["group_id"], record["rank"] = group, rank
        else:
            for record in records:
                record["label_0"] = float(record["label_0"])
                record["label_1"] = 1.0 - record["label_0"]
                record["has_label"] = True
                record["are_different"] = record["jpg_0"] != record["jpg_1"]
        writer = ShardWriter(out, split_name, schema, shard_size)
        writer.write_many(records)
        writer.close()
        splits[split_name] = len(records)
    write_meta(
        out,
        {
            "kind": kind,
            "schema": "pick-a-pic-v2" if kind == "pairwise" else "prefpaint",
            "inpainting": inpainting,
            "splits": splits,
            "image_size": list(report.image_size) if report.image_size else None,
            "origin": {"source": f"imported from {table} (images in {folder})"},
        },
    )
    report.write(out / "import_report.json")
    return report


__all__ = ["import_preferences", "read_table", "detect_kind"]
