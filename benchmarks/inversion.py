"""Benchmark: exact inversion (BDIA) vs DDIM inversion, and few-step sample quality (METHODS.md §5).

Part 1 — round trip. A batch of rendered shapes images is inverted under its prompts and regenerated
(cfg 1) with DDIM inversion and with BDIA at γ ∈ {0.5, 0.9, 1.0}, for steps ∈ {10, 20, 50} and
dtype ∈ {float32, float64}. Cells: round-trip relative error ‖x̂0 − x0‖/‖x0‖ (latents, whole batch),
NFE of the inversion (count_calls), wall time of the inversion and of the whole round trip.

Part 2 — few-step sampling. Held-in prompts (``sample_prompts(n, seed, "train")``), one image each,
sampled with DDIM and with BDIA at 10 and 20 steps, CFG 3, the same seeds for every sampler. BDIA uses
γ = 0.5, the paper's setting for few steps (METHODS §5: "0.5 at 10 steps, 1.0 at 40"), and γ = 1.0 for
reference. Reported: the annotator's mean score (± 95% CI), attribute accuracy (colour, shape, and the
rest), and the paired win rate of each BDIA setting against DDIM on the same prompt and seed.

    python benchmarks/inversion.py            # full: batch 8, 512 prompts → benchmarks/results/inversion.json
    python benchmarks/inversion.py --quick    # smoke run: batch 2, 16 prompts (same table layout)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from _common import RESULTS, machine  # noqa: E402

from prefalign.backbones.loading import load_backbone  # noqa: E402
from prefalign.editing import backbone_in_dtype, invert_image, regenerate, relative_error  # noqa: E402
from prefalign.sampling import generate  # noqa: E402
from prefalign.worlds.shapes.annotator import Annotator  # noqa: E402
from prefalign.worlds.shapes.prompts import parse_prompt, sample_prompts  # noqa: E402
from prefalign.worlds.shapes.render import render  # noqa: E402

ROUNDTRIP_ROWS = [
    ("DDIM inversion", "ddim", 0.0),
    ("BDIA γ=0.5", "bdia", 0.5),
    ("BDIA γ=0.9", "bdia", 0.9),
    ("BDIA γ=1.0", "bdia", 1.0),
]
ROUNDTRIP_STEPS = (10, 20, 50)
DTYPES = ("float32", "float64")
SAMPLERS = [("DDIM", "ddim", 0.0), ("BDIA γ=0.5", "bdia", 0.5), ("BDIA γ=1.0", "bdia", 1.0)]
SAMPLE_STEPS = (10, 20)
DEFAULT_OUT = RESULTS / "inversion.json"


def roundtrip_part(backbone, batch: int, seed: int) -> list[dict]:
    prompts = sample_prompts(batch, seed, "train")
    images = render([parse_prompt(p) for p in prompts], seed=seed).images
    rows = []
    for dtype in DTYPES:
        model = backbone_in_dtype(backbone, getattr(torch, dtype))  # cast once, outside the timings
        for name, method, gamma in ROUNDTRIP_ROWS:
            for steps in ROUNDTRIP_STEPS:
                start = time.perf_counter()
                inverted = invert_image(
                    model, images, prompts, method, steps, gamma or 1.0, 1.0, dtype, roundtrip=False
                )
                invert_s = time.perf_counter() - start
                regenerated = regenerate(model, inverted.state, prompts, method, steps, inverted.gamma, 1.0, dtype,
                                         levels=inverted.levels)
                roundtrip_s = time.perf_counter() - start
                error, per_image = relative_error(regenerated.latents, inverted.latents)
                rows.append(
                    {
                        "row": name,
                        "method": method,
                        "gamma": gamma if method == "bdia" else None,
                        "steps": steps,
                        "dtype": dtype,
                        "roundtrip_rel_err": error,
                        "max_image_rel_err": float(per_image.max()),
                        "nfe": inverted.nfe,
                        "regeneration_nfe": regenerated.nfe,
                        "invert_s": invert_s,
                        "roundtrip_s": roundtrip_s,
                    }
                )
                cell = rows[-1]
                print(
                    f"  {name:15s} {steps:3d} steps {dtype}: rel err {cell['roundtrip_rel_err']:.2e}, "
                    f"NFE {cell['nfe']}, invert {invert_s:.2f}s, round trip {roundtrip_s:.2f}s",
                    flush=True,
                )
    return rows


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% normal-approximation half-width."""
    values = values.double()
    half = 1.96 * float(values.std(unbiased=True)) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), half


def sampling_part(backbone, count: int, seed: int, batch_size: int) -> list[dict]:
    prompts = sample_prompts(count, seed, "train")
    annotator = Annotator()
    rows = []
    for steps in SAMPLE_STEPS:
        scores_by_sampler = {}
        for name, sampler, gamma in SAMPLERS:
            start = time.perf_counter()
            images = generate(backbone, prompts, seed=seed, steps=steps, guidance_scale=3.0, sampler=sampler,
                              gamma=gamma, batch_size=batch_size)
            wall = time.perf_counter() - start
            scores = annotator.score(images, prompts)
            checks = annotator.attribute_checks(images, prompts)
            scores_by_sampler[name] = scores
            mean, half = mean_ci(scores)
            row = {
                "sampler": name,
                "method": sampler,
                "gamma": gamma if sampler == "bdia" else None,
                "steps": steps,
                "cfg": 3.0,
                "prompts": count,
                "annotator_mean": mean,
                "annotator_ci95": half,
                "accuracy": {k: float(v.float().mean()) for k, v in checks.items()},
                "wall_s": wall,
            }
            if sampler == "bdia":
                diff = scores - scores_by_sampler["DDIM"]
                row["win_rate_vs_ddim"] = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
                row["mean_score_diff_vs_ddim"], row["score_diff_ci95"] = mean_ci(diff)
            rows.append(row)
            print(
                f"  {name:11s} {steps:2d} steps: annotator {mean:.4f} ± {half:.4f}, colour {row['accuracy']['colour']:.3f}, "
                f"shape {row['accuracy']['shape']:.3f}, {wall:.0f}s",
                flush=True,
            )
    return rows


def print_tables(roundtrip: list[dict], sampling: list[dict]) -> None:
    print("\nRound trip (cfg 1): relative latent error | inversion NFE | inversion s / round-trip s")
    for dtype in DTYPES:
        print(f"{dtype:16s}" + "".join(f"{f'{s} steps':>28s}" for s in ROUNDTRIP_STEPS))
        for name, _, _ in ROUNDTRIP_ROWS:
            cells = []
            for steps in ROUNDTRIP_STEPS:
                c = next(r for r in roundtrip if r["row"] == name and r["steps"] == steps and r["dtype"] == dtype)
                cells.append(f"{c['roundtrip_rel_err']:.1e} | {c['nfe']:2d} | {c['invert_s']:.1f}/{c['roundtrip_s']:.1f}")
            print(f"{name:16s}" + "".join(f"{cell:>28s}" for cell in cells))
    print("\nFew-step sampling (CFG 3, same seeds): annotator mean ± 95% CI | colour acc | shape acc | win rate vs DDIM")
    for row in sampling:
        win = f"{row['win_rate_vs_ddim']:.3f}" if "win_rate_vs_ddim" in row else "-"
        print(
            f"{row['sampler']:11s} {row['steps']:2d} steps  {row['annotator_mean']:.4f} ± {row['annotator_ci95']:.4f} | "
            f"{row['accuracy']['colour']:.3f} | {row['accuracy']['shape']:.3f} | {win}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-t2i", help="shipped model name or model folder")
    parser.add_argument("--quick", action="store_true", help="batch 2 and 16 prompts: a smoke run")
    parser.add_argument("--batch", type=int, default=None, help="images in the round-trip batch (default 8; quick 2)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts for the sampling part (default 512; quick 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; quick: inversion-quick.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    count = args.prompts or (16 if args.quick else 512)
    out = args.out or (DEFAULT_OUT.with_name("inversion-quick.json") if args.quick else DEFAULT_OUT)

    backbone = load_backbone(args.model, device=args.device)
    started = time.perf_counter()
    print(f"part 1: round trip, batch {batch}", flush=True)
    roundtrip = roundtrip_part(backbone, batch, args.seed)
    print(f"part 2: sampling {count} held-in prompts", flush=True)
    sampling = sampling_part(backbone, count, args.seed, batch_size=64)
    print_tables(roundtrip, sampling)
    result = {
        "benchmark": "inversion",
        "model": args.model,
        "quick": args.quick,
        "batch": batch,
        "prompts": count,
        "seed": args.seed,
        "few_step_gamma_note": "BDIA γ=0.5 is the paper's few-step setting (METHODS §5: 0.5 at 10 steps, 1.0 at 40); γ=1.0 for reference",
        "machine": {**machine(), "device": args.device, "platform": platform.platform()},
        "roundtrip": roundtrip,
        "sampling": sampling,
        "total_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
