"""Pool the seeds of several ``benchmarks/alignment.py`` results files into one table.

The alignment benchmark takes about 50 CPU-minutes per seed of the four methods, so its seeds are
often run separately (``--seeds 1 --name alignment-seed1``, in parallel or in later sessions). This
reads those files (same settings: data, steps, evaluation prompts and seeds — checked) and writes:

- per method and prompt set: the win rate of every seed, the pooled win rate over prompts × seeds
  with its 95 % Wilson interval, the mean and spread (max − min) over seeds, and the seed-weighted
  mean annotator score and attribute accuracy; the win rate under the learned reward, averaged over
  the seeds of the files run with ``--reward`` (``reward_seeds`` says how many);
- the mean curves over all seeds and, from them, the steps each method needs to reach DPO's final
  win rate; step time, overhead ratio and peak memory averaged over runs;
- the style-alignment rows of every file.

    python benchmarks/alignment_seeds.py alignment alignment-seed1 alignment-seed2 --name alignment-seeds

Inputs and output are names in benchmarks/results/ (without .json). Prints tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, table, write_json  # noqa: E402
from alignment import STYLE_COLUMNS, steps_to_reach  # noqa: E402

from prefalign.evaluation import wilson_interval  # noqa: E402

#: settings that must agree between pooled files
SAME = ("model", "data", "steps", "eval_prompts", "sampling_steps", "guidance", "curve_prompts", "eval_every", "pairs")


def prompts_per_seed(row: dict[str, Any], settings: dict[str, Any]) -> int:
    """Prompts of one seed's evaluation (stored since the ``prompts`` field; before it, the benchmark's
    fixed sizes: ``--eval-prompts`` held-out prompts, a quarter of them (≥ 16) held-out combinations)."""
    if "prompts" in row:
        return int(row["prompts"])
    count = int(settings["eval_prompts"])
    return count if row["set"] == "held_out_prompts" else max(16, count // 4)


def seeds_in(results: dict[str, Any], method: str) -> int:
    """Seeds of ``method`` in one results file (0 if it has none)."""
    return next((len(r["win_rate_per_seed"]) for r in results["win_rates"] if r["method"] == method and r["set"] == "held_out_prompts"), 0)


def pool(files: list[dict[str, Any]]) -> dict[str, Any]:
    reference = files[0]["settings"]
    for f in files[1:]:
        different = [k for k in SAME if f["settings"].get(k) != reference.get(k)]
        if different:
            raise SystemExit(f"the files disagree on {different}: pool only runs of one benchmark setting")

    by_key: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for f in files:
        for row in f["win_rates"]:
            by_key.setdefault((row["method"], row["set"]), []).append((row, f["settings"]))
    rows = []
    for (method, set_name), entries in by_key.items():
        per_seed, successes, n, weighted = [], 0.0, 0, {"annotator_score": 0.0, "attribute_accuracy": 0.0}
        for row, settings in entries:
            prompts = prompts_per_seed(row, settings)
            for rate in row["win_rate_per_seed"]:
                per_seed.append(rate)
                successes += rate * prompts
                n += prompts
            for key in weighted:
                weighted[key] += row[key] * len(row["win_rate_per_seed"])
        low, high = wilson_interval(successes, n)
        rewarded = [(row["reward_win_rate"], len(row["win_rate_per_seed"])) for row, _ in entries if "reward_win_rate" in row]
        reward = {}
        if rewarded:  # only the files run with --reward: their seed-weighted mean and how many seeds it covers
            seeds = sum(w for _, w in rewarded)
            reward = {"reward_win_rate": sum(v * w for v, w in rewarded) / seeds, "reward_seeds": seeds}
        rows.append({
            "method": method, "set": set_name, "seeds": len(per_seed), "win_rate": successes / n, "ci95_low": low, "ci95_high": high,
            "seed_mean": sum(per_seed) / len(per_seed), "seed_spread": max(per_seed) - min(per_seed), "win_rate_per_seed": per_seed,
            **{key: value / len(per_seed) for key, value in weighted.items()},
            "base_score": entries[0][0]["base_score"], "base_attribute_accuracy": entries[0][0]["base_attribute_accuracy"],
            **reward,
        })

    methods = [r["method"] for r in rows if r["set"] == "held_out_prompts"]
    curves: dict[str, list[list[float]]] = {}
    for method in methods:
        by_step: dict[int, list[tuple[float, int]]] = {}
        for f in files:
            seeds = seeds_in(f, method)
            for step, value in f["curves"].get(method, []):
                by_step.setdefault(int(step), []).append((value, seeds))
        curves[method] = [[step, sum(v * w for v, w in values) / sum(w for _, w in values)] for step, values in sorted(by_step.items())]
    dpo_final = curves["dpo"][-1][1] if curves.get("dpo") else None
    speed = []
    for method in methods:
        entries = [(s, seeds_in(f, method)) for f in files for s in f["speed"] if s["method"] == method]
        total = sum(w for _, w in entries)
        speed.append({
            "method": method,
            "step_time_s": sum(s["step_time_s"] * w for s, w in entries) / total,
            "overhead_ratio": sum(s["overhead_ratio"] * w for s, w in entries) / total,
            "peak_rss_mib": max(s["peak_rss_mib"] for s, _ in entries),
            "steps_to_dpo_final_win_rate": steps_to_reach(curves[method], dpo_final),
        })
    style = [row for f in files for row in f.get("style", [])]
    return {"settings": reference, "win_rates": rows, "curves": curves, "speed": speed, "style": style}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="results names in benchmarks/results/ (without .json)")
    parser.add_argument("--name", default="alignment-seeds", help="output name in benchmarks/results/")
    args = parser.parse_args()
    files = [json.loads((RESULTS / f"{name}.json").read_text()) for name in args.inputs]
    pooled = pool(files)
    path = write_json(args.name, {"inputs": args.inputs, **pooled})
    columns = ["method", "set", "seeds", "win_rate", "ci95_low", "ci95_high", "seed_mean", "seed_spread", "annotator_score", "base_score", "attribute_accuracy"]
    if any("reward_win_rate" in r for r in pooled["win_rates"]):
        columns += ["reward_win_rate", "reward_seeds"]
    print(table(pooled["win_rates"], columns))
    print()
    print(table(pooled["speed"]))
    for method, curve in pooled["curves"].items():
        print(f"{method:>6}: " + "  ".join(f"{s}:{v:.2f}" for s, v in curve))
    if pooled["style"]:
        print()
        print(table(pooled["style"], STYLE_COLUMNS))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
