"""One interface for every scorer — used wherever a command or method takes ``--scorer``.

Get one with :func:`load_scorer` (``spec`` → :class:`Scorer`)::

    scorer = load_scorer("annotator")              # the world's simulated human, balanced persona
    scorer = load_scorer("annotator:aesthete")     # another persona (balanced, literal, aesthete)
    scorer = load_scorer("runs/rm")                # a reward model folder (`prefalign reward train`)
    scorer = load_scorer("my_package.scores:f")    # a user callable, see below

    rewards = scorer(images, prompts)                          # Tensor[B], higher is better
    rewards = scorer(images, prompts, masked_images=masked)    # inpainting scorers

Arguments and result:

- ``images``: [B, 3, H, W] float in [0, 1] (RGB), on any device; the result (float32 for the
  built-in scorers) is on the scorer's device (a reward model's) or the images' (the annotator).
  The shapes world's scorers take the world's image size (a reward model: its CLIP's, 32 by
  default) and raise a PrefalignError naming the size otherwise.
- ``prompts``: B strings (PrefPaint's image-only inpainting prompts: empty strings).
- ``masked_images`` [B, 3, H, W] (the masked prompt image an inpainting model was given) and
  ``masks`` [B, 1, H, W] (1 = repainted) are keyword conditions; scorers that do not use them ignore
  them. An inpainting reward model requires ``masked_images``.
- The scale is the scorer's own: the annotator's noiseless score is in [0, 1]; a reward model's is
  an unbounded logit (Bradley–Terry) or a standardised rating (pointwise).

Capabilities (attributes every scorer has):

- ``differentiable``: gradients of the score reach the images. True for reward models
  (Diff-Instruct++ back-propagates through them; their own parameters are frozen when loaded, so
  only the images get gradients); False for the annotator (pixel statistics with medians and
  thresholds) and, unless the callable sets ``differentiable = True``, for ``module:function``.
- ``has_confidence``: the scorer has PrefPaint's linear feature z and confidence bound (reward
  models). Then ``features(images, prompts, **cond)`` → z [B, d] and
  ``score_with_confidence(images, prompts, **cond)`` → dict of ``reward`` [B], ``features``
  [B, d], ``bound`` = ‖z‖_{V⁻¹} [B], ``bound_reference`` = ‖V⁻¹z‖₂ [B] and ``trust_gamma`` γ(z) [B]
  with the model's trust settings (METHODS.md §4). Other scorers return None from ``features`` and
  raise a PrefalignError from ``score_with_confidence`` (PrefPaint's trust weighting needs a
  reward model).
- ``score_batched(images, prompts, batch_size, **cond)``: the score in chunks without gradients,
  on the CPU (for evaluating many images).

A ``module:function`` spec names a callable ``f(images, prompts) -> scores`` (a tensor, array or
list of B numbers; it also receives ``masked_images`` / ``masks`` if it declares those parameters or
``**kwargs``), an object with a ``score`` method, a :class:`Scorer` instance, or a class /
zero-argument factory returning one of these. The module must be importable (on ``PYTHONPATH``).
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
    has_confidence: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor | None:
        """The scorer's feature vector z [B, d] where it has one (a reward model), else None."""
        return None

    def score_with_confidence(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> dict[str, torch.Tensor]:
        """Reward, z, bounds and γ (reward models only; see module docstring)."""
        raise PrefalignError(
            f"scorer {self.name!r} has no confidence bound; PrefPaint's trust weighting needs a reward model folder "
            "(train one with `prefalign reward train`), or turn trust weighting off"
        )

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], masked_images: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        if masked_images is not None:
            cond["masked_images"] = masked_images
        return self.score(images, prompts, **cond)

    def score_batched(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256, **cond: Any) -> torch.Tensor:
        """``score`` in chunks, without gradients, as float32 on the CPU (for evaluating many images)."""
        if len(prompts) != images.shape[0]:
            raise PrefalignError(f"got {images.shape[0]} images for {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                rows = slice(start, start + batch_size)
                chunk = {k: v[rows] if torch.is_tensor(v) else v for k, v in cond.items() if v is not None}
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
    """A user function ``f(images, prompts[, masked_images=…, masks=…]) -> scores`` (or an object's
    ``score`` method). Conditions are passed only if ``f`` declares them (or ``**kwargs``)."""

    def __init__(self, function: Callable[..., Any], name: str, differentiable: bool = False):
        self.function = function
        self.name = name
        self.differentiable = differentiable
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        self._takes_all = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
        self._takes = {p.name for p in parameters if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}

    def score(self, images: torch.Tensor, prompts: Sequence[str], **cond: Any) -> torch.Tensor:
        passed = {k: v for k, v in cond.items() if self._takes_all or k in self._takes}
        result = self.function(images, list(prompts), **passed)
        scores = torch.as_tensor(result, dtype=torch.float32) if not torch.is_tensor(result) else result
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.shape != (images.shape[0],):
            raise PrefalignError(f"scorer {self.name} returned shape {tuple(scores.shape)} for {images.shape[0]} images; it must return one score per image")
        return scores if scores.is_floating_point() and scores.dtype != torch.float64 else scores.float()


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
