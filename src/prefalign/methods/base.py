"""The method interface: a method owns its loss (and, for RL methods, its rollout); the trainer
(:mod:`prefalign.training.trainer`) owns the loop.

A method is a class with

- ``name`` and ``config_class`` (a pydantic model: the method's options, the ``METHOD:`` section of an
  align config);
- ``loss(batch, models) -> LossOutput``: the objective on one micro-batch, with metrics;
- optionally ``rollout(batch, models) -> batch``: work done without gradients before the loss
  (sampling images for the RL methods; the offline methods of METHODS.md §1–3 have none);
- ``needs_reference`` (does the loss call the frozen reference ε_ref?) and ``data`` (what batches it
  consumes: ``"pairs"`` of preferred/rejected images, ``"prompts"`` for methods that make their
  own images, or ``"none"``: no data at all — the batch holds only the micro-step's seeds and the
  method draws its own prompts, e.g. Diff-Instruct++);
- ``state_dict()/load_state_dict()`` for any JSON-able state that must survive a resume, and
  ``state_tensors()/load_state_tensors()`` for tensors (networks and optimisers a method owns,
  saved as safetensors in the checkpoint);
- optionally ``trainer_defaults`` (trainer settings the method's reference uses, applied under any
  config file and ``--set``) and ``replace_nonfinite_gradients`` (the trainer replaces NaN/inf
  gradients of the policy, as some reference codes do, instead of stopping; a non-finite *loss*
  still stops the run).

Randomness. Every random draw of a loss comes from :class:`StepRandomness`: generators seeded by
(run seed, step, micro-step, *global* sample position, stream name). So a step's noise, timesteps and
prompt dropout are the same however the global batch is split across processes (1 process or N give
the same numbers), and a resumed run redraws exactly what an uninterrupted one would.

Shared maths: :func:`denoising_target` and :func:`per_sample_error` implement e(x_t, ε, t) of
METHODS.md "Notation": the per-sample **mean** over (C, H, W) of the squared error.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from prefalign.backbones.base import Backbone, Conditioning
from prefalign.diffusion.schedule import NoiseSchedule, v_target


class MethodConfig(BaseModel):
    """Base of every method's options: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------


def _stream_id(stream: str) -> int:
    return zlib.crc32(stream.encode())


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative integers (via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass(frozen=True)
class StepRandomness:
    """Seeds of one micro-step. ``positions`` are the global positions (within the global micro-batch)
    of this process's samples; ``shared(...)`` is identical on every process and equals
    ``per_sample(...)[0]`` of the first global sample, so a method that draws one value for the whole
    micro-batch (RPO's shared t) reduces, with one pair per batch, to the per-pair draw of DPO."""

    seed: int
    step: int
    micro_step: int
    positions: tuple[int, ...]

    def _generator(self, position: int, stream: str) -> torch.Generator:
        return seeded_generator(self.seed, self.step, self.micro_step, position, _stream_id(stream))

    def per_sample(self, stream: str) -> list[torch.Generator]:
        return [self._generator(p, stream) for p in self.positions]

    def shared(self, stream: str) -> torch.Generator:
        return self._generator(0, stream)


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """[B, *shape] standard normal, row i from generators[i] (float32, CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def randint_per_sample(generators: Sequence[torch.Generator], high: int) -> Tensor:
    """[B] integers in [0, high), one per generator (int64, CPU)."""
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in generators])


def rand_per_sample(generators: Sequence[torch.Generator]) -> Tensor:
    """[B] uniforms in [0, 1), one per generator (float32, CPU)."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def drop_prompts(prompts: Sequence[str], uniforms: Tensor, probability: float) -> list[str]:
    """Replace prompt i by the empty prompt when uniforms[i] < probability (Diffusion-DPO's
    ``proportion_empty_prompts``; keeps the model usable with classifier-free guidance)."""
    return ["" if float(u) < probability else p for p, u in zip(prompts, uniforms)]


# --------------------------------------------------------------------------------------------------
# Batches and the models a method sees
# --------------------------------------------------------------------------------------------------


@dataclass
class PreferenceBatch:
    """One micro-batch of preference pairs on this process.

    prompts: B captions; images_w / images_l: [B, 3, H, W] in [0, 1] (preferred / rejected);
    rows: [B] dataset row ids (cache keys); rng: the micro-step's seeds.
    ``extras`` holds whatever a rollout adds (sampled latents, log-probabilities, rewards …)."""

    prompts: list[str]
    images_w: Tensor
    images_l: Tensor
    rows: Tensor
    rng: StepRandomness
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return replace(self, images_w=self.images_w.to(device), images_l=self.images_l.to(device))


@dataclass
class LossOutput:
    """What a method's loss returns.

    loss: the scalar to back-propagate (already scaled as the gradient needs: e.g. RPO multiplies its
    globally computed loss by the number of processes, see rpo.py);
    metrics: scalars to log (averaged over micro-steps and processes); ``metrics["loss"]`` is the
    reported loss (defaults to ``loss``)."""

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class TrainingModels(ABC):
    """The models a loss may call, prepared by the trainer.

    ``backbone`` is the policy (its ``unet`` may be wrapped for distributed training; calling
    ``backbone.model_output`` runs it with gradients). ``reference()`` is a context manager inside
    which ``backbone`` computes the frozen reference ε_ref (LoRA: adapters disabled; full
    fine-tuning: the frozen copy) — call it under ``torch.no_grad()``."""

    backbone: Backbone
    num_processes: int = 1
    process_index: int = 0
    image_embedder: Callable[[Tensor], Tensor] | None = None
    step: int = 0
    #: The policy's learning rate of the current step (for methods that own another optimiser).
    learning_rate: float = 0.0
    #: The trainer's settings (a ``TrainConfig``: seed, batch_size, gradient_accumulation_steps …).
    config: Any = None

    def guard(self, value: Tensor, what: str) -> None:
        """Stop the run with a clear message when ``value`` is not finite (the trainer's NaN guard)."""
        if not bool(torch.isfinite(value.detach()).all()):
            from prefalign.errors import PrefalignError

            raise PrefalignError(f"non-finite {what}; lower the learning rate")

    @abstractmethod
    def reference(self) -> AbstractContextManager[Backbone]:
        """Switch ``backbone`` to the reference network for the duration of the block."""

    @abstractmethod
    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` [b, ...] over processes in process order → [b·P, ...]; this
        process's slice is ``tensor`` itself (so gradients flow through the local terms), the others
        are detached copies."""


# --------------------------------------------------------------------------------------------------
# Shared maths
# --------------------------------------------------------------------------------------------------

Target = Literal["native", "epsilon"]


def denoising_target(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor, target: Target) -> Tensor:
    """What the network output is compared with: ε, or for v-prediction models with
    ``target="native"`` (the Diffusion-DPO reference code) v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0.
    For ε-prediction models both choices are ε."""
    if target == "native" and schedule.prediction_type == "v_prediction":
        return v_target(x0, eps, schedule.alpha_bar(t))
    return eps


def network_output(backbone: Backbone, x_t: Tensor, t: Tensor, cond: Conditioning, target: Target) -> Tensor:
    """The output matching :func:`denoising_target`: the raw UNet output (``native``) or ε
    (``epsilon``: v converted to ε)."""
    if target == "native":
        return backbone.model_output(x_t, t, cond)
    return backbone.predict_eps(x_t, t, cond)


def replace_nonfinite_gradients_(parameters: Sequence[torch.nn.Parameter], posinf: float = 1e5, neginf: float = -1e5) -> None:
    """In place: NaN gradients → 0, ±inf → ±1e5 (the reference codes' ``torch.nan_to_num`` of EDM / SiD)."""
    for p in parameters:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=posinf, neginf=neginf)


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """e = mean over (C, H, W) of (prediction − target)² (METHODS.md "Notation": a mean, not a sum).

    prediction, target: [B, C, H, W] → [B] float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def pair_latents(backbone: Backbone, images_w: Tensor, images_l: Tensor) -> Tensor:
    """Latents of [winners; losers]: [2B, C, h, w] (no gradients: the VAE is frozen)."""
    with torch.no_grad():
        return backbone.images_to_latents(torch.cat([images_w, images_l]).to(backbone.device))


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------


class Method(ABC):
    """Base class of every alignment method (see the module docstring)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    needs_reference: ClassVar[bool] = True
    data: ClassVar[Literal["pairs", "prompts", "none"]] = "pairs"
    #: Trainer settings of the method's reference (nested dict, e.g. ``{"grad_clip": 0.0}``).
    trainer_defaults: ClassVar[dict[str, Any]] = {}
    #: Replace non-finite policy gradients (nan → 0, ±inf → ±1e5) instead of stopping the run.
    replace_nonfinite_gradients: ClassVar[bool] = False
    #: The metric whose rise means "better" on the training batch (for logging / progress bars).
    headline_metric: ClassVar[str] = "loss"

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    def setup(self, models: TrainingModels) -> None:
        """Called once before training (check options against the backbone, build caches)."""

    def rollout(self, batch: PreferenceBatch, models: TrainingModels) -> PreferenceBatch:
        """Work without gradients before the loss (RL methods sample here). Default: none."""
        return batch

    @abstractmethod
    def loss(self, batch: PreferenceBatch, models: TrainingModels) -> LossOutput:
        """The objective on one micro-batch (with gradients through the policy)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        """Named groups of tensors saved in checkpoints (default: none); called after :meth:`state_dict`."""
        return {}

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        """Restore :meth:`state_tensors` (called after :meth:`load_state_dict` on resume)."""


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
