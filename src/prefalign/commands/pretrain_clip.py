"""``prefalign pretrain clip``: train the world's CLIP image encoder (registered on the pretrain app)."""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import load_config


def clip(
    out: Path = typer.Option(Path("runs/pretrain-clip"), help="run folder (checkpoints, TensorBoard, model/)"),
    steps: int = typer.Option(None, help="training steps (default 600)"),
    batch_size: int = typer.Option(None, help="batch size (default 128)"),
    image_size: int = typer.Option(None, help="image side (default 32)"),
    seed: int = typer.Option(None, help="seed (default 0)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    config: Path = typer.Option(None, help="YAML file of PretrainClipConfig fields"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value (repeatable)"),
    resume: bool = typer.Option(True, help="continue from the latest checkpoint in --out"),
) -> None:
    """Train the CLIP image encoder contrastively against the frozen MiniLM sentence embeddings of
    the prompts (renders with styles and defects); writes OUT/model with a card of its zero-shot
    accuracies. Copy OUT/model to src/prefalign/models/shapes-clip to ship it."""
    from prefalign.pretrain.clip import PretrainClipConfig, pretrain_clip

    cfg = load_config(PretrainClipConfig, config, set_, steps=steps, batch_size=batch_size, image_size=image_size, seed=seed, threads=threads)
    model = pretrain_clip(cfg, out, resume=resume)
    held_in = model.metadata["metrics"]["held_in"]
    typer.echo("zero-shot (held-in, clean renders): " + ", ".join(f"{k.removesuffix('_accuracy')} {v:.1%}" for k, v in held_in.items()))
    typer.echo(f"model written to {out / 'model'}")
