"""Offline preference alignment on the shapes world (issue 5): SFT, Diffusion-DPO, Diffusion-RPO, DDIM-InPO.

From one preference dataset (``prefalign prefs make``: ≥ 4k pairs labelled by the default annotator
persona), every method is trained for the same number of steps with its tuned-once config
(``configs/<method>.yaml``) and several seeds, then evaluated on held-out prompts (prompts that are
not in the training data) with fixed sampling seeds:

- annotator win rate of the aligned model against the base model (ties ½, 95 % Wilson interval over
  prompts × seeds), mean annotator score, attribute accuracy, win rate under a learned reward
  (``--reward``), and the same on the world's held-out colour–shape combinations;
- curves of the annotator win rate against steps (every ``--eval-every`` steps, ``--curve-prompts``
  prompts) and the steps each method needs to reach DPO's final win rate;
- step time and peak memory per method (each run in a fresh process); the step time over the time
  of the bare network calls of the same batch (policy forward+backward and reference forward on the
  2B winner+loser latents) measured in the same process — target ≤ 1.15 for DPO;
- style alignment (Diffusion-RPO's evaluation, ``--styles``): pairs where the styled render of a
  prompt beats its plain render; share of generations on held-out prompts in that style (the
  annotator's style classifier) and content preservation (colour and shape accuracy).

    python benchmarks/alignment.py --quick                       # minutes: tiny model, smoke test
    python benchmarks/alignment.py --data prefs/shapes-4k        # the full benchmark (shipped model)

Writes benchmarks/results/alignment[-quick].json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

from _common import run_isolated, table, write_json  # noqa: E402

from prefalign.evaluation import wilson_interval  # noqa: E402  (95 % Wilson interval, ties count ½)

METHODS = ("sft", "dpo", "rpo", "inpo")
STYLE_COLUMNS = ["style", "method", "overrides", "style_share", "base_style_share", "colour_accuracy", "shape_accuracy"]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_pairs(model: str, out: Path, prompts: int, per_prompt: int, steps: int, seed: int = 0) -> Path:
    """``prefalign prefs make`` (annotator, default persona, all pairs per prompt)."""
    from prefalign.rewards.labelling import MakePrefsConfig, make_preferences

    if (out / "data").is_dir():
        return out
    make_preferences(MakePrefsConfig(model=model, prompts=prompts, per_prompt=per_prompt, steps=steps, seed=seed, test_fraction=0.0), out)
    return out


def make_style_pairs(out: Path, style: str, count: int, size: int, seed: int = 0) -> Path:
    """Style preference pairs (RPO's style alignment): winner = the render of the prompt in ``style``,
    loser = the plain render; the caption is the plain prompt."""

    from prefalign.data.preference import PAIRWISE_SCHEMA, pair_record
    from prefalign.data.storage import ShardWriter
    from prefalign.worlds.shapes.prompts import sample_scenes
    from prefalign.worlds.shapes.render import render

    if (out / "data").is_dir():
        return out
    scenes = sample_scenes(count, seed, "train")
    writer = ShardWriter(out, "train", PAIRWISE_SCHEMA, shard_size=1000)
    for start in range(0, count, 256):
        chunk = scenes[start : start + 256]
        plain = render(chunk, seed=seed + start, size=size).images
        styled = render([s.with_style(style) for s in chunk], seed=seed + start, size=size).images
        for i, scene in enumerate(chunk):
            # winner in position 0 or 1 alternately (label_0 says which)
            first_styled = (start + i) % 2 == 0
            a, b = (styled[i], plain[i]) if first_styled else (plain[i], styled[i])
            writer.write(pair_record(scene.prompt, a, b, 1.0 if first_styled else 0.0, ranking_id=start + i))
    writer.close()
    return out


def eval_prompts(count: int, seed: int, exclude: set[str], split: str = "train") -> list[str]:
    """``count`` distinct world prompts of ``split`` that are not in ``exclude`` (the training captions)."""
    import random

    from prefalign.worlds.shapes.prompts import all_scenes

    pool = [s.prompt for s in all_scenes(split) if s.prompt not in exclude]
    random.Random(seed).shuffle(pool)
    if len(pool) < count:
        pool = pool * (count // max(1, len(pool)) + 1)
    return pool[:count]


# --------------------------------------------------------------------------------------------------
# One training run (in a fresh process)
# --------------------------------------------------------------------------------------------------


def bare_network_time(backbone, batch_size: int, repeats: int = 5) -> float:
    """Seconds of the bare network calls of one DPO micro-batch: policy forward+backward and
    reference forward (no grad) on the 2B winner+loser latents."""
    import torch

    x = torch.randn(2 * batch_size, *backbone.latent_shape, device=backbone.device)
    t = torch.randint(0, backbone.schedule.num_train_timesteps, (2 * batch_size,), device=backbone.device)
    cond = backbone.encode_prompts(["a small red circle in the centre on a white background"] * (2 * batch_size))
    unet = backbone.unet
    unet.train()

    has_lora = bool(getattr(unet, "peft_config", None))

    def once() -> None:
        with torch.no_grad():
            if has_lora:  # the reference: adapters disabled (full fine-tuning: a copy of the same size)
                unet.disable_adapters()
            backbone.model_output(x, t, cond)
            if has_lora:
                unet.enable_adapters()
        backbone.model_output(x, t, cond).float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    once()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from prefalign.sampling import generate
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import Trainer
    from prefalign.worlds.shapes.annotator import Annotator

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    config = load_align_config(
        ROOT / "configs" / f"{job['config']}.yaml",
        job["overrides"],
        model=job["model"],
        steps=job["steps"],
        seed=job["seed"],
        **{"data.path": job["data"]},
    )
    run_dir = Path(job["run_dir"])
    resume = (run_dir / "metrics.json").exists() is False and (run_dir / "checkpoints").is_dir()
    if (run_dir / "metrics.json").exists():
        result_metrics = json.loads((run_dir / "metrics.json").read_text())
        backbone = None
    else:
        result = Trainer(config, run_dir).train(resume=resume)
        result_metrics, backbone = result.metrics, result.backbone
    out: dict[str, Any] = {
        "step_time_s": result_metrics["step_time_s"],
        "curve": [{k: e.get(k) for k in ("step", "annotator_win_rate", "annotator_score")} for e in result_metrics["eval"]],
        "final_train": result_metrics["final"],
    }
    from prefalign.backbones.loading import load_backbone

    aligned = load_backbone(run_dir / "export", device=job["device"])
    if backbone is not None and job["measure_overhead"]:
        out["bare_network_s"] = bare_network_time(backbone, config.batch_size)
        out["overhead_ratio"] = out["step_time_s"] / out["bare_network_s"]
    annotator = Annotator("balanced")
    evaluation = {}
    for name, prompts in job["eval_sets"].items():
        images = generate(aligned, prompts, seed=job["eval_seed"], steps=job["sampling_steps"], guidance_scale=job["guidance"], batch_size=128)
        scores = annotator.score(images, prompts)
        checks = annotator.attribute_checks(images, prompts)
        entry = {"scores": scores.tolist(), "colour": checks["colour"].float().tolist(), "shape": checks["shape"].float().tolist()}
        entry["attributes"] = torch.stack([checks[k].float() for k in ("colour", "shape", "size", "position", "background")]).mean(0).tolist()
        if job.get("style"):
            styles = annotator.classify_style(images, prompts)
            entry["style_share"] = sum(s == job["style"] for s in styles) / len(styles)
        if job.get("reward"):
            from prefalign.rewards.base import load_scorer

            entry["reward"] = load_scorer(job["reward"]).score_batched(images, prompts).tolist()
        evaluation[name] = entry
    out["evaluation"] = evaluation
    out["peak_memory_mib"] = result_metrics.get("peak_memory_mib")
    return out


def base_evaluation(model: str, eval_sets: dict[str, list[str]], seed: int, steps: int, guidance: float, reward: str | None, device: str) -> dict[str, Any]:
    from prefalign.backbones.loading import load_backbone
    from prefalign.sampling import generate
    from prefalign.worlds.shapes.annotator import Annotator

    backbone = load_backbone(model, device=device)
    annotator = Annotator("balanced")
    out = {}
    for name, prompts in eval_sets.items():
        images = generate(backbone, prompts, seed=seed, steps=steps, guidance_scale=guidance, batch_size=128)
        checks = annotator.attribute_checks(images, prompts)
        entry = {
            "scores": annotator.score(images, prompts).tolist(),
            "colour": checks["colour"].float().tolist(),
            "shape": checks["shape"].float().tolist(),
            "style_counts": {},
        }
        import torch

        entry["attributes"] = torch.stack([checks[k].float() for k in ("colour", "shape", "size", "position", "background")]).mean(0).tolist()
        for style in annotator.classify_style(images, prompts):
            entry["style_counts"][str(style)] = entry["style_counts"].get(str(style), 0) + 1
        if reward:
            from prefalign.rewards.base import load_scorer

            entry["reward"] = load_scorer(reward).score_batched(images, prompts).tolist()
        out[name] = entry
    return out


def cached_base_evaluation(out: Path, model: str, eval_sets: dict[str, list[str]], seed: int, steps: int, guidance: float, reward: str | None, device: str) -> dict[str, Any]:
    """:func:`base_evaluation`, kept in ``out`` under a hash of its inputs, so that benchmark runs of
    other seeds or methods in the same work folder (e.g. in parallel) share one base evaluation."""
    import hashlib

    key = json.dumps([model, eval_sets, seed, steps, guidance, reward], sort_keys=True)
    path = out / f"base-evaluation-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    base = base_evaluation(model, eval_sets, seed, steps, guidance, reward, device)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(base))
    temporary.replace(path)
    return base


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def win_rate(policy: list[float], base: list[float]) -> float:
    return sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, base)) / len(base)


def summarise(method: str, runs: list[dict[str, Any]], base: dict[str, Any], set_name: str) -> dict[str, Any]:
    wins, n, scores, attributes, reward_wins = 0.0, 0, [], [], []
    per_seed = []
    for run in runs:
        ev = run["evaluation"][set_name]
        w = win_rate(ev["scores"], base[set_name]["scores"])
        per_seed.append(w)
        wins += w * len(ev["scores"])
        n += len(ev["scores"])
        scores.append(sum(ev["scores"]) / len(ev["scores"]))
        attributes.append(sum(ev["attributes"]) / len(ev["attributes"]))
        if "reward" in ev:
            reward_wins.append(win_rate(ev["reward"], base[set_name]["reward"]))
    low, high = wilson_interval(wins, n)
    row = {
        "method": method,
        "set": set_name,
        "win_rate": wins / n,
        "ci95_low": low,
        "ci95_high": high,
        "win_rate_per_seed": per_seed,
        "prompts": n // max(1, len(runs)),
        "annotator_score": sum(scores) / len(scores),
        "base_score": sum(base[set_name]["scores"]) / len(base[set_name]["scores"]),
        "attribute_accuracy": sum(attributes) / len(attributes),
        "base_attribute_accuracy": sum(base[set_name]["attributes"]) / len(base[set_name]["attributes"]),
    }
    if reward_wins:
        row["reward_win_rate"] = sum(reward_wins) / len(reward_wins)
    return row


def steps_to_reach(curve: list, target: float | None) -> int | None:
    """First step of a (step, win rate) curve at or above ``target`` (DPO's final value); None if never."""
    return next((step for step, value in curve if target is not None and value >= target), None)


def mean_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for point in run["curve"]:
            if point.get("annotator_win_rate") is not None:
                by_step.setdefault(point["step"], []).append(point["annotator_win_rate"])
    return sorted((step, sum(v) / len(v)) for step, v in by_step.items())


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def quick_model(out: Path) -> str:
    """A tiny 16×16 shapes model pretrained for a minute (the quick benchmark's base model)."""
    from prefalign.pretrain.t2i import PretrainT2IConfig, pretrain_t2i

    folder = out / "pretrain" / "model"
    if not (folder / "prefalign.json").is_file():
        config = PretrainT2IConfig(
            image_size=16, block_out_channels=(16, 32, 32), steps=150, batch_size=32, warmup_steps=10, checkpoint_every=1000, log_every=50
        )
        pretrain_t2i(config, out / "pretrain", progress=False)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny data, few steps: checks the pipeline, not the methods")
    parser.add_argument("--model", default="shapes-t2i")
    parser.add_argument("--data", type=Path, default=None, help="a pairwise dataset (default: make one with prefs make)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default runs/bench-alignment[-quick])")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="config names in configs/ (e.g. inpo-reference); none: style runs only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs-prompts", type=int, default=800, help="prompts for prefs make (4 images each → 6 pairs: 4800, ~4300 without ties)")
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("--curve-prompts", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--reward", default=None, help="a learned reward (folder or module:function) for the reward win rate")
    parser.add_argument("--styles", nargs="*", default=["winter", "sketch", "starry"])
    parser.add_argument("--name", default=None, help="results file benchmarks/results/NAME.json (default alignment[-quick]); e.g. one per seed run in parallel")
    parser.add_argument("--style-methods", nargs="*", default=["sft", "dpo", "rpo"], help="methods of the style-alignment table")
    parser.add_argument("--style-pairs", type=int, default=2000)
    parser.add_argument("--style-set", dest="style_overrides", action="append", default=[], help="extra key=value override for the style runs only (e.g. dpo.beta=500); tags their run folders")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra key=value override for every run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    if args.quick:
        args.seeds = args.seeds[:1]
        args.steps = min(args.steps, 20)
        args.pairs_prompts = min(args.pairs_prompts, 40)
        args.eval_prompts = min(args.eval_prompts, 48)
        args.curve_prompts = min(args.curve_prompts, 16)
        args.eval_every = min(args.eval_every, 10)
        args.sampling_steps = min(args.sampling_steps, 10)
        args.styles = args.styles[:1]
        args.style_pairs = min(args.style_pairs, 96)
    out = args.out or ROOT / "runs" / ("bench-alignment-quick" if args.quick else "bench-alignment")
    out.mkdir(parents=True, exist_ok=True)
    model = quick_model(out) if args.quick else args.model
    started = time.time()

    data = args.data or make_pairs(model, out / "prefs", args.pairs_prompts, 4, args.sampling_steps if args.quick else 30)
    from prefalign.data.preference import load_pairwise

    pairs = load_pairwise(data, "train", drop_ties=True)
    captions = set(pairs.captions)
    eval_sets = {
        "held_out_prompts": eval_prompts(args.eval_prompts, 12345, captions, "train"),
        "held_out_combinations": eval_prompts(max(16, args.eval_prompts // 4), 54321, captions, "held_out"),
    }
    eval_seed = 777
    base = cached_base_evaluation(out, model, eval_sets, eval_seed, args.sampling_steps, args.guidance, args.reward, args.device)
    overrides = [
        f"eval.every={args.eval_every}", f"eval.prompts={args.curve_prompts}", f"eval.sampling_steps={args.sampling_steps}",
        f"eval.guidance_scale={args.guidance}", "logging.progress=false", f"device={args.device}", *args.overrides,
    ]
    if args.quick:
        overrides += ["batch_size=8", "data.num_workers=0"]

    results: dict[str, list[dict[str, Any]]] = {}

    def summary() -> tuple[list, dict, list]:
        rows = [summarise(m, r, base, s) for s in eval_sets for m, r in results.items()]
        curves = {m: mean_curve(r) for m, r in results.items()}
        dpo_final = curves.get("dpo", [])[-1][1] if curves.get("dpo") else None
        speed = []
        for method, runs in results.items():
            reach = steps_to_reach(curves[method], dpo_final)
            speed.append({
                "method": method,
                "step_time_s": sum(r["step_time_s"] for r in runs) / len(runs),
                "overhead_ratio": sum(r.get("overhead_ratio", float("nan")) for r in runs) / len(runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "peak_memory_mib": max((r.get("peak_memory_mib") or 0) for r in runs),  # CUDA allocated on a GPU, else RSS
                "steps_to_dpo_final_win_rate": reach,
            })
        return rows, curves, speed

    name = args.name or ("alignment-quick" if args.quick else "alignment")

    def save(style_rows: list, complete: bool) -> Path:
        """Results so far (after every run, so a long benchmark cut short still leaves its numbers)."""
        rows, curves, speed = summary()
        return write_json(name, {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": model, "data": str(data), "pairs": len(pairs)},
            "complete": complete, "win_rates": rows, "curves": curves, "speed": speed, "style": style_rows, "wall_time_s": time.time() - started,
        })

    style_rows: list[dict[str, Any]] = []

    def style_alignment() -> None:
        """RPO's style alignment: for each style, SFT/DPO/RPO on styled-vs-plain pairs (first seed)."""
        for style in args.styles:
            style_data = make_style_pairs(out / f"style-{style}", style, args.style_pairs, 16 if args.quick else 32)
            plain = eval_sets["held_out_prompts"][: max(16, args.eval_prompts // 4)]
            base_share = base["held_out_prompts"]["style_counts"].get(style, 0) / len(eval_sets["held_out_prompts"])
            for method in args.style_methods:
                tag = "".join(f"-{o.replace('=', '').replace('.', '_').replace('/', '_')}" for o in args.style_overrides)
                job = {
                    "config": method, "model": model, "data": str(style_data), "steps": args.steps, "seed": args.seeds[0],
                    "overrides": overrides + ["eval.every=0", "eval.annotator=false", *args.style_overrides],
                    "run_dir": str(out / "style-runs" / f"{style}-{method}{tag}"),
                    "device": args.device, "threads": args.threads, "eval_sets": {"plain": plain}, "eval_seed": eval_seed,
                    "sampling_steps": args.sampling_steps, "guidance": args.guidance, "reward": None, "measure_overhead": False, "style": style,
                }
                result, _ = run_isolated(train_one, job)
                ev = result["evaluation"]["plain"]
                style_rows.append({
                    "style": style, "method": method, "style_share": ev["style_share"], "base_style_share": base_share,
                    "colour_accuracy": sum(ev["colour"]) / len(ev["colour"]), "shape_accuracy": sum(ev["shape"]) / len(ev["shape"]),
                    "overrides": args.style_overrides, "final_train": result["final_train"],
                })
                save(style_rows, complete=False)

    # Order: every method for the first seed, the style runs, then the other seeds — results are saved
    # after every run, so a benchmark cut short still has a full first seed and the style table.
    for index, seed in enumerate(args.seeds):
        for method in args.methods:
            job = {
                "config": method, "model": model, "data": str(data), "steps": args.steps, "seed": seed, "overrides": overrides,
                "run_dir": str(out / "runs" / f"{method}-seed{seed}"), "device": args.device, "threads": args.threads,
                "eval_sets": eval_sets, "eval_seed": eval_seed, "sampling_steps": args.sampling_steps, "guidance": args.guidance,
                "reward": args.reward, "measure_overhead": True,
            }
            result, peak = run_isolated(train_one, job)
            result["peak_rss_mib"] = peak
            results.setdefault(method, []).append(result)
            print(f"{method} seed {seed}: done ({time.time() - started:.0f} s)", flush=True)
            save(style_rows, complete=False)
        if index == 0:
            style_alignment()

    path = save(style_rows, complete=True)
    rows, curves, speed = summary()
    columns = ["method", "set", "win_rate", "ci95_low", "ci95_high", "annotator_score", "base_score", "attribute_accuracy", "base_attribute_accuracy"]
    if any("reward_win_rate" in r for r in rows):
        columns.append("reward_win_rate")
    print(table(rows, columns))
    print()
    print(table(speed))
    print()
    for method, curve in curves.items():
        print(f"{method:>6}: " + "  ".join(f"{s}:{v:.2f}" for s, v in curve))
    if style_rows:
        print()
        print(table(style_rows, STYLE_COLUMNS))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
