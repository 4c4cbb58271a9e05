"""``prefalign sample``: images from prompts with any model and sampler.

A one-step generator (e.g. ``RUN/export`` of ``prefalign align diff-instruct-pp``; its folder has
``one_step.json``) samples with ``--steps 1``: one network call per image, ``--cfg``/``--sampler``
do not apply (the guidance is distilled into it); any other ``--steps`` is an error that says so."""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP, echo_json, read_prompts


def sample(
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="a prompt (repeat for several)"),
    prompts_file: Path = typer.Option(None, help="prompts file: .txt (one per line), .jsonl/.json or .csv with a prompt/caption field"),
    n: int = typer.Option(16, help="images per prompt"),
    seed: int = typer.Option(0, help="seed of the first image; image i uses seed + i"),
    steps: int = typer.Option(50, help="sampling steps (1 for a one-step generator)"),
    cfg: float = typer.Option(3.0, help="classifier-free guidance scale (1 = no guidance; not used by one-step generators)"),
    sampler: str = typer.Option("ddim", help="ddim or bdia"),
    eta: float = typer.Option(0.0, help="DDIM η (0 = deterministic)"),
    gamma: float = typer.Option(1.0, help="BDIA γ (γ = 0 is DDIM)"),
    model: str = typer.Option("shapes-t2i", help=MODEL_HELP),
    batch_size: int = typer.Option(64, help="images per forward batch"),
    out: Path = typer.Option(Path("out/samples"), help="output folder: one PNG per image and grid.png"),
    device: str = typer.Option("cpu", help="torch device"),
    json_output: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Sample images for prompts; writes each PNG and a labelled grid."""
    import torch

    from prefalign.backbones.loading import load_backbone
    from prefalign.images import labelled_grid, save_image
    from prefalign.sampling import generate

    prompts = read_prompts(prompt, prompts_file)
    if not prompts:
        raise typer.BadParameter("give --prompt or --prompts-file")
    backbone = load_backbone(model, device=device)
    expanded = [p for p in prompts for _ in range(n)]
    images = generate(backbone, expanded, seed, steps, cfg, sampler, eta, gamma, batch_size, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, text) in enumerate(zip(images, expanded)):
        files.append(str(save_image(image, out / f"{i:04d}.png")))
    upscale = max(1, 96 // images.shape[-1])
    grid = labelled_grid(images, [f"{i}" for i in range(len(images))], columns=n if n > 1 else min(8, len(images)), upscale=upscale)
    grid.save(out / "grid.png")
    (out / "prompts.txt").write_text("\n".join(f"{i:04d}\t{p}" for i, p in enumerate(expanded)) + "\n")
    summary = {"images": len(images), "grid": str(out / "grid.png"), "out": str(out)}
    if getattr(backbone, "one_step", None) is not None:
        summary["one_step_generator"] = backbone.one_step.to_dict()
    if backbone.kind == "shapes":
        from prefalign.worlds.shapes.annotator import Annotator
        from prefalign.worlds.shapes.prompts import try_parse_prompt

        if all(try_parse_prompt(p) is not None for p in expanded):
            annotator = Annotator()
            summary["annotator_mean_score"] = float(annotator.score(images, expanded).mean())
            checks = annotator.attribute_checks(images, expanded)
            summary["attribute_accuracy"] = {k: float(v.float().mean()) for k, v in checks.items()}
    if json_output:
        echo_json(summary)
    else:
        typer.echo(f"wrote {len(images)} images and {out / 'grid.png'}")
        for key in ("annotator_mean_score", "attribute_accuracy"):
            if key in summary:
                typer.echo(f"{key}: {summary[key]}")
    del torch
