"""``prefalign demo [--out DIR] [--methods dpo,rpo,inpo,…] [--quick]``: the whole loop on the shapes world.

Stages (each with its own progress bar; a finished stage leaves OUT/stages/NAME.json with its
settings, and a re-run with the same --out reuses it; an interrupted alignment resumes from its last
checkpoint):

1. **prefs** — sample the shipped ``shapes-t2i`` and let the simulated annotator (default persona)
   label all pairs of each prompt's images (``prefalign prefs make``) → OUT/prefs
2. **reward** — a PrefPaint reward model (frozen ``shapes-clip`` features, Bradley–Terry loss) on
   those pairs, evaluated on the held-out test prompts with its error-vs-bound plot
   (``prefalign reward train``) → OUT/reward
3. **align** — each method of ``--methods`` on the pairs (``prefalign align METHOD``, one trainer for
   all) → OUT/runs/METHOD (its export/ is the aligned model)
4. **evaluate** — every aligned model against the base model on prompts outside the training data,
   same prompts and seeds (``prefalign evaluate``): annotator win rate with a 95 % Wilson interval,
   learned-reward win rate, attribute accuracy, diversity → OUT/runs/METHOD/evaluation.json
5. **report** — OUT/report.html (``prefalign report``) and the one-screen summary (OUT/summary.txt,
   OUT/summary.json).

Sizes (:data:`SIZES`) were chosen so that the default run takes ≤ 10 minutes and ``--quick`` ≤ 3
minutes on 2 CPU cores. They were set from CPU-seconds measured on one thread on the project's
shared 2-core machine (wall times there were meaningless: other jobs ran): sampling 0.030 s per
image and DDIM step (with CFG), the annotator 0.03 s per image, one optimiser step of 8 pairs
0.82 s (DPO), 0.95 s (RPO), 1.9 s (InPO with 5 inversion steps); ``--quick`` took 80 CPU-s in all.
The default sizes add up to ≈ 720 CPU-s (data 175, reward 30, alignment 310 with the curve
evaluations, evaluation 165, report and loading 35), i.e. ≈ 7–8 minutes on two idle cores; measured
end to end on two idle cores: 296 s wall, 534 CPU-s, peak RSS 1.7 GB. The quick run checks that the
loop works; its numbers mean little.

Adding a method is one entry of :data:`DEMO_METHODS` (a registered method without an entry runs
with the trainer's defaults, and gets the demo's reward model if its config has a field called
``reward``, ``reward_model`` or ``scorer``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from prefalign.errors import PrefalignError

# --------------------------------------------------------------------------------------------------
# The demo's settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSizes:
    """How big each stage is (see :data:`SIZES`)."""

    prompts: int  # prompts of the preference dataset
    per_prompt: int  # images per prompt: K(K-1)/2 pairs each
    data_steps: int  # DDIM steps when sampling the dataset
    reward_epochs: int
    align_steps: int
    batch_size: int  # pairs per optimiser step
    learning_rate: float
    curve_every: int  # annotator evaluation every N training steps (0: none) for the report's curve
    curve_prompts: int
    eval_prompts: int
    eval_per_prompt: int
    eval_steps: int  # DDIM steps of evaluation samples and report grids
    grid_prompts: int


SIZES: dict[str, DemoSizes] = {
    "default": DemoSizes(
        prompts=112, per_prompt=4, data_steps=10, reward_epochs=40, align_steps=64, batch_size=8, learning_rate=2e-4,
        curve_every=32, curve_prompts=16, eval_prompts=48, eval_per_prompt=2, eval_steps=12, grid_prompts=6,
    ),
    "quick": DemoSizes(
        prompts=24, per_prompt=4, data_steps=8, reward_epochs=8, align_steps=8, batch_size=4, learning_rate=2e-4,
        curve_every=0, curve_prompts=8, eval_prompts=12, eval_per_prompt=2, eval_steps=8, grid_prompts=3,
    ),
}


@dataclass(frozen=True)
class DemoMethod:
    """How the demo runs one alignment method.

    - ``overrides``: ``--set key=value`` settings on top of the demo's shared ones (below);
    - ``data``: which of the demo's datasets (:data:`DATASETS`) the method learns from, and whose
      reward model its evaluation (and, with ``reward_field``, its training) uses;
    - ``reward_field``: the config key that receives the demo's reward model folder (reward-RL
      methods); None = auto-detect a ``reward`` / ``reward_model`` / ``scorer`` field;
    - ``model``: a base model other than the dataset's (e.g. a one-step generator's teacher)."""

    overrides: tuple[str, ...] = ()
    data: str = "pairs"
    reward_field: str | None = None
    model: str | None = None


#: One entry per method (``{name}`` in an override is filled from :class:`DemoSizes`). β and friends:
#: the reference values (METHODS.md / configs/*.yaml); InPO inverts with 5 grid steps instead of 10
#: to fit the time budget. The reward-RL methods (DDPO, PrefPaint) and Diff-Instruct++ maximise the
#: demo's learned reward (their ``reward`` field, found by itself) on the text-to-image model, with
#: the dataset's DDIM steps for rollouts and CFG 3 (the world's scale); PrefPaint's inpainting setting
#: is its own benchmark (benchmarks/prefpaint.py). Not in the default --methods: at demo sizes they
#: cost more than they show (measured: Diff-Instruct++ +340 CPU-s, and its one-step generator after 64
#: steps scores 0.49 against the base model's 0.85; PrefPaint ≈ 10 s per step of 8 rollouts).
DEMO_METHODS: dict[str, DemoMethod] = {
    "sft": DemoMethod(),
    "dpo": DemoMethod(("dpo.beta=5000", "dpo.prompt_dropout=0.2")),
    "rpo": DemoMethod(("rpo.beta=5000", "rpo.tau=0.5", "rpo.prompt_dropout=0.2")),
    "inpo": DemoMethod(("inpo.beta=2000", "inpo.inversion_steps=5", "inpo.prompt_dropout=0.2")),
    "ddpo": DemoMethod(("ddpo.sampling_steps={data_steps}", "ddpo.guidance_scale=3.0")),
    "prefpaint": DemoMethod(("prefpaint.sampling_steps={data_steps}", "prefpaint.guidance_scale=3.0")),
    "diff_instruct_pp": DemoMethod(("diff_instruct_pp.alpha_rew=1.0", "diff_instruct_pp.guidance_scale=3.0")),
}
DEFAULT_METHODS = ("dpo", "rpo", "inpo")

#: The trainer settings every demo run shares (LoRA on the attention, feed-forward and conv layers,
#: as configs/*.yaml; checkpoints only at the end; data decoded in the main process).
SHARED_OVERRIDES = (
    "finetune.mode=lora",
    "finetune.rank=16",
    "finetune.target_modules=[to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2]",
    "schedule.warmup_steps=5",
    "data.num_workers=0",
    "logging.every=5",
    "logging.tensorboard=false",
    "checkpoint.keep_last=1",
    "eval.split=train",
    "eval.sampling_steps=10",
)


@dataclass(frozen=True)
class DemoDataset:
    """A preference dataset of the demo and the reward model trained on it."""

    model: str = "shapes-t2i"
    format: str = "pairwise"
    objective: str = "pairwise"


DATASETS: dict[str, DemoDataset] = {
    "pairs": DemoDataset(),
    "inpaint": DemoDataset(model="shapes-inpaint", format="pointwise", objective="pointwise"),
}


def canonical_method(name: str) -> str:
    """The registered name (``diff-instruct-pp`` = ``diff_instruct_pp``)."""
    from prefalign.methods import METHODS

    for candidate in (name, name.replace("-", "_")):
        if candidate in METHODS:
            return candidate
    raise PrefalignError(f"unknown method {name!r} in --methods; registered: {', '.join(sorted(METHODS))}")


def shared_overrides(method: str, extra: Sequence[str] = ()) -> list[str]:
    """:data:`SHARED_OVERRIDES` + ``extra`` minus the settings the method's own ``trainer_defaults``
    fix (e.g. full fine-tuning at lr 2e-6 of the RL methods, one-step evaluation samples of
    Diff-Instruct++)."""
    from prefalign.methods import METHODS

    fixed: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            walk(value, f"{prefix}{key}.") if isinstance(value, dict) else fixed.add(f"{prefix}{key}")

    walk(getattr(METHODS[method], "trainer_defaults", None) or {}, "")
    section = lambda key: key.split(".")[0]  # noqa: E731
    fixed_sections = {section(k) for k in fixed if section(k) == "finetune"}  # LoRA settings only make sense together
    return [o for o in (*SHARED_OVERRIDES, *extra) if o.split("=")[0] not in fixed and section(o.split("=")[0]) not in fixed_sections]


def method_entry(name: str) -> DemoMethod:
    """The demo's entry for ``name`` (a registered method without an entry gets the defaults)."""
    from prefalign.methods import METHODS

    name = canonical_method(name)
    entry = DEMO_METHODS.get(name, DemoMethod())
    if entry.reward_field is None:
        fields = getattr(METHODS[name].config_class, "model_fields", {})
        found = next((f for f in ("reward", "reward_model", "scorer") if f in fields), None)
        if found is not None:
            entry = DemoMethod(entry.overrides, entry.data, f"{name}.{found}", entry.model)
    if entry.data not in DATASETS:
        raise PrefalignError(f"demo entry of {name} names an unknown dataset {entry.data!r}")
    return entry


# --------------------------------------------------------------------------------------------------
# Stage bookkeeping
# --------------------------------------------------------------------------------------------------


class Stages:
    """Done-markers OUT/stages/NAME.json holding each finished stage's settings and timing."""

    def __init__(self, out: Path):
        self.out = out
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self._cpu_started: dict[str, float] = {}

    def finished(self, name: str, settings: dict[str, Any], redo_on_change: bool = False) -> dict[str, Any] | None:
        """The stage's record if it finished with these settings; None if it must run. A stage that
        finished with other settings is an error (its outputs would be mixed), or with
        ``redo_on_change`` (derived outputs: evaluations, the report) simply runs again."""
        path = self.dir / f"{name}.json"
        record = json.loads(path.read_text()) if path.is_file() else None
        if record is not None and record.get("settings") != json.loads(json.dumps(settings, default=str)) and redo_on_change:
            record = None
        if record is None:
            self._cpu_started[name] = time.process_time()
            return None
        if record.get("settings") != json.loads(json.dumps(settings, default=str)):
            raise PrefalignError(
                f"{self.out} holds a demo stage '{name}' made with other settings (e.g. --quick vs the full run); "
                f"use another --out, or delete {self.out} to start again"
            )
        self.timings[name] = 0.0
        return record

    def finish(self, name: str, settings: dict[str, Any], seconds: float, info: dict[str, Any] | None = None) -> None:
        self.timings[name] = seconds
        cpu = time.process_time() - self._cpu_started.get(name, time.process_time())  # CPU seconds of all threads
        record = {"settings": settings, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "info": info or {}}
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(self.dir / f"{name}.json")


def _header(index: int, total: int, text: str) -> None:
    typer.secho(f"[{index}/{total}] {text}", bold=True)


# --------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------


def model_fingerprint(spec: str) -> list:
    """Size and modification time of a model's weight files (shipped name or folder)."""
    from prefalign.backbones.shapes import SHIPPED_MODELS

    folder = SHIPPED_MODELS.get(spec, Path(spec))
    return sorted([str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime)] for p in Path(folder).rglob("*.safetensors"))


def make_dataset(out: Path, key: str, sizes: DemoSizes, seed: int, stages: Stages) -> Path:
    from prefalign.rewards.labelling import MakePrefsConfig, make_preferences

    spec = DATASETS[key]
    folder = out / ("prefs" if key == "pairs" else f"prefs-{key}")
    config = MakePrefsConfig(
        format=spec.format, prompts=sizes.prompts, per_prompt=sizes.per_prompt, pairing="all", scorer="annotator",
        model=spec.model, seed=seed, steps=sizes.data_steps, guidance_scale=3.0, test_fraction=0.1, batch_size=16,
    )
    settings = {**config.model_dump(), "model_fingerprint": model_fingerprint(spec.model)}  # a replaced shipped model → new data
    name = f"prefs-{key}"
    if stages.finished(name, settings) is None:
        started = time.time()
        card = make_preferences(config, folder, overwrite=True, progress=True)
        stages.finish(name, settings, time.time() - started, {"splits": card.get("splits", {})})
    return folder


def train_reward(out: Path, key: str, data: Path, sizes: DemoSizes, seed: int, stages: Stages) -> Path:
    from prefalign.rewards.training import RewardTrainConfig, evaluate_reward_model, save_evaluation, train_reward_model

    folder = out / ("reward" if key == "pairs" else f"reward-{key}")
    config = RewardTrainConfig(objective=DATASETS[key].objective, epochs=sizes.reward_epochs, seed=seed, tensorboard=False)
    settings = {**config.model_dump(), "data": str(data)}
    name = f"reward-{key}"
    if stages.finished(name, settings) is None:
        from prefalign.data.storage import available_splits
        from prefalign.rewards.prefpaint import RewardModel

        started = time.time()
        _, summary = train_reward_model(data, folder, config, progress=True)
        info: dict[str, Any] = {"validation_accuracy": summary.get("validation_accuracy")}
        if "test" in available_splits(data):
            evaluation = evaluate_reward_model(RewardModel.from_pretrained(folder), data, "test", plot=folder / "error_vs_bound.png", progress=False)
            save_evaluation(folder, evaluation)
            info.update({k: evaluation.get(k) for k in ("accuracy", "ceiling_accuracy", "spearman_with_annotator")})
        stages.finish(name, settings, time.time() - started, info)
    return folder


def align_method(out: Path, method: str, data: Path, reward: Path, sizes: DemoSizes, seed: int, threads: int, stages: Stages) -> Path:
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import train

    entry = method_entry(method)
    run_dir = out / "runs" / method
    overrides = shared_overrides(method, [f"optimizer.learning_rate={sizes.learning_rate}"]) + [
        f"checkpoint.every={sizes.align_steps}",
        f"eval.every={sizes.curve_every}",
        f"eval.prompts={sizes.curve_prompts}",
        f"threads={threads}",
        *(o.format(**asdict(sizes)) for o in entry.overrides),
    ]
    if entry.reward_field:
        overrides.append(f"{entry.reward_field}={reward}")
    model = entry.model or DATASETS[entry.data].model
    config = load_align_config(None, overrides, method=method, model=model, steps=sizes.align_steps, batch_size=sizes.batch_size, seed=seed, **{"data.path": str(data)})
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k != "threads"}  # threads do not change results
    name = f"align-{method}"
    if stages.finished(name, settings) is None:
        from prefalign.training.checkpoint import list_checkpoints

        started = time.time()
        result = train(config, run_dir, resume=bool(list_checkpoints(run_dir)))
        stages.finish(name, settings, time.time() - started, {"final": result.metrics.get("final", {})})
    return run_dir


def evaluate_runs(runs: dict[str, Path], rewards: dict[str, Path], sizes: DemoSizes, stages: Stages) -> dict[str, dict]:
    """Evaluate every run not evaluated yet with these settings (one call per reward model, so the
    shared base model is sampled once)."""
    from prefalign.evaluation import EVALUATION_FILE, EvaluationSettings, SamplingSettings, evaluate, save_result

    def marker(method: str) -> dict[str, Any]:
        trained = json.loads((stages.dir / f"align-{method}.json").read_text()).get("finished")  # a re-trained run is re-evaluated
        key = method_entry(method).data
        return {"prompts": sizes.eval_prompts, "per_prompt": sizes.eval_per_prompt, "steps": sizes.eval_steps, "reward": str(rewards[key]), "run": str(runs[method]), "trained": trained}

    results: dict[str, dict] = {}
    todo: dict[str, list[str]] = {}
    for method, run_dir in runs.items():
        key = method_entry(method).data
        if stages.finished(f"evaluate-{method}", marker(method), redo_on_change=True) is not None and (run_dir / EVALUATION_FILE).is_file():
            results[method] = json.loads((run_dir / EVALUATION_FILE).read_text())
        else:
            todo.setdefault(key, []).append(method)
    for key, methods in todo.items():
        settings = EvaluationSettings(
            prompts=sizes.eval_prompts, scorers=["annotator", str(rewards[key])],
            sampling=SamplingSettings(per_prompt=sizes.eval_per_prompt, steps=sizes.eval_steps),
        )
        started = time.time()
        for method, result in zip(methods, evaluate([runs[m] for m in methods], "base", settings, progress=True)):
            save_result(result, runs[method] / EVALUATION_FILE)
            results[method] = result
            stages.finish(f"evaluate-{method}", marker(method), (time.time() - started) / len(methods))
    return results


# --------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------


def summary_rows(results: dict[str, dict], runs: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for method, result in results.items():
        metrics = json.loads((runs[method] / "metrics.json").read_text()) if (runs[method] / "metrics.json").is_file() else {}
        final = metrics.get("final", {})
        rates = result["win_rates"]
        model, base = result["metrics"]["model"], result["metrics"]["against"]
        annotator = next(n for n in rates if n.startswith("annotator"))
        reward = next((n for n in rates if not n.startswith("annotator")), None)
        rows.append({
            "method": method,
            "steps": metrics.get("steps"),
            "train_implicit_accuracy": final.get("implicit_accuracy"),
            "annotator_win_rate": rates[annotator]["win_rate"],
            "annotator_win_rate_ci95": rates[annotator]["ci95"],
            "reward_win_rate": rates[reward]["win_rate"] if reward else None,
            "reward_win_rate_ci95": rates[reward]["ci95"] if reward else None,
            "annotator_score": model["scores"][annotator]["mean"],
            "base_annotator_score": base["scores"][annotator]["mean"],
            "attribute_accuracy": model.get("attribute_accuracy"),
            "base_attribute_accuracy": base.get("attribute_accuracy"),
            "diversity": model.get("diversity"),
            "base_diversity": base.get("diversity"),
            "train_time_s": metrics.get("wall_time_s"),
            "comparisons": rates[annotator]["n"],
        })
    return rows


def format_summary(rows: list[dict[str, Any]], lines_before: list[str], lines_after: list[str]) -> str:
    def f(value: Any, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    header = ("method", "steps", "train acc", "annotator win rate [95% CI]", "reward win rate [95% CI]", "annotator score", "attribute acc", "diversity", "train s")
    table = [header]
    for r in rows:
        ci = r["annotator_win_rate_ci95"]
        reward = f"{f(r['reward_win_rate'])} [{f(r['reward_win_rate_ci95'][0], 2)}, {f(r['reward_win_rate_ci95'][1], 2)}]" if r["reward_win_rate"] is not None else "–"
        table.append((
            r["method"], str(r["steps"]), f(r["train_implicit_accuracy"]),
            f"{f(r['annotator_win_rate'])} [{f(ci[0], 2)}, {f(ci[1], 2)}]", reward,
            f"{f(r['annotator_score'])} (base {f(r['base_annotator_score'])})",
            f"{f(r['attribute_accuracy'])} (base {f(r['base_attribute_accuracy'])})",
            f"{f(r['diversity'])} (base {f(r['base_diversity'])})", f(r["train_time_s"], 0),
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines_before, *text, *lines_after])


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def demo(
    out: Path = typer.Option(None, help="output folder (default out/demo, or out/demo-quick with --quick); re-running reuses finished stages"),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated alignment methods (registered: see `prefalign align --help`)"),
    quick: bool = typer.Option(False, help="tiny sizes (≤ 3 minutes on 2 CPU cores): checks that the loop works; its numbers mean little"),
    seed: int = typer.Option(0, help="seed of the dataset, the reward model and every run"),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default, all cores)"),
) -> None:
    """The whole loop on the shapes world: preference data from the simulated annotator → reward
    model → alignment with each method → evaluation against the base model → OUT/report.html."""
    import torch

    from prefalign.methods import get_method

    if threads:
        torch.set_num_threads(threads)
    out = out or Path("out/demo-quick" if quick else "out/demo")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise PrefalignError("--methods is empty; give e.g. --methods dpo,rpo,inpo")
    chosen = list(dict.fromkeys(canonical_method(m) for m in chosen))
    entries = {m: method_entry(m) for m in chosen}
    _check_models_exist(entries)
    sizes = SIZES["quick" if quick else "default"]
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    started = time.time()
    keys = list(dict.fromkeys(e.data for e in entries.values()))
    total = 2 * len(keys) + len(chosen) + 2
    step = 0

    data: dict[str, Path] = {}
    rewards: dict[str, Path] = {}
    for key in keys:
        step += 1
        _header(step, total, f"preference data ({sizes.prompts} prompts × {sizes.per_prompt} images from {DATASETS[key].model}, labelled by the annotator)")
        data[key] = make_dataset(out, key, sizes, seed, stages)
        step += 1
        _header(step, total, f"reward model on {data[key]}")
        rewards[key] = train_reward(out, key, data[key], sizes, seed, stages)
    runs: dict[str, Path] = {}
    for method in chosen:
        step += 1
        unit = "pairs" if getattr(get_method(method), "data", "pairs") == "pairs" else "samples"
        _header(step, total, f"align {method} ({sizes.align_steps} steps × {sizes.batch_size} {unit})")
        runs[method] = align_method(out, method, data[entries[method].data], rewards[entries[method].data], sizes, seed, threads, stages)
    step += 1
    _header(step, total, f"evaluate against the base model ({sizes.eval_prompts} prompts × {sizes.eval_per_prompt} seeds)")
    results = evaluate_runs(runs, rewards, sizes, stages)
    step += 1
    _header(step, total, "report")
    rows = summary_rows({m: results[m] for m in chosen}, runs)
    before, after = _summary_lines(out, data, rewards, stages, sizes, quick)
    report_path = _write_report(out, chosen, runs, rewards, sizes, before, stages)
    after.append(f"report: {report_path}")
    after.append(f"total {time.time() - started:.0f} s this time (stages reused: {', '.join(k for k, v in stages.timings.items() if v == 0.0) or 'none'})")
    text = format_summary(rows, before, after)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "sizes": asdict(sizes), "methods": chosen, "stage_seconds": stages.timings, "report": str(report_path)}, indent=2, default=float))
    typer.echo("")
    typer.echo(text)


def _check_models_exist(entries: dict[str, DemoMethod]) -> None:
    from prefalign.backbones.shapes import SHIPPED_MODELS

    for method, entry in entries.items():
        model = entry.model or DATASETS[entry.data].model
        if model in SHIPPED_MODELS and not (SHIPPED_MODELS[model] / "prefalign.json").is_file():
            raise PrefalignError(f"the demo's {method} needs the shipped model {model}, which this checkout does not have yet; leave {method} out of --methods")


def _summary_lines(out: Path, data: dict[str, Path], rewards: dict[str, Path], stages: Stages, sizes: DemoSizes, quick: bool) -> tuple[list[str], list[str]]:
    before = [f"prefalign demo{' --quick' if quick else ''} → {out}"]
    for key, folder in data.items():
        card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
        train = card.get("splits", {}).get("train", {})
        agreement = train.get("annotator_agreement")
        before.append(
            f"data: {train.get('usable', '?')} training pairs from {train.get('prompts', '?')} prompts ({train.get('ties', '?')} ties, left out of alignment)"
            + (f", labels agree with the noiseless annotator {agreement:.1%}" if agreement is not None else "")
        )
        meta = json.loads((rewards[key] / "reward_model.json").read_text())
        evaluation = meta.get("evaluation") or {}
        if evaluation:
            before.append(
                f"reward model: held-out accuracy {evaluation.get('accuracy', float('nan')):.3f} (annotator ceiling {evaluation.get('ceiling_accuracy', float('nan')):.3f}), "
                f"Spearman with the annotator {evaluation.get('spearman_with_annotator', float('nan')):.3f}"
            )
    before.append(
        f"evaluation: {sizes.eval_prompts} prompts outside the training data × {sizes.eval_per_prompt} seeds, same noise for base and aligned; "
        "win rates count ties ½, 95 % Wilson intervals"
    )
    return before, []


def _write_report(out: Path, methods: list[str], runs: dict[str, Path], rewards: dict[str, Path], sizes: DemoSizes, summary_lines: list[str], stages: Stages) -> Path:
    import html

    from prefalign.evaluation import SamplingSettings
    from prefalign.report import build_report

    stamps = [stages.dir.joinpath(f"{stage}-{m}.json").stat().st_mtime for m in methods for stage in ("align", "evaluate")]
    settings = {"methods": methods, "grid_prompts": sizes.grid_prompts, "steps": sizes.eval_steps, "stamps": stamps}
    path = out / "report.html"
    if stages.finished("report", settings, redo_on_change=True) is not None and path.is_file():
        return path
    started = time.time()
    timing = "".join(f"<li>{html.escape(k)}: {v:.0f} s</li>" for k, v in stages.timings.items() if v)
    intro = (
        "<p>Made by <code>prefalign demo</code>: the shapes world's simulated annotator labels pairs of the shipped model's samples, a reward "
        "model learns them, each method aligns the model with the pairs, and every aligned model is compared with the base model.</p>"
        f"<pre>{html.escape(chr(10).join(summary_lines))}</pre>"
        + (f"<details><summary>stage times (this invocation)</summary><ul>{timing}</ul></details>" if timing else "")
    )
    build_report(
        [runs[m] for m in methods], path, reward_models=sorted(set(rewards.values())), evaluate_missing=False,
        grid_prompts=sizes.grid_prompts, grid_sampling=SamplingSettings(per_prompt=1, seed=777, steps=sizes.eval_steps),
        title="prefalign demo report", intro_html=intro, progress=True,
    )
    stages.finish("report", settings, time.time() - started)
    return path
