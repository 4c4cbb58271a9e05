"""PrefPaint's evaluation on the shapes world (issue 6; METHODS.md §4, §7).

1. Data and reward (unless given): ``prefs make-inpaint`` (masked prompt images of both kinds, 3
   completions each by the base inpainting model, rated 1–7 by the annotator) and
   ``reward train --objective pointwise`` on it (the reward model with V⁻¹).
2. Training curves of the paper's ablation, ``--seeds`` each: DDPO, DDPO with a constant 1.4× weight,
   and PrefPaint (trust weighting γ(z)); every run identical but for the sample weights. Per
   iteration: the rollouts' learned reward and annotator score (the truth the reward approximates).
3. PrefPaint's protocol against the base inpainting model on held-out masked prompt images (world
   prompts not used in training, both mask kinds), S = 10 samples per prompt and model with the
   same seeds, under the learned reward **and** the annotator, split by mask kind:
   - ``win@S``: chance that one sample of the aligned model beats the best of S samples of the base
     model (ties ½); ``win_best@S``: best of S against best of S;
   - mean reward, and the reward variance across a prompt's samples (mean over prompts);
   - reward hacking: gains of the learned reward and of the annotator score over the base, each in
     units of the base's across-sample std on that prompt set, and their difference (``gap``).

    python benchmarks/prefpaint.py --quick                 # minutes: a tiny version of everything
    python benchmarks/prefpaint.py [--iterations 60] [--seeds 0 1 2] [--data DIR] [--reward RM]

RL settings (both methods): full fine-tuning, AdamW, no gradient clipping, PPO clip 1e-4, K = 5
trained steps shared by the batch, advantages normalised over the batch and clipped at ±10, loss
summed, sampler refreshed every ``--refresh`` iterations (reference 15), the policy prompted with the
masked image only (empty text) — PrefPaint's released code except the size: 20 DDIM steps instead
of 50, batch 16, ``--lr`` instead of 2e-6 (a 2 M-parameter pixel model, not SD's 860 M).

Writes benchmarks/results/prefpaint.json (+ prefpaint_curves.png) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: variant → (method, method options, learning-rate factor). ``ddpo_x1.4`` scales every PPO term by 1.4
#: (the paper's constant-scale ablation; under Adam a constant loss scale is nearly a no-op), while
#: ``ddpo_lr1.4`` (not run by default) scales the learning rate instead.
VARIANTS = {
    "ddpo": ("ddpo", {}, 1.0),
    "ddpo_x1.4": ("ddpo", {"sample_weight": 1.4}, 1.0),
    "prefpaint": ("prefpaint", {}, 1.0),
    "ddpo_lr1.4": ("ddpo", {}, 1.4),
}
DEFAULT_VARIANTS = ["ddpo", "ddpo_x1.4", "prefpaint"]


def ensure_data(args) -> Path:
    from prefalign.data.inpaint_prefs import MakeInpaintPrefsConfig, make_inpaint_preferences

    data = Path(args.data) if args.data else Path(args.work) / "prefs-inpaint"
    if not (data / "card.json").is_file():
        config = MakeInpaintPrefsConfig(model=args.model, prompts=args.data_prompts, steps=args.steps, seed=args.seed)
        make_inpaint_preferences(config, data, overwrite=True, progress=args.progress)
    return data


def ensure_reward(args, data: Path) -> Path:
    reward = Path(args.reward) if args.reward else Path(args.work) / "reward-inpaint"
    if not (reward / "reward_model.json").is_file():
        command = [sys.executable, "-m", "prefalign.cli", "reward", "train", "--data", str(data), "--out", str(reward), "--objective", "pointwise"]
        if args.quick:
            command += ["--epochs", "5"]
        subprocess.run(command, check=True, cwd=ROOT)
    return reward


def run_variant(args, name: str, seed: int, reward: Path) -> dict:
    from prefalign.methods import get_method
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import Trainer

    method, extra, lr_factor = VARIANTS[name]
    options = {
        "reward": str(reward), "sampling_steps": args.steps, "train_timesteps": 5, "sampler_refresh": args.refresh,
        "prompt_count": args.train_prompts, "prompt_seed": args.seed, **extra,
    }
    overrides = [f"{method}.{k}={v}" for k, v in options.items()] + [
        "finetune.mode=full", "grad_clip=0", f"optimizer.learning_rate={args.lr * lr_factor}", "optimizer.weight_decay=0.01",
        "logging.every=1", f"logging.progress={args.progress}", "eval.annotator=false", "checkpoint.every=1000", f"threads={args.threads}",
        f"eval.every={args.eval_every}",
    ] + variant_overrides(args.overrides, method)
    config = load_align_config(None, overrides, method=method, model=args.model, batch_size=args.batch_size, seed=seed)
    per_iteration = get_method(method)(config.method_config()).steps_per_iteration(config)
    config = config.model_copy(update={"steps": args.iterations * per_iteration})
    folder = Path(args.work) / f"{name}-seed{seed}"
    started = time.time()
    metrics = finished_metrics(folder, config)
    if metrics is not None:  # a finished run of these settings: reuse it
        result = type("Result", (), {"metrics": metrics, "export_path": folder / "export"})
    else:
        result = Trainer(config, folder, hooks=[policy_hook(args, reward)]).train(resume=any(folder.glob("checkpoints/step-*")))
    evaluations = {int(e["step"]): e for e in result.metrics.get("eval", []) if "policy_reward" in e}
    curve = [{k: h[k] for k in ("step", "reward_mean", "annotator_score", "weight_mean", "bound_mean", "clip_fraction", "approx_kl") if k in h} for h in result.metrics["history"]]
    for point in curve:  # the current policy (not the possibly stale sampler) on fixed prompts and seeds
        point.update({k: v for k, v in evaluations.get(point["step"], {}).items() if k.startswith("policy_")})
    if 0 in evaluations:
        curve.insert(0, {"step": 0, **{k: v for k, v in evaluations[0].items() if k.startswith("policy_")}})
    return {"variant": name, "seed": seed, "export": str(result.export_path), "curve": curve, "wall_s": time.time() - started}


def variant_overrides(overrides: list[str], method: str) -> list[str]:
    """The ``--set`` overrides that apply to a variant of ``method``: trainer keys (``optimizer.…``) go
    to every variant, method keys only to their own method (``prefpaint.trust_k=3.5`` leaves DDPO as
    it is, so the variants still differ in their sample weights alone)."""
    methods = {m for m, _, _ in VARIANTS.values()} | {"rl"}
    chosen = []
    for override in overrides:
        prefix = override.split("=", 1)[0].split(".", 1)[0]
        if prefix == "rl":  # options of both RL methods (RLConfig): rl.sampler_refresh=1 → ddpo.… / prefpaint.…
            chosen.append(f"{method}.{override.split('.', 1)[1]}")
        elif prefix not in methods or prefix == method:
            chosen.append(override)
    return chosen


def finished_metrics(folder: Path, config) -> dict | None:
    """metrics.json of a finished run in ``folder`` with the same steps and settings (its saved
    config.yaml), else None."""
    from prefalign.training.config import config_differences, config_from_yaml_text

    finished, saved = folder / "metrics.json", folder / "config.yaml"
    if not (finished.is_file() and saved.is_file()):
        return None
    metrics = json.loads(finished.read_text())
    same = not config_differences(config_from_yaml_text(saved.read_text()), config)
    return metrics if metrics.get("status") == "finished" and metrics.get("steps") == config.steps and same else None


def policy_hook(args, reward: Path):
    """Trainer hook (every ``--eval-every`` iterations): learned reward and annotator score of the
    current policy on ``--curve-prompts`` fixed masked prompts with fixed seeds."""
    state: dict = {}

    def hook(context) -> dict:
        from prefalign.inpainting import inpaint
        from prefalign.rewards.base import load_scorer
        from prefalign.worlds.shapes.annotator import Annotator

        if "items" not in state:
            state["items"] = eval_prompts(args, context.backbone.latent_shape[-1], count=args.curve_prompts, offset=77)
            state["scorer"], state["annotator"] = load_scorer(str(reward)), Annotator()
        items = state["items"]
        images = inpaint(context.backbone, items, seed=args.seed + 7000, steps=args.steps, prompt_mode="empty")
        rewards = state["scorer"].score_batched(images, items.prompts, masked_images=items.masked_images, masks=items.masks)
        return {"policy_reward": float(rewards.mean()), "policy_annotator": float(state["annotator"].score(images, items.prompts).mean())}

    return hook


def eval_prompts(args, size: int, count: int | None = None, offset: int = 999):
    from prefalign.inpainting import world_inpaint_prompts
    from prefalign.worlds.shapes.prompts import sample_prompts

    captions = sample_prompts(count or args.eval_prompts, seed=args.seed + offset, split="train")
    return world_inpaint_prompts(captions, size, seed=args.seed + offset)


def sample_scores(model: str, items, args, scorer, annotator) -> dict[str, torch.Tensor]:
    """Rewards and annotator scores [P, S] of S completions per prompt (sample s uses seed base + s·P + p)."""
    from prefalign.backbones.loading import load_backbone
    from prefalign.inpainting import inpaint

    backbone = load_backbone(model)
    repeated = items.select(torch.arange(len(items)).repeat(args.samples))  # s-major: row s·P + p
    images = inpaint(backbone, repeated, seed=args.seed + 5000, steps=args.steps, prompt_mode="empty", batch_size=64, progress=args.progress)
    rewards = scorer.score_batched(images, repeated.prompts, masked_images=repeated.masked_images, masks=repeated.masks)
    truth = annotator.score(images, repeated.prompts)
    shape = (args.samples, len(items))
    return {"reward": rewards.view(shape).T.contiguous(), "annotator": truth.view(shape).T.contiguous()}


def win_rate(aligned: torch.Tensor, base: torch.Tensor, s: int, best_of_both: bool = False) -> float:
    """aligned, base: [P, S]. One aligned sample (every one, averaged) — or the best of the first s —
    against the best of the base's first s samples; ties count ½."""
    best_base = base[:, :s].max(1, keepdim=True).values  # [P, 1]
    mine = aligned[:, :s].max(1, keepdim=True).values if best_of_both else aligned
    return float(((mine > best_base).float() + 0.5 * (mine == best_base).float()).mean())


def compare(aligned: dict, base: dict, kinds: list[str]) -> list[dict]:
    rows = []
    for kind in ("outpaint", "warp", "all"):
        index = torch.tensor([i for i, k in enumerate(kinds) if kind in ("all", k)])
        for judge in ("reward", "annotator"):
            a, b = aligned[judge][index], base[judge][index]
            spread = float(b.std())
            row = {"mask": kind, "judge": judge}
            for s in (1, 3, 10):
                if s <= a.shape[1]:
                    row[f"win@{s}"] = win_rate(a, b, s)
                    row[f"win_best@{s}"] = win_rate(a, b, s, best_of_both=True)
            row.update({
                "mean": float(a.mean()), "base_mean": float(b.mean()),
                "variance": float(a.var(1).mean()), "base_variance": float(b.var(1).mean()),
                "gain_std": (float(a.mean()) - float(b.mean())) / spread if spread > 0 else float("nan"),
            })
            rows.append(row)
    return rows


def plot_curves(runs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {"ddpo": "tab:blue", "ddpo_x1.4": "tab:orange", "prefpaint": "tab:green", "ddpo_lr1.4": "tab:red"}
    for run in runs:
        for axis, key in zip(axes, ("policy_reward", "policy_annotator")):
            points = [(p["step"], p[key]) for p in run["curve"] if key in p]
            axis.plot([x for x, _ in points], [y for _, y in points], color=colours[run["variant"]], alpha=0.7, marker=".",
                      label=run["variant"] if run["seed"] == runs[0]["seed"] else None)
    axes[0].set_title("learned reward of the policy")
    axes[1].set_title("annotator score of the policy")
    for axis in axes:
        axis.set_xlabel("iteration")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-inpaint")
    parser.add_argument("--data", default=None, help="pointwise inpainting dataset (default: make one)")
    parser.add_argument("--reward", default=None, help="reward model folder (default: train one on the data)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-prefpaint"))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (data, policy, evaluation)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--refresh", type=int, default=15, help="sampler refresh interval (reference 15)")
    parser.add_argument("--data-prompts", type=int, default=600, help="masked prompt images of the made dataset (×3 completions)")
    parser.add_argument("--train-prompts", type=int, default=256, help="masked prompt images the policy trains on")
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--curve-prompts", type=int, default=32, help="fixed prompts of the policy curves")
    parser.add_argument("--eval-every", type=int, default=5, help="iterations between policy evaluations (curves)")
    parser.add_argument("--samples", type=int, default=10, help="S: samples per evaluation prompt and model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, prompts and evaluation noise")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file benchmarks/results/NAME.json (+ NAME_curves.png; default prefpaint[_quick]), e.g. one per learning rate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the runs (repeatable): trainer keys apply to every variant, "
                        "rl.KEY to both RL methods, prefpaint.KEY / ddpo.KEY to that method only (e.g. prefpaint.trust_k=3.5)")
    parser.add_argument("--no-protocol", dest="protocol", action="store_false",
                        help="training curves only (e.g. a learning-rate sweep): skip the win-rate protocol against the base model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole protocol")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.seeds, args.batch_size, args.steps = 4, [0], 4, 6
        args.data_prompts, args.train_prompts, args.eval_prompts, args.samples, args.curve_prompts, args.eval_every = 24, 16, 8, 3, 4, 2
        args.work = str(Path(args.work).with_name(Path(args.work).name + "-quick"))
    Path(args.work).mkdir(parents=True, exist_ok=True)

    from prefalign.backbones.loading import load_backbone
    from prefalign.rewards.base import load_scorer
    from prefalign.worlds.shapes.annotator import Annotator

    started = time.time()
    data = ensure_data(args)
    reward = ensure_reward(args, data)
    runs = [run_variant(args, name, seed, reward) for seed in args.seeds for name in args.variants]

    scorer, annotator = load_scorer(str(reward)), Annotator()
    rows = []
    if args.protocol:
        items = eval_prompts(args, load_backbone(args.model).latent_shape[-1])
        base = sample_scores(args.model, items, args, scorer, annotator)
        for run in runs:
            if run["seed"] != args.seeds[0]:
                continue  # the protocol on the first seed's models; curves cover every seed
            for row in compare(sample_scores(run["export"], items, args, scorer, annotator), base, items.kinds):
                rows.append({"variant": run["variant"], **row})
    finals = []
    for run in runs:
        rollouts = [p for p in run["curve"] if "reward_mean" in p]
        tail = rollouts[-max(1, len(rollouts) // 5):]
        head = rollouts[: max(1, len(rollouts) // 5)]
        mean = lambda points, key: sum(p[key] for p in points) / len(points)  # noqa: E731
        policy = [p for p in run["curve"] if "policy_reward" in p]
        finals.append({
            "variant": run["variant"], "seed": run["seed"],
            "reward_start": mean(head, "reward_mean"), "reward_end": mean(tail, "reward_mean"),
            "annotator_start": mean(head, "annotator_score"), "annotator_end": mean(tail, "annotator_score"),
            "policy_reward_start": policy[0]["policy_reward"] if policy else None, "policy_reward_end": policy[-1]["policy_reward"] if policy else None,
            "policy_annotator_start": policy[0]["policy_annotator"] if policy else None, "policy_annotator_end": policy[-1]["policy_annotator"] if policy else None,
            "weight_mean": mean(rollouts, "weight_mean"), "clip_fraction": mean(rollouts, "clip_fraction"), "wall_s": run["wall_s"],
        })
    headline = [r for r in rows if r["variant"] == "prefpaint" and r["mask"] == "all"]
    bar = {f"prefpaint win@1 vs base ({r['judge']})": r.get("win@1") for r in headline}
    columns = ["variant", "mask", "judge", "win@1", "win@3", "win@10", "win_best@3", "win_best@10", "mean", "base_mean", "variance", "base_variance", "gain_std"]
    print(table(rows, [c for c in columns if any(c in r for r in rows)]))
    print()
    print(table(finals))
    print("bar (learned-reward win@1 ≥ 0.70):", bar)
    name = args.name or ("prefpaint_quick" if args.quick else "prefpaint")
    plot = plot_curves(runs, RESULTS / f"{name}_curves.png")
    path = write_json(name, {
        "settings": vars(args), "data": str(data), "reward": str(reward), "protocol": rows, "training": finals,
        "curves": runs, "bar": bar, "plot": str(plot) if plot else None, "wall_s": time.time() - started,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
