"""Pick-a-Pic-size preference data: open in seconds, memory that does not grow with the dataset.

:func:`prefalign.data.preference.load_pairwise` validates every record when it opens a dataset: it
decodes every image (1.7 M JPEG decodes for Pick-a-Pic v2's 851 k pairs, hours of CPU) and reads every
image page of the memory-mapped Arrow file, so the resident memory of the reading process (file-backed
pages count in RSS) grows with the dataset. It also rejects images whose size differs from the most
common one, which drops the SD2.1/SDXL images of Pick-a-Pic.

:func:`open_lazy_pairs` (``data.validation: lazy`` in an align config) is the scale path:

- the shards are read through 🤗 ``datasets`` as a memory-mapped Arrow file (converted once, in the
  Hugging Face cache or ``cache_dir``; random access, so a resumed or multi-process run sees exactly
  the batches of an uninterrupted one);
- at open only the small columns are read and checked (caption, label_0, label_1, has_label — the
  checks of :func:`prefalign.data.preference.check_pair`), straight from the Parquet shards; the image
  columns are not touched. What is kept per pair is one int64 row id (8 bytes);
- images are decoded when a batch is read — in DataLoader workers during training (``data.num_workers``)
  — and each image is resized on its own to the model's resolution (shorter side scaled, centre crop:
  :func:`prefalign.training.pairs.resize_images`), so datasets of mixed image sizes train as a whole;
- a record whose image does not decode is replaced, deterministically, by the next usable record
  (position + 1, wrapping) and reported with its row id in a warning and in :attr:`LazyPairs.bad`;
  so nothing is dropped silently, and the order stays a pure function of (seed, step).

Memory of a run is then the model + optimiser + a few prefetched batches per worker + 8 bytes per
pair (+ the epoch permutation, 8 bytes per pair) + the Arrow cache's batch headers mapped at open
(~60 kB per 1000-row batch, :data:`prefalign.data.storage.ARROW_BATCH_ROWS`): 10 k and 100 k pairs
measured 620 and 628 MiB peak RSS (``benchmarks/data_scale.py``; the full reader: 657 and 1036 MiB).
"""

from __future__ import annotations

import warnings
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prefalign.data.preference import PAIRWISE_REQUIRED, TIE, PairBatch, _check_columns, check_pair
from prefalign.data.storage import load_split, shard_columns, shard_files
from prefalign.data.validation import BadRecord, ValidationReport, decode_image
from prefalign.errors import PrefalignError

#: The columns read (and checked) when a dataset is opened lazily: never the images.
SMALL_COLUMNS = ("caption", "label_0", "label_1", "has_label")
#: Consecutive undecodable records after which reading stops with an error (the data is broken).
MAX_SUBSTITUTIONS = 64


class LazyPairs:
    """The usable pairs of a split, with images decoded (and resized) only when read.

    Duck-compatible with :class:`prefalign.data.preference.PairwiseDataset` where the trainer needs it
    (``len``, ``batch(indices)``, ``report``, ``rows``, ``path``, ``split``); :meth:`batch` also takes
    ``size`` (H, W) to resize each image on its own.

    Args:
        dataset: the split as a (memory-mapped) ``datasets.Dataset``.
        rows: row ids (positions in the split) of the usable pairs, in order.
        report: what was skipped at open (bad small fields, ties dropped).
    """

    resizes = True  # batch() accepts size=(H, W)

    def __init__(self, dataset, rows: Sequence[int], report: ValidationReport, path: Path, split: str):
        self.raw = dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        self.report = report
        self.path, self.split = path, split
        self._columns = dataset.select_columns(["caption", "jpg_0", "jpg_1", "label_0"])
        self.bad: dict[int, BadRecord] = {}  # found while reading (this process / worker only)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None  # not known without decoding; images are resized per record

    def _decode(self, position: int, size: tuple[int, int] | None) -> tuple[str, torch.Tensor, torch.Tensor, float, int] | None:
        row = int(self.rows[position])
        if row in self.bad:
            return None
        record = self._columns[row]
        images = []
        for column in ("jpg_0", "jpg_1"):
            try:
                image = decode_image(record[column])
            except Exception as error:  # noqa: BLE001 - any decoder failure makes the record bad
                self._report_bad(BadRecord(row, column, f"is not a readable image ({error.__class__.__name__})"))
                return None
            if size is not None:
                from prefalign.training.pairs import resize_images

                image = resize_images(image[None], tuple(size))[0]
            images.append(image)
        if size is None and images[0].shape != images[1].shape:
            self._report_bad(BadRecord(row, "jpg_1", f"is {tuple(images[1].shape[-2:])} but jpg_0 is {tuple(images[0].shape[-2:])} (size mismatch; read with size=)"))
            return None
        return record["caption"], images[0], images[1], float(record["label_0"]), row

    def _report_bad(self, bad: BadRecord) -> None:
        self.bad[bad.row] = bad
        warnings.warn(f"{self.path} [{self.split}]: {bad}; using the next usable record in its place", stacklevel=3)

    def batch(self, indices: Sequence[int], size: tuple[int, int] | None = None) -> PairBatch:
        """Decode the pairs at ``indices`` (positions among the usable pairs); with ``size`` (H, W)
        every image is resized to it on its own (without, both images of a batch must share a size).
        An undecodable record is replaced by the next usable one (see the module docstring)."""
        captions, first, second, labels, rows = [], [], [], [], []
        for index in indices:
            position = int(index) % len(self)
            for _ in range(MAX_SUBSTITUTIONS):
                decoded = self._decode(position, size)
                if decoded is not None:
                    break
                position = (position + 1) % len(self)
            else:
                raise PrefalignError(
                    f"{self.path} [{self.split}]: {MAX_SUBSTITUTIONS} records in a row do not decode "
                    f"(from row {int(self.rows[int(index) % len(self)])}); open the data with data.validation=full to list every bad record, or re-download the shards"
                )
            caption, image_0, image_1, label, row = decoded
            captions.append(caption)
            first.append(image_0)
            second.append(image_1)
            labels.append(label)
            rows.append(row)
        if size is None and len({tuple(t.shape) for t in first}) > 1:
            raise PrefalignError(f"{self.path}: images of different sizes in one batch; read with size=(H, W) to resize them")
        return PairBatch(
            captions=captions,
            images_0=torch.stack(first),
            images_1=torch.stack(second),
            label_0=torch.tensor(labels, dtype=torch.float32),
            rows=torch.tensor(rows, dtype=torch.int64),
        )

    def __getitem__(self, index: int) -> dict:
        batch = self.batch([index])
        return {"caption": batch.captions[0], "image_0": batch.images_0[0], "image_1": batch.images_1[0], "label_0": float(batch.label_0[0]), "row": int(batch.rows[0])}


def small_field_rows(files: Sequence[Path], columns: Sequence[str], drop_ties: bool, report: ValidationReport, batch_size: int = 8192) -> np.ndarray:
    """Row ids (positions in the split: shards in order, rows in order) whose small fields pass
    :func:`check_pair` (ties dropped when asked); bad ones are added to ``report``.

    Reads only ``columns``, straight from the Parquet shards in batches (not through the memory-mapped
    Arrow file: touching its small buffers would map neighbouring image pages into the process too)."""
    import pyarrow.parquet as pq

    keep = array("q")
    row_id = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=list(columns)):
            values = batch.to_pydict()
            for i in range(batch.num_rows):
                row = {k: v[i] for k, v in values.items()}
                report.total += 1
                problem = check_pair(row)
                if problem is not None:
                    report.bad.append(BadRecord(row_id, *problem))
                elif drop_ties and float(row["label_0"]) == TIE:
                    report.ties_dropped += 1
                else:
                    keep.append(row_id)
                row_id += 1
    return np.frombuffer(keep, dtype=np.int64).copy() if keep else np.zeros(0, dtype=np.int64)


def open_lazy_pairs(path: str | Path, split: str = "train", drop_ties: bool = True, cache_dir: str | Path | None = None) -> LazyPairs:
    """Open a pairwise (Pick-a-Pic v2 schema) split for training at scale (see the module docstring).

    Raises :class:`PrefalignError` when a required column is missing or no record is usable."""
    path = Path(path)
    files = shard_files(path, split)
    _check_columns(files, PAIRWISE_REQUIRED, "pairwise (Pick-a-Pic v2)")
    present = [c for c in SMALL_COLUMNS if c in shard_columns(files)]
    report = ValidationReport(f"{path} [{split}] (images checked when read)")
    rows = small_field_rows(files, present, drop_ties, report)
    report.raise_if_unusable("pairwise dataset")
    dataset = load_split(path, split, cache_dir=cache_dir)
    if len(dataset) != report.total:  # pragma: no cover - the Arrow copy is the shards in order
        raise PrefalignError(f"{path}: the Arrow cache has {len(dataset)} rows but the shards {report.total}; delete the cache (data.cache_dir) and retry")
    return LazyPairs(dataset, rows, report, path, split)


__all__ = ["LazyPairs", "open_lazy_pairs", "small_field_rows", "SMALL_COLUMNS"]
