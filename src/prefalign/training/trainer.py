"""The one training loop of every alignment method (DESIGN.md ``training/``).

    Trainer(config, run_dir).train(resume=False) -> TrainResult

What the loop does, in order, for each optimiser step:
1. the learning rate of the step (warm-up, then constant / linear / cosine; a pure function of the step);
2. for each micro-step (gradient accumulation): the process's micro-batch (decoded in DataLoader
   workers), ``method.rollout`` then ``method.loss`` under ``accelerator.autocast()``, the NaN/inf
   guard, ``accelerator.backward``;
3. gradient clipping (the norm is logged), the optimiser step, the EMA update;
4. logging (TensorBoard through accelerate's tracker, the tqdm bar), evaluation hooks, atomic
   checkpoints (every ``checkpoint.every`` steps and at the end, keeping the last
   ``checkpoint.keep_last``).
At the end: ``metrics.json`` and the export (:mod:`prefalign.training.export`).

Devices, processes and mixed precision come from accelerate (``accelerate launch`` for several
processes). Randomness is seeded from (seed, step, micro-step, global sample position), never from a
running generator, and checkpoints hold the trainable weights, optimiser state and EMA, so a run
killed at any point and resumed (``resume=True``) ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.backbones.base import Backbone
from prefalign.errors import PrefalignError
from prefalign.methods import get_method
from prefalign.methods.base import Method, PreferenceBatch, StepRandomness, TrainingModels, replace_nonfinite_gradients_
from prefalign.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
)
from prefalign.training.config import (
    TrainConfig,
    config_differences,
    config_digest,
    config_from_yaml_text,
    dump_config,
)
from prefalign.training.ema import EMA
from prefalign.training.lora import ReferenceSwitch, prepare_finetuning, trainable_named_parameters
from prefalign.training.pairs import BatchLayout, StepPairBatches, open_pairs, pair_loader

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


class NonFiniteLossError(PrefalignError):
    """A NaN/inf loss or gradient stopped the run (the last good checkpoint is kept)."""


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, peak: float, steps: int, schedule) -> float:
    """Linear warm-up over ``warmup_steps`` (from peak/warmup to peak), then constant, linear or
    cosine decay reaching ``min_lr_ratio``·peak at the last step (step = steps − 1)."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    if schedule.name == "constant":
        return peak
    progress = min(1.0, (step - schedule.warmup_steps) / max(1, steps - 1 - schedule.warmup_steps))
    floor = schedule.min_lr_ratio
    if schedule.name == "linear":
        return peak * (floor + (1 - floor) * (1 - progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def pixel_resolution(backbone: Backbone) -> tuple[int, int]:
    """(H, W) of the backbone's images at its default resolution."""
    if hasattr(backbone, "resolution"):
        return tuple(int(v) for v in backbone.resolution)
    if hasattr(backbone, "image_size"):
        return (int(backbone.image_size), int(backbone.image_size))
    with torch.no_grad():
        probe = backbone.latents_to_images(torch.zeros(1, *backbone.latent_shape, device=backbone.device))
    return tuple(probe.shape[-2:])


def build_optimizer(parameters: list[torch.nn.Parameter], config, learning_rate: float) -> torch.optim.Optimizer:
    if config.name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(
        parameters, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
        clip_threshold=1.0, weight_decay=config.weight_decay,
    )


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Models(TrainingModels):
    """The concrete :class:`TrainingModels` the trainer hands to methods."""

    def __init__(self, backbone: Backbone, switch: ReferenceSwitch | None, accelerator):
        self.backbone = backbone
        self.switch = switch
        self.accelerator = accelerator
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.image_embedder = None
        self.step = 0

    @contextmanager
    def reference(self) -> Iterator[Backbone]:
        if self.switch is None:
            raise PrefalignError("this method has no reference network (needs_reference=False)")
        with self.switch(self.backbone) as reference:
            yield reference

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        gathered = self.accelerator.gather(tensor.detach().contiguous())
        parts = list(gathered.chunk(self.num_processes))
        parts[self.process_index] = tensor
        return torch.cat(parts)


@dataclass
class EvalContext:
    """What an evaluation hook gets: the policy (EMA weights if enabled, eval mode, unwrapped), a
    switch to the reference (base) network, the step and the run folder."""

    step: int
    backbone: Backbone
    reference: Callable[[], Any]
    run_dir: Path
    config: TrainConfig
    state: dict[str, Any] = field(default_factory=dict)


EvalHook = Callable[[EvalContext], dict[str, float]]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    metrics: dict[str, Any]
    export_path: Path | None
    backbone: Backbone


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    """Train ``config.method`` on ``config.model`` with preference data (see the module docstring).

    Args:
        config: a resolved align config (:func:`prefalign.training.config.load_align_config`).
        run_dir: the run folder (config.yaml, checkpoints/, tensorboard/, metrics.json, export/).
        data: a :class:`prefalign.data.PairwiseDataset` or a dataset folder (default ``config.data.path``).
        backbone: an already loaded backbone to train (default: ``load_backbone(config.model)``); it is
            modified in place (LoRA adapters added, trainable flags set).
        hooks: extra evaluation hooks, called every ``eval.every`` steps and at the end on the main
            process; each returns metrics to log.
        method: an already built method (default: from the registry and the config section).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        data: Any = None,
        backbone: Backbone | None = None,
        hooks: Sequence[EvalHook] = (),
        method: Method | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.data_source = data if data is not None else config.data.path
        self._backbone = backbone
        self.hooks = list(hooks)
        self.method = method if method is not None else get_method(config.method)(config.method_config())
        self._latent_cache = None

    # ---- set-up ------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool, is_main: bool) -> None:
        saved_file = self.run_dir / CONFIG_FILE
        has_checkpoints = bool(list_checkpoints(self.run_dir))
        if not resume and has_checkpoints:
            raise PrefalignError(
                f"{self.run_dir} already holds checkpoints of a run; pass --resume to continue it or choose a new --out"
            )
        if resume and has_checkpoints and saved_file.is_file():
            saved = config_from_yaml_text(saved_file.read_text())
            different = config_differences(saved, self.config)
            if different:
                raise PrefalignError(
                    f"--resume: the config differs from the run's saved {saved_file} in {', '.join(different[:6])}; "
                    "resume with the same settings (only steps, logging, eval, export and checkpoint may change)"
                )
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved_file.write_text(dump_config(self.config))

    def _load_backbone(self, device: torch.device) -> Backbone:
        if self._backbone is not None:
            return self._backbone
        from prefalign.backbones.loading import load_backbone

        return load_backbone(self.config.model, device=device)

    # ---- the run -----------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from tqdm.auto import tqdm

        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        _allow_new_accelerator_settings(config.mixed_precision)
        accelerator = Accelerator(
            cpu=config.device == "cpu",
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if config.logging.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir)),
        )
        if config.device == "cuda" and accelerator.device.type != "cuda":
            raise PrefalignError("device=cuda but no CUDA device is visible; use device=auto or cpu")
        is_main = accelerator.is_main_process
        self._check_run_dir(resume, is_main)
        accelerator.wait_for_everyone()

        torch.manual_seed(config.seed)  # LoRA initialisation
        backbone = self._load_backbone(accelerator.device)
        method = self.method
        switch = prepare_finetuning(backbone, config.finetune, method.needs_reference, accelerator.unwrap_model)
        if config.gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
        named = trainable_named_parameters(backbone.unet)
        if not named:
            raise PrefalignError("nothing to train: no UNet parameter requires gradients")
        names = [n for n, _ in named]
        parameters = [p for _, p in named]
        global_pairs = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        peak_lr = config.optimizer.learning_rate * (global_pairs if config.optimizer.scale_lr else 1)
        optimizer = build_optimizer(parameters, config.optimizer, peak_lr)
        ema = EMA(parameters, config.ema.decay, config.ema.warmup) if config.ema.enabled else None

        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:  # DeepSpeed sizes its batch from a prepared DataLoader; ours is not prepared
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        unet, optimizer = accelerator.prepare(backbone.unet, optimizer)
        backbone.unet = unet
        raw_unet = accelerator.unwrap_model(unet)
        models = _Models(backbone, switch if method.needs_reference else None, accelerator)
        models.guard = lambda value, what: self._guard(value, models.step, accelerator, what)
        models.config = config
        method.setup(models)

        # ---- resume
        start_step, elapsed_before, history = 0, 0.0, []
        last_logged: dict[str, float] = {}
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            tensors, state = load_checkpoint(checkpoint)
            missing = [n for n in names if n not in tensors["trainable"]]
            if missing:
                raise PrefalignError(f"{checkpoint} does not match this model ({len(missing)} trainable tensors missing, e.g. {missing[0]})")
            with torch.no_grad():
                for name, p in named:
                    p.copy_(tensors["trainable"][name])
            optimizer.load_state_dict(optimizer_state_from_tensors(tensors.get("optimizer", {}), state["optimizer"]))
            if ema is not None and "ema" in tensors:
                ema.load_state_tensors(tensors["ema"])
            method.load_state_dict(state.get("method", {}))
            method.load_state_tensors({k.removeprefix("method_"): v for k, v in tensors.items() if k.startswith("method_")})
            start_step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
            history = list(state.get("history", []))
            if history:
                last_logged = {k: v for k, v in history[-1].items() if k != "step"}

        # ---- data
        pairs = None
        loader_iter: Iterator[dict[str, Any]] = iter(())
        layout = BatchLayout(config.batch_size, accelerator.num_processes, accelerator.process_index, config.gradient_accumulation_steps)
        if start_step < config.steps and method.data == "pairs":
            with accelerator.local_main_process_first():  # one process per node builds the Arrow cache
                pairs = open_pairs(self.data_source, config.data.ties, progress=False, validate=config.data.validation, cache_dir=config.data.cache_dir)
            dataset = StepPairBatches(
                pairs, layout, start_step, config.steps, config.seed, pixel_resolution(backbone),
                shuffle=config.data.shuffle, random_flip=config.data.random_flip, limit=config.data.limit,
            )
            loader_iter = iter(pair_loader(dataset, config.data.num_workers))
            if config.data.latent_cache:
                from prefalign.training.latent_cache import LatentCache

                with accelerator.local_main_process_first():  # one process per node creates the files
                    self._latent_cache = LatentCache.open(
                        config.data.latent_cache, len(pairs.raw), backbone.latent_shape, config.data.random_flip,
                        config.model, pixel_resolution(backbone),
                    )
                self._latent_cache.attach(backbone)

        if config.logging.tensorboard:
            accelerator.init_trackers("tensorboard", config={"method": config.method, "model": config.model})

        try:
            # ---- the loop
            window: dict[str, list[float]] = defaultdict(list)
            eval_results: list[dict[str, Any]] = []
            step_times: list[float] = []
            started = time.time()
            bar = tqdm(
                total=config.steps, initial=start_step, desc=f"align {config.method}",
                disable=not (is_main and config.logging.progress), dynamic_ncols=True,
            )
            eval_state: dict[str, Any] = {}
            if self._eval_due(0) and start_step == 0:
                eval_results.append(self._evaluate(0, accelerator, backbone, raw_unet, parameters, ema, switch, eval_state))
            step = start_step
            for step in range(start_step, config.steps):
                step_start = time.time()
                lr = lr_at(step, peak_lr, config.steps, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                models.step = step
                models.learning_rate = lr
                step_metrics: dict[str, list[float]] = defaultdict(list)
                grad_norm = torch.tensor(float("nan"))
                for micro in range(config.gradient_accumulation_steps):
                    batch = self._next_batch(loader_iter, step, micro, layout, accelerator.device) if method.data == "pairs" else None
                    if method.data == "none":  # data-free methods get only the micro-step's seeds
                        batch = PreferenceBatch([], torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long), StepRandomness(config.seed, step, micro, layout.positions()))
                    with accelerator.accumulate(unet):
                        with accelerator.autocast():
                            batch = method.rollout(batch, models)
                            output = method.loss(batch, models)
                        if self._latent_cache is not None:
                            self._latent_cache.clear()
                        self._guard(output.loss, step, accelerator, "loss")
                        accelerator.backward(output.loss)
                        if accelerator.sync_gradients:
                            if method.replace_nonfinite_gradients and config.mixed_precision != "fp16":
                                replace_nonfinite_gradients_(parameters)
                            max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
                            grad_norm = accelerator.clip_grad_norm_(parameters, max_norm)
                            if config.mixed_precision != "fp16":  # fp16: the gradient scaler skips inf steps itself
                                self._guard(torch.as_tensor(grad_norm), step, accelerator, "gradient norm")
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                    values = dict(output.metrics)
                    values.setdefault("loss", output.loss.detach())
                    for key, value in values.items():
                        step_metrics[key].append(float(value))
                if ema is not None:
                    ema.update(parameters, step)
                reduced = self._reduce_metrics(step_metrics, accelerator)
                reduced["grad_norm"] = float(grad_norm)
                reduced["lr"] = lr
                step_times.append(time.time() - step_start)
                reduced["step_time_s"] = step_times[-1]
                for key, value in reduced.items():
                    window[key].append(value)
                done = step + 1
                bar.update(1)
                if done % config.logging.every == 0 or done == config.steps:
                    last_logged = {k: sum(v) / len(v) for k, v in window.items()}
                    window.clear()
                    if config.logging.tensorboard:
                        accelerator.log({f"train/{k}": v for k, v in last_logged.items()}, step=done)
                    history.append({"step": done, **{k: round(v, 6) for k, v in last_logged.items()}})
                    headline = method.headline_metric
                    postfix = {"loss": f"{last_logged.get('loss', float('nan')):.4f}"}
                    if headline in last_logged and headline != "loss":
                        postfix[headline.replace("implicit_accuracy", "acc")] = f"{last_logged[headline]:.3f}"
                    bar.set_postfix(postfix)
                if self._eval_due(done) and done != config.steps:
                    eval_results.append(self._evaluate(done, accelerator, backbone, raw_unet, parameters, ema, switch, eval_state))
                if done % config.checkpoint.every == 0 or done == config.steps:
                    self._save(accelerator, done, named, optimizer, ema, method, elapsed_before + time.time() - started, history)
            bar.close()
            final_step = max(step + 1, start_step) if start_step < config.steps else start_step
            if self.hooks or config.eval.every > 0:
                eval_results.append(self._evaluate(final_step, accelerator, backbone, raw_unet, parameters, ema, switch, eval_state))

            # ---- the end: metrics.json and the export
            wall = elapsed_before + time.time() - started
            export_path = None
            if config.export.enabled and is_main:
                from prefalign.training.export import export_aligned

                with self._export_weights(parameters, ema):
                    backbone.unet = raw_unet
                    export_path = export_aligned(backbone, self.run_dir / "export", config, final_step)
                    backbone.unet = unet
            metrics = {
                "status": "finished",
                "method": config.method,
                "model": config.model,
                "steps": final_step,
                "resumed_from": start_step or None,
                "global_pairs_per_step": global_pairs,
                "processes": accelerator.num_processes,
                "final": last_logged,
                "history": history,
                "eval": eval_results,
                "wall_time_s": round(wall, 3),
                "step_time_s": round(sum(step_times[1:]) / max(1, len(step_times) - 1), 5) if step_times else None,
                "peak_memory_mib": round(peak_memory_mib(accelerator.device), 1),
                "trainable_parameters": sum(p.numel() for p in parameters),
                "latent_cache": None if self._latent_cache is None else {"hits": self._latent_cache.hits, "misses": self._latent_cache.misses},
                "export": str(export_path) if export_path else None,
                "config_digest": config_digest(config),
            }
            if is_main:
                (self.run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))
            accelerator.wait_for_everyone()
            backbone.unet = raw_unet
            return TrainResult(self.run_dir, final_step, metrics, export_path, backbone)
        finally:
            for tracker in accelerator.trackers:  # not end_training(): that destroys the process group
                tracker.finish()
            if self._latent_cache is not None:
                self._latent_cache.flush()
                self._latent_cache.detach(backbone)

    # ---- helpers -----------------------------------------------------------------------------
    def _next_batch(self, loader_iter, step: int, micro: int, layout: BatchLayout, device) -> PreferenceBatch:
        try:
            item = next(loader_iter)
        except StopIteration:  # pragma: no cover - the loader is sized to the run
            raise PrefalignError("the data loader ran out of batches; this is a bug") from None
        if item["step"] != step or item["micro"] != micro:  # pragma: no cover - guards the ordering
            raise RuntimeError(f"data order broken: got step {item['step']}.{item['micro']}, expected {step}.{micro}")
        rng = StepRandomness(self.config.seed, step, micro, layout.positions())
        if self._latent_cache is not None:
            flips = item.get("flips")
            self._latent_cache.expect(item["rows"].tolist(), item["first_wins"].tolist(), None if flips is None else flips.tolist())
        return PreferenceBatch(item["prompts"], item["images_w"], item["images_l"], item["rows"], rng).to(device)

    def _guard(self, value: torch.Tensor, step: int, accelerator, what: str) -> None:
        bad = torch.tensor([0.0 if bool(torch.isfinite(value.detach()).all()) else 1.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        if float(bad) > 0:
            last = latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            message = (
                f"non-finite {what} ({float(value.detach().float().flatten()[0]) if value.numel() else 'nan'}) at step {step + 1}; "
                f"{kept}; lower optimizer.learning_rate (or the method's beta) and continue with --resume"
            )
            if accelerator.is_main_process:
                (self.run_dir / METRICS_FILE).write_text(json.dumps({"status": "stopped", "reason": message, "step": step + 1}, indent=2))
            raise NonFiniteLossError(message)

    @staticmethod
    def _reduce_metrics(step_metrics: dict[str, list[float]], accelerator) -> dict[str, float]:
        keys = sorted(step_metrics)
        local = torch.tensor([sum(step_metrics[k]) / len(step_metrics[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local, reduction="mean")
        return {k: float(v) for k, v in zip(keys, local.tolist())}

    def _save(self, accelerator, step: int, named, optimizer, ema: EMA | None, method: Method, elapsed: float, history: list) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            opt_tensors, opt_state = optimizer_state_to_tensors(optimizer)
            tensors = {"trainable": {n: p.detach() for n, p in named}, "optimizer": opt_tensors}
            if ema is not None:
                tensors["ema"] = ema.state_tensors()
            method_state = method.state_dict()
            tensors.update({f"method_{k}": v for k, v in method.state_tensors().items()})
            state = {
                "optimizer": opt_state,
                "method": method_state,
                "elapsed_s": elapsed,
                "history": history,
                "config_digest": config_digest(self.config),
            }
            save_checkpoint(self.run_dir, step, tensors, state, keep_last=self.config.checkpoint.keep_last)
        accelerator.wait_for_everyone()

    @contextmanager
    def _export_weights(self, parameters, ema: EMA | None):
        if ema is not None and self.config.ema.export:
            with ema.applied(parameters):
                yield
        else:
            yield

    def _eval_due(self, step: int) -> bool:
        every = self.config.eval.every
        return every > 0 and step % every == 0 and (self.hooks or self._builtin_hooks_apply())

    def _builtin_hooks_apply(self) -> bool:
        return self.config.eval.annotator

    def _evaluate(self, step, accelerator, backbone, raw_unet, parameters, ema, switch, state) -> dict[str, Any]:
        """Run the hooks on the main process with the unwrapped UNet in eval mode (EMA weights if enabled)."""
        results: dict[str, Any] = {"step": step}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            wrapped = backbone.unet
            backbone.unet = raw_unet
            raw_unet.eval()
            try:
                with self._export_weights(parameters, ema), torch.no_grad():
                    hooks = list(self.hooks)
                    if self.config.eval.annotator:
                        from prefalign.training.hooks import annotator_hook

                        hooks.append(annotator_hook)
                    context = EvalContext(step, backbone, lambda: switch(backbone), self.run_dir, self.config, state)
                    for hook in hooks:
                        results.update(hook(context) or {})
            finally:
                raw_unet.train()
                backbone.unet = wrapped
            scalars = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and k != "step"}
            if self.config.logging.tensorboard and scalars:
                accelerator.log(scalars, step=step)
        accelerator.wait_for_everyone()
        return results


def _allow_new_accelerator_settings(mixed_precision: str) -> None:
    """accelerate keeps one global state per process; a second run in the same (single) process with
    another mixed-precision setting needs it reset (never done under a multi-process launch)."""
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed_precision) != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, **kwargs: Any) -> TrainResult:
    """``Trainer(config, run_dir, **kwargs).train(resume)``."""
    return Trainer(config, run_dir, **kwargs).train(resume=resume)
