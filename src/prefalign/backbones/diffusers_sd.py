"""Stable-Diffusion-family backbones: a diffusers pipeline loaded from a local folder.

Supported pipelines (``model_index.json``'s ``_class_name``) and the backbone ``kind`` they give:

    StableDiffusionPipeline            SD 1.x / 2.x, ε- or v-prediction        "sd"
    StableDiffusionInpaintPipeline     SD inpainting, 9-channel UNet          "sd-inpaint"
    StableDiffusionXLPipeline          SDXL base                              "sdxl"
    StableDiffusionXLInpaintPipeline   SDXL inpainting, 9-channel UNet        "sdxl-inpaint"

The kind follows the UNet, not only the class name: a 9-channel UNet (4 latent + 1 mask + 4
masked-image latents) is an inpainting model, a 4-channel one a text-to-image model.

What the backbone does the way diffusers does it (so results match the pipelines):
- prompts are encoded by the pipeline's own ``encode_prompt`` (tokenisation, truncation, clip-skip,
  SDXL's two encoders and penultimate layer), without classifier-free-guidance duplication;
- the unconditional branch of CFG is the empty prompt; for SDXL with
  ``force_zeros_for_empty_prompt`` (the default) it is all zeros, as in the SDXL pipelines;
- SDXL ``time_ids`` are (original_size, crops_coords_top_left, target_size) = ((H, W), (0, 0), (H, W))
  at the default resolution (``_get_add_time_ids``); SDXL inpainting with
  ``requires_aesthetics_score`` uses (H, W, 0, 0, 6.0) and (H, W, 0, 0, 2.5) for the unconditional
  branch, the pipeline defaults;
- inpainting conditions are [mask at latent size (nearest), VAE latents of the masked image], the
  order of ``torch.cat([latent_model_input, mask, masked_image_latents], dim=1)``; masks are binarised
  at 0.5 and 1 marks the region to repaint; the masked image is ``image · (mask < 0.5)`` in [-1, 1]
  (so the hole is mid-grey), as ``StableDiffusionInpaintPipeline``.

Deliberate differences, all documented on the methods: the VAE encoder returns the *mean* of the
latent distribution (deterministic; diffusers samples it), and prompt encodings are cached per prompt
(the text encoders are frozen).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from prefalign.backbones.base import Backbone, Conditioning
from prefalign.diffusion.schedule import NoiseSchedule
from prefalign.errors import PrefalignError

#: ``_class_name`` → model family ("sd" or "sdxl").
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
#: (family, inpainting) → the diffusers class that is loaded.
_PIPELINE_CLASSES = {
    ("sd", False): "StableDiffusionPipeline",
    ("sd", True): "StableDiffusionInpaintPipeline",
    ("sdxl", False): "StableDiffusionXLPipeline",
    ("sdxl", True): "StableDiffusionXLInpaintPipeline",
}
#: Components every pipeline of a family needs (others listed in model_index.json are checked too).
_REQUIRED_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}
#: Optional components that are never loaded (not needed to train or sample).
_SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")

DEFAULT_PROMPT_CACHE_SIZE = 50_000
#: Memory budget of the prompt cache (it lives on the text encoder's device): 1 GiB holds ~4 400 SD1.5
#: encodings (77×768 fp32) or ~1 700 SDXL ones; without a budget 50 000 Pick-a-Pic prompts would take
#: 12 GB (SD1.5) / 31 GB (SDXL) of GPU memory.
DEFAULT_PROMPT_CACHE_MIB = 1024.0
AESTHETIC_SCORE = 6.0  # diffusers' StableDiffusionXLInpaintPipeline defaults
NEGATIVE_AESTHETIC_SCORE = 2.5


class StableDiffusionBackbone(Backbone):
    """A Stable-Diffusion-family pipeline (SD 1.x/2.x, SDXL, their inpainting variants) as a
    :class:`Backbone`.

    Only the UNet trains: the VAE and text encoders are frozen (``requires_grad_(False)``, eval mode).
    ``self.pipeline`` is the full diffusers pipeline (for export); ``self.unet`` is ``pipeline.unet``.

    Args:
        pipeline: a loaded ``StableDiffusion[XL][Inpaint]Pipeline``.
        kind: "sd", "sdxl", "sd-inpaint" or "sdxl-inpaint"; inferred from the pipeline when None.
        clip_skip: passed to ``encode_prompt`` (None: the pipeline default).
        prompt_cache_size: how many prompt encodings to keep (least recently used are dropped).
        prompt_cache_mib: and at most this many MiB of them.
    """

    def __init__(
        self,
        pipeline,
        kind: str | None = None,
        clip_skip: int | None = None,
        prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
        prompt_cache_mib: float = DEFAULT_PROMPT_CACHE_MIB,
    ):
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.kind = kind or infer_kind(pipeline)
        if self.kind not in ("sd", "sdxl", "sd-inpaint", "sdxl-inpaint"):
            raise PrefalignError(
                f"unknown Stable Diffusion backbone kind {self.kind!r}; use sd, sdxl, sd-inpaint or sdxl-inpaint"
            )
        self.is_xl = self.kind.startswith("sdxl")
        self.clip_skip = clip_skip
        self.prompt_cache_size = int(prompt_cache_size)
        self.prompt_cache_mib = float(prompt_cache_mib)
        self._cache_bytes = 0
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.schedule = NoiseSchedule.from_scheduler(pipeline.scheduler)

        self.latent_channels = int(self.vae.config.latent_channels)
        in_channels = int(self.unet.config.in_channels)
        expected = 2 * self.latent_channels + 1 if self.is_inpainting else self.latent_channels
        if in_channels != expected:
            raise PrefalignError(
                f"a {self.kind} backbone needs a UNet with {expected} input channels, this one has {in_channels}; "
                "load the folder with load_backbone so the kind follows the UNet"
            )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.unet.config.sample_size
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        self.latent_size: tuple[int, int] = (int(h), int(w))
        #: (H, W) in pixels of the default resolution (the pipelines' default height/width).
        self.resolution: tuple[int, int] = (int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor)

        encoders = (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None))
        self.text_encoders = [m for m in encoders if m is not None]
        for module in [self.vae, *self.text_encoders]:
            module.requires_grad_(False).eval()
        self.unet.eval()

        self.aesthetic_score = AESTHETIC_SCORE
        self.negative_aesthetic_score = NEGATIVE_AESTHETIC_SCORE
        if self.is_xl:
            self._check_time_ids()
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    # --- prompts -------------------------------------------------------------------------------
    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: the unconditional branch is all zeros (not the encoded empty prompt)."""
        return self.is_xl and bool(self.pipeline.config.get("force_zeros_for_empty_prompt", False))

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts with the pipeline's own ``encode_prompt`` (no CFG duplication).

        Returns ``encoder_hidden_states`` [B, L, D]; for SDXL ``added_cond_kwargs`` ``text_embeds``
        [B, 1280] (pooled, projected output of text_encoder_2) and ``time_ids`` [B, 6] (or [B, 5] with
        aesthetic scores); ``sentence_embeddings`` [B, D'] (float32, L2-normalised): SDXL's pooled
        embedding, and for SD 1.x/2.x the text encoder's ``pooler_output`` (the final-layer-normed EOS
        token state, one extra text-encoder forward per new prompt), or None when the text encoder has
        no pooled output. Encodings are cached per prompt (the text encoders are frozen); call
        :meth:`clear_prompt_cache` after changing them.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PrefalignError("encode_prompts needs at least one prompt")
        rows: dict[str, dict[str, torch.Tensor]] = {}
        for prompt in prompts:
            if prompt in self._cache and prompt not in rows:
                self._cache.move_to_end(prompt)
                rows[prompt] = self._cache[prompt]
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        if missing:
            fresh = self._encode_uncached(missing)
            rows.update(fresh)
            if self.prompt_cache_size > 0:
                self._cache.update(fresh)
                self._cache_bytes += sum(_row_bytes(r) for r in fresh.values())
                while self._cache and (len(self._cache) > self.prompt_cache_size or self._cache_bytes > self.prompt_cache_mib * 2**20):
                    self._cache_bytes -= _row_bytes(self._cache.popitem(last=False)[1])
        batch = [rows[p] for p in prompts]
        added: dict[str, torch.Tensor] = {}
        if self.is_xl:
            added["text_embeds"] = torch.stack([r["text_embeds"] for r in batch])
            added["time_ids"] = self.time_ids(negative=False, dtype=added["text_embeds"].dtype).repeat(len(batch), 1)
        sentence = None
        if all("sentence" in r for r in batch):
            sentence = torch.stack([r["sentence"] for r in batch])
        cond = Conditioning(
            encoder_hidden_states=torch.stack([r["hidden"] for r in batch]),
            added_cond_kwargs=added,
            sentence_embeddings=sentence,
        )
        return cond.to(self.device)

    def empty_conditioning(self, batch_size: int) -> Conditioning:
        """The unconditional branch, as the pipelines build it: the encoded empty prompt; for SDXL
        with ``force_zeros_for_empty_prompt`` zeros instead (token states and pooled embedding), and
        the negative ``time_ids`` (which differ only with aesthetic scores). The sentence embedding
        stays that of the empty prompt."""
        cond = self.encode_prompts([""] * batch_size)
        if not self.is_xl:
            return cond
        added = dict(cond.added_cond_kwargs)
        negative_ids = self.time_ids(negative=True, dtype=added["time_ids"].dtype)
        added["time_ids"] = negative_ids.repeat(batch_size, 1).to(self.device)
        hidden = cond.encoder_hidden_states
        if self.force_zeros_for_empty_prompt:
            hidden = torch.zeros_like(hidden)
            added["text_embeds"] = torch.zeros_like(added["text_embeds"])
        return Conditioning(hidden, added, None, cond.sentence_embeddings)

    def clear_prompt_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        pipe = self.pipeline
        device = self.text_encoders[-1].device
        rows: list[dict[str, torch.Tensor]] = [{} for _ in prompts]
        if self.is_xl:
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=self.clip_skip,
            )
            sentence = F.normalize(pooled.float(), dim=-1)
            for i, row in enumerate(rows):
                row["text_embeds"] = pooled[i]
                row["sentence"] = sentence[i]
        else:
            hidden, _ = pipe.encode_prompt(prompts, device, 1, False, clip_skip=self.clip_skip)
            pooled = self._sd_pooled_output(prompts, device)
            if pooled is not None:
                sentence = F.normalize(pooled.float(), dim=-1)
                for i, row in enumerate(rows):
                    row["sentence"] = sentence[i]
        for i, row in enumerate(rows):
            row["hidden"] = hidden[i]
        return dict(zip(prompts, rows))

    def _sd_pooled_output(self, prompts: list[str], device: torch.device) -> torch.Tensor | None:
        """SD 1.x/2.x: ``text_encoder(ids).pooler_output`` [B, D], tokenised as ``encode_prompt`` does."""
        tokenizer, text_encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        inputs = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        attention_mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            attention_mask = inputs.attention_mask.to(device)
        output = text_encoder(inputs.input_ids.to(device), attention_mask=attention_mask)
        return getattr(output, "pooler_output", None)

    # --- SDXL micro-conditioning -----------------------------------------------------------------
    @property
    def requires_aesthetics_score(self) -> bool:
        return self.is_xl and bool(self.pipeline.config.get("requires_aesthetics_score", False))

    def time_ids(self, negative: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """SDXL ``time_ids`` [1, n] at the default resolution (H, W): (H, W, 0, 0, H, W), or with
        ``requires_aesthetics_score`` (H, W, 0, 0, score) where the score is 6.0 (2.5 when
        ``negative``), as ``_get_add_time_ids`` of the SDXL pipelines with their default arguments."""
        height, width = self.resolution
        if self.requires_aesthetics_score:
            ids = [height, width, 0, 0, self.negative_aesthetic_score if negative else self.aesthetic_score]
        else:
            ids = [height, width, 0, 0, height, width]
        return torch.tensor([ids], dtype=dtype)

    def _check_time_ids(self) -> None:
        text_encoder_2 = getattr(self.pipeline, "text_encoder_2", None)
        if text_encoder_2 is None:
            return
        add_embedding = getattr(self.unet, "add_embedding", None)
        time_dim = getattr(self.unet.config, "addition_time_embed_dim", None)
        if add_embedding is None or time_dim is None:
            raise PrefalignError(
                f"the {self.kind} UNet has no text_time embedding "
                f"(addition_embed_type={self.unet.config.addition_embed_type!r}); "
                "is this really an SDXL pipeline? Check unet/config.json"
            )
        passed = int(time_dim) * self.time_ids().shape[1] + int(text_encoder_2.config.projection_dim)
        expected = add_embedding.linear_1.in_features
        if passed != expected:
            raise PrefalignError(
                f"the SDXL UNet expects an added embedding of size {expected} but the time ids and text_encoder_2 give "
                f"{passed}; check requires_aesthetics_score in model_index.json and projection_dim in "
                "text_encoder_2/config.json"
            )

    # --- latents -------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, *self.latent_size)

    def _check_images(self, images: torch.Tensor, what: str = "images") -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise PrefalignError(f"{what} must be a [B, 3, H, W] tensor in [0, 1], got shape {tuple(images.shape)}")
        if images.shape[-2] % self.vae_scale_factor or images.shape[-1] % self.vae_scale_factor:
            raise PrefalignError(
                f"{what} of size {tuple(images.shape[-2:])} are not divisible by the VAE factor "
                f"{self.vae_scale_factor}; "
                f"resize them (the default resolution is {self.resolution})"
            )

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → scaled latents: the VAE posterior *mean* (``latent_dist.mode()``),
        deterministic, unlike diffusers' ``retrieve_latents`` which samples it (the posterior std of
        SD's VAE is tiny, so the difference is negligible). Scaling: (z − shift)·scaling_factor, or
        (z − latents_mean)·scaling_factor/latents_std where the VAE config has them."""
        encoded = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype))
        dist = getattr(encoded, "latent_dist", None)
        z = dist.mode() if dist is not None else encoded.latents
        config = self.vae.config
        scaling = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            return (z - mean) * scaling / std
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            z = z - float(shift)
        return z * scaling

    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → latents [B, 4, H/f, W/f] (VAE mean × scaling factor; see
        :meth:`_encode_pixels`), in the images' dtype, on the backbone's device."""
        self._check_images(images)
        return self._encode_pixels(images * 2 - 1).to(device=self.device, dtype=images.dtype)

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → [B, 3, H, W] in [0, 1] (clamped): the inverse scaling, ``vae.decode``, then
        (x + 1)/2. Differentiable with respect to the latents (the VAE's weights are frozen)."""
        config = self.vae.config
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        scaling = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std / scaling + mean
        else:
            z = z / scaling
            shift = getattr(config, "shift_factor", None)
            if shift is not None:
                z = z + float(shift)
        pixels = self.vae.decode(z).sample
        return ((pixels + 1) / 2).clamp(0, 1).to(device=latents.device, dtype=latents.dtype)

    # --- inpainting ----------------------------------------------------------------------------
    def inpaint_conditioning(self, cond: Conditioning, images: torch.Tensor, masks: torch.Tensor) -> Conditioning:
        """Attach the inpainting condition: ``cond.with_concat([mask, masked-image latents])``.

        images: [B, 3, H, W] in [0, 1]; masks: [B, 1, H, W] or [B, H, W], 1 = region to repaint,
        binarised at 0.5 like diffusers' mask processor. As ``StableDiffusionInpaintPipeline``: the
        masked image is (2·image − 1)·(mask < 0.5), encoded by the VAE (mean, see
        :meth:`_encode_pixels`); the mask is resized to latent size with nearest interpolation.
        concat: [B, 1 + 4, H/f, W/f], in the order of the pipelines' UNet input
        ``[x_t, mask, masked_image_latents]``.
        """
        if not self.is_inpainting:
            raise PrefalignError(f"inpaint_conditioning needs an inpainting model; this backbone is {self.kind!r}")
        self._check_images(images)
        if masks.ndim == 3:
            masks = masks[:, None]
        batch, _, height, width = images.shape
        if masks.ndim != 4 or tuple(masks.shape) != (batch, 1, height, width):
            raise PrefalignError(
                f"masks must be [B, 1, H, W] matching the images {tuple(images.shape)}, got {tuple(masks.shape)}"
            )
        if len(cond) != images.shape[0]:
            raise PrefalignError(
                f"got {len(cond)} prompts for {images.shape[0]} images to inpaint; give one prompt per image"
            )
        masks = (masks.to(device=images.device, dtype=images.dtype) >= 0.5).to(images.dtype)  # [B, 1, H, W]
        masked_pixels = (images * 2 - 1) * (masks < 0.5)  # the hole is 0 in [-1, 1]
        masked_latents = self._encode_pixels(masked_pixels).to(device=self.device, dtype=images.dtype)  # [B, 4, h, w]
        small_masks = F.interpolate(masks, size=masked_latents.shape[-2:]).to(self.device)  # [B, 1, h, w]
        return cond.with_concat(torch.cat([small_masks, masked_latents], dim=1))

    # --- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Save the whole pipeline (diffusers layout, safetensors). Merge or remove LoRA adapters first."""
        path = Path(path)
        self.pipeline.save_pretrained(path, safe_serialization=True)
        return path


def _row_bytes(row: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in row.values())


def infer_kind(pipeline) -> str:
    """"sd"/"sdxl" from the pipeline's text encoders, + "-inpaint" for a 9-channel UNet."""
    is_xl = getattr(pipeline, "text_encoder_2", None) is not None or "XL" in type(pipeline).__name__
    family = "sdxl" if is_xl else "sd"
    latent_channels = int(pipeline.vae.config.latent_channels)
    inpaint = int(pipeline.unet.config.in_channels) == 2 * latent_channels + 1
    return family + ("-inpaint" if inpaint else "")


# --------------------------------------------------------------------------------------------------
# Loading from a folder
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrefalignError(f"cannot read {what} {path}: {error}; replace it with a valid JSON file") from error
    if not isinstance(data, dict):
        raise PrefalignError(f"{what} {path} is not a JSON object; replace it with a valid diffusers file")
    return data


def _weight_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]


def _component_problem(path: Path, name: str, class_name: str) -> str | None:
    """Why component ``name`` of a pipeline folder cannot load, or None."""
    folder = path / name
    if not folder.is_dir():
        return f"{name} (no {name}/ folder)"
    files = {p.name for p in folder.iterdir()}
    if "Scheduler" in class_name:
        return None if "scheduler_config.json" in files else f"{name} (no {name}/scheduler_config.json)"
    if "Tokenizer" in class_name:
        if files & {"tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model"}:
            return None
        return f"{name} (no tokenizer files in {name}/)"
    if "config.json" not in files:
        return f"{name} (no {name}/config.json)"
    if not _weight_files(folder):
        return f"{name} (no weights in {name}/)"
    return None


def check_pipeline_folder(path: str | Path) -> tuple[str, dict]:
    """Validate a diffusers pipeline folder without loading it: returns (family, model_index).

    Raises :class:`PrefalignError` naming the missing components or the unsupported class."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PrefalignError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); give the folder saved by save_pretrained"
        )
    index = _read_json(index_file, "pipeline index")
    class_name = index.get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise PrefalignError(
            f"pipeline class {class_name!r} in {index_file} is not supported; "
            f"supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    family = SUPPORTED_PIPELINES[class_name]
    problems = []
    names = dict.fromkeys([*_REQUIRED_COMPONENTS[family], *(k for k in index if not k.startswith("_"))])
    for name in names:
        if name in _SKIPPED_COMPONENTS:
            continue
        entry = index.get(name)
        if name not in index or entry is None or (isinstance(entry, list) and (len(entry) != 2 or entry[1] is None)):
            if name in _REQUIRED_COMPONENTS[family]:
                problems.append(f"{name} (not listed in model_index.json)")
            continue
        if not isinstance(entry, list):
            continue  # a config value such as force_zeros_for_empty_prompt
        problem = _component_problem(path, name, str(entry[1]))
        if problem:
            problems.append(problem)
    if problems:
        raise PrefalignError(
            f"the diffusers pipeline in {path} is incomplete: missing {', '.join(problems)}; "
            "copy or download the complete pipeline folder (every component listed in model_index.json)"
        )
    return family, index


def _variant(path: Path, index: dict) -> str | None:
    """"fp16" when the model components only have ``*.fp16.*`` weight files (a variant download)."""
    has_plain, has_fp16 = False, False
    for name, entry in index.items():
        if name.startswith("_") or name in _SKIPPED_COMPONENTS or not isinstance(entry, list) or entry[1] is None:
            continue
        if not (path / name).is_dir():
            continue
        for file in _weight_files(path / name):
            if ".fp16." in file:
                has_fp16 = True
            else:
                has_plain = True
    return "fp16" if has_fp16 and not has_plain else None


def load_diffusers_backbone(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_skip: int | None = None,
) -> StableDiffusionBackbone:
    """Load a Stable-Diffusion-family pipeline from a local folder (never downloads:
    ``local_files_only=True``) as a :class:`StableDiffusionBackbone`.

    The class comes from model_index.json's ``_class_name`` and the UNet: a 9-channel UNet loads the
    inpainting pipeline of its family. The safety checker, feature extractor and image encoder are
    not loaded. In float16 a VAE with ``force_upcast`` (SDXL's) stays in float32, as the pipelines
    upcast it to decode.
    """
    path = Path(path)
    if not path.is_dir():
        raise PrefalignError(
            f"diffusers pipeline folder {path} does not exist; give the path of a local pipeline folder"
        )
    family, index = check_pipeline_folder(path)
    unet_config = _read_json(path / "unet" / "config.json", "UNet config")
    vae_config = _read_json(path / "vae" / "config.json", "VAE config")
    latent_channels = int(vae_config.get("latent_channels", 4))
    in_channels = int(unet_config.get("in_channels", latent_channels))
    if in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise PrefalignError(
            f"the UNet in {path} has {in_channels} input channels; supported are {latent_channels} (text-to-image) "
            f"and {2 * latent_channels + 1} (inpainting)"
        )
    inpaint = in_channels == 2 * latent_channels + 1

    import diffusers

    class_name = _PIPELINE_CLASSES[(family, inpaint)]
    pipeline_class = getattr(diffusers, class_name)
    extra: dict = {name: None for name in _SKIPPED_COMPONENTS if name in index}
    if family == "sd":
        extra["requires_safety_checker"] = False
    else:
        extra["add_watermarker"] = False
    variant = _variant(path, index)
    if variant:
        extra["variant"] = variant
    try:
        pipeline = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PrefalignError(
            f"could not load the {class_name} in {path}: {message}; check that the folder is a complete, "
            "uncorrupted diffusers pipeline"
        ) from error
    if dtype == torch.float16 and getattr(pipeline.vae.config, "force_upcast", False):
        pipeline.vae.to(torch.float32)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return StableDiffusionBackbone(pipeline, kind=family + ("-inpaint" if inpaint else ""), clip_skip=clip_skip)
