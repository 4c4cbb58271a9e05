"""Diff-Instruct++ on the shapes world (issue 7): one-step generators against the 50-step base model.

Three one-step generators are trained from the same base model with ``prefalign align
diff-instruct-pp`` (same steps, seed and settings), the paper's ablation of (α_rew, ω):

    distill     (0, 1)       plain Diff-Instruct distillation of the unguided model
    cfg         (0, ω)       distillation of the CFG teacher — "CFG is secretly RLHF": prompt fidelity
                             should rise with ω without any explicit reward
    di++        (α, ω)       + α_rew × the reward (``--reward``: the world's CLIP score by default)

Each generator and the base model (``--base-steps`` DDIM steps, CFG ω) then make one image for each
of ``--prompts`` held-out prompts (the world's held-out colour–shape combinations: seen by neither
the base model's pretraining nor the generators' training), image i with seed ``--seed`` + i, the
same starting noise for every model. Reported per model:

- annotator win rate against the base model (ties ½) with a 95 % Wilson interval over prompts,
  mean annotator score, attribute accuracy (mean of colour/shape/size/position/background checks)
  and the share with all five right;
- the learned reward (mean; ``--eval-reward``, default the training reward) and the CLIP score;
- images per second (same batch of ``--speed-images`` images, same threads) and the speed-up;
- diversity: mean pairwise RMS pixel distance (and 1 − cosine of CLIP embeddings) between
  ``--diversity-samples`` samples of each of ``--diversity-prompts`` prompts (mode collapse shows as
  a drop next to a rising reward).

Bar (issue 7): the DI++ generator wins ≥ 60 % against the base model and samples ≥ 30× faster.

    python benchmarks/diff_instruct_pp.py --quick      # minutes: a few steps, a few prompts (smoke test)
    python benchmarks/diff_instruct_pp.py              # the full benchmark (shipped shapes-t2i)

Trained runs are kept in ``--out`` and reused when finished with the same config (delete a run
folder to retrain it). Writes benchmarks/results/diff_instruct_pp[-quick].json and prints tables.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

from _common import table, write_json  # noqa: E402

from prefalign.evaluation import wilson_interval  # noqa: E402  (95 % Wilson interval, ties count ½)


def held_out_prompts(count: int, seed: int, split: str = "held_out") -> list[str]:
    """``count`` distinct world prompts of ``split`` (repeated when the split has fewer)."""
    from prefalign.worlds.shapes.prompts import all_scenes

    pool = [s.prompt for s in all_scenes(split)]
    random.Random(seed).shuffle(pool)
    return (pool * (count // len(pool) + 1))[:count]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train_generator(name: str, alpha_rew: float, guidance: float, args, out: Path) -> Path:
    """Train (or reuse) one generator; returns its export folder."""
    import json

    from prefalign.training.config import dump_config, load_align_config
    from prefalign.training.trainer import CONFIG_FILE, Trainer

    run = out / name
    overrides = [
        "logging.progress=false" if args.no_progress else "logging.progress=true",
        "logging.every=10",
        "eval.annotator=false",
        f"checkpoint.every={max(1, args.steps // 4)}",
        f"optimizer.learning_rate={args.lr}",
        f"finetune.mode={args.finetune}",
        f"threads={args.threads}",
        f"diff_instruct_pp.alpha_rew={alpha_rew}",
        f"diff_instruct_pp.guidance_scale={guidance}",
        f"diff_instruct_pp.ta_steps={args.ta_steps}",
        f"diff_instruct_pp.generator_timestep={args.t_star}",
        f"diff_instruct_pp.weighting={args.weighting}",
        f"ema.decay={args.ema}",
    ]
    if alpha_rew > 0:
        overrides.append(f"diff_instruct_pp.reward={args.reward}")
    overrides += args.set or []
    config = load_align_config(None, overrides, method="diff_instruct_pp", model=args.model, steps=args.steps, batch_size=args.batch_size, seed=args.train_seed)
    metrics_file = run / "metrics.json"
    if metrics_file.is_file() and (run / CONFIG_FILE).read_text() == dump_config(config):
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("status") == "finished" and metrics.get("steps") == args.steps:
            print(f"[{name}] reusing the finished run in {run}")
            return run / "export"
    started = time.time()
    resume = (run / "checkpoints").is_dir() and (run / CONFIG_FILE).is_file() and (run / CONFIG_FILE).read_text() == dump_config(config)
    if not resume and run.exists():
        import shutil

        shutil.rmtree(run)
    result = Trainer(config, run).train(resume=resume)
    print(f"[{name}] {result.steps} steps in {time.time() - started:.0f} s; final {result.metrics['final']}")
    return run / "export"


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def images_per_second(backbone, prompts: list[str], steps: int, guidance: float, batch_size: int) -> float:
    import torch

    from prefalign.sampling import generate

    generate(backbone, prompts[: min(4, len(prompts))], seed=0, steps=steps, guidance_scale=guidance, batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    with torch.no_grad():
        generate(backbone, prompts, seed=0, steps=steps, guidance_scale=guidance, batch_size=batch_size)
    return len(prompts) / (time.perf_counter() - started)


def diversity(images, clip) -> tuple[float, float]:
    """images [P, K, 3, H, W] → (mean pairwise RMS pixel distance, mean pairwise 1 − cos of CLIP embeddings)."""
    import torch

    P, K = images.shape[:2]
    flat = images.flatten(2)  # [P, K, D]
    rows, cols = torch.triu_indices(K, K, 1)
    pixel = ((flat[:, rows] - flat[:, cols]).pow(2).mean(-1).sqrt()).mean()
    with torch.no_grad():
        emb = clip.encode_images(images.flatten(0, 1)).view(P, K, -1)
    cosine = (emb[:, rows] * emb[:, cols]).sum(-1)
    return float(pixel), float((1 - cosine).mean())


def evaluate(name: str, backbone, steps: int, guidance: float, prompts: list[str], args, annotator, clip, scorer, base: dict | None, cache: Path | None = None) -> dict[str, Any]:
    import torch

    from prefalign.sampling import generate

    if cache is not None and cache.is_file():  # the base model's evaluation is reused between invocations
        saved = torch.load(cache, weights_only=True)
        return {**saved["row"], "_scores": saved["scores"]}
    images = generate(backbone, prompts, seed=args.seed, steps=steps, guidance_scale=guidance, batch_size=args.sample_batch, progress=not args.no_progress)
    scores = annotator.score(images, prompts)
    checks = annotator.attribute_checks(images, prompts)
    content = torch.stack([checks[k].float() for k in ("colour", "shape", "size", "position", "background")])
    row: dict[str, Any] = {
        "model": name,
        "steps": steps,
        "annotator_score": float(scores.mean()),
        "attribute_accuracy": float(content.mean()),
        "all_attributes": float(content.all(0).float().mean()),
        **{f"{k}_acc": float(checks[k].float().mean()) for k in ("colour", "shape", "size", "position", "background")},
        "clip_score": float(clip.similarity(images, prompts).mean()) if clip is not None else float("nan"),
        "learned_reward": float(scorer.score_batched(images, prompts).mean()) if scorer is not None else float("nan"),
    }
    if base is not None:
        wins = (scores > base["scores"]).float() + 0.5 * (scores == base["scores"]).float()
        low, high = wilson_interval(float(wins.sum()), len(prompts))
        row.update({"win_rate": float(wins.mean()), "ci95_low": low, "ci95_high": high})
    row["_scores"] = scores
    # diversity: K seeds for each of the first P prompts
    div_prompts = [p for p in prompts[: args.diversity_prompts] for _ in range(args.diversity_samples)]
    div_images = generate(backbone, div_prompts, seed=args.seed + 100_000, steps=steps, guidance_scale=guidance, batch_size=args.sample_batch)
    row["diversity_pixel"], row["diversity_clip"] = diversity(div_images.view(args.diversity_prompts, args.diversity_samples, *div_images.shape[1:]), clip)
    speed_prompts = prompts[: args.speed_images]
    row["images_per_s"] = images_per_second(backbone, speed_prompts, steps, guidance, args.sample_batch)
    if cache is not None:
        torch.save({"row": {k: v for k, v in row.items() if k != "_scores"}, "scores": scores}, cache)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few steps and prompts")
    parser.add_argument("--model", default="shapes-t2i")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-diff-instruct-pp")
    parser.add_argument("--steps", type=int, default=600, help="training steps of each generator")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--finetune", default="full", choices=["full", "lora"])
    parser.add_argument("--ta-steps", type=int, default=1)
    parser.add_argument("--t-star", type=int, default=625)
    parser.add_argument("--weighting", default="dmd")
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--cfg", type=float, default=3.0, help="ω of the teacher and of the base model's sampling")
    parser.add_argument("--alpha-rew", type=float, default=10.0)
    parser.add_argument("--reward", default="clip", help="training reward of the DI++ generator")
    parser.add_argument("--eval-reward", default=None, help="learned reward to report (default: --reward)")
    parser.add_argument("--set", action="append", help="extra align config override key=value (all runs)")
    parser.add_argument("--only", nargs="*", default=None, help="train/evaluate only these generators (distill, cfg, dipp)")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--split", default="held_out", choices=["held_out", "train"])
    parser.add_argument("--base-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--diversity-prompts", type=int, default=32)
    parser.add_argument("--diversity-samples", type=int, default=4)
    parser.add_argument("--speed-images", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--name", default=None, help="results file benchmarks/results/NAME.json (default diff_instruct_pp[-quick]); e.g. for a partial or timing run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.prompts = min(args.steps, 4), min(args.batch_size, 4), min(args.prompts, 16)
        args.diversity_prompts, args.diversity_samples, args.speed_images = 4, 3, 16
        args.base_steps = min(args.base_steps, 50)
        args.out = args.out.with_name(args.out.name + "-quick")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from prefalign.backbones.loading import load_backbone
    from prefalign.methods.diff_instruct_pp import load_reward
    from prefalign.rewards.clip import load_clip
    from prefalign.worlds.shapes.annotator import Annotator

    generators = {"distill": (0.0, 1.0), "cfg": (0.0, args.cfg), "dipp": (args.alpha_rew, args.cfg)}
    if args.only:
        generators = {k: v for k, v in generators.items() if k in args.only}
    exports = {name: train_generator(name, alpha, omega, args, args.out) for name, (alpha, omega) in generators.items()}

    prompts = held_out_prompts(args.prompts, args.seed, args.split)
    annotator = Annotator("balanced")
    clip = load_clip("shapes-clip")
    eval_reward = args.eval_reward or args.reward
    scorer = load_reward(eval_reward)
    base_model = load_backbone(args.model)
    weights = Path(str(base_model.unet.config.get("_name_or_path", ""))) / "diffusion_pytorch_model.safetensors"
    stamp = f"{base_model.schedule.prediction_type}-{int(weights.stat().st_mtime) if weights.is_file() else 0}"  # a replaced model is re-evaluated
    cache = args.out / f"base-{Path(args.model).name}-{stamp}-{args.split}-{args.prompts}-{args.base_steps}-{args.cfg}-{args.seed}-{args.diversity_prompts}x{args.diversity_samples}-{args.speed_images}-{eval_reward.replace('/', '_')}.pt"
    base = evaluate(f"base ({args.base_steps} steps)", base_model, args.base_steps, args.cfg, prompts, args, annotator, clip, scorer, None, cache)
    base["scores"] = base["_scores"]
    rows = [base]
    for name, export in exports.items():
        alpha, omega = generators[name]
        row = evaluate(name, load_backbone(export), 1, 1.0, prompts, args, annotator, clip, scorer, base)
        row.update({"alpha_rew": alpha, "omega": omega, "speed_up": row["images_per_s"] / base["images_per_s"]})
        rows.append(row)
    for row in rows:
        row.pop("_scores", None)
        row.pop("scores", None)
    dipp = next((r for r in rows if r["model"] == "dipp"), None)
    bar = {}
    if dipp is not None:
        bar = {"win_rate>=0.60": dipp["win_rate"] >= 0.60, "speed_up>=30": dipp["speed_up"] >= 30}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["eval_reward"] = eval_reward
    path = write_json(args.name or ("diff_instruct_pp" + ("-quick" if args.quick else "")), {"settings": settings, "rows": rows, "bar": bar})
    columns = ["model", "alpha_rew", "omega", "steps", "win_rate", "ci95_low", "ci95_high", "annotator_score", "attribute_accuracy", "all_attributes",
               "clip_score", "learned_reward", "diversity_pixel", "diversity_clip", "images_per_s", "speed_up"]
    print(table(rows, columns))
    print(table([{"model": r["model"], **{k: r[k] for k in r if k.endswith("_acc")}} for r in rows]))
    print("bar:", bar)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
