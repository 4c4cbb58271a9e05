"""Effect of :func:`prefalign.allocator.keep_freed_memory` on CPU sampling (the ``prefs make`` loop).

Runs the same sampling job (``--images`` images of the shipped model, ``--steps`` DDIM steps, batch
``--batch``) in two fresh processes, glibc's default allocator settings and prefalign's, one after
the other on the same thread count; reports wall, user and system time, minor page faults and peak
RSS of each, and the ratios.

    python benchmarks/allocator.py [--images 128] [--steps 10] [--threads 1]

Writes benchmarks/results/allocator.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table, write_json  # noqa: E402

CHILD = r"""
import json, resource, sys, time, os
import torch
settings = sys.argv[1]
torch.set_num_threads(int(sys.argv[5]))
if settings == "prefalign":
    from prefalign.allocator import keep_freed_memory
    assert keep_freed_memory(), "mallopt refused the settings"
from prefalign.backbones.loading import load_backbone
from prefalign.sampling import generate
from prefalign.worlds.shapes.prompts import sample_scenes
backbone = load_backbone("shapes-t2i")
prompts = [s.prompt for s in sample_scenes(int(sys.argv[2]), 0, "train")]
generate(backbone, prompts[:8], seed=0, steps=2, batch_size=8)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF)
wall = time.perf_counter()
generate(backbone, prompts, seed=0, steps=int(sys.argv[3]), batch_size=int(sys.argv[4]))
wall = time.perf_counter() - wall
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"settings": settings, "wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                  "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt,
                  "peak_rss_mib": after.ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    rows = []
    for settings in ("glibc default", "prefalign"):
        command = [sys.executable, "-c", CHILD, settings.split()[0], str(args.images), str(args.steps), str(args.batch), str(args.threads)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        row["settings"] = settings
        rows.append(row)
    ratios = {key: rows[1][key] / rows[0][key] for key in ("wall_s", "sys_s", "minor_faults", "peak_rss_mib")}
    print(table(rows))
    print("prefalign / default:", {k: round(v, 3) for k, v in ratios.items()})
    path = write_json("allocator", {"settings": vars(args), "rows": rows, "ratios": ratios})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
