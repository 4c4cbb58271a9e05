"""One interface for "a diffusion model and everything needed to call it".

A :class:`Backbone` owns: prompt encoding (→ :class:`Conditioning`), the denoiser call with
classifier-free guidance and v→ε conversion (→ ε always), image↔latent conversion (identity up to
scaling for pixel models, the VAE for latent models), the noise schedule, and which parameters
train. Everything above this layer (samplers, losses, trainers) sees only ε-prediction on
"latents" and never needs to know which model it is.

Conventions: images are float tensors in [0, 1], shape [B, 3, H, W]; latents are what the denoiser
diffuses ([B, C, h, w]); timesteps are integer levels 0..T-1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from prefalign.diffusion.schedule import NoiseSchedule, classifier_free_guidance, eps_from_v
from prefalign.errors import PrefalignError

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Conditioning:
    """The denoiser's condition, batched along dim 0.

    - ``encoder_hidden_states``: text token states for cross-attention [B, L, D];
    - ``added_cond_kwargs``: extra UNet inputs (SDXL: ``text_embeds`` [B, 1280], ``time_ids`` [B, 6]);
    - ``concat``: channels concatenated to x_t before the UNet (inpainting: mask + masked-image
      latents) [B, C', h, w];
    - ``sentence_embeddings``: normalised prompt embeddings [B, D'] where the backbone has them
      (used for similarities, e.g. RPO weights); not an input of the denoiser.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    concat: torch.Tensor | None = None
    sentence_embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(
            encoder_hidden_states=fn(self.encoder_hidden_states),
            added_cond_kwargs={k: fn(v) for k, v in self.added_cond_kwargs.items()},
            concat=None if self.concat is None else fn(self.concat),
            sentence_embeddings=None if self.sentence_embeddings is None else fn(self.sentence_embeddings),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda t: t[index])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        return self._map(lambda t: t.repeat_interleave(repeats, 0))

    def with_concat(self, concat: torch.Tensor | None) -> Conditioning:
        return replace(self, concat=concat)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch; an optional field is kept only if every item has it."""

        def optional(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(v is None for v in values) else torch.cat(values)

        first = items[0]
        return Conditioning(
            encoder_hidden_states=torch.cat([c.encoder_hidden_states for c in items]),
            added_cond_kwargs={k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in first.added_cond_kwargs},
            concat=optional([c.concat for c in items]),
            sentence_embeddings=optional([c.sentence_embeddings for c in items]),
        )


class Backbone(ABC):
    """A diffusion model and everything needed to call it (see module docstring)."""

    #: The noise schedule the denoiser was trained with.
    schedule: NoiseSchedule
    #: The trainable denoiser (a diffusers ``UNet2DConditionModel``).
    unet: torch.nn.Module
    #: "shapes", "sd", "sdxl" (+ "-inpaint" for inpainting variants).
    kind: str

    # --- prompts -------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts (no gradients; cached where the backbone can)."""

    def empty_conditioning(self, batch_size: int) -> Conditioning:
        """The unconditional branch of classifier-free guidance (the empty prompt)."""
        return self.encode_prompts([""] * batch_size)

    # --- latents -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at the backbone's default resolution."""

    @abstractmethod
    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → latents [B, C, h, w]."""

    @abstractmethod
    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → [B, 3, H, W] in [0, 1] (clamped)."""

    # --- the denoiser --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_inpainting(self) -> bool:
        return self.kind.endswith("-inpaint")

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Conditioning) -> torch.Tensor:
        """The raw UNet output (ε or v, per ``schedule.prediction_type``)."""
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        model_input = x_t if cond.concat is None else torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)
        unet_dtype = self.dtype
        out = self.unet(
            model_input.to(unet_dtype),
            t,
            encoder_hidden_states=cond.encoder_hidden_states.to(unet_dtype),
            added_cond_kwargs={k: v.to(unet_dtype) for k, v in cond.added_cond_kwargs.items()} or None,
        ).sample
        return out.to(x_t.dtype)

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """ε-prediction, with classifier-free guidance when ``guidance_scale != 1`` (one batched
        forward of [uncond; cond]) and v-prediction converted to ε."""
        if guidance_scale != 1.0:
            if uncond is None:
                uncond = self.empty_conditioning(x_t.shape[0]).to(x_t.device)
                if cond.concat is not None:  # inpainting: the image condition stays, the text goes
                    uncond = uncond.with_concat(cond.concat)
            both = Conditioning.cat([uncond, cond])
            t_both = t if not torch.is_tensor(t) or t.ndim == 0 else torch.cat([t, t])
            out_uncond, out_cond = self.model_output(torch.cat([x_t, x_t]), t_both, both).chunk(2)
            out = classifier_free_guidance(out_uncond, out_cond, guidance_scale)
        else:
            out = self.model_output(x_t, t, cond)
        if self.schedule.prediction_type == "v_prediction":
            out = eps_from_v(x_t, out, self.schedule.alpha_bar(t).to(x_t.device))
        return out

    def eps_fn(self, cond: Conditioning, guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> EpsFn:
        """A sampler-ready ``eps_fn(x_t, t)`` closed over the condition and guidance."""
        if guidance_scale != 1.0 and uncond is None:
            uncond = self.empty_conditioning(len(cond)).to(self.device)
            if cond.concat is not None:
                uncond = uncond.with_concat(cond.concat)

        def eps_fn(x_t: torch.Tensor, t: int) -> torch.Tensor:
            return self.predict_eps(x_t, t, cond, guidance_scale, uncond)

        return eps_fn

    # --- training ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def initial_latents(
        self, batch_size: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """x_T ~ N(0, I) of the backbone's latent shape (drawn on CPU, so seeds agree across devices)."""
        return torch.randn((batch_size, *self.latent_shape), generator=generator, dtype=dtype).to(self.device)

    def inpaint_conditioning(self, cond: Conditioning, images: torch.Tensor, masks: torch.Tensor) -> Conditioning:
        """Add the inpainting channels (mask + masked image, in the model's layout) to ``cond``.
        ``images`` [B, 3, H, W] in [0, 1]; ``masks`` [B, 1, H, W], 1 = repaint."""
        raise PrefalignError(f"this {self.kind} model is not an inpainting model; load an inpainting model folder")
