"""Tiny, randomly initialised Stable-Diffusion-family pipelines, built in code and saved to disk.

Tests load them back through the real loading code (``load_backbone(path)``), so everything from
``model_index.json`` to the tokenizer files is exercised without a download. Every builder is
deterministic (fixed seed) and takes well under a second on one CPU core.

Sizes: UNet block_out_channels (32, 64) with one layer per block, latent 4 × 8 × 8; VAE
block_out_channels (32, 64) → scale factor 2, so images are 16 × 16; CLIP text encoders with hidden
size 32, 2 layers, 4 heads, 16 tokens; a byte-level CLIP BPE tokenizer whose vocabulary (every byte,
every byte + ``</w>``, a handful of merges, the two special tokens) is written to disk here.
The SDXL configs follow diffusers' own ``get_dummy_components`` (tests/pipelines/stable_diffusion_xl):
cross-attention dim = 32 + 32 (both encoders' hidden states concatenated), ``addition_embed_type=
"text_time"``, ``projection_class_embeddings_input_dim = n_time_ids · addition_time_embed_dim +
projection_dim``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 0
MAX_TOKENS = 16
HIDDEN_SIZE = 32
PROJECTION_DIM = 32
ADDITION_TIME_EMBED_DIM = 8
LATENT_SIZE = 8  # UNet sample_size; images are LATENT_SIZE * 2 pixels square
VOCAB_SIZE = 1000

_MERGES = ["t h", "th e</w>", "a n", "i n", "o n</w>", "r e", "e d</w>", "c a", "ca t</w>", "a t</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable unicode character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt of a tiny byte-level CLIP BPE vocabulary; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return folder


def make_tiny_tokenizer(folder: str | Path):
    """A ``CLIPTokenizer`` read from tiny vocabulary files written into ``folder``."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=PROJECTION_DIM,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=2 * LATENT_SIZE,
        scaling_factor=scaling_factor,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _unet(in_channels: int, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        **extra,
    )


def _sd_components(folder: Path, in_channels: int, prediction_type: str) -> dict:
    from transformers import CLIPTextModel

    tokenizer = make_tiny_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return dict(
        vae=_vae(0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(in_channels, HIDDEN_SIZE),
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_components(folder: Path, in_channels: int, n_time_ids: int) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tiny_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    unet = _unet(
        in_channels,
        2 * HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=n_time_ids * ADDITION_TIME_EMBED_DIM + PROJECTION_DIM,
        transformer_layers_per_block=1,
        use_linear_projection=True,
    )
    return dict(
        vae=_vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
    )


def _save(pipeline, path: str | Path) -> Path:
    import shutil

    path = Path(path)
    pipeline.save_pretrained(path, safe_serialization=True)
    shutil.rmtree(path / "_tokenizer_src", ignore_errors=True)
    return path


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """A tiny SD 1.x-style ``StableDiffusionPipeline`` (ε or v prediction) saved to ``path``."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    return _save(StableDiffusionPipeline(**_sd_components(path, 4, prediction_type)), path)


def make_tiny_sd_inpaint(path: str | Path) -> Path:
    """A tiny ``StableDiffusionInpaintPipeline`` (9-channel UNet) saved to ``path``."""
    from diffusers import StableDiffusionInpaintPipeline

    path = Path(path)
    return _save(StableDiffusionInpaintPipeline(**_sd_components(path, 9, "epsilon")), path)


def make_tiny_sdxl(path: str | Path, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A tiny ``StableDiffusionXLPipeline`` (two text encoders, text_time embedding) saved to ``path``."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    pipeline = StableDiffusionXLPipeline(
        **_sdxl_components(path, 4, 6), force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False
    )
    return _save(pipeline, path)


def make_tiny_sdxl_inpaint(path: str | Path, requires_aesthetics_score: bool = False) -> Path:
    """A tiny ``StableDiffusionXLInpaintPipeline`` (9-channel UNet) saved to ``path``.

    With ``requires_aesthetics_score=True`` the time ids are (H, W, top, left, aesthetic score): 5 values,
    as in the SDXL refiner."""
    from diffusers import StableDiffusionXLInpaintPipeline

    path = Path(path)
    pipeline = StableDiffusionXLInpaintPipeline(
        **_sdxl_components(path, 9, 5 if requires_aesthetics_score else 6),
        requires_aesthetics_score=requires_aesthetics_score,
        add_watermarker=False,
    )
    return _save(pipeline, path)
