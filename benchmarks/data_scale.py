"""Memory of a training run against dataset size, and pairs per second read from disk (issue 8).

    python benchmarks/data_scale.py [--sizes 10000 100000] [--steps 50] [--batch-size 8] [--workers 2]
                                    [--model shapes-t2i] [--modes lazy full] [--workdir DIR]

1. Writes synthetic Pick-a-Pic-v2-schema datasets of each size (``make_pickapic.py``; kept in
   ``--workdir`` and reused when the arguments match) and builds their Arrow caches once.
2. For each size and each ``data.validation`` mode, runs ``--steps`` Diffusion-DPO steps (LoRA, the
   trainer as `prefalign align` runs it, ``--workers`` DataLoader workers) in a fresh process and
   records its peak RSS (``ru_maxrss``; file-backed pages of the memory-mapped data count in it), the
   resident file-backed share at the end (``RssFile``), the workers' peak RSS (largest worker,
   ``RUSAGE_CHILDREN``), the seconds to open the data and the run's seconds.
   The bar (issue 8): peak RSS with the largest size within 10 % of the smallest, for the lazy path.
3. Pairs per second read from disk: the training DataLoader alone (decode + resize, no model), with
   0 and ``--workers`` workers, after evicting the dataset's Arrow files from the page cache
   (``posix_fadvise(DONTNEED)``: a cold read) and again warm.

Prints tables and writes benchmarks/results/data_scale.json. On a machine that other jobs share, the
timings move with the load; the memory numbers do not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_isolated, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def proc_status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in MiB (Linux /proc/self/status)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = float(value.split()[0]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def ensure_dataset(workdir: Path, pairs: int, image_size: int, seed: int) -> Path:
    from make_pickapic import make_pickapic

    folder = workdir / f"pickapic-{pairs}-{image_size}px-seed{seed}"
    marker = folder / "synthetic.json"
    if marker.is_file():
        return folder
    print(f"writing {pairs} synthetic pairs to {folder} …", flush=True)
    info = make_pickapic(folder, pairs, image_size=image_size, seed=seed, progress=True)
    marker.write_text(json.dumps(info))
    return folder


def build_cache(folder: str, cache_dir: str) -> dict:
    """Convert the shards to the Arrow cache once (outside the measured runs)."""
    from prefalign.data.storage import load_split

    start = time.time()
    dataset = load_split(folder, "train", cache_dir=cache_dir)
    return {"rows": len(dataset), "seconds": time.time() - start, "arrow_bytes": sum(os.path.getsize(f["filename"]) for f in dataset.cache_files)}


def evict(folder: str, cache_dir: str) -> int:
    """Drop the dataset's Arrow files from the page cache; returns the bytes advised."""
    from prefalign.data.storage import load_split

    dataset = load_split(folder, "train", cache_dir=cache_dir)
    total = 0
    for entry in dataset.cache_files:
        fd = os.open(entry["filename"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def resolve_model(model: str, workdir: Path) -> str:
    if model != "tiny-sd":
        return model
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipelines import make_tiny_sd

    folder = workdir / "tiny-sd"
    if not (folder / "model_index.json").is_file():
        make_tiny_sd(folder)
    return str(folder)


def train_run(model: str, folder: str, cache_dir: str, mode: str, steps: int, batch_size: int, workers: int, run_dir: str) -> dict:
    """``steps`` DPO steps; peak memory of this process and its DataLoader workers."""
    import shutil

    import torch

    torch.set_num_threads(1)
    from prefalign.training.config import load_align_config
    from prefalign.training.pairs import open_pairs
    from prefalign.training.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"data.validation={mode}", f"data.num_workers={workers}", f"data.cache_dir={cache_dir}", "threads=1",
        "logging.progress=false", "logging.tensorboard=false", "eval.annotator=false", "export.enabled=false",
        f"checkpoint.every={steps}", "finetune.rank=8",
    ]
    config = load_align_config(None, overrides, method="dpo", model=model, steps=steps, batch_size=batch_size, **{"data.path": folder})
    start = time.time()
    pairs = open_pairs(folder, config.data.ties, validate=mode, cache_dir=cache_dir)
    open_s = time.time() - start
    start = time.time()
    result = Trainer(config, run_dir, data=pairs).train()
    run_s = time.time() - start
    status = proc_status()
    return {
        "usable_pairs": len(pairs),
        "open_s": round(open_s, 2),
        "train_s": round(run_s, 2),
        "final_loss": result.metrics["final"].get("loss"),
        "rss_file_end_mib": round(status.get("RssFile", float("nan")), 1),
        "rss_anon_end_mib": round(status.get("RssAnon", float("nan")), 1),
        "worker_peak_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1) if workers else None,
    }


def read_rate(model_resolution: tuple[int, int], folder: str, cache_dir: str, workers: int, batch_size: int, batches: int, cold: bool) -> dict:
    """Pairs per second through the training DataLoader (decode + resize), without a model."""
    import torch

    torch.set_num_threads(1)
    from prefalign.training.pairs import BatchLayout, StepPairBatches, open_pairs, pair_loader

    evicted = evict(folder, cache_dir) if cold else 0
    pairs = open_pairs(folder, "drop", validate="lazy", cache_dir=cache_dir)
    dataset = StepPairBatches(pairs, BatchLayout(batch_size, 1, 0, 1), 0, batches, seed=0, resolution=model_resolution)
    start = time.time()
    count = 0
    for item in pair_loader(dataset, workers):
        count += len(item["prompts"])
    seconds = time.time() - start
    return {"pairs_per_s": round(count / seconds, 1), "pairs": count, "evicted_mib": round(evicted / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="shapes-t2i", help="a shipped model, a model folder, or tiny-sd (built in code)")
    parser.add_argument("--modes", nargs="+", default=["lazy", "full"], choices=["lazy", "full"])
    parser.add_argument("--read-batches", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prefalign-data-scale"))
    parser.add_argument("--name", default="data_scale")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = str(args.workdir / "arrow-cache")
    model = resolve_model(args.model, args.workdir)
    folders = {n: str(ensure_dataset(args.workdir, n, args.image_size, seed=0)) for n in args.sizes}
    datasets_info = {}
    for n, folder in folders.items():
        info, _ = run_isolated(build_cache, folder, cache_dir)
        datasets_info[n] = {**json.loads((Path(folder) / "synthetic.json").read_text()), **info}

    rows = []
    for mode in args.modes:
        for n, folder in folders.items():
            result, peak = run_isolated(
                train_run, model, folder, cache_dir, mode, args.steps, args.batch_size, args.workers, str(args.workdir / f"run-{mode}-{n}")
            )
            rows.append({"validation": mode, "pairs": n, "peak_rss_mib": round(peak, 1), **result})
            print(table(rows[-1:]), flush=True)
    for mode in args.modes:
        mine = [r for r in rows if r["validation"] == mode]
        smallest, largest = mine[0]["peak_rss_mib"], mine[-1]["peak_rss_mib"]
        for r in mine:
            r["vs_smallest"] = round(r["peak_rss_mib"] / smallest - 1, 4)
        print(f"{mode}: peak RSS {largest:.0f} MiB at {mine[-1]['pairs']} pairs vs {smallest:.0f} MiB at {mine[0]['pairs']} "
              f"({100 * (largest / smallest - 1):+.1f} %)")

    # model resolution without loading the model in this process
    from prefalign.backbones.loading import load_backbone
    from prefalign.training.trainer import pixel_resolution

    resolution = pixel_resolution(load_backbone(model))
    reads = []
    largest_folder = folders[max(folders)]
    for workers in sorted({0, args.workers}):
        for cold in (True, False):
            result, _ = run_isolated(read_rate, resolution, largest_folder, cache_dir, workers, 32, args.read_batches, cold)
            reads.append({"pairs": max(folders), "workers": workers, "cache": "cold" if cold else "warm", **result})
    print()
    print(table(rows, ["validation", "pairs", "usable_pairs", "peak_rss_mib", "vs_smallest", "rss_file_end_mib", "rss_anon_end_mib", "worker_peak_mib", "open_s", "train_s"]))
    print()
    print(table(reads))
    lazy = [r for r in rows if r["validation"] == "lazy"]
    bar = None
    if len(lazy) >= 2:
        bar = abs(lazy[-1]["peak_rss_mib"] / lazy[0]["peak_rss_mib"] - 1) <= 0.10
        print(f"\nbar (lazy, peak RSS within 10 %): {'met' if bar else 'NOT met'}")
    path = write_json(args.name, {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "model_resolution": list(resolution)},
        "datasets": datasets_info,
        "runs": rows,
        "reads": reads,
        "bar_met": bar,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
