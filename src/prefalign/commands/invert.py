"""``prefalign invert`` and ``prefalign edit``: exact (BDIA) or DDIM inversion of an image, and
prompt-to-prompt editing by inverting under one prompt and regenerating under another.

The logic lives in :mod:`prefalign.editing`; these functions read the image, load the model, call it
and write the files. Registered in ``cli.py`` as ``app.command("invert")(invert.invert)`` and
``app.command("edit")(invert.edit)``.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP, echo_json


class Method(str, Enum):
    bdia = "bdia"
    ddim = "ddim"


class Precision(str, Enum):
    float32 = "float32"
    float64 = "float64"


IMAGE_HELP = "input image (PNG/JPEG); resized to the model's resolution with a warning unless --no-resize"
RESIZE_HELP = "resize an image of another size to the model's resolution (--no-resize: refuse it instead)"
METHOD_HELP = "bdia: exact inversion (BDIA, stores the pair z_N, z_N-1); ddim: plain DDIM inversion (stores z_N)"
STEPS_HELP = "steps of the sampling grid (inversion and regeneration use the same grid); NFE = steps"
DTYPE_HELP = "precision of latents and UNet: BDIA round-trips to ~1e-13 in float64, ~1e-5 in float32"
STRENGTH_HELP = "fraction of the grid to invert (1 = all the way to noise; < 1 stops at an intermediate level)"
DEVICE_HELP = "torch device (cpu, cuda, cuda:1, mps)"


def _labelled_row(images, labels, title: str | None = None):
    """One row of images with captions, upscaled so that small (32²) images stay readable."""
    from prefalign.images import labelled_grid

    upscale = max(1, 128 // max(images.shape[-2:]))
    return labelled_grid(images.float().cpu(), labels, columns=len(labels), upscale=upscale, title=title)


def _prepare(model: str, device: str, dtype: str, image: Path, resize: bool):
    """Load the model (UNet cast to ``dtype`` in place) and the image at the model's resolution."""
    from prefalign.backbones.loading import load_backbone
    from prefalign.editing import backbone_in_dtype, load_input_image, resolve_dtype

    precision = resolve_dtype(dtype)
    backbone = backbone_in_dtype(load_backbone(model, device=device), precision, inplace=True)
    return backbone, load_input_image(backbone, image, resize=resize), precision


def invert(
    image: Path = typer.Option(..., "--image", "-i", help=IMAGE_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="prompt that describes the image (the inversion's condition)"),
    method: Method = typer.Option(Method.bdia, help=METHOD_HELP),
    gamma: float = typer.Option(1.0, help="BDIA γ in (0, 1]; keep it near 1 (1/γ amplifies rounding); ignored by ddim"),
    steps: int = typer.Option(50, min=1, help=STEPS_HELP),
    dtype: Precision = typer.Option(Precision.float32, help=DTYPE_HELP),
    cfg: float = typer.Option(1.0, help="classifier-free guidance scale used for inversion and regeneration (1 = none)"),
    strength: float = typer.Option(1.0, help=STRENGTH_HELP),
    model: str = typer.Option("shapes-t2i", help=MODEL_HELP),
    resize: bool = typer.Option(True, "--resize/--no-resize", help=RESIZE_HELP),
    out: Path = typer.Option(Path("out/invert"), help="output folder: inversion.safetensors, reconstruction.png, side_by_side.png, metrics.json"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    json_output: bool = typer.Option(False, "--json", help='print {"roundtrip_rel_err": …, "nfe": …, …} as JSON'),
) -> None:
    """Invert an image to the diffusion model's noise and check the round trip.

    Saves the inverted state (safetensors, with method, γ, steps, prompt, cfg, dtype and model as metadata), the reconstruction regenerated from it, and input | reconstruction | |error|×10 side by side. The round-trip error ‖x̂0 − x0‖/‖x0‖ is measured on latents; NFE counts the network evaluations of the inversion alone.
    """
    from prefalign.editing import STATE_FILE, dtype_name, invert_image, save_inversion
    from prefalign.images import save_image

    backbone, images, precision = _prepare(model, device, dtype.value, image, resize)
    result = invert_image(
        backbone, images, prompt, method.value, steps, gamma, cfg, precision, strength=strength, roundtrip=True
    )
    out.mkdir(parents=True, exist_ok=True)
    state_path = save_inversion(result, out / STATE_FILE, model=model)
    reconstruction = result.reconstruction_images.float().cpu()
    original = images.float().cpu()
    error = ((reconstruction - original).abs() * 10).clamp(0, 1)
    save_image(reconstruction[0], out / "reconstruction.png")
    side = _labelled_row(
        _cat(original, reconstruction, error),
        ["input", f"reconstruction ({result.method})", "|error| x10"],
        title=f"{result.method} {steps} steps {dtype_name(precision)}: rel err {result.roundtrip_rel_err:.2e}",
    )
    side.save(out / "side_by_side.png")
    summary = {
        "roundtrip_rel_err": result.roundtrip_rel_err,
        "nfe": result.nfe,
        "regeneration_nfe": result.regeneration_nfe,
        "method": result.method,
        "gamma": result.gamma,
        "steps": steps,
        "dtype": dtype_name(precision),
        "cfg": cfg,
        "state": str(state_path),
        "reconstruction": str(out / "reconstruction.png"),
        "side_by_side": str(out / "side_by_side.png"),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if json_output:
        echo_json(summary)
    else:
        typer.echo(
            f"{result.method} inversion, {steps} steps, {dtype_name(precision)}: round-trip relative error "
            f"{result.roundtrip_rel_err:.3e} (latents), {result.nfe} network evaluations"
        )
        typer.echo(f"wrote {state_path}, {out / 'reconstruction.png'}, {out / 'side_by_side.png'}")


def edit(
    image: Path = typer.Option(..., "--image", "-i", help=IMAGE_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="prompt that describes the input image (used to invert it)"),
    edit_prompt: str = typer.Option(..., "--edit-prompt", "-e", help="prompt of the edited image (used to regenerate)"),
    method: Method = typer.Option(Method.bdia, help=METHOD_HELP),
    gamma: float = typer.Option(0.96, help="BDIA γ in (0, 1]; 0.92–1 for editing (METHODS §5); ignored by ddim"),
    steps: int = typer.Option(50, min=1, help=STEPS_HELP),
    dtype: Precision = typer.Option(Precision.float32, help=DTYPE_HELP),
    cfg: float = typer.Option(
        2.0, help="classifier-free guidance scale for inversion and regeneration (3+ over-saturates inverted shapes images)"
    ),
    strength: float = typer.Option(1.0, help=STRENGTH_HELP),
    model: str = typer.Option("shapes-t2i", help=MODEL_HELP),
    resize: bool = typer.Option(True, "--resize/--no-resize", help=RESIZE_HELP),
    out: Path = typer.Option(Path("out/edit"), help="output folder: edited.png, side_by_side.png, inversion.safetensors, metrics.json"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    json_output: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Edit an image by prompt: invert it under --prompt, regenerate under --edit-prompt.

    With BDIA (the default) the inversion is exact, so what the edit prompt does not change stays as close to the input as the model allows; --edit-prompt equal to --prompt gives the input back. Writes the edited PNG and input | edited side by side.
    """
    from prefalign.editing import STATE_FILE, dtype_name, edit_image, save_inversion
    from prefalign.images import save_image

    backbone, images, precision = _prepare(model, device, dtype.value, image, resize)
    result = edit_image(
        backbone, images, prompt, edit_prompt, method.value, steps, gamma, cfg, precision, strength=strength
    )
    out.mkdir(parents=True, exist_ok=True)
    state_path = save_inversion(result.inversion, out / STATE_FILE, model=model)
    original, edited = images.float().cpu(), result.images.float().cpu()
    save_image(edited[0], out / "edited.png")
    _labelled_row(_cat(original, edited), [f"input: {prompt}", f"edited: {edit_prompt}"]).save(out / "side_by_side.png")
    summary = {
        "nfe": result.nfe,
        "method": result.inversion.method,
        "gamma": result.inversion.gamma,
        "steps": steps,
        "dtype": dtype_name(precision),
        "cfg": cfg,
        "mean_abs_change": float((edited - original).abs().mean()),
        "edited": str(out / "edited.png"),
        "side_by_side": str(out / "side_by_side.png"),
        "state": str(state_path),
    }
    summary.update(_annotator_summary(backbone, original, edited, edit_prompt))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if json_output:
        echo_json(summary)
    else:
        typer.echo(f"edited with {result.inversion.method} ({steps} steps, {result.nfe} network evaluations): {out / 'edited.png'}")
        for key in ("annotator_score_input", "annotator_score_edited"):
            if key in summary:
                typer.echo(f"{key} (for the edit prompt): {summary[key]:.3f}")
        typer.echo(f"wrote {out / 'side_by_side.png'}")


def _annotator_summary(backbone, original, edited, edit_prompt: str) -> dict:
    """On the shapes world: the annotator's score of input and edit for the edit prompt."""
    if backbone.kind != "shapes":
        return {}
    from prefalign.worlds.shapes.annotator import Annotator
    from prefalign.worlds.shapes.prompts import try_parse_prompt

    if try_parse_prompt(edit_prompt) is None or original.shape[-1] != edited.shape[-1]:
        return {}
    annotator = Annotator()
    scores = annotator.score(_cat(original, edited), [edit_prompt, edit_prompt])
    checks = annotator.attribute_checks(edited, [edit_prompt])
    return {
        "annotator_score_input": float(scores[0]),
        "annotator_score_edited": float(scores[1]),
        "edited_matches_edit_prompt": {k: bool(v[0]) for k, v in checks.items()},
    }


def _cat(*tensors):
    import torch

    return torch.cat(tensors)
