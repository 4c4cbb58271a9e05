"""``prefalign report RUN… --out report.html``: one self-contained HTML file (see :mod:`prefalign.report`)."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    runs: list[Path] = typer.Argument(..., help="run folders of `prefalign align` (one table row each)"),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write"),
    reward_model: list[Path] = typer.Option(None, "--reward-model", help="reward model folder(s) to show (those named in a run's config are found by themselves)"),
    evaluate: bool = typer.Option(True, help="evaluate runs that have no RUN/evaluation.json yet (and save it)"),
    prompts: int = typer.Option(32, help="evaluation prompts for runs evaluated now"),
    per_prompt: int = typer.Option(2, help="evaluation images per prompt for runs evaluated now"),
    steps: int = typer.Option(20, help="sampling steps (evaluation and grids)"),
    grid_prompts: int = typer.Option(6, help="prompts (rows) of the base-vs-aligned grids (0: no grids)"),
    seed: int = typer.Option(777, help="sampling seed of the grids' first row"),
    device: str = typer.Option("cpu", help="torch device"),
    title: str = typer.Option("prefalign report", help="the report's title"),
) -> None:
    """Write one HTML report: metrics table (one row per run), base-vs-aligned grids with the same
    prompts and seeds, training curves, the reward model's error-vs-bound plot, the dataset card."""
    from prefalign.evaluation import EvaluationSettings, SamplingSettings
    from prefalign.report import build_report

    settings = EvaluationSettings(prompts=prompts, sampling=SamplingSettings(per_prompt=per_prompt, steps=steps), device=device)
    path = build_report(
        runs, out, reward_models=reward_model or (), evaluate_missing=evaluate, evaluation=settings,
        grid_prompts=grid_prompts, grid_sampling=SamplingSettings(per_prompt=1, seed=seed, steps=steps), device=device, title=title,
    )
    typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
