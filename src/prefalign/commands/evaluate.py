"""``prefalign evaluate RUN_OR_MODEL… [--against base|RUN2] [--scorer …] [--prompts N|FILE] [--style S] [--json]``.

Samples every model and the model it is compared with on the same prompts and seeds, and reports
mean/median scores, win rates with a 95 % Wilson interval (ties ½), the annotator's win rate and
attribute accuracy on the shapes world, diversity, and with ``--style`` the style share and content
preservation (the protocol is written down in :mod:`prefalign.evaluation`). A run folder's result is
also saved to RUN/evaluation.json (read by ``prefalign report``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP, echo_json, read_prompts
from prefalign.errors import PrefalignError

SCORER_HELP = "annotator, annotator:PERSONA, a reward model folder (`prefalign reward train`) or module:function"


def parse_prompts_option(value: str) -> int | list[str]:
    """``--prompts``: an integer (that many world prompts) or a prompts file."""
    value = value.strip()
    if value.isdigit():
        return int(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise PrefalignError(f"--prompts {value!r} is neither a number nor a prompts file; give e.g. --prompts 64 or --prompts prompts.txt")
    prompts = read_prompts(None, path)
    if not prompts:
        raise PrefalignError(f"{path} holds no prompts")
    return prompts


def evaluate(
    models: list[str] = typer.Argument(..., help="run folders of `prefalign align`, export folders, or " + MODEL_HELP),
    against: str = typer.Option("base", "--against", help="base (the run's base model) or another run / model to compare with"),
    scorer: list[str] = typer.Option(None, "--scorer", help=f"scorer(s) for scores and win rates (repeatable): {SCORER_HELP}; default annotator on world prompts"),
    prompts: str = typer.Option("64", "--prompts", help="N world prompts (not in the run's training data) or a prompts file (.txt/.jsonl/.json/.csv)"),
    split: str = typer.Option("train", help="world prompts from: train (held-in combinations), held_out (combinations never pretrained) or all"),
    style: str = typer.Option(None, "--style", help="style alignment: share of generations the world's CLIP classifies as this style (winter, sketch, starry)"),
    per_prompt: int = typer.Option(2, help="images per prompt (seed + i for image i; ≥ 2 for diversity)"),
    seed: int = typer.Option(777, help="sampling seed of the first image"),
    prompt_seed: int = typer.Option(12345, help="seed that draws the world prompts"),
    steps: int = typer.Option(20, help="sampling steps"),
    cfg: float = typer.Option(3.0, "--cfg", help="classifier-free guidance scale"),
    sampler: str = typer.Option("ddim", help="ddim or bdia"),
    batch_size: int = typer.Option(64, help="images per forward batch"),
    clip: str = typer.Option("shapes-clip", help="CLIP encoder of --style (shapes-clip or a folder)"),
    device: str = typer.Option("cpu", help="torch device"),
    save: bool = typer.Option(True, help="save a run folder's result to RUN/evaluation.json"),
    json_output: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Evaluate aligned models against their base model (or another model): same prompts and seeds."""
    from prefalign.evaluation import EVALUATION_FILE, EvaluationSettings, SamplingSettings, format_result, save_result
    from prefalign.evaluation import evaluate as run_evaluation

    if split not in ("train", "held_out", "all"):
        raise PrefalignError(f"--split must be train, held_out or all, not {split!r}")
    if per_prompt < 1:
        raise PrefalignError("--per-prompt must be at least 1")
    settings = EvaluationSettings(
        prompts=parse_prompts_option(prompts),
        split=split,
        prompt_seed=prompt_seed,
        scorers=list(scorer) if scorer else None,
        style=style,
        clip=clip,
        sampling=SamplingSettings(per_prompt=per_prompt, seed=seed, steps=steps, guidance_scale=cfg, sampler=sampler, batch_size=batch_size),
        device=device,
    )

    def saved(result: dict) -> None:
        run_dir = result["model"].get("run_dir")
        if save and run_dir and against == "base" and style is None:
            result["saved_to"] = str(save_result(result, Path(run_dir) / EVALUATION_FILE))
        elif save and run_dir and style is not None:
            result["saved_to"] = str(save_result(result, Path(run_dir) / f"evaluation-{style}.json"))

    results = run_evaluation(models, against, settings, progress=not json_output, on_result=saved)
    if json_output:
        echo_json(results if len(results) > 1 else results[0])
        return
    for result in results:
        typer.echo(format_result(result))
        if "saved_to" in result:
            typer.echo(f"saved {result['saved_to']}")
        typer.echo("")
