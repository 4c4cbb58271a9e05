"""Exact inversion and editing of images with any text-to-image backbone (METHODS.md §5, §3).

The pieces, each a short function over a :class:`~prefalign.backbones.base.Backbone`:

- :func:`invert_image` — image(s) → the inverted state on a sampling grid, with the round-trip check:
  ``method="bdia"`` (default) is BDIA's exact inversion (Zhang et al., ECCV 2024) and returns the
  **pair** (z_N, z_{N−1}); ``method="ddim"`` is plain DDIM inversion (ε(x_u, u) ≈ ε(x_s, s)) and
  returns z_N. Both cost exactly N network evaluations (NFE) for N steps.
- :func:`regenerate` — the state → latents x_0 under a (possibly different) prompt: BDIA continues
  from the pair with the same γ (N−1 evaluations); DDIM samples from z_N (N evaluations, done as
  ``bdia_sample`` with γ = 0, which *is* η = 0 DDIM, on the same grid).
- :func:`edit_image` — invert under ``prompt``, regenerate under ``edit_prompt``. With
  ``edit_prompt == prompt`` and BDIA the input latents come back up to rounding.

Everything happens in latent space: ``backbone.images_to_latents`` (identity up to scaling for the
shapes models, the VAE encoder mean for Stable Diffusion) and ``latents_to_images``. The round-trip
error ‖x̂_0 − x_0‖ / ‖x_0‖ is measured on latents, so a VAE's own reconstruction error is excluded.

Precision. ``dtype`` is the precision of the latents *and* of the UNet: the network runs in that
dtype (a copy of the backbone with a cast UNet is made when needed, see :func:`backbone_in_dtype`)
and ε comes back in the latent dtype. BDIA with γ = 1 round-trips to ~1e-7 relative error in
float32 and ~1e-13 in float64; 1/γ amplifies rounding along the inversion (keep γ^(N−1) ≳ 1e-4,
e.g. γ = 0.5 only at ~10 steps).

Guidance. ``cfg`` is used for inversion *and* regeneration (BDIA is exact for any ε function, also
a guided one); with CFG each network evaluation is one batched forward of [uncond; cond].

``strength`` < 1 inverts only the first round(strength·N) steps of the N-step grid (EDICT/BDIA's
"init image strength"): the state then lives at an intermediate level and regeneration starts there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from prefalign.backbones.base import Backbone
from prefalign.diffusion import ascending_levels, bdia_invert, bdia_regenerate, bdia_sample, count_calls, ddim_invert
from prefalign.errors import PrefalignError

METHODS = ("bdia", "ddim")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
STATE_FILE = "inversion.safetensors"
#: Names of the state tensors in the safetensors file, per method.
STATE_KEYS = {"bdia": ("z_N", "z_N_minus_1"), "ddim": ("z_N",)}


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class InversionResult:
    """What :func:`invert_image` returns. Tensors are on the backbone's device, latents in ``dtype``.

    - ``state``: (z_N, z_{N−1}) for BDIA, (z_N,) for DDIM, each [B, C, h, w];
    - ``latents``: the input latents x_0 [B, C, h, w]; ``images``: the input images [B, 3, H, W];
    - ``reconstruction``: regenerated latents x̂_0 (None when the round trip was not run) and
      ``reconstruction_images`` their decoding;
    - ``roundtrip_rel_err``: ‖x̂_0 − x_0‖ / ‖x_0‖ over the whole batch; ``per_image_rel_err`` [B];
    - ``nfe``: network evaluations of the inversion alone (``count_calls``); ``regeneration_nfe``
      those of the round trip's regeneration;
    - ``levels``: the ascending grid [t_0, …, t_N]; the state lives at t_N (z_{N−1} at t_{N−1}).
    """

    method: str
    state: tuple[Tensor, ...]
    latents: Tensor
    images: Tensor
    prompts: list[str]
    steps: int
    gamma: float
    cfg: float
    dtype: torch.dtype
    strength: float
    levels: list[int]
    nfe: int
    reconstruction: Tensor | None = None
    reconstruction_images: Tensor | None = None
    roundtrip_rel_err: float | None = None
    per_image_rel_err: Tensor | None = None
    regeneration_nfe: int | None = None

    def metadata(self, model: str = "") -> dict[str, str]:
        """The string metadata stored next to the state (safetensors metadata must be str → str)."""
        return inversion_metadata(
            self.method, self.gamma, self.steps, self.prompts, self.cfg, self.dtype, model, self.levels, self.strength
        )


@dataclass
class RegenerationResult:
    """Latents x_0 [B, C, h, w] regenerated from an inverted state, their images, and the NFE spent."""

    latents: Tensor
    images: Tensor
    nfe: int


@dataclass
class EditResult:
    """What :func:`edit_image` returns: the inversion (under ``prompt``) and the edit (under
    ``edit_prompts``); ``nfe`` = inversion + regeneration evaluations."""

    inversion: InversionResult
    edit_prompts: list[str]
    latents: Tensor
    images: Tensor
    nfe: int
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"float32"/"float64" (or the torch dtype) → torch dtype; anything else is a user error."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PrefalignError(f"inversion runs in float32 or float64, not {dtype}")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise PrefalignError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _check_method(method: str) -> str:
    method = str(getattr(method, "value", method)).lower()
    if method not in METHODS:
        raise PrefalignError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def backbone_in_dtype(backbone: Backbone, dtype: torch.dtype, inplace: bool = False) -> Backbone:
    """The backbone with its UNet in ``dtype``: itself when it already is, else (``inplace=False``) a
    shallow copy whose ``unet`` is a cast deep copy (the original is untouched), or (``inplace=True``)
    the backbone with its own UNet cast — use that when nothing else needs the original precision."""
    if backbone.dtype == dtype:
        return backbone
    unet = backbone.unet if inplace else copy.deepcopy(backbone.unet)
    _quiet_cast(unet, dtype)
    if inplace:
        return backbone
    converted = copy.copy(backbone)
    converted.unet = unet
    return converted


def _quiet_cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without diffusers' "modules to keep in float32" warning (none are kept here)."""
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:  # pragma: no cover - diffusers is a dependency
        module.to(dtype)
        return
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def backbone_image_size(backbone: Backbone) -> tuple[int, int] | None:
    """(H, W) of the images the backbone expects at its default resolution (None if unknown)."""
    resolution = getattr(backbone, "resolution", None)
    if resolution is not None:
        return (int(resolution[0]), int(resolution[1]))
    size = getattr(backbone, "image_size", None)
    if size is not None:
        return (int(size), int(size))
    return None


def load_input_image(backbone: Backbone, path: str | Path, resize: bool = True) -> Tensor:
    """Read one image file as [1, 3, H, W] in [0, 1] at the backbone's resolution.

    An image of another size is resized with a warning, or refused (PrefalignError) when ``resize`` is
    False; a file that is not an image is a PrefalignError with a one-line message.
    """
    from prefalign.images import load_image

    return load_image(path, size=backbone_image_size(backbone), resize=resize)[None]


def _as_batch(images: Tensor) -> Tensor:
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise PrefalignError(f"images must be [B, 3, H, W] (or [3, H, W]) in [0, 1], got shape {tuple(images.shape)}")
    return images


def _prompt_list(prompts: str | Sequence[str], batch: int, what: str = "prompt") -> list[str]:
    """A single prompt is used for every image; a list needs one prompt per image."""
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise PrefalignError(f"got {len(prompts)} {what}s for {batch} images; give one {what}, or one per image")
    return prompts


def inversion_grid(backbone: Backbone, steps: int, strength: float = 1.0) -> list[int]:
    """Ascending levels [t_0, …, t_k] of the ``steps``-step sampling grid, cut after k = round(strength·steps)."""
    if not isinstance(steps, int) or steps < 1:
        raise PrefalignError(f"steps must be a positive integer (got {steps!r})")
    if not 0 < strength <= 1:
        raise PrefalignError(f"strength must be in (0, 1] (got {strength}); 1 inverts all the way to noise")
    grid = ascending_levels(backbone.schedule, steps)
    kept = max(1, int(round(strength * steps)))
    return grid[: kept + 1]


def _eps_fn(backbone: Backbone, prompts: list[str], cfg: float):
    if backbone.is_inpainting:
        raise PrefalignError(
            f"inversion and editing need a text-to-image model; {backbone.kind!r} is an inpainting model"
        )
    return backbone.eps_fn(backbone.encode_prompts(prompts), cfg)


def relative_error(value: Tensor, target: Tensor) -> tuple[float, Tensor]:
    """(‖value − target‖/‖target‖ over the batch, the same per sample [B]), computed in float64."""
    diff, ref = (value - target).double().flatten(1), target.double().flatten(1)
    total = float(diff.norm() / ref.norm().clamp(min=1e-300))
    per_image = diff.norm(dim=1) / ref.norm(dim=1).clamp(min=1e-300)
    return total, per_image.cpu()


# --------------------------------------------------------------------------------------------------
# Invert, regenerate, edit
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def invert_image(
    backbone: Backbone,
    image: Tensor,
    prompt: str | Sequence[str],
    method: str = "bdia",
    steps: int = 50,
    gamma: float = 1.0,
    cfg: float = 1.0,
    dtype: str | torch.dtype = torch.float32,
    *,
    strength: float = 1.0,
    roundtrip: bool = True,
) -> InversionResult:
    """Invert image(s) [B, 3, H, W] (or [3, H, W]) in [0, 1] under ``prompt`` (METHODS §5 / §3).

    BDIA: z_1 = D_{0→1}(z_0), then z_{i+1} = (z_{i−1} − D_{i→i−1}(z_i))/γ + D_{i→i+1}(z_i); state
    (z_N, z_{N−1}). DDIM: x_u = D_{s→u}(x_s) along the grid; state (z_N,). Both N = ``steps``
    evaluations (``nfe``, counted with :func:`~prefalign.diffusion.count_calls`). With ``roundtrip``
    the state is regenerated under the same prompt and the relative latent error is reported.
    """
    method = _check_method(method)
    dtype = resolve_dtype(dtype)
    if method == "bdia" and not gamma > 0:
        raise PrefalignError(f"BDIA inversion divides by gamma; use gamma > 0 (got {gamma}), ideally 0.9–1")
    images = _as_batch(image)
    prompts = _prompt_list(prompt, images.shape[0])
    levels = inversion_grid(backbone, steps, strength)
    model = backbone_in_dtype(backbone, dtype)

    x0 = model.images_to_latents(images.to(model.device)).to(dtype)  # [B, C, h, w]
    counted = count_calls(_eps_fn(model, prompts, cfg))
    if method == "bdia":
        state = tuple(bdia_invert(counted, x0, model.schedule, None, gamma, levels=levels))
    else:
        state = (ddim_invert(counted, x0, model.schedule, None, levels=levels),)
    result = InversionResult(
        method=method,
        state=state,
        latents=x0,
        images=images,
        prompts=prompts,
        steps=steps,
        gamma=float(gamma) if method == "bdia" else 0.0,
        cfg=float(cfg),
        dtype=dtype,
        strength=float(strength),
        levels=levels,
        nfe=counted.calls,
    )
    if roundtrip:
        regenerated = regenerate(model, result.state, prompts, method, steps, result.gamma, cfg, dtype, levels=levels)
        result.reconstruction = regenerated.latents
        result.reconstruction_images = regenerated.images
        result.regeneration_nfe = regenerated.nfe
        result.roundtrip_rel_err, result.per_image_rel_err = relative_error(regenerated.latents, x0)
    return result


@torch.no_grad()
def regenerate(
    backbone: Backbone,
    state: Sequence[Tensor],
    prompt: str | Sequence[str],
    method: str = "bdia",
    steps: int = 50,
    gamma: float = 1.0,
    cfg: float = 1.0,
    dtype: str | torch.dtype = torch.float32,
    *,
    levels: Sequence[int] | None = None,
    strength: float = 1.0,
) -> RegenerationResult:
    """Latents x_0 (and images) from an inverted ``state`` under ``prompt``.

    BDIA: the update z_{i−1} = γ·z_{i+1} − γ·D_{i→i+1}(z_i) + D_{i→i−1}(z_i) for i = N−1, …, 1 from the
    pair (z_N, z_{N−1}) (N−1 evaluations); use the inversion's γ, grid and cfg to get its input back.
    DDIM: η = 0 DDIM sampling from z_N (N evaluations). ``levels`` (the inversion's ascending grid)
    overrides ``steps``/``strength``.
    """
    method = _check_method(method)
    dtype = resolve_dtype(dtype)
    expected = len(STATE_KEYS[method])
    if len(state) != expected:
        raise PrefalignError(
            f"a {method} state has {expected} tensor(s) ({', '.join(STATE_KEYS[method])}), got {len(state)}; "
            "regenerate with the method that inverted it"
        )
    grid = list(levels) if levels is not None else inversion_grid(backbone, steps, strength)
    model = backbone_in_dtype(backbone, dtype)
    state = tuple(z.to(device=model.device, dtype=dtype) for z in state)
    prompts = _prompt_list(prompt, state[0].shape[0])
    counted = count_calls(_eps_fn(model, prompts, cfg))
    if method == "bdia":
        latents = bdia_regenerate(counted, state, model.schedule, None, gamma, levels=grid)
    else:  # γ = 0 BDIA sampling is η = 0 DDIM, on an explicit (possibly partial) grid
        latents = bdia_sample(counted, state[0], model.schedule, None, 0.0, levels=grid)
    return RegenerationResult(latents=latents, images=model.latents_to_images(latents), nfe=counted.calls)


@torch.no_grad()
def edit_image(
    backbone: Backbone,
    image: Tensor,
    prompt: str | Sequence[str],
    edit_prompt: str | Sequence[str],
    method: str = "bdia",
    steps: int = 50,
    gamma: float = 0.96,
    cfg: float = 2.0,
    dtype: str | torch.dtype = torch.float32,
    *,
    strength: float = 1.0,
    roundtrip: bool = False,
) -> EditResult:
    """Invert under ``prompt``, regenerate under ``edit_prompt`` (same method, γ, grid and cfg).

    γ = 0.96 follows BDIA's editing setting (METHODS §5: "0.92–1.0 for editing"). Guidance 2: on the
    shapes model, inverting under EDICT's guidance 3 leaves latents that regenerate with saturated,
    noisy backgrounds, and guidance 1 often misses the edit. With ``edit_prompt == prompt`` BDIA gives
    the input latents back up to rounding, whatever the guidance.
    """
    inversion = invert_image(
        backbone, image, prompt, method, steps, gamma, cfg, dtype, strength=strength, roundtrip=roundtrip
    )
    edit_prompts = _prompt_list(edit_prompt, inversion.latents.shape[0], "edit prompt")
    edited = regenerate(
        backbone, inversion.state, edit_prompts, inversion.method, steps, inversion.gamma, cfg, inversion.dtype,
        levels=inversion.levels,
    )
    return EditResult(inversion, edit_prompts, edited.latents, edited.images, inversion.nfe + edited.nfe)


# --------------------------------------------------------------------------------------------------
# The state on disk
# --------------------------------------------------------------------------------------------------


def inversion_metadata(
    method: str,
    gamma: float,
    steps: int,
    prompts: Sequence[str],
    cfg: float,
    dtype: torch.dtype,
    model: str,
    levels: Sequence[int],
    strength: float = 1.0,
) -> dict[str, str]:
    """String metadata of a saved state: everything :func:`regenerate` needs besides the tensors."""
    prompts = list(prompts)
    return {
        "format": "prefalign-inversion-v1",
        "method": method,
        "gamma": repr(float(gamma)),
        "steps": str(int(steps)),
        "strength": repr(float(strength)),
        "prompt": prompts[0] if len(set(prompts)) == 1 else json.dumps(prompts),
        "prompts": json.dumps(prompts),
        "cfg": repr(float(cfg)),
        "dtype": dtype_name(dtype),
        "model": str(model),
        "levels": json.dumps([int(t) for t in levels]),
    }


def save_inversion(result: InversionResult, path: str | Path, model: str = "") -> Path:
    """Write the state as safetensors (BDIA: ``z_N``, ``z_N_minus_1``; DDIM: ``z_N``) with metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: z.detach().cpu().contiguous() for key, z in zip(STATE_KEYS[result.method], result.state)}
    save_file(tensors, str(path), metadata=result.metadata(model))
    return path


def load_inversion(path: str | Path) -> tuple[tuple[Tensor, ...], dict]:
    """Read a state written by :func:`save_inversion`: (state tensors, parsed metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrefalignError(f"inversion file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
            keys = set(handle.keys())
            method = raw.get("method")
            if method not in STATE_KEYS or not set(STATE_KEYS[method]) <= keys:
                raise PrefalignError(f"{path} is not a prefalign inversion file (no method/state tensors)")
            state = tuple(handle.get_tensor(key) for key in STATE_KEYS[method])
    except PrefalignError:
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise PrefalignError(f"{path} is not a readable safetensors file ({error.__class__.__name__})") from None
    meta = dict(raw)
    meta["gamma"] = float(raw["gamma"])
    meta["steps"] = int(raw["steps"])
    meta["strength"] = float(raw.get("strength", 1.0))
    meta["cfg"] = float(raw["cfg"])
    meta["levels"] = json.loads(raw["levels"])
    meta["prompts"] = json.loads(raw.get("prompts", json.dumps([raw.get("prompt", "")])))
    return state, meta

