"""Evaluation of aligned models (METHODS.md "Evaluation, shared by all"; DESIGN.md ``evaluation/``).

Pure metrics first (short functions, tested on fixed tensors), then the loop that samples models and
applies them (:func:`evaluate`, used by ``prefalign evaluate``, ``prefalign report`` and ``prefalign demo``).

Protocol (the defaults are written down here and in every result's ``settings``):

- **Same prompts and seeds for both models.** Prompt p's k-th image (``per_prompt`` = K images per
  prompt) is image i = p·K + k of the run and starts from x_T drawn with seed ``seed + i``
  (:func:`prefalign.sampling.generate`), so the model and the model it is compared against start from
  identical noise; DDIM with η = 0 is deterministic from there.
- **Prompts.** An integer N draws N *distinct* world prompts of ``split`` (``train`` = the held-in
  colour–shape combinations, ``held_out`` = the combinations never pretrained on, ``all``) with
  ``prompt_seed``, leaving out every caption the run was trained on (when the run's data can be read):
  "held-out prompts" in METHODS.md's sense. A file gives the prompts verbatim.
- **Win rate** of model A over model B under a scorer: over the N·K (prompt, seed) comparisons, a win
  counts 1, a tie ½, a loss 0; scores within ``tie_tolerance`` (default 1e-4, far below any
  visible difference on the annotator's [0, 1] scale or a reward model's logit scale) are a tie, so
  float noise between near-identical images is not counted as wins. Its 95 % interval is the
  **Wilson score interval** of a
  proportion with successes = wins + ½·ties out of n = N·K (:func:`wilson_interval`). The K images of
  one prompt are treated as independent comparisons, so with K > 1 the interval is somewhat narrow.
- **Annotator win rate**: the same with the shapes world's noiseless annotator score (the true
  preference a learned reward only approximates; METHODS.md). Only on world prompts.
- **Attribute accuracy**: the annotator's checks of colour, shape, size, position and background (mean
  of the five) and the share of images with all five right.
- **Diversity**: the mean pairwise RMS pixel distance (images in [0, 1]) between the K images of a
  prompt, averaged over prompts (needs K ≥ 2). A model that collapses to one image per prompt gets 0.
- **Style** (``style=S``, Diffusion-RPO's style alignment): prompts are plain (no style suffix); the
  share of generations that the world's CLIP (``shapes-clip``) classifies zero-shot as style S (the
  candidates are the prompt with each style suffix and without one), and content preservation: the
  CLIP's zero-shot colour and shape accuracy, judged with the style the CLIP assigned to the image.

Models are given as any ``--model`` spec (a shipped name, a shapes model folder, a diffusers pipeline
folder), a run folder of ``prefalign align`` (its ``export/`` is loaded; ``against="base"`` is the
run's base model) or an export folder itself. Diffusers LoRA exports are loaded onto their base
pipeline with ``pipeline.load_lora_weights``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import PrefalignError

#: What the win-rate interval is, written into every result.
INTERVAL_NAME = "Wilson score interval (95 %), ties (|Δ| ≤ tie_tolerance) counted ½, over prompts × seeds"
#: The annotator checks that make up "attribute accuracy".
CONTENT_ATTRIBUTES = ("colour", "shape", "size", "position", "background")
#: File a run folder's evaluation is saved to (read by ``prefalign report``).
EVALUATION_FILE = "evaluation.json"
Z_95 = 1.959963984540054
#: Score differences up to this are ties (see the module docstring).
TIE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------
# Pure metrics
# --------------------------------------------------------------------------------------------------


def win_counts(scores: torch.Tensor, reference_scores: torch.Tensor, tie_tolerance: float = TIE_TOLERANCE) -> tuple[int, int, int]:
    """(wins, ties, n) of ``scores`` [n] over ``reference_scores`` [n], compared element by element;
    |s − s_ref| ≤ ``tie_tolerance`` is a tie."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    reference_scores = torch.as_tensor(reference_scores, dtype=torch.float64).flatten()
    if scores.shape != reference_scores.shape:
        raise PrefalignError(f"win rate needs paired scores; got {scores.numel()} and {reference_scores.numel()}")
    difference = scores - reference_scores
    ties = difference.abs() <= tie_tolerance
    return int(((difference > 0) & ~ties).sum()), int(ties.sum()), int(scores.numel())


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion p = successes / n:

        centre = (p + z²/2n) / (1 + z²/n),  half = z·√(p(1−p)/n + z²/4n²) / (1 + z²/n).

    ``successes`` may be fractional (ties counted ½). (nan, nan) when n = 0."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(scores: torch.Tensor, reference_scores: torch.Tensor, z: float = Z_95, tie_tolerance: float = TIE_TOLERANCE) -> dict[str, Any]:
    """Win rate of ``scores`` over ``reference_scores`` (ties ½) with its Wilson interval."""
    wins, ties, n = win_counts(scores, reference_scores, tie_tolerance)
    successes = wins + 0.5 * ties
    low, high = wilson_interval(successes, n, z)
    return {"win_rate": successes / n if n else float("nan"), "ci95": [low, high], "wins": wins, "ties": ties, "n": n}


def score_summary(scores: torch.Tensor) -> dict[str, float]:
    """Mean, median (the lower middle value for even n, as ``torch.median``) and std of scores [n]."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    return {
        "mean": float(scores.mean()),
        "median": float(scores.median()),
        "std": float(scores.std()) if scores.numel() > 1 else 0.0,
    }


def mean_pairwise_distance(images: torch.Tensor, per_prompt: int) -> float | None:
    """Diversity: images [P·K, C, H, W] grouped as K consecutive images per prompt → the mean over
    prompts of the mean RMS distance √mean((x_a − x_b)²) over the K(K−1)/2 pairs of the prompt.
    None when K < 2."""
    if per_prompt < 2:
        return None
    if images.shape[0] % per_prompt:
        raise PrefalignError(f"{images.shape[0]} images are not groups of {per_prompt}")
    flat = images.reshape(images.shape[0] // per_prompt, per_prompt, -1).double()  # [P, K, D]
    squared = torch.cdist(flat, flat).pow(2) / flat.shape[-1]  # [P, K, K] mean squared differences
    rows, cols = torch.triu_indices(per_prompt, per_prompt, offset=1)
    return float(squared[:, rows, cols].clamp(min=0).sqrt().mean())


def attribute_accuracy(checks: dict[str, torch.Tensor]) -> dict[str, float]:
    """The annotator's attribute checks → per-attribute accuracy, their mean over
    :data:`CONTENT_ATTRIBUTES` and the share of images with all of them right."""
    stacked = torch.stack([checks[k].float() for k in CONTENT_ATTRIBUTES])  # [5, B]
    out = {f"{k}_accuracy": float(checks[k].float().mean()) for k in CONTENT_ATTRIBUTES}
    out["attribute_accuracy"] = float(stacked.mean())
    out["all_attributes_correct"] = float(stacked.all(0).float().mean())
    return out


def style_alignment(clip, images: torch.Tensor, prompts: Sequence[str], style: str) -> dict[str, Any]:
    """Diffusion-RPO's style metric with the world's CLIP: share of ``images`` classified zero-shot
    as ``style`` (candidates: the prompt's scene in each style and plain), and content preservation
    (zero-shot colour and shape accuracy, judged with the style the CLIP assigned to each image)."""
    from prefalign.rewards.clip import attribute_options, zero_shot_predictions
    from prefalign.worlds.shapes.prompts import STYLES, parse_prompt

    if style not in STYLES:
        raise PrefalignError(f"unknown style {style!r}; choose one of {list(STYLES)}")
    scenes = [parse_prompt(p).with_style(None) for p in prompts]
    styles = attribute_options("style")
    predicted = zero_shot_predictions(clip, images, scenes, "style")  # [B] indices into styles
    judged = [scene.with_style(styles[int(i)]) for scene, i in zip(scenes, predicted)]
    out: dict[str, Any] = {
        "style": style,
        "style_share": float((predicted == styles.index(style)).float().mean()),
        "style_counts": {str(s): int((predicted == i).sum()) for i, s in enumerate(styles)},
    }
    for attribute in ("colour", "shape"):
        options = attribute_options(attribute)
        truth = torch.tensor([options.index(getattr(s, attribute)) for s in judged])
        out[f"{attribute}_accuracy"] = float((zero_shot_predictions(clip, images, judged, attribute) == truth).float().mean())
    out["content_preservation"] = (out["colour_accuracy"] + out["shape_accuracy"]) / 2
    return out


# --------------------------------------------------------------------------------------------------
# Models: run folders, exports, any --model spec
# --------------------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    """What a model spec refers to. ``load`` goes to ``load_backbone``; ``lora`` (a diffusers LoRA
    export) and ``unet`` (a fully fine-tuned diffusers UNet) are applied on top of it."""

    label: str
    load: str
    base: str | None = None
    run_dir: str | None = None
    method: str | None = None
    data: str | None = None
    steps: int | None = None
    lora: str | None = None
    unet: str | None = None

    @property
    def key(self) -> tuple:
        return (self.load, self.lora, self.unet)


def is_run_folder(path: Path) -> bool:
    """A folder written by ``prefalign align`` (config.yaml / metrics.json, maybe export/)."""
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / "metrics.json").is_file()) and not (path / "model_index.json").is_file()


def resolve_model(spec: str | Path, label: str | None = None) -> ResolvedModel:
    """Resolve a run folder, an export folder or a plain ``--model`` spec (see module docstring)."""
    from prefalign.training.export import EXPORT_INFO

    name = str(spec)
    path = Path(name).expanduser()
    if is_run_folder(path):
        export = path / "export"
        if not export.is_dir():
            status = _read_json(path / "metrics.json").get("status", "unfinished")
            raise PrefalignError(
                f"{path} is a run folder without an export (status: {status}); finish it with "
                f"`prefalign align METHOD --out {path} --resume`, or check that export.enabled was true"
            )
        resolved = _resolve_export(export, label or path.name)
        config = _read_yaml(path / "config.yaml")
        resolved.run_dir = str(path)
        resolved.method = resolved.method or config.get("method")
        resolved.base = resolved.base or config.get("model")
        data = config.get("data")
        resolved.data = data.get("path") if isinstance(data, dict) else data
        return resolved
    if path.is_dir() and (path / EXPORT_INFO).is_file():
        return _resolve_export(path, label or name)
    return ResolvedModel(label=label or name, load=name)


def _resolve_export(export: Path, label: str) -> ResolvedModel:
    from prefalign.training.export import EXPORT_INFO

    info = _read_json(export / EXPORT_INFO)
    common = {"label": label, "base": info.get("base_model"), "method": info.get("method"), "steps": info.get("steps")}
    if (export / "prefalign.json").is_file():
        return ResolvedModel(load=str(export), **common)
    if (export / "pipeline" / "model_index.json").is_file():
        return ResolvedModel(load=str(export / "pipeline"), **common)
    if common["base"] is None:
        raise PrefalignError(f"{export / EXPORT_INFO} does not name its base model; load the export's base pipeline yourself")
    if (export / "unet" / "config.json").is_file():
        return ResolvedModel(load=str(common["base"]), unet=str(export / "unet"), **common)
    if (export / "pytorch_lora_weights.safetensors").is_file():
        return ResolvedModel(load=str(common["base"]), lora=str(export), **common)
    raise PrefalignError(f"{export} holds no model (no prefalign.json, pipeline/, unet/ or pytorch_lora_weights.safetensors)")


def load_model(resolved: ResolvedModel, device: str | torch.device = "cpu"):
    """A :class:`~prefalign.backbones.base.Backbone` for a resolved model (LoRA / UNet applied)."""
    from prefalign.backbones.loading import load_backbone

    backbone = load_backbone(resolved.load, device=device)
    if resolved.unet is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(resolved.unet).to(device=backbone.device, dtype=backbone.unet.dtype).eval()
        backbone.pipeline.unet = unet
        backbone.unet = unet
    if resolved.lora is not None:
        backbone.pipeline.load_lora_weights(resolved.lora)
        backbone.unet = backbone.pipeline.unet
    backbone.unet.eval()
    return backbone


def against_model(model: ResolvedModel, against: str) -> ResolvedModel:
    """The model to compare with: ``"base"`` = the run's (or export's) base model, else any spec."""
    if against == "base":
        if model.base is None:
            raise PrefalignError(
                f"{model.label} is not a run folder or export, so it has no known base model; give --against MODEL (e.g. shapes-t2i)"
            )
        return resolve_model(model.base, label=f"base ({Path(model.base).name if Path(model.base).exists() else model.base})")
    return resolve_model(against)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise PrefalignError(f"{path} is not valid JSON; was it written completely?") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text()) or {}
    return loaded if isinstance(loaded, dict) else {}


# --------------------------------------------------------------------------------------------------
# Prompts and sampling
# --------------------------------------------------------------------------------------------------


def training_captions(data_path: str | None) -> set[str]:
    """Captions of a preference dataset's train split (empty when it cannot be read)."""
    if not data_path or not Path(data_path).is_dir():
        return set()
    try:
        import pyarrow.parquet as pq

        captions: set[str] = set()
        for shard in sorted((Path(data_path) / "data").glob("train-*.parquet")):
            table = pq.read_table(shard, columns=["caption"])
            captions.update(str(c) for c in table.column("caption").to_pylist())
        return captions
    except Exception:  # an unreadable dataset only means nothing is excluded
        return set()


def evaluation_prompts(count: int, seed: int = 12345, split: str = "train", exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct plain world prompts of ``split`` that are not in ``exclude``, shuffled with
    ``seed`` (repeats only when the split has fewer prompts left than ``count``)."""
    from prefalign.worlds.shapes.prompts import all_scenes

    if count < 1:
        raise PrefalignError("--prompts must be at least 1")
    pool = [s.prompt for s in all_scenes(split) if s.prompt not in exclude]
    if not pool:
        raise PrefalignError(f"every {split} prompt is in the training data; use --split held_out or a prompts file")
    random.Random(seed).shuffle(pool)
    while len(pool) < count:
        pool = pool + pool[: count - len(pool)]
    return pool[:count]


def is_shapes_model(resolved: ResolvedModel) -> bool:
    """Whether a resolved model is a shapes-world model (the annotator and attribute checks apply)."""
    from prefalign.backbones.shapes import SHIPPED_MODELS

    return resolved.load in SHIPPED_MODELS or (Path(resolved.load) / "prefalign.json").is_file()


def is_world_prompt(prompt: str) -> bool:
    from prefalign.worlds.shapes.prompts import try_parse_prompt

    return try_parse_prompt(prompt) is not None


@dataclass
class SamplingSettings:
    """How every model of an evaluation is sampled (identical for the compared models)."""

    per_prompt: int = 2
    seed: int = 777
    steps: int = 20
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    batch_size: int = 64


def inpainting_inputs(prompts: Sequence[str], size: int, seed: int) -> dict[str, torch.Tensor]:
    """For inpainting models on world prompts: a clean render of each prompt (``sources``), a mask
    (outpainting for even rows, a warping hole for odd rows; 1 = repaint) and the masked image."""
    from prefalign.worlds.shapes.masks import make_masks
    from prefalign.worlds.shapes.prompts import parse_prompt
    from prefalign.worlds.shapes.render import render

    scenes = [parse_prompt(p) for p in prompts]
    sources = render(scenes, seed=seed, size=size).images
    masks = torch.zeros(len(prompts), 1, size, size)
    for parity, kind in ((0, "outpaint"), (1, "warp")):
        rows = list(range(parity, len(prompts), 2))
        if rows:
            masks[rows] = make_masks(kind, sources[rows], seed=seed + parity)
    return {"sources": sources, "masks": masks, "masked_images": sources * (1 - masks)}


def sample_images(backbone, prompts: Sequence[str], settings: SamplingSettings, progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images [N·K, 3, H, W] for ``prompts`` (each repeated K = per_prompt times, image i from seed
    ``settings.seed + i``) and the scorer conditions (inpainting: masked images and masks). A
    one-step generator (``backbone.one_step``) makes each image in one call from the same x_T."""
    from prefalign.sampling import generate

    expanded = [p for p in prompts for _ in range(settings.per_prompt)]
    condition: Callable | None = None
    cond: dict[str, torch.Tensor] = {}
    if backbone.is_inpainting:
        if not all(is_world_prompt(p) for p in prompts):
            raise PrefalignError("evaluating an inpainting model needs world prompts (the masked source image is a render of the prompt)")
        from prefalign.training.trainer import pixel_resolution

        inputs = inpainting_inputs(prompts, pixel_resolution(backbone)[-1], settings.seed)
        sources = inputs["sources"].repeat_interleave(settings.per_prompt, 0)
        masks = inputs["masks"].repeat_interleave(settings.per_prompt, 0)
        cond = {"masked_images": inputs["masked_images"].repeat_interleave(settings.per_prompt, 0), "masks": masks}

        def inpaint(c, rows):
            return backbone.inpaint_conditioning(c, sources[rows].to(backbone.device), masks[rows].to(backbone.device))

        condition = inpaint

    steps = 1 if getattr(backbone, "one_step", None) is not None else settings.steps  # a one-step generator (Diff-Instruct++)
    images = generate(
        backbone, expanded, seed=settings.seed, steps=steps, guidance_scale=settings.guidance_scale,
        sampler=settings.sampler, batch_size=settings.batch_size, progress=progress, condition=condition,
    )
    return images, cond


# --------------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------------


@dataclass
class EvaluationSettings:
    """Everything that defines an evaluation (saved with its results)."""

    prompts: int | list[str] = 64
    split: str = "train"
    prompt_seed: int = 12345
    scorers: list[str] | None = None
    style: str | None = None
    clip: str = "shapes-clip"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    device: str = "cpu"
    tie_tolerance: float = TIE_TOLERANCE


def side_metrics(images: torch.Tensor, prompts: Sequence[str], cond: dict[str, torch.Tensor], scorers: dict[str, Any], per_prompt: int, world: bool, style: str | None, clip) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metrics of one model's images and its per-image scores (for the win rates)."""
    expanded = [p for p in prompts for _ in range(per_prompt)]
    scores = {name: scorer.score_batched(images, expanded, **cond) for name, scorer in scorers.items()}
    out: dict[str, Any] = {"scores": {name: score_summary(s) for name, s in scores.items()}}
    if world:
        from prefalign.worlds.shapes.annotator import Annotator

        out.update(attribute_accuracy(Annotator().attribute_checks(images, expanded)))
    out["diversity"] = mean_pairwise_distance(images, per_prompt)
    if style is not None:
        out["style"] = style_alignment(clip, images, expanded, style)
    return out, scores


def evaluate(
    models: Sequence[str | Path],
    against: str = "base",
    settings: EvaluationSettings | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate each model against ``against`` (see the module docstring for the protocol).

    Each model's images and the images of the model it is compared with are sampled once per call
    (a shared base model is sampled only once). Returns one result dict per model; a run folder's
    result is also written to RUN/evaluation.json by the command line (and the demo)."""
    from tqdm.auto import tqdm

    from prefalign.rewards.base import AnnotatorScorer, load_scorer

    settings = settings or EvaluationSettings()
    sampling = settings.sampling
    resolved = [resolve_model(m) for m in models]
    pairs = [(model, against_model(model, against)) for model in resolved]

    clip = None
    if settings.style is not None:
        from prefalign.rewards.clip import load_clip

        clip = load_clip(settings.clip, device=settings.device)

    cache: dict[tuple, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    backbones: dict[tuple, Any] = {}
    loaded_scorers: dict[str, Any] = {}
    steps_used: dict[tuple, int] = {}
    results = []
    bar = tqdm(total=len(pairs), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for model, reference in pairs:
        if isinstance(settings.prompts, int):
            exclude = training_captions(model.data) | training_captions(reference.data)
            prompts = evaluation_prompts(settings.prompts, settings.prompt_seed, settings.split, exclude)
            prompt_source = f"{settings.prompts} world prompts ({settings.split} split, seed {settings.prompt_seed}, {len(exclude)} training captions excluded)"
        else:
            prompts = list(settings.prompts)
            prompt_source = f"{len(prompts)} given prompts"
        if not prompts:
            raise PrefalignError("no evaluation prompts; give --prompts N or a prompts file")
        world = all(is_world_prompt(p) for p in prompts) and is_shapes_model(model) and is_shapes_model(reference)
        if settings.style is not None:
            if not world:
                raise PrefalignError("--style needs shapes-world models and prompts (the world's CLIP judges the style)")
            from prefalign.worlds.shapes.prompts import parse_prompt

            prompts = [parse_prompt(p).with_style(None).prompt for p in prompts]
        names = list(settings.scorers) if settings.scorers is not None else (["annotator"] if world else [])
        scorers = {}
        for name in names:
            if name not in loaded_scorers:
                loaded_scorers[name] = load_scorer(name, device=settings.device)
            scorer = loaded_scorers[name]
            if isinstance(scorer, AnnotatorScorer) and not world:
                raise PrefalignError("the annotator scorer only rates shapes-world models on world prompts; use --scorer with a reward model or module:function")
            scorers[scorer.name if isinstance(scorer, AnnotatorScorer) else name] = scorer

        per_side: dict[str, dict] = {}
        per_scores: dict[str, dict] = {}
        for side, target in (("model", model), ("against", reference)):
            key = (target.key, tuple(prompts), tuple(sorted(asdict(sampling).items())), tuple(scorers), world)
            if key not in cache:  # sample and score each model once per call (a shared base model too)
                if target.key not in backbones:
                    backbones.clear()  # keep one model in memory at a time
                    backbones[target.key] = load_model(target, settings.device)
                bar.set_postfix_str(f"sampling {target.label}")
                steps_used[target.key] = 1 if getattr(backbones[target.key], "one_step", None) is not None else sampling.steps
                images, cond = sample_images(backbones[target.key], prompts, sampling)
                cache[key] = side_metrics(images, prompts, cond, scorers, sampling.per_prompt, world, settings.style, clip)
            per_side[side], per_scores[side] = cache[key]
        win_rates = {name: win_rate(per_scores["model"][name], per_scores["against"][name], tie_tolerance=settings.tie_tolerance) for name in scorers}
        result = {
            "model": asdict(model),
            "against": asdict(reference),
            "settings": {
                "prompts": len(prompts),
                "prompt_source": prompt_source,
                "split": settings.split,
                "prompt_seed": settings.prompt_seed,
                "scorers": list(scorers),
                "style": settings.style,
                "interval": INTERVAL_NAME,
                "tie_tolerance": settings.tie_tolerance,
                "steps_used": {"model": steps_used.get(model.key), "against": steps_used.get(reference.key)},  # 1: a one-step generator
                **asdict(sampling),
            },
            "metrics": per_side,
            "win_rates": win_rates,
        }
        results.append(result)
        if on_result is not None:
            on_result(result)
        bar.update(1)
    bar.close()
    return results


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One flat row of an evaluation result (the report's and the demo's metrics table)."""
    model, metrics = result["model"], result["metrics"]
    row: dict[str, Any] = {"model": model["label"], "method": model.get("method") or "-"}
    for name, rate in result["win_rates"].items():
        row[f"{name} win rate"] = rate["win_rate"]
        row[f"{name} win rate ci95"] = rate["ci95"]
    for name, summary in metrics["model"]["scores"].items():
        row[f"{name} mean"] = summary["mean"]
        row[f"{name} mean (against)"] = metrics["against"]["scores"][name]["mean"]
    for key in ("attribute_accuracy", "diversity"):
        if metrics["model"].get(key) is not None:
            row[key] = metrics["model"][key]
            row[f"{key} (against)"] = metrics["against"].get(key)
    if "style" in metrics["model"]:
        style = metrics["model"]["style"]
        row[f"{style['style']} share"] = style["style_share"]
        row[f"{style['style']} share (against)"] = metrics["against"]["style"]["style_share"]
        row["content preservation"] = style["content_preservation"]
    return row


def format_result(result: dict[str, Any]) -> str:
    """A plain-text table of one result: metric | model | against."""
    model, against, metrics = result["model"], result["against"], result["metrics"]
    rows: list[tuple[str, str, str]] = []

    def number(value: Any) -> str:
        return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

    for name in result["win_rates"]:
        rate = result["win_rates"][name]
        low, high = rate["ci95"]
        rows.append((f"{name} win rate", f"{rate['win_rate']:.3f} [{low:.3f}, {high:.3f}]", f"n={rate['n']}, ties {rate['ties']}"))
        for stat in ("mean", "median"):
            rows.append((f"{name} {stat}", number(metrics["model"]["scores"][name][stat]), number(metrics["against"]["scores"][name][stat])))
    for key in (*[f"{a}_accuracy" for a in CONTENT_ATTRIBUTES], "attribute_accuracy", "all_attributes_correct", "diversity"):
        if key in metrics["model"]:
            rows.append((key.replace("_", " "), number(metrics["model"][key]), number(metrics["against"].get(key))))
    if "style" in metrics["model"]:
        for key in ("style_share", "colour_accuracy", "shape_accuracy", "content_preservation"):
            label = f"{metrics['model']['style']['style']} share" if key == "style_share" else f"style eval {key.replace('_', ' ')}"
            rows.append((label, number(metrics["model"]["style"][key]), number(metrics["against"]["style"][key])))
    header = ("metric", model["label"], against["label"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    s = result["settings"]
    lines.append(
        f"{s['prompt_source']}; {s['per_prompt']} images per prompt, seeds {s['seed']}…, {s['steps']} {s['sampler']} steps, "
        f"CFG {s['guidance_scale']}; interval: {s['interval']}"
    )
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write one result as JSON (atomically: temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(path)
    return path


__all__ = [
    "INTERVAL_NAME",
    "EVALUATION_FILE",
    "win_counts",
    "wilson_interval",
    "win_rate",
    "score_summary",
    "mean_pairwise_distance",
    "attribute_accuracy",
    "style_alignment",
    "ResolvedModel",
    "resolve_model",
    "load_model",
    "against_model",
    "evaluation_prompts",
    "SamplingSettings",
    "EvaluationSettings",
    "sample_images",
    "evaluate",
    "summary_row",
    "format_result",
    "save_result",
]
