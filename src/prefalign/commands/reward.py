"""``prefalign reward …``: train and evaluate PrefPaint reward models."""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import echo_json

app = typer.Typer(help="Reward models (PrefPaint: CLIP features → transformer layer → linear MLP → z → r = wᵀz, with the V⁻¹ confidence bound).", no_args_is_help=True)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _validated(model_class, data: dict):
    """``model_class.model_validate(data)`` with pydantic's errors as one PrefalignError line (as
    ``load_config``, which cannot take a field called "model" as a keyword)."""
    from pydantic import ValidationError

    from prefalign.errors import PrefalignError

    try:
        return model_class.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PrefalignError(f"invalid config: {problems}") from None


def _merged_settings(config: Path | None, overrides: list[str] | None, explicit: dict, model_explicit: dict) -> dict:
    """YAML file ← --set overrides ← explicit options, merged key by key (also inside ``model``)."""
    import yaml

    from prefalign.commands.common import parse_overrides
    from prefalign.errors import PrefalignError

    data: dict = {}
    if config is not None:
        if not config.is_file():
            raise PrefalignError(f"config file not found: {config}")
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as error:
            raise PrefalignError(f"{config} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise PrefalignError(f"{config} must hold a mapping of settings")
    data = _deep_merge(data, parse_overrides(overrides))
    data = _deep_merge(data, {k: v for k, v in explicit.items() if v is not None})
    model = {k: v for k, v in model_explicit.items() if v is not None}
    return _deep_merge(data, {"model": model}) if model else data


@app.command("train")
def train(
    data: Path = typer.Option(..., help="dataset folder (pairwise or pointwise)"),
    out: Path = typer.Option(..., help="reward model folder to write"),
    objective: str = typer.Option(None, help="pairwise (Bradley–Terry, default) or pointwise (regression on scores)"),
    epochs: int = typer.Option(None, help="maximum epochs (default 40; early stopping on validation accuracy)"),
    batch_size: int = typer.Option(None, help="comparisons / records per step (default 128)"),
    learning_rate: float = typer.Option(None, help="AdamW learning rate (default 3e-4)"),
    fix_rate: float = typer.Option(None, help="share of CLIP blocks kept frozen (default 1 = frozen; reference code 0.7)"),
    encoder: str = typer.Option(None, help="CLIP encoder: shapes-clip (default) or a folder"),
    image_statistics: bool = typer.Option(
        None, "--image-statistics/--no-image-statistics",
        help="add a token of the frozen encoder's early-layer statistics (quality cues the CLIP embedding ignores; needs fix_rate 1; default off, as PrefPaint)",
    ),
    split: str = typer.Option(None, help="split to train on (default train)"),
    seed: int = typer.Option(None, help="seed (default 0)"),
    config: Path = typer.Option(None, help="YAML file of RewardTrainConfig fields (model.* for the architecture)"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value, e.g. model.feature_dim=128 (repeatable)"),
    evaluate: bool = typer.Option(True, help="evaluate on the dataset's test split afterwards (if it has one) and record it in the card"),
    json_output: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Train a reward model; writes OUT (safetensors + reward_model.json + V + encoder + card)."""
    from prefalign.rewards.training import RewardTrainConfig, train_reward_model

    explicit = {"objective": objective, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "split": split, "seed": seed}
    model_explicit = {"fix_rate": fix_rate, "encoder": encoder, "image_statistics": image_statistics}
    cfg = _validated(RewardTrainConfig, _merged_settings(config, set_, explicit, model_explicit))
    model, summary = train_reward_model(data, out, cfg)
    result = {k: v for k, v in summary.items() if k not in ("history", "train_config")}
    if evaluate:
        from prefalign.data.storage import available_splits

        if "test" in available_splits(data) and cfg.split != "test":
            from prefalign.rewards.prefpaint import RewardModel
            from prefalign.rewards.training import evaluate_reward_model, save_evaluation

            evaluation = evaluate_reward_model(RewardModel.from_pretrained(out), data, "test", plot=out / "error_vs_bound.png")
            save_evaluation(out, evaluation)
            result["test"] = {k: evaluation[k] for k in ("accuracy", "ceiling_accuracy", "accuracy_over_ceiling", "spearman_with_annotator") if k in evaluation}
    if json_output:
        echo_json(result)
    else:
        typer.echo(f"best epoch {summary['best_epoch']}: validation accuracy {summary['validation_accuracy']:.3f}")
        if "test" in result:
            t = result["test"]
            typer.echo(f"test: accuracy {t['accuracy']:.3f} (ceiling {t['ceiling_accuracy']:.3f}, {t['accuracy_over_ceiling']:.1%} of it); Spearman with the annotator {t['spearman_with_annotator']:.3f}")
        typer.echo(f"wrote {out}")


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="reward model folder"),
    data: Path = typer.Option(..., help="dataset folder"),
    split: str = typer.Option(None, help="split (default: test if present, else train)"),
    labeller: str = typer.Option(None, help="scorer whose noiseless score is the ceiling (default: the dataset's labeller)"),
    plot: Path = typer.Option(None, help="PNG of |reward error| vs ‖z‖_V⁻¹ (default: MODEL/error_vs_bound-DATA.png)"),
    record: bool = typer.Option(False, help="record this evaluation in the model's JSON and card"),
    json_output: bool = typer.Option(False, "--json", help="print all metrics as JSON"),
) -> None:
    """Held-out pairwise accuracy vs the annotator's ceiling on the same noisy labels, Spearman with
    the noiseless annotator, and PrefPaint's error-vs-bound plot with the share under its upper line."""
    from prefalign.rewards.prefpaint import RewardModel
    from prefalign.rewards.training import evaluate_reward_model, save_evaluation

    reward_model = RewardModel.from_pretrained(model)
    plot = plot or model / f"error_vs_bound-{data.name}.png"
    result = evaluate_reward_model(reward_model, data, split, labeller=labeller, plot=plot)
    if record:
        save_evaluation(model, result)
    if json_output:
        echo_json(result)
        return
    typer.echo(f"{result['data']} [{result['split']}]: {result['records']} records ({result['bad_records']} bad)")
    typer.echo(f"accuracy {result['accuracy']:.3f} on {result['pairs_compared']} comparisons; ceiling {result['ceiling_accuracy']:.3f} ({result['accuracy_over_ceiling']:.1%} of it)")
    typer.echo(f"Spearman with the noiseless annotator: {result['spearman_with_annotator']:.3f} (pooled), {result['spearman_within_prompt']:.3f} (mean within a prompt)")
    bound = result["bound"]
    typer.echo(
        f"error vs bound: Spearman {bound['error_bound_spearman']:.3f}; share under the fitted upper line {bound['share_under_line']:.3f}; "
        f"β_δ {bound['beta_delta']:.3g} ({bound['share_under_beta_delta_bound']:.3f} under β_δ·‖z‖_V⁻¹); plot {result['plot']}"
    )
