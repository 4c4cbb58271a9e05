"""Generate images from prompts with any backbone and sampler.

Seeds: image ``i`` of a call starts from x_T drawn with ``torch.Generator().manual_seed(seed + i)``
(on CPU), so the same (prompts, seed) give the same starting noise for every model of the same
latent shape — base-vs-aligned comparisons use identical noise.

One-step generators (``backbone.one_step`` set, e.g. a Diff-Instruct++ export; see
:mod:`prefalign.backbones.one_step`) make each image from the same x_T = z in one network call:
``steps`` must be 1 (anything else is an error saying so) and ``guidance_scale``, ``sampler``,
``eta`` and ``gamma`` do not apply (the guidance is distilled into the generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from prefalign.backbones.base import Backbone, Conditioning
from prefalign.backbones.one_step import check_one_step_steps, one_step_spec, sample_one_step
from prefalign.diffusion import bdia_sample, ddim_sample
from prefalign.errors import PrefalignError

SAMPLERS = ("ddim", "bdia")


def initial_noise(backbone: Backbone, count: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T for images seed, seed+1, …, seed+count-1: [count, C, h, w] on the backbone's device."""
    return torch.stack(
        [torch.randn(backbone.latent_shape, generator=torch.Generator().manual_seed(seed + i), dtype=dtype) for i in range(count)]
    ).to(backbone.device)


@torch.no_grad()
def sample_latents(
    backbone: Backbone,
    cond: Conditioning,
    x_T: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    eta: float = 0.0,
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run one sampler from x_T under ``cond``; returns latents x_0."""
    eps_fn = backbone.eps_fn(cond, guidance_scale)
    if sampler == "ddim":
        return ddim_sample(eps_fn, x_T, backbone.schedule, steps, eta=eta, generator=generator)
    if sampler == "bdia":
        return bdia_sample(eps_fn, x_T, backbone.schedule, steps, gamma)
    raise PrefalignError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    eta: float = 0.0,
    gamma: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
    condition: Callable[[Conditioning, slice], Conditioning] | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for ``prompts`` (image i uses seed + i).

    ``condition(cond, rows)`` may add to the encoded condition of a chunk (e.g. inpainting
    channels)."""
    if sampler not in SAMPLERS:
        raise PrefalignError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if not prompts:
        raise PrefalignError("no prompts to sample; give --prompt or --prompts-file")
    one_step = one_step_spec(backbone)
    check_one_step_steps(one_step, steps)
    out = []
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="sampling", disable=not progress):
        rows = slice(start, min(start + batch_size, len(prompts)))
        cond = backbone.encode_prompts(list(prompts[rows]))
        if condition is not None:
            cond = condition(cond, rows)
        x_T = initial_noise(backbone, rows.stop - rows.start, seed + start)
        generator = torch.Generator().manual_seed(seed + start + 1_000_000) if eta > 0 else None
        if one_step is not None:
            latents = sample_one_step(backbone, cond, x_T, one_step)
        else:
            latents = sample_latents(backbone, cond, x_T, steps, guidance_scale, sampler, eta, gamma, generator)
        out.append(backbone.latents_to_images(latents).float().cpu())
    return torch.cat(out)
