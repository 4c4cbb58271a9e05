"""Reward models and scorers behind one interface: ``load_scorer(spec)(images, prompts,
masked_images=None) -> Tensor[B]`` (documented in :mod:`prefalign.rewards.base`).

- :mod:`.base` — :class:`Scorer`, :func:`load_scorer` (annotator, reward model folder, ``module:function``);
- :mod:`.prefpaint` — PrefPaint's reward model, the V⁻¹ confidence bound and the trust factor γ;
- :mod:`.training` — its losses (Bradley–Terry, regression), training and evaluation (Fig. 2);
- :mod:`.labelling` — ``prefs make``: sample a model and label the samples with a scorer;
- :mod:`.clip` — the shapes world's CLIP image encoder.
"""

from prefalign.rewards.base import AnnotatorScorer, CallableScorer, Scorer, load_scorer

__all__ = ["Scorer", "AnnotatorScorer", "CallableScorer", "load_scorer"]
