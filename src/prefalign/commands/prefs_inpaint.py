"""``prefalign prefs make-inpaint``: PrefPaint's scored inpainting dataset (registered in prefs.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP, echo_json, load_config


def make_inpaint(
    out: Path = typer.Option(..., help="dataset folder to write"),
    prompts: int = typer.Option(None, help="masked prompt images (default 512)"),
    per_prompt: int = typer.Option(None, help="completions per masked image (default 3, as PrefPaint)"),
    mask_kind: str = typer.Option(None, help="both (default: alternating), outpaint or warp"),
    model: str = typer.Option(None, help=MODEL_HELP + " (an inpainting model; default shapes-inpaint)"),
    scorer: str = typer.Option(None, help="annotator[:PERSONA] (1–7 ratings with rater noise, default) or a scorer spec"),
    prompt_mode: str = typer.Option(None, help="the model's text: empty (PrefPaint, default) or caption"),
    seed: int = typer.Option(None, help="seed (prompts, masks, sampling noise, rater noise; default 0)"),
    steps: int = typer.Option(None, help="DDIM steps (default 20)"),
    test_fraction: float = typer.Option(None, help="share of masked images for the test split (default 0.1)"),
    device: str = typer.Option(None, help="torch device (default cpu)"),
    config: Path = typer.Option(None, help="YAML file of MakeInpaintPrefsConfig fields"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="replace an existing dataset in --out"),
    json_output: bool = typer.Option(False, "--json", help="print the card as JSON"),
) -> None:
    """PrefPaint's dataset: per masked prompt image (outpainting band or warping hole), three
    completions of the base inpainting model (known region kept), rated 1–7 by the annotator and
    ranked within their group (pointwise records; train a reward with `reward train --objective pointwise`)."""
    from prefalign.commands.prefs import _echo_card
    from prefalign.data.inpaint_prefs import MakeInpaintPrefsConfig, make_inpaint_preferences

    cfg = load_config(
        MakeInpaintPrefsConfig, config, set_, prompts=prompts, per_prompt=per_prompt, mask_kind=mask_kind, scorer=scorer,
        prompt_mode=prompt_mode, seed=seed, steps=steps, test_fraction=test_fraction, device=device,
    )
    if model is not None:  # (load_config's own first parameter is called "model")
        cfg = MakeInpaintPrefsConfig.model_validate({**cfg.model_dump(), "model": model})
    card = make_inpaint_preferences(cfg, out, overwrite=overwrite)
    if json_output:
        echo_json(card)
    else:
        _echo_card(card, out)
