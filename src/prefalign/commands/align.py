"""``prefalign align METHOD --data DIR [--model …] [--steps N] [--config F] [--set k=v] --out RUN [--resume]``.

Aligns a model (a shipped shapes model, a shapes model folder, or a diffusers pipeline folder) with
preference pairs using one of the registered methods (sft, dpo, rpo, inpo, …). Settings: defaults ←
``--config`` YAML ← ``--set key=value`` ← the explicit options; the resolved config is saved as
RUN/config.yaml. ``--resume`` continues from RUN's latest checkpoint (with RUN/config.yaml as the base
config when no --config is given). Multi-GPU / multi-process: ``accelerate launch -m prefalign.cli align …``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP
from prefalign.errors import PrefalignError


def align(
    method: str = typer.Argument(..., help="the alignment method: sft, dpo, rpo or inpo"),
    data: Path = typer.Option(None, "--data", help="preference pairs: a dataset folder from `prefalign prefs make` / `prefs import`"),
    model: str = typer.Option(None, "--model", help=MODEL_HELP + " (default shapes-t2i)"),
    steps: int = typer.Option(None, "--steps", help="optimiser steps"),
    batch_size: int = typer.Option(None, "--batch-size", help="pairs per process per micro-step"),
    seed: int = typer.Option(None, "--seed", help="seed of data order, noise, timesteps and LoRA init"),
    config: Path = typer.Option(None, "--config", help="YAML align config (see configs/)"),
    set_: list[str] = typer.Option(None, "--set", help="override a setting: key=value, e.g. dpo.beta=2000 (repeatable)"),
    out: Path = typer.Option(..., "--out", help="run folder: config.yaml, checkpoints/, tensorboard/, metrics.json, export/"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in --out"),
) -> None:
    """Align a diffusion model with human preference (METHODS.md §1–3); writes RUN/export/."""
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import CONFIG_FILE, train

    base = config
    if resume and base is None and (out / CONFIG_FILE).is_file():
        base = out / CONFIG_FILE
    cfg = load_align_config(
        base, set_, method=method, model=model, steps=steps, batch_size=batch_size, seed=seed,
        **{"data.path": None if data is None else str(data)},
    )
    if cfg.data.path is None:
        raise PrefalignError("no preference data: pass --data DIR (make one with `prefalign prefs make`)")
    result = train(cfg, out, resume=resume)
    final = result.metrics.get("final", {})
    summary = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "implicit_accuracy") if k in final)
    typer.echo(f"{cfg.method}: {result.steps} steps{' (' + summary + ')' if summary else ''}; run folder {out}")
    if result.export_path is not None:
        typer.echo(f"aligned model exported to {result.export_path}")
