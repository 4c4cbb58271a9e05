"""One self-contained HTML report for alignment runs (``prefalign report RUN… --out report.html``).

Sections (DESIGN.md: "every run directory ends with report.html"):

1. **Metrics** — one table row per run: method, steps, final training loss and implicit accuracy
   (RUN/metrics.json), and the evaluation against the run's base model (RUN/evaluation.json, written
   by ``prefalign evaluate``; computed now when missing): annotator win rate with its 95 % Wilson
   interval, learned-reward win rate, mean scores, attribute accuracy, diversity.
2. **Base vs aligned** — for each base model, one table of images: a row per prompt, a column for the
   base model and each run, all sampled with the same seed per row (so differences are the
   alignment's, not the noise's); the annotator's score under each image on the shapes world.
3. **Training curves** — loss, implicit accuracy, any logged reward and the annotator win rate of
   the periodic evaluations, one line per run (matplotlib, Agg).
4. **Reward model** — its error-vs-bound plot (PrefPaint's |r − r*| against ‖z‖_V⁻¹) and held-out
   numbers, when a reward model is part of the runs (named in a run's config, or given).
5. **Dataset card** of each run's preference data, and each run's resolved config.

Every image is embedded as a ``data:image/png;base64`` URI, there are no scripts and no external
resources, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import PrefalignError
from prefalign.evaluation import (
    EVALUATION_FILE,
    EvaluationSettings,
    SamplingSettings,
    evaluate,
    evaluation_prompts,
    is_run_folder,
    is_world_prompt,
    load_model,
    resolve_model,
    sample_images,
    save_result,
    training_captions,
)

#: Curves drawn from RUN/metrics.json: (title, key in "history" or "eval", where)
CURVES = (
    ("loss", "loss", "history"),
    ("implicit accuracy", "implicit_accuracy", "history"),
    ("reward", "reward", "history"),
    ("annotator win rate vs base", "annotator_win_rate", "eval"),
)


# --------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_data_uri(image: torch.Tensor, upscale: int = 3) -> str:
    """A [3, H, W] image in [0, 1] as a PNG data URI (nearest-neighbour upscaled)."""
    from PIL import Image

    from prefalign.images import to_pil

    pil = to_pil(image)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())


def figure_data_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return png_data_uri(buffer.getvalue())


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


class RunInfo:
    """What the report knows about one run folder."""

    def __init__(self, path: Path):
        import yaml

        if not is_run_folder(path):
            raise PrefalignError(f"{path} is not a run folder of `prefalign align` (no config.yaml or metrics.json)")
        self.path = path
        self.name = path.name
        self.metrics = read_json(path / "metrics.json")
        config_file = path / "config.yaml"
        self.config_text = config_file.read_text() if config_file.is_file() else ""
        self.config = (yaml.safe_load(self.config_text) or {}) if self.config_text else {}
        self.method = self.metrics.get("method") or self.config.get("method") or "?"
        data = self.config.get("data")
        self.data = data.get("path") if isinstance(data, dict) else data
        self.evaluation = read_json(path / EVALUATION_FILE) or None
        self.resolved = resolve_model(path) if (path / "export").is_dir() else None

    @property
    def base(self) -> str | None:
        return self.resolved.base if self.resolved is not None else self.config.get("model")

    def reward_models(self) -> list[Path]:
        """Reward model folders named anywhere in the run's config."""
        from prefalign.rewards.prefpaint import is_reward_model_folder

        found = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)
            elif isinstance(node, str) and len(node) < 1000:
                path = Path(node).expanduser()
                if path.is_dir() and is_reward_model_folder(path):
                    found.append(path.resolve())

        walk(self.config)
        return found


def metrics_rows(runs: Sequence[RunInfo]) -> list[dict[str, Any]]:
    """One row per run (the report's metrics table; also the demo's summary)."""
    rows = []
    for run in runs:
        final = run.metrics.get("final", {})
        row: dict[str, Any] = {
            "run": run.name,
            "method": run.method,
            "steps": run.metrics.get("steps"),
            "loss": final.get("loss"),
            "implicit accuracy": final.get("implicit_accuracy"),
            "train time (s)": run.metrics.get("wall_time_s"),
        }
        evaluation = run.evaluation
        if evaluation:
            model, against = evaluation["metrics"]["model"], evaluation["metrics"]["against"]
            learned = [n for n in evaluation["win_rates"] if not n.startswith("annotator")]
            for name, rate in evaluation["win_rates"].items():
                label = "annotator" if name.startswith("annotator") else "reward" if len(learned) == 1 else Path(name).name
                row[f"{label} win rate"] = rate["win_rate"]
                row[f"{label} win rate ci95"] = rate["ci95"]
                row[f"{label} score"] = model["scores"][name]["mean"]
                row[f"{label} score (base)"] = against["scores"][name]["mean"]
            for key in ("attribute_accuracy", "diversity"):
                if model.get(key) is not None:
                    row[key.replace("_", " ")] = model[key]
                    row[key.replace("_", " ") + " (base)"] = against.get(key)
            row["eval images"] = evaluation["settings"]["prompts"] * evaluation["settings"]["per_prompt"]
        for style_file in sorted(run.path.glob("evaluation-*.json")):  # `prefalign evaluate RUN --style S`
            style = (read_json(style_file).get("metrics") or {}).get("model", {}).get("style")
            base_style = (read_json(style_file).get("metrics") or {}).get("against", {}).get("style")
            if style and base_style:
                row[f"{style['style']} share"] = style["style_share"]
                row[f"{style['style']} share (base)"] = base_style["style_share"]
                row[f"{style['style']} content preservation"] = style["content_preservation"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def metrics_table_html(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not k.endswith("ci95")]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            text = fmt(value, 1 if c == "train time (s)" else 3)
            if c.endswith("win rate") and row.get(c + " ci95"):
                low, high = row[c + " ci95"]
                text += f" <span class='ci'>[{fmt(low)}, {fmt(high)}]</span>"
                text = f"<b>{text}</b>" if low > 0.5 else text
                cells.append(f"<td>{text}</td>")
            else:
                cells.append(f"<td>{esc(text)}</td>")
        body.append(f"<tr class='run-row' data-run='{esc(row['run'])}'>{''.join(cells)}</tr>")
    return f"<div class='wide'><table id='metrics'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def comparison_grids_html(runs: Sequence[RunInfo], prompts_count: int, sampling: SamplingSettings, device: str, progress: bool) -> str:
    """Per base model: a table of images, rows = prompts, columns = base + each run (same seeds)."""
    from tqdm.auto import tqdm

    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        if run.resolved is not None and run.base is not None:
            groups.setdefault(run.base, []).append(run)
    if not groups:
        return "<p>No run has an exported model to sample.</p>"
    parts = []
    total = sum(1 + len(g) for g in groups.values())
    bar = tqdm(total=total, desc="report grids", disable=not progress, dynamic_ncols=True)
    for base, group in groups.items():
        exclude = set().union(*(training_captions(r.data) for r in group))
        prompts = evaluation_prompts(prompts_count, seed=2468, split="train", exclude=exclude)
        columns = [("base", resolve_model(base, label=f"base: {Path(base).name}"))] + [(r.name, r.resolved) for r in group]
        images: dict[str, torch.Tensor] = {}
        scores: dict[str, torch.Tensor | None] = {}
        one_step: set[str] = set()
        for label, resolved in columns:
            backbone = load_model(resolved, device)
            if getattr(backbone, "one_step", None) is not None:
                one_step.add(label)
            images[label] = sample_images(backbone, prompts, sampling)[0]
            scores[label] = None
            if backbone.kind.startswith("shapes") and all(is_world_prompt(p) for p in prompts):
                from prefalign.worlds.shapes.annotator import Annotator

                scores[label] = Annotator().score(images[label], prompts)
            del backbone
            bar.update(1)
        upscale = max(1, 96 // images["base"].shape[-1])
        head = "<th>prompt</th>" + "".join(f"<th>{esc(label)}{' (one step)' if label in one_step else ''}</th>" for label, _ in columns)
        rows = []
        for i, prompt in enumerate(prompts):
            cells = [f"<td class='prompt'>{esc(prompt)}</td>"]
            for label, _ in columns:
                caption = ""
                if scores[label] is not None:
                    caption = f"<div class='score'>annotator {float(scores[label][i]):.2f}</div>"
                cells.append(f"<td><img class='sample' alt='{esc(label)}: {esc(prompt)}' src='{image_data_uri(images[label][i], upscale)}'>{caption}</td>")
            rows.append(f"<tr>{''.join(cells)}</tr>")
        parts.append(
            f"<h3>base model <code>{esc(base)}</code></h3>"
            f"<p class='note'>Seed {sampling.seed + 0}… (row i uses seed {sampling.seed}+i for every column), {sampling.steps} "
            f"{sampling.sampler} steps, CFG {sampling.guidance_scale}; prompts not in the runs' training data.</p>"
            f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    bar.close()
    return "".join(parts)


def curves_html(runs: Sequence[RunInfo]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, key, where in CURVES:
        lines = []
        for run in runs:
            points = run.metrics.get(where, []) or []
            if key == "reward":  # any logged reward statistic (RL methods), e.g. reward_mean
                names = sorted({k for p in points for k in p if "reward" in k and isinstance(p.get(k), (int, float))})
                key_used = names[0] if names else None
            else:
                key_used = key
            xy = [(p["step"], p[key_used]) for p in points if key_used and isinstance(p.get(key_used), (int, float))]
            if xy:
                lines.append((run.name, key_used, xy))
        if lines:
            panels.append((title, lines))
    if not panels:
        return "<p>No training curves (the runs have no metrics.json history).</p>"
    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for name, key_used, xy in lines:
            xs, ys = zip(*xy)
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=name)
        ax.set_title(title if lines[0][1] in (None, title.replace(" ", "_")) else f"{title} ({lines[0][1]})")
        ax.set_xlabel("step")
        if "win rate" in title or "accuracy" in title:
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    note = (
        "<p class='note'>Training values are window means over <code>logging.every</code> steps (RUN/metrics.json <code>history</code>); "
        "the annotator win rate comes from the periodic evaluations (<code>eval.every</code>), when enabled.</p>"
    )
    return f"<img class='plot' alt='training curves' src='{figure_data_uri(figure)}'>{note}"


def reward_model_html(folders: Sequence[Path], progress: bool) -> str:
    """Error-vs-bound plot(s) and held-out numbers of each reward model."""
    parts = []
    for folder in folders:
        meta = read_json(folder / "reward_model.json")
        plots = sorted(folder.glob("error_vs_bound*.png"))
        images = [(p.name, png_data_uri(p.read_bytes())) for p in plots]
        evaluation = meta.get("evaluation") or {}
        if not images:  # no plot yet: evaluate on the training data's test split if there is one
            data = (meta.get("training") or {}).get("data")
            if data and (Path(data) / "data").is_dir():
                from prefalign.data.storage import available_splits

                if "test" in available_splits(data):
                    import tempfile

                    from prefalign.rewards.prefpaint import RewardModel
                    from prefalign.rewards.training import evaluate_reward_model

                    with tempfile.TemporaryDirectory() as tmp:
                        plot = Path(tmp) / "error_vs_bound.png"
                        evaluation = evaluate_reward_model(RewardModel.from_pretrained(folder), data, "test", plot=plot, progress=progress)
                        images = [("error_vs_bound.png", png_data_uri(plot.read_bytes()))]
        items = []
        for key in ("data", "split", "accuracy", "ceiling_accuracy", "accuracy_over_ceiling", "spearman_with_annotator"):
            if key in evaluation:
                items.append(f"<li>{esc(key.replace('_', ' '))}: {esc(fmt(evaluation[key]))}</li>")
        bound = evaluation.get("bound") or {}
        if "error_bound_spearman" in bound:
            items.append(f"<li>Spearman(|error|, ‖z‖<sub>V⁻¹</sub>): {fmt(bound['error_bound_spearman'])}; share under the fitted upper line: {fmt(bound.get('share_under_line'))}</li>")
        plots_html = "".join(f"<figure><img class='plot' alt='{esc(name)}' src='{uri}'><figcaption>{esc(name)}</figcaption></figure>" for name, uri in images)
        parts.append(f"<h3><code>{esc(folder)}</code></h3><ul>{''.join(items) or '<li>no held-out evaluation recorded</li>'}</ul>{plots_html or '<p>no error-vs-bound plot (the reward model has no test split to evaluate on)</p>'}")
    return "".join(parts)


def dataset_cards_html(paths: Sequence[str]) -> str:
    parts = []
    for path in paths:
        folder = Path(path)
        readme = folder / "README.md"
        if not readme.is_file():
            parts.append(f"<h3><code>{esc(path)}</code></h3><p>no dataset card (README.md) in this folder</p>")
            continue
        text = readme.read_text()
        try:
            import markdown

            body = markdown.markdown(html.escape(text, quote=False))
        except ImportError:  # pragma: no cover - markdown comes with tensorboard
            body = f"<pre>{esc(text)}</pre>"
        parts.append(f"<div class='card'><p class='note'><code>{esc(path)}</code></p>{body}</div>")
    return "".join(parts) or "<p>The runs name no dataset folder.</p>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td .ci { color: #666; font-size: .9em; }
table.grid td { text-align: center; } table.grid td.prompt { text-align: left; max-width: 14em; }
img.sample { image-rendering: pixelated; display: block; margin: 0 auto; }
img.plot { max-width: 100%; } .score { font-size: .8em; color: #555; }
.note { color: #555; font-size: .85em; } pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .8em; }
.card { border: 1px solid #ddd; padding: 0 1em; margin: .5em 0; } .wide { overflow-x: auto; }
"""


def build_report(
    runs: Sequence[str | Path],
    out: str | Path,
    reward_models: Sequence[str | Path] = (),
    evaluate_missing: bool = True,
    evaluation: EvaluationSettings | None = None,
    grid_prompts: int = 6,
    grid_sampling: SamplingSettings | None = None,
    device: str = "cpu",
    title: str = "prefalign report",
    intro_html: str = "",
    progress: bool = True,
) -> Path:
    """Write the report of ``runs`` to ``out`` (see the module docstring); returns its path.

    ``evaluate_missing``: evaluate runs that have no RUN/evaluation.json (with ``evaluation``
    settings; default 32 prompts × 2 images, 20 DDIM steps) and save it there."""
    from prefalign.rewards.prefpaint import is_reward_model_folder

    if not runs:
        raise PrefalignError("give at least one run folder")
    infos = [RunInfo(Path(r)) for r in runs]
    names = [i.name for i in infos]
    if len(set(names)) != len(names):  # two runs with the same folder name: use the full paths
        for info in infos:
            info.name = str(info.path)
    missing = [i for i in infos if i.evaluation is None and i.resolved is not None]
    if evaluate_missing and missing:
        settings = evaluation or EvaluationSettings(prompts=32, device=device)
        for info, result in zip(missing, evaluate([i.path for i in missing], "base", settings, progress=progress)):
            save_result(result, info.path / EVALUATION_FILE)
            info.evaluation = result
    rows = metrics_rows(infos)
    sampling = grid_sampling or SamplingSettings(per_prompt=1, seed=777, steps=20)

    reward_folders = [Path(p).resolve() for p in reward_models]
    for path in reward_folders:
        if not is_reward_model_folder(path):
            raise PrefalignError(f"{path} is not a reward model folder (no reward_model.json)")
    for info in infos:
        reward_folders += [p for p in info.reward_models() if p not in reward_folders]
    datasets = list(dict.fromkeys(str(i.data) for i in infos if i.data))

    sections = [
        ("Metrics", metrics_table_html(rows) + _evaluation_note(infos)),
        ("Base vs aligned, same prompts and seeds", comparison_grids_html(infos, grid_prompts, sampling, device, progress) if grid_prompts > 0 else "<p>(grids off)</p>"),
        ("Training curves", curves_html(infos)),
    ]
    if reward_folders:
        sections.append(("Reward model: error vs confidence bound", reward_model_html(reward_folders, progress)))
    sections.append(("Dataset card", dataset_cards_html(datasets)))
    configs = "".join(f"<details><summary>{esc(i.name)} ({esc(i.method)})</summary><pre>{esc(i.config_text)}</pre></details>" for i in infos)
    sections.append(("Run configs", configs))

    body = "".join(f"<section><h2>{esc(name)}</h2>{content}</section>" for name, content in sections)
    document = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='note'>{len(infos)} run(s): {esc(', '.join(str(i.path) for i in infos))}. "
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by <code>prefalign report</code>.</p>{intro_html}{body}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(out)
    return out


def _evaluation_note(infos: Sequence[RunInfo]) -> str:
    settings = next((i.evaluation["settings"] for i in infos if i.evaluation), None)
    if settings is None:
        return "<p class='note'>No evaluation (run <code>prefalign evaluate RUN</code>).</p>"
    return (
        f"<p class='note'>Evaluation against each run's base model: {esc(settings['prompt_source'])}; {settings['per_prompt']} images per prompt "
        f"(seeds {settings['seed']}…, identical for both models), {settings['steps']} {esc(settings['sampler'])} steps, CFG {settings['guidance_scale']}. "
        f"Win rates: {esc(settings['interval'])}; bold when the interval lies above ½. Diversity: mean pairwise RMS pixel distance "
        "between images of one prompt. Loss / implicit accuracy: last logging window of training.</p>"
    )


__all__ = ["build_report", "metrics_rows", "RunInfo", "image_data_uri", "png_data_uri"]
