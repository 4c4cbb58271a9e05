"""Training and evaluating reward models (PrefPaint §3, METHODS.md §4).

Objectives:
- **pairwise** (Bradley–Terry): −[ℓ·log σ(r₀ − r₁) + (1 − ℓ)·log σ(r₁ − r₀)] with ℓ = label_0
  (a tie, ℓ = 0.5, pulls the two rewards together); pairwise data, or the within-group rank pairs
  of pointwise data;
- **pointwise** (regression, PrefPaint's reward): (r − y)² on standardised scores y.

The frozen part of the encoder runs once per image (its outputs are cached), so an epoch costs
only the trainable part. Model selection: the epoch with the best validation accuracy (a held-out
share of the training prompts/groups). After training, V = λI + Σ z zᵀ is computed over the
features of every training image and saved with the model.

Evaluation (``reward eval``): held-out pairwise accuracy; the *ceiling* — the accuracy of the
noiseless labeller's score difference at predicting the same noisy labels; Spearman's ρ with the
noiseless annotator score; and PrefPaint's Fig. 2: |reward error| against ‖z‖_{V⁻¹}, where the
reward is mapped affinely onto the annotator score (fitted on a calibration half of the held-out
images), with a fitted upper line (0.95-quantile regression on the calibration half) and the share
of the other half under it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from prefalign.data import PairwiseDataset, PointwiseDataset, load_preference_data
from prefalign.data.stats import binomial_interval, pairwise_agreement, spearman_correlation
from prefalign.errors import PrefalignError
from prefalign.rewards.prefpaint import RewardModel, RewardModelConfig

# ---------------------------------------------------------------------------------------------
# Losses (pure functions)
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(reward_0: torch.Tensor, reward_1: torch.Tensor, label_0: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood with soft labels (Pick-a-Pic / PickScore):
    mean_i −[ℓ_i·log σ(r₀ᵢ − r₁ᵢ) + (1 − ℓ_i)·log σ(r₁ᵢ − r₀ᵢ)].  All inputs [B] → scalar."""
    margin = reward_0 - reward_1
    label = label_0.to(margin.dtype)
    return -(label * F.logsigmoid(margin) + (1 - label) * F.logsigmoid(-margin)).mean()


def regression_loss(reward: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error mean_i (r_i − y_i)² (PrefPaint's pointwise reward training). [B] → scalar."""
    return (reward - target.to(reward.dtype)).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class RewardTrainConfig(BaseModel):
    """Settings of ``prefalign reward train``."""

    objective: Literal["pairwise", "pointwise"] = "pairwise"
    split: str = "train"
    model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    encoder_learning_rate: float = Field(3e-5, gt=0, description="learning rate of the unfrozen encoder blocks (fix_rate < 1)")
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="share of training prompts (groups) held out for model selection")
    patience: int = Field(8, ge=1, description="stop after this many epochs without a better validation accuracy")
    drop_ties: bool = Field(False, description="drop tied pairs (otherwise they train with label 0.5)")
    normalize_scores: bool = Field(True, description="pointwise: regress on standardised scores")
    seed: int = 0
    threads: int = Field(0, ge=0)
    tensorboard: bool = True


def _split_groups(keys: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation records, split by key (prompt / group) so that one
    prompt's records are on one side only."""
    unique = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    count = int(round(len(unique) * fraction)) if fraction > 0 else 0
    if fraction > 0 and len(unique) > 1:
        count = min(max(count, 1), len(unique) - 1)
    held = {unique[i] for i in order[:count]}
    mask = np.array([k in held for k in keys])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class _Cache:
    """Per-image cached encoder inputs and prompt embeddings of a dataset (see RewardModel.cache_input)."""

    def __init__(self, model: RewardModel, data, pairs: list[tuple[int, int]] | None, batch_size: int = 256, progress: bool = True):
        self.kind = "pairwise" if isinstance(data, PairwiseDataset) else "pointwise"
        self.pairs = pairs
        images, masked, prompts = [], [], []
        batches = data.batches(batch_size)
        total = math.ceil(len(data) / batch_size)
        for batch in tqdm(batches, total=total, desc="encoding images", disable=not progress, leave=False):
            if self.kind == "pairwise":
                images.append(torch.stack([model.cache_input(batch.images_0), model.cache_input(batch.images_1)], 1))  # [b, 2, ...]
            else:
                images.append(model.cache_input(batch.images))
                if model.config.inpainting:
                    if batch.masked_images is None:
                        raise PrefalignError("an inpainting reward model needs an inpainting dataset (masked_image and mask columns)")
                    masked.append(model.cache_input(batch.masked_images))
            prompts.extend(batch.captions)
        self.inputs = torch.cat(images)
        self.masked = torch.cat(masked) if masked else None
        self.prompt_embeddings = model.prompt_embeddings(prompts) if model.config.use_prompt else None
        if self.kind == "pairwise":
            self.labels = data.label_0
        else:
            self.scores = data.scores

    def rewards(self, model: RewardModel, index: torch.Tensor, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards [b], features [b, d]) of records ``index`` (pairwise: image ``side``)."""
        cached = self.inputs[index] if side is None else self.inputs[index, side]
        image = model.embed_cached(cached)
        prompt = self.prompt_embeddings[index] if self.prompt_embeddings is not None else None
        masked = model.embed_cached(self.masked[index]) if self.masked is not None else None
        z = model.features_from_embeddings(image, prompt, masked)
        return model.reward_from_features(z), z


def _pair_index(cache: _Cache, records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first, second, label_0) tensors of the comparisons among ``records``."""
    if cache.kind == "pairwise":
        index = torch.as_tensor(records, dtype=torch.long)
        return index, index, cache.labels[index]
    chosen = set(int(r) for r in records)
    pairs = [(i, j) for i, j in cache.pairs if i in chosen and j in chosen]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    first, second = torch.tensor(pairs).T
    return first, second, torch.ones(len(pairs))


@torch.no_grad()
def _accuracy(model: RewardModel, cache: _Cache, records: np.ndarray) -> float:
    first, second, label = _pair_index(cache, records)
    if len(first) == 0:
        return float("nan")
    model.eval()
    r0, r1 = [], []
    for start in range(0, len(first), 1024):
        rows = slice(start, start + 1024)
        if cache.kind == "pairwise":
            r0.append(cache.rewards(model, first[rows], 0)[0])
            r1.append(cache.rewards(model, second[rows], 1)[0])
        else:
            r0.append(cache.rewards(model, first[rows])[0])
            r1.append(cache.rewards(model, second[rows])[0])
    return pairwise_agreement(torch.cat(r0) - torch.cat(r1), label)[0]


def train_reward_model(data_path: str | Path, out: str | Path, config: RewardTrainConfig, progress: bool = True, clip=None) -> tuple[RewardModel, dict[str, Any]]:
    """Train a reward model on the dataset at ``data_path``; save it (with V) to ``out``. Returns
    the model and a training summary."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = load_preference_data(data_path, config.split, drop_ties=config.drop_ties, progress=progress)
    if progress and data.report.bad:
        tqdm.write(data.report.summary())
    pointwise_data = isinstance(data, PointwiseDataset)
    if config.objective == "pointwise" and not pointwise_data:
        raise PrefalignError(f"--objective pointwise needs a pointwise (scored) dataset; {data_path} is pairwise: use --objective pairwise")
    model_config = config.model
    if pointwise_data and data.inpainting and not model_config.inpainting:
        model_config = model_config.model_copy(update={"inpainting": True})
    model = RewardModel(model_config, clip=clip)
    keys = data.captions if not pointwise_data else data.group_ids
    train_records, valid_records = _split_groups(keys, config.validation_fraction, config.seed)
    pairs = data.group_pairs() if pointwise_data else None
    cache = _Cache(model, data, pairs, progress=progress)

    if config.objective == "pointwise":
        scores = cache.scores
        mean, std = (float(scores[train_records].mean()), float(scores[train_records].std().clamp(min=1e-6))) if config.normalize_scores else (0.0, 1.0)
        targets = (scores - mean) / std
        units = torch.as_tensor(train_records)
    else:
        mean, std = 0.0, 1.0
        first, second, labels = _pair_index(cache, train_records)
        if len(first) == 0:
            raise PrefalignError(f"{data_path} has no comparisons to train on (pointwise data needs groups with different scores)")
        units = torch.arange(len(first))

    head_parameters = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip.")]
    encoder_parameters = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")]
    groups = [{"params": head_parameters, "lr": config.learning_rate}]
    if encoder_parameters:
        groups.append({"params": encoder_parameters, "lr": config.encoder_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(units) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    writer = None
    if config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(out).with_name(Path(out).name + "-tensorboard")))
    generator = torch.Generator().manual_seed(config.seed)
    best = (-1.0, None, 0)
    history = []
    step = 0
    started = time.time()
    bar = tqdm(range(config.epochs), desc="reward train", disable=not progress)
    for epoch in bar:
        model.train()
        order = units[torch.randperm(len(units), generator=generator)]
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            if config.objective == "pointwise":
                reward, _ = cache.rewards(model, batch)
                loss = regression_loss(reward, targets[batch])
            elif cache.kind == "pairwise":
                r0, _ = cache.rewards(model, first[batch], 0)
                r1, _ = cache.rewards(model, second[batch], 1)
                loss = bradley_terry_loss(r0, r1, labels[batch])
            else:
                r0, _ = cache.rewards(model, first[batch])
                r1, _ = cache.rewards(model, second[batch])
                loss = bradley_terry_loss(r0, r1, labels[batch])
            if not torch.isfinite(loss):
                raise PrefalignError(f"the reward loss became {loss.item()} at epoch {epoch}; lower --set learning_rate=…")
            scale = min(1.0, (step + 1) / max(1, config.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        train_accuracy = _accuracy(model, cache, train_records)
        valid_accuracy = _accuracy(model, cache, valid_records) if len(valid_records) else train_accuracy
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_accuracy": train_accuracy, "validation_accuracy": valid_accuracy}
        history.append(entry)
        if writer is not None:
            for key, value in entry.items():
                if key != "epoch":
                    writer.add_scalar(f"reward/{key}", value, epoch + 1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", train=f"{train_accuracy:.3f}", valid=f"{valid_accuracy:.3f}")
        if valid_accuracy > best[0]:
            best = (valid_accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)
        elif epoch + 1 - best[2] >= config.patience:
            break
    if writer is not None:
        writer.close()
    model.load_state_dict(best[1])
    model.eval()

    # V over the features of every training image (both images of a pair).
    with torch.no_grad():
        index = torch.as_tensor(train_records, dtype=torch.long)
        features = []
        for start in range(0, len(index), 1024):
            rows = index[start : start + 1024]
            if cache.kind == "pairwise":
                features += [cache.rewards(model, rows, 0)[1], cache.rewards(model, rows, 1)[1]]
            else:
                features.append(cache.rewards(model, rows)[1])
        model.set_confidence(torch.cat(features))

    summary = {
        "data": str(data_path),
        "split": config.split,
        "objective": config.objective,
        "records": len(data),
        "bad_records": len(data.report.bad),
        "train_records": int(len(train_records)),
        "validation_records": int(len(valid_records)),
        "best_epoch": best[2],
        "validation_accuracy": best[0],
        "epochs_run": len(history),
        "wall_time_s": round(time.time() - started, 1),
        "score_normalisation": {"mean": mean, "std": std},
        "history": history,
        "train_config": config.model_dump(),
    }
    model.metadata.update({"name": Path(out).name, "training": summary, "labeller": _labeller(data_path)})
    save_atomically(model, out)
    return model, summary


def save_atomically(model: RewardModel, out: str | Path) -> Path:
    """Write the model folder next to ``out`` and rename it into place (a killed run never leaves a
    half-written model; an existing folder is replaced)."""
    import os
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, card=reward_card(model))
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def _labeller(data_path: str | Path) -> str:
    from prefalign.data.storage import read_meta

    return str(read_meta(data_path).get("origin", {}).get("scorer", "annotator"))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def quantile_line(x: np.ndarray, y: np.ndarray, quantile: float = 0.95, slopes: int = 400) -> tuple[float, float]:
    """Linear quantile regression y ≈ a + c·x at ``quantile`` (minimum pinball loss) with c ≥ 0 —
    an *upper bound* that grows with x, the form of the theory's β_δ·‖z‖_{V⁻¹} (a falling line would
    not be a confidence bound; when the data have no rising trend the fit is flat, c = 0). For each
    candidate slope the best intercept is the quantile of y − c·x. Returns (a, c)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    spread = (np.quantile(y, 0.99) - np.quantile(y, 0.01)) / max(np.ptp(x), 1e-12)
    best = (np.inf, 0.0, float(np.quantile(y, quantile)))
    for c in np.linspace(0.0, 3 * spread, slopes):
        residual = y - c * x
        a = np.quantile(residual, quantile)
        r = residual - a
        loss = np.mean(np.maximum(quantile * r, (quantile - 1) * r))
        if loss < best[0]:
            best = (loss, float(c), float(a))
    return best[2], best[1]


def within_group_spearman(values, truth, groups: list[str], minimum: int = 3) -> float:
    """Mean over groups (prompts) with at least ``minimum`` samples of Spearman's ρ(values, truth)
    inside the group. A reward trained on pairs of one prompt learns differences within a prompt;
    its offset between prompts is not identified, which the pooled ρ mixes in. NaN if no group."""
    v, t = np.asarray(torch.as_tensor(values).double()), np.asarray(torch.as_tensor(truth).double())
    index: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        index.setdefault(group, []).append(i)
    values_ = [spearman_correlation(v[rows], t[rows]) for rows in index.values() if len(rows) >= minimum]
    values_ = [x for x in values_ if np.isfinite(x)]
    return float(np.mean(values_)) if values_ else float("nan")


def in_distribution_flags(prompts: list[str]) -> list[str]:
    """"in-distribution", "held-out combination", "styled" or "other" per prompt."""
    from prefalign.worlds.shapes.prompts import try_parse_prompt

    flags = []
    for prompt in prompts:
        scene = try_parse_prompt(prompt)
        if scene is None:
            flags.append("other")
        elif scene.style is not None:
            flags.append("styled")
        elif scene.held_out:
            flags.append("held-out combination")
        else:
            flags.append("in-distribution")
    return flags


def bound_analysis(rewards: torch.Tensor, truth: torch.Tensor, bounds: torch.Tensor, seed: int = 0, quantile: float = 0.95) -> dict[str, Any]:
    """PrefPaint Fig. 2 numbers: calibrate reward → truth affinely and fit the upper line (a + c·b,
    c ≥ 0, the ``quantile`` quantile) and the proportional bound β_δ·b on a random half; report on
    the other half the share under each, and on all samples the Spearman ρ of |error| with b.
    rewards, truth, bounds: [N] → dict (``errors``: the |error| array, for plotting)."""
    r, s, b = (np.asarray(t.detach().double().cpu().numpy()) for t in (rewards, truth, bounds))
    order = np.random.default_rng(seed).permutation(len(r))
    calibration, evaluation = order[: len(r) // 2], order[len(r) // 2 :]
    slope, intercept = np.polyfit(r[calibration], s[calibration], 1)
    error = np.abs(slope * r + intercept - s)
    line_a, line_c = quantile_line(b[calibration], error[calibration], quantile)
    under = float(np.mean(error[evaluation] <= line_a + line_c * b[evaluation]))
    # the theory's own form, error ≤ β_δ·‖z‖_{V⁻¹}: β_δ = the quantile of error / bound
    beta_delta = float(np.quantile(error[calibration] / np.maximum(b[calibration], 1e-12), quantile))
    return {
        "samples": len(r),
        "calibration": {"slope": float(slope), "intercept": float(intercept)},
        "mean_abs_error": float(error.mean()),
        "upper_line": {"intercept": line_a, "slope": line_c, "quantile": quantile},
        "share_under_line": under,
        "beta_delta": beta_delta,
        "share_under_beta_delta_bound": float(np.mean(error[evaluation] <= beta_delta * b[evaluation])),
        "error_bound_spearman": spearman_correlation(error, b),
        "errors": error,
    }


def plot_error_vs_bound(bounds: np.ndarray, errors: np.ndarray, flags: list[str], line: dict[str, float], path: str | Path, title: str = "", beta_delta: float | None = None) -> Path:
    """PrefPaint Fig. 2: |reward error| against ‖z‖_{V⁻¹} with the fitted upper line (and, given
    ``beta_delta``, the proportional bound β_δ·‖z‖_{V⁻¹} dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    colours = {"in-distribution": "tab:blue", "held-out combination": "tab:orange", "styled": "tab:green", "other": "tab:gray"}
    flags = np.asarray(flags)
    for flag, colour in colours.items():
        rows = flags == flag
        if rows.any():
            ax.scatter(bounds[rows], errors[rows], s=6, alpha=0.5, color=colour, label=f"{flag} ({int(rows.sum())})")
    xs = np.linspace(0, float(bounds.max()) * 1.02, 50)
    ax.plot(xs, line["intercept"] + line["slope"] * xs, color="black", lw=1.5, label=f"upper line (q={line['quantile']:.2f})")
    if beta_delta is not None:
        ax.plot(xs, beta_delta * xs, color="black", lw=1, ls="--", label=f"β_δ·‖z‖ (β_δ={beta_delta:.3g})")
    ax.set_ylim(0, max(float(errors.max()), 1e-6) * 1.05)
    ax.set_xlabel(r"$\|z\|_{V^{-1}}$")
    ax.set_ylabel("|reward error| (annotator-score units)")
    ax.set_title(title or "reward error vs confidence bound")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


_SCORED = ("reward", "bound", "bound_reference", "trust_gamma", "truth")


@torch.no_grad()
def score_dataset(model: RewardModel, annotator, data, batch_size: int, progress: bool) -> dict[str, Any]:
    """Rewards, bounds, γ and noiseless annotator scores of every image of ``data`` (pairwise:
    per side, ``side_0`` / ``side_1``)."""
    pairwise = isinstance(data, PairwiseDataset)
    sides: list[dict[str, list]] = [{k: [] for k in _SCORED} for _ in range(2 if pairwise else 1)]
    prompts: list[str] = []
    total = math.ceil(len(data) / batch_size)
    for batch in tqdm(data.batches(batch_size), total=total, desc="scoring", disable=not progress, leave=False):
        groups = [(batch.images_0, {}), (batch.images_1, {})] if pairwise else [(batch.images, batch.condition)]
        for side, (images, cond) in zip(sides, groups):
            result = model.score_with_confidence(images, batch.captions, **cond)
            for key in _SCORED[:-1]:
                side[key].append(result[key].float().cpu())
            side["truth"].append(annotator.score(images, batch.captions).float())
        prompts.extend(batch.captions)
    merged = [{k: torch.cat(v) for k, v in side.items()} for side in sides]
    if pairwise:
        return {"side_0": merged[0], "side_1": merged[1], "prompts": prompts}
    return {**merged[0], "prompts": prompts}


def evaluate_reward_model(
    model: RewardModel,
    data_path: str | Path,
    split: str | None = None,
    labeller: str | None = None,
    plot: str | Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out metrics of a reward model on a dataset split (see module docstring).

    ``labeller``: the scorer whose noiseless score defines the ceiling (default: the dataset's own
    labelling scorer if it is an annotator, else the balanced annotator); the Spearman and bound
    truths are the noiseless annotator of that persona."""
    from prefalign.data.storage import available_splits, read_meta
    from prefalign.rewards.base import AnnotatorScorer, load_scorer

    if split is None:
        splits = available_splits(data_path)
        split = "test" if "test" in splits else "train"
    data = load_preference_data(data_path, split, progress=progress)
    origin = read_meta(data_path).get("origin", {})
    labeller = labeller or str(origin.get("scorer", "annotator"))
    truth_scorer = load_scorer(labeller)
    annotator = truth_scorer if isinstance(truth_scorer, AnnotatorScorer) else AnnotatorScorer("balanced")
    model.eval()
    scored = score_dataset(model, annotator, data, batch_size, progress)
    result: dict[str, Any] = {"data": str(data_path), "split": split, "records": len(data), "bad_records": len(data.report.bad), "labeller": labeller}

    if isinstance(data, PairwiseDataset):
        labels = data.label_0
        s0, s1 = scored["side_0"], scored["side_1"]
        accuracy, compared = pairwise_agreement(s0["reward"] - s1["reward"], labels)
        if isinstance(truth_scorer, AnnotatorScorer):
            ceiling_difference = s0["truth"] - s1["truth"]
        else:  # the labeller is some other scorer: its own noiseless score is the ceiling
            images = [(b.images_0, b.images_1, b.captions) for b in data.batches(batch_size)]
            ceiling_difference = torch.cat([truth_scorer.score_batched(a, c) - truth_scorer.score_batched(b, c) for a, b, c in images])
        ceiling, _ = pairwise_agreement(ceiling_difference, labels)
        rewards = torch.cat([s0["reward"], s1["reward"]])
        truth = torch.cat([s0["truth"], s1["truth"]])
        bounds = torch.cat([s0["bound"], s1["bound"]])
        bounds_reference = torch.cat([s0["bound_reference"], s1["bound_reference"]])
        gammas = torch.cat([s0["trust_gamma"], s1["trust_gamma"]])
        prompts = scored["prompts"] * 2
        result.update(
            {
                "pairs_compared": compared,
                "ties": int((labels == 0.5).sum()),
                "accuracy": accuracy,
                "accuracy_ci95": binomial_interval(accuracy, compared),
                "ceiling_accuracy": ceiling,
                "accuracy_over_ceiling": accuracy / ceiling if ceiling > 0 else float("nan"),
                "true_order_accuracy": pairwise_agreement(s0["reward"] - s1["reward"], (s0["truth"] > s1["truth"]).float())[0],
            }
        )
    else:
        scores = data.scores
        rewards, truth, bounds, bounds_reference, gammas = (scored[k] for k in ("reward", "truth", "bound", "bound_reference", "trust_gamma"))
        prompts = scored["prompts"]
        pairs = data.group_pairs()
        if pairs:
            first, second = torch.tensor(pairs).T
            accuracy, compared = pairwise_agreement(rewards[first] - rewards[second], torch.ones(len(pairs)))
            ceiling, _ = pairwise_agreement(truth[first] - truth[second], torch.ones(len(pairs)))
        else:
            accuracy, compared, ceiling = float("nan"), 0, float("nan")
        result.update(
            {
                "pairs_compared": compared,
                "accuracy": accuracy,
                "accuracy_ci95": binomial_interval(accuracy, compared),
                "ceiling_accuracy": ceiling,
                "accuracy_over_ceiling": accuracy / ceiling if ceiling and ceiling > 0 else float("nan"),
                "score_spearman": spearman_correlation(rewards, scores),
                "annotator_score_spearman": spearman_correlation(truth, scores),
            }
        )
    result["spearman_with_annotator"] = spearman_correlation(rewards, truth)
    result["spearman_within_prompt"] = within_group_spearman(rewards, truth, prompts)
    analysis = bound_analysis(rewards, truth, bounds)
    errors = analysis.pop("errors")
    flags = in_distribution_flags(prompts)
    result["bound"] = {
        **analysis,
        "bound_theory_mean": float(bounds.mean()),
        "bound_reference_mean": float(bounds_reference.mean()),
        "reference_vs_theory_spearman": spearman_correlation(bounds, bounds_reference),
        "trust_gamma_mean": float(gammas.mean()),
        "trust_gamma_at_max_share": float((gammas >= gammas.max() - 1e-6).float().mean()),
        "by_group": {},
    }
    flag_array = np.asarray(flags)
    for flag in sorted(set(flags)):
        rows = flag_array == flag
        mask = torch.as_tensor(rows)
        result["bound"]["by_group"][flag] = {
            "samples": int(rows.sum()),
            "mean_bound": float(bounds[mask].mean()),
            "mean_abs_error": float(errors[rows].mean()),
            "mean_trust_gamma": float(gammas[mask].mean()),
        }
    if plot is not None:
        plot_error_vs_bound(bounds.numpy(), errors, flags, analysis["upper_line"], plot, title=f"{getattr(model, 'name', 'reward model')} on {Path(data_path).name} [{split}]", beta_delta=analysis["beta_delta"])
        result["plot"] = str(plot)
    return result


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------


def reward_card(model: RewardModel, evaluation: dict[str, Any] | None = None) -> str:
    """README.md of a reward model folder."""
    c = model.config
    training = model.metadata.get("training", {})
    tokens = " + ".join(model.token_kinds)
    lines = [
        f"# {model.metadata.get('name', 'reward model')} — PrefPaint reward model",
        "",
        f"- tokens: {tokens} (CLIP `{model.clip.metadata.get('name', c.encoder)}` image embeddings, MiniLM prompt embedding) → "
        f"1 transformer-encoder layer (d={c.d_model}, {c.num_heads} heads) → linear MLP {list(c.mlp_dims)} → z ∈ R^{c.feature_dim} → r = wᵀz",
        f"- encoder fix_rate {c.fix_rate} ({model.frozen_blocks} of {len(model.clip.blocks)} CLIP blocks frozen)",
        f"- confidence: V = {c.ridge_lambda}·I + Σ z zᵀ over {int(model.ridge_count)} training features; trust γ = clip(exp(−{c.trust_k}·b + {c.trust_beta}), 1, {c.trust_gamma_max}) with b = "
        + ("‖V⁻¹z‖₂ (reference)" if c.trust_bound == "reference" else "√(zᵀV⁻¹z) (theory)"),
    ]
    if training:
        lines += [
            f"- trained: {training.get('objective')} on `{training.get('data')}` [{training.get('split')}], {training.get('train_records')} records "
            f"(+{training.get('validation_records')} for validation), best epoch {training.get('best_epoch')}, validation accuracy {training.get('validation_accuracy', float('nan')):.3f}, "
            f"{training.get('wall_time_s')} s",
        ]
    evaluation = evaluation or model.metadata.get("evaluation")
    if evaluation:
        lines += ["", "## Evaluation", ""]
        for key in ("data", "split", "accuracy", "ceiling_accuracy", "accuracy_over_ceiling", "spearman_with_annotator", "spearman_within_prompt"):
            if key in evaluation:
                value = evaluation[key]
                lines.append(f"- {key.replace('_', ' ')}: {value:.4f}" if isinstance(value, float) else f"- {key.replace('_', ' ')}: {value}")
        bound = evaluation.get("bound", {})
        if bound:
            lines.append(f"- Spearman(|error|, ‖z‖_V⁻¹): {bound['error_bound_spearman']:.3f}; share under the fitted upper line: {bound['share_under_line']:.3f}")
            if "beta_delta" in bound:
                lines.append(f"- β_δ (error ≤ β_δ·‖z‖_V⁻¹ at the 0.95 quantile): {bound['beta_delta']:.3g}; share under it: {bound['share_under_beta_delta_bound']:.3f}")
    return "\n".join(lines) + "\n"


def save_evaluation(model_path: str | Path, evaluation: dict[str, Any]) -> None:
    """Record an evaluation in the model's JSON and card."""
    from prefalign.rewards.prefpaint import REWARD_CONFIG_FILE

    path = Path(model_path)
    meta = json.loads((path / REWARD_CONFIG_FILE).read_text())
    meta["evaluation"] = evaluation
    (path / REWARD_CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=float))
    model = RewardModel.from_pretrained(path)
    (path / "README.md").write_text(reward_card(model, evaluation))


__all__ = [
    "bradley_terry_loss",
    "regression_loss",
    "RewardTrainConfig",
    "train_reward_model",
    "evaluate_reward_model",
    "score_dataset",
    "in_distribution_flags",
    "within_group_spearman",
    "bound_analysis",
    "quantile_line",
    "plot_error_vs_bound",
    "reward_card",
    "save_evaluation",
]
