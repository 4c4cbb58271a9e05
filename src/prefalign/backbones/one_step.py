"""One-step generators (Diff-Instruct++, METHODS.md §6): x_0 = g_θ(z, c) in one network call.

The generator is a diffusion UNet evaluated at one fixed level t* (``timestep``):

    x_{t*} = √(1−ᾱ_{t*})·z                                   z ~ N(0, I)
    g_θ(z, c) = x̂_0(x_{t*}, t*, c)     ε-model: (x_{t*} − √(1−ᾱ_{t*})·ε_θ) / √ᾱ_{t*}
                                       v-model: √ᾱ_{t*}·x_{t*} − √(1−ᾱ_{t*})·v_θ
    (clamped to [−r, r] when ``clip_range`` is set)

x_{t*} is the reference code's ``add_noise(0, z, t*)`` and x̂_0 its scheduler's
``pred_original_sample`` (SiD-LSG ``sid_sd_sampler``, the code Diff-Instruct++'s Stable-Diffusion runs
follow), so a generator initialised from a pretrained denoiser is exactly that denoiser's one-step
x̂_0 prediction at t* (tested against diffusers' ``DDPMScheduler.step``).

A model folder holding a one-step generator has ``one_step.json`` (:class:`OneStepSpec`); every
loader (``load_backbone``) attaches it as ``backbone.one_step``, and
:func:`prefalign.sampling.generate` then makes each image with one network call. Such a model
samples with ``steps=1`` only (any other step count is an error that says so: the network was
trained for one level, a multi-step DDIM run of it is not a sampler of anything), and classifier-free
guidance does not apply (the guidance is distilled into the generator; ``guidance_scale`` is ignored).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefalign.backbones.base import Backbone, Conditioning
from prefalign.diffusion.schedule import AlphaBar, _coefficients, predicted_x0, x0_from_v
from prefalign.errors import PrefalignError

ONE_STEP_FILE = "one_step.json"


@dataclass(frozen=True)
class OneStepSpec:
    """How a UNet is used as a one-step generator.

    timestep: t*, the level the network is evaluated at; clip_range: clamp x̂_0 to [−r, r] (None: no
    clamp); method / guidance_scale: how it was trained (informational)."""

    timestep: int
    clip_range: float | None = None
    method: str = "diff_instruct_pp"
    guidance_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "one-step-generator", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OneStepSpec:
        try:
            return cls(
                timestep=int(data["timestep"]),
                clip_range=None if data.get("clip_range") is None else float(data["clip_range"]),
                method=str(data.get("method", "diff_instruct_pp")),
                guidance_scale=None if data.get("guidance_scale") is None else float(data["guidance_scale"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PrefalignError(f"invalid one-step generator spec {data!r} ({error}); it needs an integer 'timestep'") from None


# --------------------------------------------------------------------------------------------------
# The maths
# --------------------------------------------------------------------------------------------------


def generator_input(z: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """x_{t*} = √(1−ᾱ_{t*})·z (the reference's ``add_noise(0, z, t*)``). z: [B, C, h, w] → same."""
    (sqrt_one_minus,) = _coefficients(alpha_bar, z, lambda a: ((1 - a).sqrt(),))
    return sqrt_one_minus * z


def x0_from_output(x_t: Tensor, output: Tensor, alpha_bar: AlphaBar, prediction_type: str) -> Tensor:
    """x̂_0 from the raw network output: ε → (x_t − √(1−ᾱ)·ε)/√ᾱ; v → √ᾱ·x_t − √(1−ᾱ)·v."""
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, output, alpha_bar)
    return predicted_x0(x_t, output, alpha_bar)


def generator_x0(backbone: Backbone, z: Tensor, cond: Conditioning, spec: OneStepSpec) -> Tensor:
    """g_θ(z, c): one call of ``backbone``'s network (see the module docstring). z: [B, C, h, w] latents
    (float32); returns x_0 [B, C, h, w] with gradients to the network when enabled."""
    schedule = backbone.schedule
    if not 0 <= spec.timestep < schedule.num_train_timesteps:
        raise PrefalignError(
            f"the one-step generator's timestep {spec.timestep} is outside 0..{schedule.num_train_timesteps - 1}; pick a level of the schedule"
        )
    alpha_bar = schedule.alpha_bar(spec.timestep)
    x_t = generator_input(z, alpha_bar)
    output = backbone.model_output(x_t, spec.timestep, cond)
    x0 = x0_from_output(x_t, output, alpha_bar, schedule.prediction_type)
    return x0 if spec.clip_range is None else x0.clamp(-spec.clip_range, spec.clip_range)


# --------------------------------------------------------------------------------------------------
# Marking backbones and folders
# --------------------------------------------------------------------------------------------------


def one_step_spec(backbone: Backbone) -> OneStepSpec | None:
    """The backbone's :class:`OneStepSpec`, or None for an ordinary diffusion model."""
    spec = getattr(backbone, "one_step", None)
    if spec is None or isinstance(spec, OneStepSpec):
        return spec
    return OneStepSpec.from_dict(spec)


def write_one_step(folder: str | Path, spec: OneStepSpec) -> Path:
    """Mark a model folder as a one-step generator (``one_step.json``)."""
    path = Path(folder) / ONE_STEP_FILE
    path.write_text(json.dumps(spec.to_dict(), indent=2))
    return path


def read_one_step(folder: str | Path) -> OneStepSpec | None:
    path = Path(folder) / ONE_STEP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PrefalignError(f"cannot read {path}: {error}; re-export the model or delete the file") from None
    return OneStepSpec.from_dict(data)


def attach_one_step(backbone: Backbone, folder: str | Path | None) -> Backbone:
    """Set ``backbone.one_step`` from ``folder/one_step.json`` when the folder has one."""
    spec = read_one_step(folder) if folder is not None and Path(folder).is_dir() else None
    if spec is not None:
        backbone.one_step = spec
    return backbone


@torch.no_grad()
def sample_one_step(backbone: Backbone, cond: Conditioning, z: Tensor, spec: OneStepSpec | None = None) -> Tensor:
    """Latents x_0 = g(z, c) of a one-step generator (no gradients)."""
    spec = spec or one_step_spec(backbone)
    if spec is None:
        raise PrefalignError("this model is not a one-step generator; sample it with a multi-step sampler")
    return generator_x0(backbone, z.float(), cond, spec)


def check_one_step_steps(spec: OneStepSpec | None, steps: int) -> None:
    """A one-step generator samples with ``steps=1`` only (see the module docstring)."""
    if spec is not None and steps != 1:
        raise PrefalignError(
            f"this model is a one-step generator ({spec.method}, t*={spec.timestep}): it makes an image in one "
            f"network call; sample it with --steps 1 (got --steps {steps})"
        )
