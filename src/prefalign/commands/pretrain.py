"""``prefalign pretrain …``: train the shapes world's own models from a fixed seed."""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import load_config

app = typer.Typer(help="Train the shapes world's models (the shipped ones are made by these commands).", no_args_is_help=True)


@app.command("t2i")
def t2i(
    out: Path = typer.Option(Path("runs/pretrain-t2i"), help="run folder (checkpoints, TensorBoard, model/)"),
    steps: int = typer.Option(None, help="training steps (default 2400)"),
    batch_size: int = typer.Option(None, help="batch size (default 64)"),
    image_size: int = typer.Option(None, help="image side (default 32)"),
    seed: int = typer.Option(None, help="seed (default 0)"),
    config: Path = typer.Option(None, help="YAML file of PretrainT2IConfig fields"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value (repeatable)"),
    resume: bool = typer.Option(True, help="continue from the latest checkpoint in --out"),
) -> None:
    """Train the text-to-image model on the world's data mix (clean + defective renders, styles,
    10 % empty prompts for CFG) with EMA; resumable. The EMA model is written to OUT/model."""
    from prefalign.pretrain.t2i import PretrainT2IConfig, pretrain_t2i

    cfg = load_config(PretrainT2IConfig, config, set_, steps=steps, batch_size=batch_size, image_size=image_size, seed=seed)
    pretrain_t2i(cfg, out, resume=resume)
    typer.echo(f"model written to {out / 'model'}")


@app.command("inpaint")
def inpaint(
    out: Path = typer.Option(Path("runs/pretrain-inpaint"), help="run folder (checkpoints, TensorBoard, model/)"),
    init_from: str = typer.Option(None, help="text-to-image model to widen (default the shipped shapes-t2i)"),
    steps: int = typer.Option(None, help="training steps (default 1000)"),
    batch_size: int = typer.Option(None, help="batch size (default 64)"),
    seed: int = typer.Option(None, help="seed (default 0)"),
    config: Path = typer.Option(None, help="YAML file of PretrainInpaintConfig fields"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value (repeatable)"),
    resume: bool = typer.Option(True, help="continue from the latest checkpoint in --out"),
) -> None:
    """Train the inpainting model (input: noisy image + mask + masked image): the text-to-image
    model with conv_in widened by 4 zero-initialised channels, fine-tuned on the world's data mix
    with outpainting and warping masks; resumable. The EMA model is written to OUT/model."""
    from prefalign.pretrain.inpaint import PretrainInpaintConfig, pretrain_inpaint

    cfg = load_config(PretrainInpaintConfig, config, set_, init_from=init_from, steps=steps, batch_size=batch_size, seed=seed)
    pretrain_inpaint(cfg, out, resume=resume)
    typer.echo(f"model written to {out / 'model'}")
