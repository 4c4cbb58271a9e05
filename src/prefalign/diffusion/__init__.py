"""Pure diffusion maths: noise schedule, DDIM, DDIM/BDIA inversion (no models; see DESIGN.md).

Samplers take ``eps_fn(x_t, t) -> ε`` (ε prediction at integer level t). diffusers' DDIMScheduler is the
reference the functions are tested against.
"""

from prefalign.diffusion.ddim import (
    ddim_jump,
    ddim_log_prob,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    standard_normal_like,
)
from prefalign.diffusion.inversion import (
    CallCounter,
    ascending_levels,
    bdia_invert,
    bdia_regenerate,
    bdia_sample,
    count_calls,
    ddim_invert,
    inversion_levels,
)
from prefalign.diffusion.schedule import (
    NoiseSchedule,
    betas_from_config,
    classifier_free_guidance,
    eps_from_v,
    implied_eps,
    predicted_x0,
    v_target,
    x0_from_v,
)

__all__ = [
    "CallCounter",
    "NoiseSchedule",
    "ascending_levels",
    "bdia_invert",
    "bdia_regenerate",
    "bdia_sample",
    "betas_from_config",
    "classifier_free_guidance",
    "count_calls",
    "ddim_invert",
    "ddim_jump",
    "ddim_log_prob",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "eps_from_v",
    "implied_eps",
    "inversion_levels",
    "predicted_x0",
    "standard_normal_like",
    "v_target",
    "x0_from_v",
]
