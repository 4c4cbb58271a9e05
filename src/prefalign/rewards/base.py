"""One interface for every scorer: ``score(images, prompts, **cond) -> Tensor[B]``.

- ``images``: [B, 3, H, W] float in [0, 1]; ``prompts``: B strings; ``cond``: extra inputs of
  inpainting scorers (``masked_images`` [B, 3, H, W], ``masks`` [B, 1, H, W], 1 = repainted) —
  scorers that do not use them ignore them.
- higher is better; the scale is the scorer's own (the annotator: [0, 1]; a reward model:
  unbounded logits).
- ``features(images, prompts, **cond)``: the scorer's feature vector where it has one (a reward
  model's z), else None.
- ``differentiable``: whether gradients of the score reach the images (reward models: yes, needed
  by Diff-Instruct++; the annotator: no).

:func:`load_scorer` resolves a spec string: ``"annotator"`` / ``"annotator:PERSONA"`` (the world's
simulated human), a reward-model folder (written by ``prefalign reward train``), or
``"module:function"`` — a Python callable ``f(images, prompts) -> scores`` (or an object with a
``score`` method, or a zero-argument factory returning either).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import PrefalignError


class Scorer:
    """Base class of scorers (see module docstring)."""

    name: str = "scorer"
    differentiable: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor | None:
        return None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor:
        return self.score(images, prompts, **cond)

    def score_batched(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256, **cond: Any) -> torch.Tensor:
        """``score`` in chunks, without gradients (for evaluation of many images)."""
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                rows = slice(start, start + batch_size)
                chunk = {k: v[rows] if torch.is_tensor(v) else v for k, v in cond.items()}
                out.append(self.score(images[rows], list(prompts[rows]), **chunk).detach().float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class AnnotatorScorer(Scorer):
    """The shapes world's simulated human (noiseless score in [0, 1]); its pairwise labels are
    Bradley–Terry draws with ties (``label_pairs``)."""

    differentiable = False

    def __init__(self, persona: str = "balanced", **options: Any):
        from prefalign.worlds.shapes.annotator import Annotator

        self.annotator = Annotator(persona, **options)
        self.persona = persona
        self.name = "annotator" if persona == "balanced" else f"annotator:{persona}"

    def score(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor:
        return self.annotator.score(images, list(prompts))


class CallableScorer(Scorer):
    """A user function ``f(images, prompts[, **cond]) -> scores`` (or object with ``score``)."""

    def __init__(self, function: Callable[..., Any], name: str, differentiable: bool = False):
        self.function = function
        self.name = name
        self.differentiable = differentiable
        try:
            parameters = inspect.signature(function).parameters.values()
            self._takes_cond = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
        except (TypeError, ValueError):
            self._takes_cond = False

    def score(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor:
        result = self.function(images, list(prompts), **cond) if self._takes_cond else self.function(images, list(prompts))
        scores = torch.as_tensor(result, dtype=torch.float32) if not torch.is_tensor(result) else result
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.shape != (images.shape[0],):
            raise PrefalignError(f"scorer {self.name} returned shape {tuple(scores.shape)} for {images.shape[0]} images; it must return one score per image")
        return scores


def _import_callable(spec: str) -> Scorer:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PrefalignError(f"cannot import module {module_name!r} for scorer {spec!r} ({error}); is it on PYTHONPATH?") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PrefalignError(f"module {module_name!r} has no attribute {attribute!r} (scorer {spec!r})")
        target = getattr(target, part)
    if isinstance(target, Scorer):
        return target
    if inspect.isclass(target) or _is_factory(target):
        target = target()
        if isinstance(target, Scorer):
            return target
    if hasattr(target, "score") and callable(target.score):
        return CallableScorer(target.score, spec, bool(getattr(target, "differentiable", False)))
    if callable(target):
        return CallableScorer(target, spec, bool(getattr(target, "differentiable", False)))
    raise PrefalignError(f"{spec!r} is not callable; give a function f(images, prompts) -> scores")


def _is_factory(target: Any) -> bool:
    """A function with no required parameters is a factory (it returns the scorer)."""
    if not inspect.isfunction(target):
        return False
    required = [p for p in inspect.signature(target).parameters.values() if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return not required


def load_scorer(spec: str | Scorer, device: str | torch.device = "cpu") -> Scorer:
    """Resolve a scorer spec (see module docstring); a :class:`Scorer` is returned as is."""
    if isinstance(spec, Scorer):
        return spec
    spec = str(spec).strip()
    if spec == "annotator" or spec.startswith("annotator:"):
        return AnnotatorScorer(spec.split(":", 1)[1] if ":" in spec else "balanced")
    path = Path(spec).expanduser()
    if path.exists():
        from prefalign.rewards.prefpaint import RewardModel, is_reward_model_folder

        if path.is_dir() and is_reward_model_folder(path):
            return RewardModel.from_pretrained(path, device=device)
        raise PrefalignError(f"{path} is not a reward model folder (no reward_model.json); give one written by `prefalign reward train`")
    if ":" in spec and not spec.startswith((".", "/")):
        return _import_callable(spec)
    raise PrefalignError(
        f"unknown scorer {spec!r}; give 'annotator', 'annotator:PERSONA', a reward model folder "
        "(from `prefalign reward train`) or 'module:function'"
    )


__all__ = ["Scorer", "AnnotatorScorer", "CallableScorer", "load_scorer"]
