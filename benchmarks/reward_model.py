"""The bars of issue 4: the world's CLIP and PrefPaint's reward model with its confidence bound.

1. CLIP: zero-shot colour / shape / style accuracy of the shipped ``shapes-clip`` on clean renders
   (bar ≥ 90 % each), held-in prompts and held-out colour–shape combinations.
2. Data — **samples of the shipped text-to-image model** ``shapes-t2i`` (what users align; DDIM,
   ``--steps`` 10, CFG 3), no renders: ``prefs make`` with ``--prompts`` held-in prompts ×
   ``--per-prompt`` samples, all pairs per prompt (420 × C(5, 2) = 4.2k pairs), labelled by the
   balanced annotator (Bradley–Terry draws with ties); 20 % of the prompts form the test split.
   An evaluation-only set (2 samples per prompt, one pair) mixes a third each of new held-in
   prompts, held-out colour–shape combinations and styled prompts — off-distribution for the
   reward model, whose training prompts have neither.
3. Reward models (one per ``--fix-rates`` value; 1 = frozen CLIP, 0.7 = PrefPaint's reference)
   trained pairwise (Bradley–Terry) on the train split. On the test split: accuracy vs the
   ceiling (the noiseless annotator's accuracy on the same noisy labels; bar: ≥ 95 % of it) and
   Spearman's ρ of the reward with the noiseless annotator score (pooled over the test images, and
   the mean within a prompt — pairwise training does not identify offsets between prompts). On
   the test split + the evaluation set together: Spearman's ρ of |reward error| (reward mapped
   affinely onto the annotator score) with ‖z‖_{V⁻¹} (bar: > 0, with a bootstrap 95 % interval)
   and PrefPaint's Fig. 2 (upper line, β_δ).
4. ``--oracle-labels`` (a diagnostic, not a contestant for the bar): every model again, trained on
   the same pairs relabelled by the noiseless annotator. Its accuracy on the test split's noisy
   labels, and its ``true_order_acc`` (agreement with the noiseless order), separate the two limits
   of a reward model: label noise in the training data, and what the encoder's features can tell.

    python benchmarks/reward_model.py [--prompts 420] [--per-prompt 5] [--steps 10] [--fix-rates 1.0 0.7]

Prints tables and writes benchmarks/results/reward_model.json (+ NAME_fig2_fix*.png, NAME from --name). Data
and models go to --work (default runs/bench-reward) and are reused when present (--fresh rebuilds).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import RESULTS, table, write_json  # noqa: E402

from prefalign.data import load_preference_data  # noqa: E402
from prefalign.data.stats import spearman_correlation  # noqa: E402
from prefalign.rewards.base import AnnotatorScorer  # noqa: E402
from prefalign.rewards.clip import load_clip, zero_shot_report  # noqa: E402
from prefalign.rewards.labelling import MakePrefsConfig, make_preferences  # noqa: E402
from prefalign.rewards.prefpaint import RewardModel, RewardModelConfig  # noqa: E402
from prefalign.rewards.training import (  # noqa: E402
    RewardTrainConfig,
    bound_analysis,
    evaluate_reward_model,
    in_distribution_flags,
    plot_error_vs_bound,
    score_dataset,
    train_reward_model,
)
from prefalign.worlds.shapes.prompts import sample_prompts  # noqa: E402


def clip_rows(count: int) -> list[dict]:
    clip = load_clip("shapes-clip")
    rows = []
    for split, seed in (("train", 777), ("held_out", 778)):
        report = zero_shot_report(clip, count, seed=seed, split=split)
        rows.append({"clip prompts": "held-in" if split == "train" else "held-out combinations", **{k.removesuffix("_accuracy"): v for k, v in report.items()}})
    return rows


def bootstrap_spearman(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 400) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of Spearman's ρ(a, b) (resampling samples)."""
    rng = np.random.default_rng(seed)
    values = [spearman_correlation(a[rows], b[rows]) for rows in (rng.integers(0, len(a), len(a)) for _ in range(resamples))]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def evaluation_prompts(count: int, seed: int) -> list[str]:
    """A third each: new held-in prompts, held-out combinations, styled held-in prompts."""
    third = count // 3
    return (
        sample_prompts(third, seed=seed, split="train")
        + sample_prompts(third, seed=seed + 1, split="held_out")
        + sample_prompts(count - 2 * third, seed=seed + 2, split="train", style_probability=1.0)
    )


def make_data(work: Path, args) -> tuple[Path, Path, dict]:
    timings = {}
    data, evaluation = work / "pairs", work / "evaluation"
    if not (data / "card.json").is_file():
        started = time.time()
        config = MakePrefsConfig(model=args.model, prompts=args.prompts, per_prompt=args.per_prompt, steps=args.steps, seed=args.seed, test_fraction=0.2, batch_size=128)
        make_preferences(config, data, overwrite=True)
        timings["make_pairs_s"] = time.time() - started
    if not (evaluation / "card.json").is_file():
        started = time.time()
        config = MakePrefsConfig(model=args.model, per_prompt=2, steps=args.steps, seed=args.seed + 1000, test_fraction=1.0, batch_size=128)
        make_preferences(config, evaluation, prompts=evaluation_prompts(args.evaluation_prompts, args.seed + 1000), overwrite=True)
        timings["make_evaluation_s"] = time.time() - started
    return data, evaluation, timings


def oracle_relabelled(data: Path, out: Path) -> Path:
    """A copy of ``data`` whose train split is labelled by the **noiseless** annotator (label_0 = 1
    when image 0 scores higher; the noisy dataset's ties get a label too); the test split is kept.
    A reward model trained on it shows what the encoder's features allow without label noise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefalign.data.storage import available_splits, shard_files
    from prefalign.data.validation import decode_image

    if (out / "card.json").is_file():
        return out
    annotator = AnnotatorScorer("balanced")
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name in ("card.json", "prefalign_dataset.json", "README.md"):
        if (data / name).is_file():
            shutil.copy(data / name, out / name)
    for file in shard_files(data, "test") if "test" in available_splits(data) else []:
        shutil.copy(file, out / "data" / file.name)
    for file in shard_files(data, "train"):
        table_ = pq.read_table(file)
        captions = table_.column("caption").to_pylist()
        sides = [torch.stack([decode_image(b) for b in table_.column(column).to_pylist()]) for column in ("jpg_0", "jpg_1")]
        difference = annotator.score_batched(sides[0], captions) - annotator.score_batched(sides[1], captions)
        label_0 = torch.where(difference > 0, 1.0, torch.where(difference < 0, 0.0, 0.5)).double().numpy()
        for column, values in (("label_0", label_0), ("label_1", 1.0 - label_0)):
            table_ = table_.set_column(table_.schema.get_field_index(column), column, pa.array(values, pa.float64()))
        pq.write_table(table_, out / "data" / file.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=420)
    parser.add_argument("--per-prompt", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--evaluation-prompts", type=int, default=300)
    parser.add_argument("--model", default="shapes-t2i", help="text-to-image model that samples the data")
    parser.add_argument("--data-only", action="store_true", help="only make the datasets")
    parser.add_argument("--fix-rates", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--name", default="reward_model", help="results file benchmarks/results/NAME.json")
    parser.add_argument("--image-statistics", action="store_true", help="also train a frozen-encoder model with the image-statistics token")
    parser.add_argument("--oracle-labels", action="store_true",
                        help="also train every model on the train split relabelled by the noiseless annotator "
                        "(a diagnostic: is the accuracy limited by label noise or by the features?)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--clip-renders", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-reward"))
    parser.add_argument("--fresh", action="store_true", help="rebuild data and models")
    args = parser.parse_args()
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.time()
    if args.data_only:
        print(make_data(args.work, args)[2])
        return
    clip = clip_rows(args.clip_renders)
    clip_bar = {f"clip_{k}_held_in>=0.90": clip[0][k] >= 0.90 for k in ("colour", "shape", "style")}
    print(table(clip))

    data, evaluation, timings = make_data(args.work, args)
    annotator = AnnotatorScorer("balanced")
    rows, group_rows, details = [], [], {}
    variants = [(f, False, False) for f in args.fix_rates] + ([(1.0, True, False)] if args.image_statistics else [])
    if args.oracle_labels:  # the same models again, trained on noiseless labels
        variants += [(f, statistics, True) for f, statistics, _ in variants]
        oracle = oracle_relabelled(data, args.work / "pairs-oracle")
    for fix_rate, statistics, noiseless in variants:
        name = f"rm-fix{fix_rate:g}" + ("-stats" if statistics else "") + ("-oracle" if noiseless else "")
        variant = f"{fix_rate:g}" + (" + stats" if statistics else "") + (", oracle labels" if noiseless else "")
        out = args.work / name
        model_config = RewardModelConfig(fix_rate=fix_rate, image_statistics=statistics)
        config = RewardTrainConfig(epochs=args.epochs, seed=args.seed, model=model_config, tensorboard=False)
        if not (out / "reward_model.json").is_file():
            t = time.time()
            train_reward_model(oracle if noiseless else data, out, config)
            timings[f"train_{name}_s"] = time.time() - t
        model = RewardModel.from_pretrained(out)
        test = evaluate_reward_model(model, data, "test", plot=args.work / f"{name}-test.png")
        off = evaluate_reward_model(model, evaluation, "test", plot=args.work / f"{name}-evaluation.png")
        # Fig. 2 over held-out test pairs + the evaluation set (in- and off-distribution together)
        scored = [score_dataset(model, annotator, load_preference_data(path, "test"), 256, True) for path in (data, evaluation)]
        parts = [side for s in scored for side in (s["side_0"], s["side_1"])]
        prompts = [p for s in scored for p in s["prompts"] * 2]
        rewards, truth, bounds = (torch.cat([p[k] for p in parts]) for k in ("reward", "truth", "bound"))
        union = bound_analysis(rewards, truth, bounds, seed=args.seed)
        errors = union.pop("errors")
        flags = in_distribution_flags(prompts)
        union["error_bound_spearman_ci95"] = bootstrap_spearman(errors, bounds.numpy(), seed=args.seed)
        plot = plot_error_vs_bound(
            bounds.numpy(), errors, flags, union["upper_line"], RESULTS / f"{args.name}_fig2_{name.removeprefix('rm-')}.png",
            title=f"PrefPaint Fig. 2 on the shapes world (fix_rate {variant})", beta_delta=union["beta_delta"],
        )
        by_group = {}
        for flag in sorted(set(flags)):
            mask = np.asarray(flags) == flag
            by_group[flag] = {
                "samples": int(mask.sum()),
                "mean_bound": float(bounds[torch.as_tensor(mask)].mean()),
                "mean_abs_error": float(errors[mask].mean()),
                "reward_annotator_spearman": spearman_correlation(rewards[torch.as_tensor(mask)], truth[torch.as_tensor(mask)]),
            }
        rows.append(
            {
                "fix_rate": variant,
                "test_pairs": test["pairs_compared"],
                "accuracy": test["accuracy"],
                "ceiling": test["ceiling_accuracy"],
                "acc/ceiling": test["accuracy_over_ceiling"],
                "true_order_acc": test["true_order_accuracy"],
                "spearman": test["spearman_with_annotator"],
                "spearman_in_prompt": test["spearman_within_prompt"],
                "off_dist_accuracy": off["accuracy"],
                "off_dist_ceiling": off["ceiling_accuracy"],
                "err~bound_rho": union["error_bound_spearman"],
                "rho_ci95": "[{:.3f}, {:.3f}]".format(*union["error_bound_spearman_ci95"]),
                "under_line": union["share_under_line"],
                "beta_delta": union["beta_delta"],
            }
        )
        group_rows += [{"fix_rate": variant, "group": flag, **values} for flag, values in by_group.items()]
        details[name] = {"test": test, "evaluation_set": off, "union_bound": {**union, "by_group": by_group, "plot": str(plot)}}
    print(table(rows))
    print(table(group_rows))
    contestants = [r for r in rows if "oracle" not in r["fix_rate"]]  # oracle-label models are a diagnostic, not a result
    bar = {
        **clip_bar,
        **{f"fix_rate={r['fix_rate']}: accuracy>=0.95*ceiling": bool(r["acc/ceiling"] >= 0.95) for r in contestants},
        **{f"fix_rate={r['fix_rate']}: error grows with bound (spearman>0)": bool(r["err~bound_rho"] > 0) for r in contestants},
    }
    print("bars:", bar)
    cards = {path.name: __import__("json").loads((path / "card.json").read_text()) for path in (data, evaluation)}
    timings["total_s"] = time.time() - started
    path = write_json(args.name, {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "clip": clip, "rows": rows, "bar": bar, "details": details, "datasets": cards, "timings": timings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
