"""DDPO (Black et al., ICLR 2024) — the baseline of PrefPaint's trust weighting (METHODS.md §7).

PPO-clip on the stochastic-DDIM policy with the rewards of a scorer (:mod:`prefalign.methods.rl`):

    A_i = clip((r_i − mean r)/(std r + eps), ±10)          global (or per-prompt) normalisation
    L   = reduce_i,t  w·max(−A_i·ρ_i,t, −A_i·clip(ρ_i,t, 1 ± ε))

with one constant weight w for every sample (``sample_weight``; 1 = DDPO; 1.4 = PrefPaint's
"constant scale" ablation, which asks whether trust weighting helps only by enlarging the step —
note that under Adam a constant loss scale changes the update only through gradient clipping and
Adam's ε). Every other option and its default is shared with PrefPaint (see ``RLConfig``), so that
``ddpo`` and ``prefpaint`` differ only in the weights; ddpo-pytorch's own values are listed in the
option descriptions (e.g. ``--set ddpo.normalization=per_prompt ddpo.loss_reduction=mean
ddpo.sampler_refresh=1 ddpo.timestep_sampling=per_sample ddpo.train_timesteps=null``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from prefalign.methods.rl import RLConfig, RLMethod


class DDPOConfig(RLConfig):
    """DDPO options: :class:`RLConfig` + the constant sample weight."""

    sample_weight: float = Field(1.0, gt=0, description="constant weight w of every PPO term (PrefPaint's ablation: 1.4)")


class DDPO(RLMethod):
    """DDPO: PPO on the stochastic-DDIM policy with constant sample weights (METHODS.md §7)."""

    name = "ddpo"
    config_class = DDPOConfig

    def sample_weights(self, scored: dict[str, Tensor]) -> Tensor:
        return torch.full_like(scored["reward"], self.config.sample_weight)
