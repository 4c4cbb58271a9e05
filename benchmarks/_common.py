"""Shared helpers of the benchmark scripts: tables, JSON results, isolated peak-memory runs."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"

from prefalign.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the command line does (every benchmark process, spawned children included)


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=float))
    return path


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table of dict rows (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _child(queue: mp.Queue, fn: Callable[..., Any], args: tuple) -> None:
    try:
        result = fn(*args)
        queue.put((result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None))
    except Exception as error:  # pragma: no cover - reported to the parent
        queue.put((None, None, repr(error)))


def run_isolated(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run ``fn(*args)`` in a fresh process; returns (result, peak RSS in MiB of that process)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn, args))
    process.start()
    result, peak, error = queue.get()
    process.join()
    if error:
        raise RuntimeError(error)
    return result, peak
