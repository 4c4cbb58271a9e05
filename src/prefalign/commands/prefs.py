"""``prefalign prefs …``: make, import and look at preference datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP, echo_json, load_config, read_prompts

app = typer.Typer(help="Preference datasets: Pick-a-Pic v2 pairs and PrefPaint scored images (Parquet, read with 🤗 datasets).", no_args_is_help=True)

SCORER_HELP = "annotator, annotator:PERSONA (balanced, literal, aesthete), a reward model folder, or module:function"


@app.command("make")
def make(
    out: Path = typer.Option(..., help="dataset folder to write"),
    prompts: int = typer.Option(None, help="world prompts to draw (default 64)"),
    per_prompt: int = typer.Option(None, help="images per prompt (default 2)"),
    scorer: str = typer.Option(None, help=f"who labels the pairs: {SCORER_HELP}"),
    model: str = typer.Option(None, help=MODEL_HELP + " (default shapes-t2i)"),
    seed: int = typer.Option(None, help="seed (prompts, sampling noise, labels; default 0)"),
    steps: int = typer.Option(None, help="sampling steps (default 30)"),
    cfg: float = typer.Option(None, "--cfg", help="classifier-free guidance scale (default 3)"),
    format: str = typer.Option(None, "--format", help="pairwise (Pick-a-Pic v2, default) or pointwise (PrefPaint scores)"),
    pairing: str = typer.Option(None, help="pairs per prompt: all (K(K-1)/2, default) or adjacent"),
    prompt_split: str = typer.Option(None, help="world prompts: train (held-in, default), held_out or all"),
    style_probability: float = typer.Option(None, help="share of prompts with a style suffix (default 0)"),
    test_fraction: float = typer.Option(None, help="share of prompts for the test split (default 0.1)"),
    temperature: float = typer.Option(None, help="Bradley–Terry temperature for non-annotator scorers (default 1)"),
    tie_rate: float = typer.Option(None, help="tie probability for non-annotator scorers (default 0)"),
    prompts_file: Path = typer.Option(None, help="use these prompts instead of drawing world prompts"),
    device: str = typer.Option(None, help="torch device (default cpu)"),
    config: Path = typer.Option(None, help="YAML file of MakePrefsConfig fields"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="replace an existing dataset in --out"),
    json_output: bool = typer.Option(False, "--json", help="print the card as JSON"),
) -> None:
    """Sample a model, label the samples with a scorer and write a dataset + card (card.json,
    README.md: counts, tie rate, agreement with the noiseless annotator)."""
    from prefalign.rewards.labelling import MakePrefsConfig, make_preferences

    cfg_ = load_config(
        MakePrefsConfig, config, set_, prompts=prompts, per_prompt=per_prompt, scorer=scorer, seed=seed, steps=steps,
        guidance_scale=cfg, format=format, pairing=pairing, prompt_split=prompt_split, style_probability=style_probability,
        test_fraction=test_fraction, temperature=temperature, tie_rate=tie_rate, device=device,
    )
    if model is not None:  # (load_config's own first parameter is called "model")
        cfg_ = MakePrefsConfig.model_validate({**cfg_.model_dump(), "model": model})
    prompt_list = read_prompts(None, prompts_file) if prompts_file is not None else None
    card = make_preferences(cfg_, out, prompts=prompt_list, overwrite=overwrite)
    if json_output:
        echo_json(card)
    else:
        _echo_card(card, out)


@app.command("make-style")
def make_style(
    style: str = typer.Option(..., help="the preferred style: winter, sketch or starry"),
    out: Path = typer.Option(..., help="dataset folder to write"),
    prompts: int = typer.Option(None, help="world prompts, one pair each (default 512)"),
    source: str = typer.Option(None, help="render (two renders of the scene, default) or model (two samples of --model)"),
    caption: str = typer.Option(None, help="caption of the pair: plain (default, as Diffusion-RPO) or styled"),
    model: str = typer.Option(None, help=MODEL_HELP + " (source=model; default shapes-t2i)"),
    image_size: int = typer.Option(None, help="render size (source=render; default 32)"),
    steps: int = typer.Option(None, help="sampling steps (source=model; default 30)"),
    cfg: float = typer.Option(None, "--cfg", help="classifier-free guidance scale (source=model; default 3)"),
    check_style: bool = typer.Option(None, "--check-style/--no-check-style", help="keep only pairs whose winner the annotator classifies as the style (default on)"),
    prompt_split: str = typer.Option(None, help="world prompts: train (held-in, default), held_out or all"),
    test_fraction: float = typer.Option(None, help="share of prompts for the test split (default 0.1)"),
    seed: int = typer.Option(None, help="seed (prompts, renders/noise, winner position; default 0)"),
    device: str = typer.Option(None, help="torch device (default cpu)"),
    config: Path = typer.Option(None, help="YAML file of StylePrefsConfig fields"),
    set_: list[str] = typer.Option(None, "--set", help="override a field: key=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="replace an existing dataset in --out"),
    json_output: bool = typer.Option(False, "--json", help="print the card as JSON"),
) -> None:
    """Style pairs for Diffusion-RPO's style alignment: the image in --style wins over the plain
    image of the same prompt (Pick-a-Pic v2 schema; the caption is the plain prompt)."""
    from prefalign.data.style import StylePrefsConfig, make_style_preferences

    cfg_ = load_config(
        StylePrefsConfig, config, set_, style=style, prompts=prompts, source=source, caption=caption, image_size=image_size,
        steps=steps, guidance_scale=cfg, check_style=check_style, prompt_split=prompt_split, test_fraction=test_fraction,
        seed=seed, device=device,
    )
    if model is not None:  # (load_config's own first parameter is called "model")
        cfg_ = StylePrefsConfig.model_validate({**cfg_.model_dump(), "model": model})
    card = make_style_preferences(cfg_, out, overwrite=overwrite)
    if json_output:
        echo_json(card)
    else:
        check = card["style_check"]
        if check["enabled"]:
            typer.echo(f"style check: {check['kept']} of {check['checked']} pairs kept")
        _echo_card(card, out)


def _echo_card(card: dict, out: Path) -> None:
    for split, info in card["splits"].items():
        parts = [f"{info['usable']} usable of {info['records']}"]
        if "tie_rate" in info:
            parts.append(f"tie rate {info['tie_rate']:.1%}")
        if info.get("annotator_agreement") is not None:
            parts.append(f"annotator agreement {info['annotator_agreement']:.1%}")
        if info.get("annotator_spearman") is not None:
            parts.append(f"annotator Spearman {info['annotator_spearman']:.3f}")
        if info.get("bad_records"):
            parts.append(f"{info['bad_records']} bad records skipped")
        typer.echo(f"{split}: " + ", ".join(parts))
    typer.echo(f"wrote {out} (card: {out / 'README.md'})")


@app.command("show")
def show(
    data: Path = typer.Argument(..., help="dataset folder"),
    out: Path = typer.Option(Path("prefs.png"), help="PNG grid to write"),
    split: str = typer.Option("train", help="split to show"),
    count: int = typer.Option(16, help="pairs (or images) to show"),
    columns: int = typer.Option(4, help="pairs per row"),
    upscale: int = typer.Option(3, help="pixel upscaling"),
) -> None:
    """Write a grid of pairs with their labels (winner marked, ties shown), or of scored images."""
    import torch

    from prefalign.data import PairwiseDataset, load_preference_data
    from prefalign.images import labelled_grid

    dataset = load_preference_data(data, split)
    if dataset.report.bad:
        typer.echo(dataset.report.summary(), err=True)
    count = min(count, len(dataset))
    if isinstance(dataset, PairwiseDataset):
        batch = dataset.batch(range(count))
        images = torch.stack([image for pair in zip(batch.images_0, batch.images_1) for image in pair])
        labels = []
        for caption, label, row in zip(batch.captions, batch.label_0.tolist(), batch.rows.tolist()):
            verdict = ("tie", "tie") if label == 0.5 else (("WINNER", "") if label > 0.5 else ("", "WINNER"))
            labels += [f"#{row} {caption}\n{verdict[0]} (label_0={label:g})", f"{verdict[1]}"]
        grid = labelled_grid(images, labels, columns=2 * columns, upscale=upscale, title=f"{data} [{split}]: {len(dataset)} pairs; left = jpg_0, right = jpg_1")
    else:
        batch = dataset.batch(range(count))
        labels = [f"#{r} group {g}\nscore {s:g}" for r, g, s in zip(batch.rows.tolist(), batch.group_ids, batch.scores.tolist())]
        images = batch.images
        if batch.masked_images is not None:
            images = torch.stack([image for pair in zip(batch.masked_images, batch.images) for image in pair])
            labels = [text for label in labels for text in ("masked prompt", label)]
        grid = labelled_grid(images, labels, columns=2 * columns if batch.masked_images is not None else columns, upscale=upscale, title=f"{data} [{split}]: {len(dataset)} scored images")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    typer.echo(f"wrote {out}")


@app.command("import")
def import_(
    folder: Path = typer.Argument(..., help="folder holding the images"),
    table: Path = typer.Argument(..., help="CSV or JSONL: caption,image_0,image_1,label_0 (pairwise) or image,score[,masked_image,mask,group_id,mask_kind,caption] (pointwise)"),
    out: Path = typer.Option(..., help="dataset folder to write"),
    kind: str = typer.Option(None, help="pairwise or pointwise (default: from the table's columns)"),
    split: str = typer.Option("train", help="split for rows without a split column"),
    image_size: int = typer.Option(None, help="required image side (default: the most common size; others are bad records)"),
    shard_size: int = typer.Option(1000, help="records per Parquet shard"),
    overwrite: bool = typer.Option(False, help="replace an existing dataset in --out"),
    card: bool = typer.Option(True, help="write the dataset card (scores world prompts with the annotator)"),
    json_output: bool = typer.Option(False, "--json", help="print the import report as JSON"),
) -> None:
    """Import a folder of images + a table as a dataset; bad rows (missing field, missing or
    unreadable image, size mismatch) are skipped and reported with their row ids."""
    from prefalign.data.card import write_card
    from prefalign.data.importing import import_preferences

    report = import_preferences(folder, table, out, kind=kind, split=split, image_size=image_size, shard_size=shard_size, overwrite=overwrite)
    typer.echo(report.summary(), err=bool(report.bad))
    written = write_card(out) if card else None
    if json_output:
        echo_json({"report": report.to_dict(), "card": written})
    elif written is not None:
        _echo_card(written, out)
    else:
        typer.echo(f"wrote {out}")


from prefalign.commands.prefs_inpaint import make_inpaint  # noqa: E402  (PrefPaint's inpainting dataset)

app.command("make-inpaint")(make_inpaint)
