"""Datasets on disk: Parquet shards per split, read back through 🤗 ``datasets``.

Layout of a dataset folder (the Hugging Face Hub layout, so a downloaded Pick-a-Pic v2 folder
reads as is)::

    DIR/prefalign_dataset.json          kind ("pairwise" | "pointwise"), splits, image size, origin
    DIR/data/train-00000-of-00004.parquet
    DIR/data/test-00000-of-00001.parquet
    DIR/card.json, DIR/README.md        the dataset card

Reading: ``datasets.Dataset.from_parquet`` converts the shards once to an Arrow cache file that is
memory-mapped (memory does not grow with the dataset), or ``streaming=True`` iterates the shards
without a cache. Image bytes stay encoded in Arrow and are decoded only when a record is read.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefalign.errors import PrefalignError

META_FILE = "prefalign_dataset.json"
DATA_DIR = "data"
KINDS = ("pairwise", "pointwise")
#: Rows per record batch of the Arrow cache. Opening the cache reads every batch header through the
#: memory map, and each read maps ~60 kB of neighbouring pages into the process (page fault-around). With
#: the 100-row batches datasets wrote by default for image shards that is ~0.6 kB of RSS per record (at
#: that rate ~500 MB for Pick-a-Pic v2's 851 k); 1000 rows per batch makes it 10× less (measured with
#: benchmarks/data_scale.py).
ARROW_BATCH_ROWS = 1000
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)-\d{5}(?:-of-\d{5})?(?:-[^.]*)?\.parquet$")


class ShardWriter:
    """Write rows (dicts) of one split as Parquet shards of ``shard_size`` rows, named
    ``{split}-{i:05d}-of-{n:05d}.parquet`` once the split is closed."""

    def __init__(self, folder: Path, split: str, schema: pa.Schema, shard_size: int = 1000):
        if shard_size < 1:
            raise PrefalignError(f"shard_size must be positive, got {shard_size}")
        self.folder = Path(folder) / DATA_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.schema, self.shard_size = split, schema, shard_size
        self._rows: list[dict[str, Any]] = []
        self._written: list[Path] = []
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self.shard_size:
            self._flush()

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def _flush(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        path = self.folder / f".{self.split}-{len(self._written):05d}.parquet.partial"
        pq.write_table(table, path, compression="zstd")
        self._written.append(path)
        self._rows = []

    def close(self) -> list[Path]:
        """Flush and give the shards their final names; returns them."""
        self._flush()
        total = len(self._written)
        final = []
        for index, path in enumerate(self._written):
            target = self.folder / f"{self.split}-{index:05d}-of-{total:05d}.parquet"
            path.rename(target)
            final.append(target)
        return final


def shard_files(path: str | Path, split: str) -> list[Path]:
    """The Parquet shards of ``split`` in a dataset folder (``data/{split}-*.parquet``, or
    ``{split}/*.parquet``), sorted; PrefalignError if there are none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrefalignError(f"dataset {path} not found; give a folder written by `prefalign prefs make` or `prefalign prefs import`")
    if path.is_file():
        if path.suffix == ".parquet":
            return [path]
        raise PrefalignError(f"{path} is a file; give the dataset folder (Parquet shards under data/)")
    candidates = sorted(
        p for p in path.rglob("*.parquet") if (_SHARD_RE.match(p.name) and _SHARD_RE.match(p.name)["split"] == split) or p.parent.name == split
    )
    if not candidates:
        available = sorted(available_splits(path))
        raise PrefalignError(
            f"dataset {path} has no {split!r} split"
            + (f"; it has {', '.join(available)} (pass --split)" if available else " (no Parquet shards found)")
        )
    return candidates


def available_splits(path: str | Path) -> set[str]:
    found = set()
    for p in Path(path).rglob("*.parquet"):
        match = _SHARD_RE.match(p.name)
        if match:
            found.add(match["split"])
    return found


def read_meta(path: str | Path) -> dict[str, Any]:
    """The dataset's ``prefalign_dataset.json`` ({} for a foreign folder)."""
    file = Path(path) / META_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise PrefalignError(f"{file} is not valid JSON ({error}); delete it or re-create the dataset") from None


def write_meta(path: str | Path, meta: dict[str, Any]) -> Path:
    file = Path(path) / META_FILE
    file.write_text(json.dumps(meta, indent=2, default=str))
    return file


def shard_columns(files: list[Path]) -> list[str]:
    """Column names of the first shard (without reading data)."""
    try:
        return list(pq.read_schema(files[0]).names)
    except (pa.ArrowInvalid, OSError) as error:
        raise PrefalignError(f"{files[0]} is not a readable Parquet file ({error}); re-create the dataset") from None


def load_split(path: str | Path, split: str = "train", streaming: bool = False, cache_dir: str | Path | None = None):
    """The raw records of ``split`` as a memory-mapped ``datasets.Dataset`` (or an
    ``IterableDataset`` when ``streaming``); images stay encoded."""
    import datasets

    files = [str(f) for f in shard_files(path, split)]
    datasets.disable_progress_bars()
    try:
        if streaming:
            return datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
        return datasets.Dataset.from_parquet(
            files, cache_dir=None if cache_dir is None else str(cache_dir), keep_in_memory=False, writer_batch_size=ARROW_BATCH_ROWS
        )
    except (pa.ArrowInvalid, OSError, ValueError) as error:
        raise PrefalignError(f"cannot read the {split!r} shards of {path} ({error.__class__.__name__}: {error}); re-create the dataset") from None
    finally:
        datasets.enable_progress_bars()


def iter_rows(dataset, columns: list[str], batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """Rows of a (memory-mapped or streaming) dataset restricted to ``columns`` as plain dicts."""
    present = [c for c in columns if c in (dataset.column_names or columns)]
    for batch in dataset.select_columns(present).iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def prepare_output_folder(out: str | Path, overwrite: bool = False) -> Path:
    """An empty folder for a new dataset: refuses to mix with an existing dataset unless
    ``overwrite``."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PrefalignError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        if (out / DATA_DIR).is_dir():
            shutil.rmtree(out / DATA_DIR)
    out.mkdir(parents=True, exist_ok=True)
    return out


__all__ = [
    "ShardWriter",
    "shard_files",
    "available_splits",
    "read_meta",
    "write_meta",
    "shard_columns",
    "load_split",
    "iter_rows",
    "prepare_output_folder",
    "META_FILE",
    "KINDS",
]
