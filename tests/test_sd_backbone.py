"""StableDiffusionBackbone and load_backbone on tiny random SD / SDXL / inpainting pipelines.

The pipelines are built in code (tests/tiny_pipelines.py), saved to disk and loaded back by path, so
the real loading code runs. Parity checks compare against diffusers itself: ``encode_prompt``, the
UNet called with diffusers' CFG formula, and the full pipeline ``__call__`` with DDIM.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from prefalign.backbones import loading
from prefalign.backbones.diffusers_sd import SUPPORTED_PIPELINES, StableDiffusionBackbone
from prefalign.backbones.loading import load_backbone
from prefalign.diffusion.ddim import ddim_sample
from prefalign.errors import PrefalignError
from tiny_pipelines import make_tiny_sd, make_tiny_sd_inpaint, make_tiny_sdxl, make_tiny_sdxl_inpaint

PROMPTS = ["a red cat on the mat", "the blue dog"]
RESOLUTION = 16  # tiny pipelines: latent 8 × 8, VAE factor 2
GUIDANCE = 3.0

BUILDERS = {
    "sd": (make_tiny_sd, {}),
    "sd-v": (make_tiny_sd, {"prediction_type": "v_prediction"}),
    "sdxl": (make_tiny_sdxl, {}),
    "sd-inpaint": (make_tiny_sd_inpaint, {}),
    "sdxl-inpaint": (make_tiny_sdxl_inpaint, {}),
    "sdxl-inpaint-aesthetic": (make_tiny_sdxl_inpaint, {"requires_aesthetics_score": True}),
}
EXPECTED_KIND = {
    "sd": "sd",
    "sd-v": "sd",
    "sdxl": "sdxl",
    "sd-inpaint": "sd-inpaint",
    "sdxl-inpaint": "sdxl-inpaint",
    "sdxl-inpaint-aesthetic": "sdxl-inpaint",
}
ALL = list(BUILDERS)
XL = [name for name in ALL if name.startswith("sdxl")]
INPAINT = [name for name in ALL if "inpaint" in name]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: builder(root / name, **kwargs) for name, (builder, kwargs) in BUILDERS.items()}


@pytest.fixture(scope="module")
def backbones(folders):
    return {name: load_backbone(path) for name, path in folders.items()}


def _inputs(backbone: StableDiffusionBackbone, seed: int = 0):
    """Prompts' conditioning (with the inpainting condition where needed), x_T, images, masks."""
    generator = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompts(PROMPTS)
    x_T = backbone.initial_latents(len(PROMPTS), generator)
    images = torch.rand(len(PROMPTS), 3, RESOLUTION, RESOLUTION, generator=generator)
    masks = torch.zeros(len(PROMPTS), 1, RESOLUTION, RESOLUTION)
    masks[0, :, 4:12, 2:10] = 1.0  # a hole
    masks[1, :, :, 8:] = 1.0  # outpaint the right half
    if backbone.is_inpainting:
        cond = backbone.inpaint_conditioning(cond, images, masks)
    return cond, x_T, images, masks


# --- loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_loads_by_path_with_kind_shapes_and_frozen_parts(backbones, name):
    backbone = backbones[name]
    assert isinstance(backbone, StableDiffusionBackbone)
    assert backbone.kind == EXPECTED_KIND[name]
    assert backbone.latent_shape == (4, 8, 8)
    assert backbone.resolution == (RESOLUTION, RESOLUTION)
    assert backbone.unet is backbone.pipeline.unet
    assert backbone.unet.config.in_channels == (9 if "inpaint" in name else 4)
    assert backbone.schedule.prediction_type == ("v_prediction" if name == "sd-v" else "epsilon")
    frozen = [backbone.pipeline.vae, backbone.pipeline.text_encoder] + (
        [backbone.pipeline.text_encoder_2] if name in XL else []
    )
    assert all(not p.requires_grad for module in frozen for p in module.parameters())
    trainable = backbone.trainable_parameters()
    assert len(trainable) == len(list(backbone.unet.parameters())) > 0


# --- prompts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd", "sd-inpaint"])
def test_sd_encoding_equals_pipeline_encode_prompt(backbones, name):
    backbone = backbones[name]
    cond = backbone.encode_prompts(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 16, 32)
    assert cond.added_cond_kwargs == {}
    with torch.no_grad():
        expected, _ = backbone.pipeline.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(cond.encoder_hidden_states, expected, rtol=0, atol=1e-6)
    # sentence embeddings: the normalised pooled output of the text encoder
    tokenizer, text_encoder = backbone.pipeline.tokenizer, backbone.pipeline.text_encoder
    ids = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = text_encoder(ids).pooler_output
    torch.testing.assert_close(cond.sentence_embeddings, F.normalize(pooled, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.sentence_embeddings.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("name", XL)
def test_sdxl_encoding_equals_pipeline_encode_prompt_and_time_ids(backbones, name):
    backbone = backbones[name]
    pipeline = backbone.pipeline
    cond = backbone.encode_prompts(PROMPTS)
    n_ids = 5 if name == "sdxl-inpaint-aesthetic" else 6
    assert cond.encoder_hidden_states.shape == (2, 16, 64)  # both encoders' states concatenated
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 32)
    assert cond.added_cond_kwargs["time_ids"].shape == (2, n_ids)
    with torch.no_grad():
        hidden, _, pooled, _ = pipeline.encode_prompt(prompt=PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.encoder_hidden_states, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.sentence_embeddings, F.normalize(pooled, dim=-1), rtol=0, atol=1e-6)
    size = (RESOLUTION, RESOLUTION)
    if name == "sdxl":
        expected = pipeline._get_add_time_ids(size, (0, 0), size, torch.float32, text_encoder_projection_dim=32)
        expected_negative = expected
    else:
        expected, expected_negative = pipeline._get_add_time_ids(
            size, (0, 0), size, 6.0, 2.5, size, (0, 0), size, torch.float32, text_encoder_projection_dim=32
        )
    torch.testing.assert_close(cond.added_cond_kwargs["time_ids"], expected.repeat(2, 1))
    uncond = backbone.empty_conditioning(2)
    torch.testing.assert_close(uncond.added_cond_kwargs["time_ids"], expected_negative.repeat(2, 1))
    # force_zeros_for_empty_prompt (the SDXL default): the unconditional branch is zeros
    assert torch.count_nonzero(uncond.encoder_hidden_states) == 0
    assert torch.count_nonzero(uncond.added_cond_kwargs["text_embeds"]) == 0


def test_prompt_cache_gives_identical_rows_in_any_order(backbones):
    backbone = backbones["sdxl"]
    backbone.clear_prompt_cache()
    first = backbone.encode_prompts(PROMPTS)
    assert set(backbone._cache) == set(PROMPTS)
    mixed = backbone.encode_prompts([PROMPTS[1], "a new prompt", PROMPTS[0], PROMPTS[1]])
    assert len(mixed) == 4 and "a new prompt" in backbone._cache
    torch.testing.assert_close(mixed.encoder_hidden_states[2], first.encoder_hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed.encoder_hidden_states[3], first.encoder_hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed.added_cond_kwargs["text_embeds"][0], first.added_cond_kwargs["text_embeds"][1])
    assert not torch.allclose(mixed.encoder_hidden_states[1], mixed.encoder_hidden_states[0])


# --- the denoiser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_guided_eps_equals_unet_with_diffusers_cfg(backbones, name):
    """One guided ε prediction against pipeline.unet called as the pipelines call it."""
    backbone = backbones[name]
    pipeline = backbone.pipeline
    cond, _, _, _ = _inputs(backbone)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = 501
    ours = backbone.predict_eps(x_t, t, cond, guidance_scale=GUIDANCE)
    with torch.no_grad():
        if name == "sd":
            positive, negative = pipeline.encode_prompt(PROMPTS, "cpu", 1, True)
            added = None
        else:
            positive, negative, pooled, negative_pooled = pipeline.encode_prompt(prompt=PROMPTS, device="cpu")
            time_ids = backbone.time_ids().repeat(4, 1)
            added = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids}
        out = pipeline.unet(
            torch.cat([x_t, x_t]),
            torch.tensor(t),
            encoder_hidden_states=torch.cat([negative, positive]),
            added_cond_kwargs=added,
        ).sample
    uncond, text = out.chunk(2)
    assert (text - uncond).abs().max() > 1e-4  # the prompt matters, so the check has teeth
    expected = uncond + GUIDANCE * (text - uncond)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_v_prediction_is_converted_to_eps(backbones):
    backbone = backbones["sd-v"]
    cond = backbone.encode_prompts(PROMPTS)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = 700
    with torch.no_grad():
        v = backbone.pipeline.unet(x_t, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        eps = backbone.predict_eps(x_t, t, cond)
    alpha_bar = backbone.pipeline.scheduler.alphas_cumprod[t]
    expected = alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x_t  # diffusers DDIMScheduler's pred_epsilon
    torch.testing.assert_close(eps, expected, rtol=0, atol=1e-5)
    assert (eps - v).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_ddim_sample_and_decode(backbones, name):
    backbone = backbones[name]
    cond, x_T, _, _ = _inputs(backbone)
    x_0 = ddim_sample(backbone.eps_fn(cond, guidance_scale=GUIDANCE), x_T, backbone.schedule, 2)
    assert x_0.shape == (2, 4, 8, 8)
    assert torch.isfinite(x_0).all()
    with torch.no_grad():
        images = backbone.latents_to_images(x_0)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", ALL)
def test_ddim_sampling_equals_the_diffusers_pipeline(backbones, name):
    """Our DDIM sampler + eps_fn reproduce the pipeline's own __call__ (DDIM, CFG 3, 2 steps)."""
    backbone = backbones[name]
    cond, x_T, images, masks = _inputs(backbone)
    ours = ddim_sample(backbone.eps_fn(cond, guidance_scale=GUIDANCE), x_T, backbone.schedule, 2)
    extra = {}
    if backbone.is_inpainting:  # our (deterministic) masked-image latents, the pipeline's mask handling
        extra = {"image": images, "mask_image": masks, "masked_image_latents": cond.concat[:, 1:], "strength": 1.0}
    reference = backbone.pipeline(
        prompt=PROMPTS,
        latents=x_T.clone(),
        num_inference_steps=2,
        guidance_scale=GUIDANCE,
        output_type="latent",
        **extra,
    ).images
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


# --- latents and inpainting ----------------------------------------------------------------------------


def test_images_to_latents_is_the_scaled_vae_mean(backbones):
    backbone = backbones["sd"]
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(3))
    latents = backbone.images_to_latents(images)
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(backbone.images_to_latents(images), latents, rtol=0, atol=0)  # deterministic
    with torch.no_grad():
        mean = backbone.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents, mean * backbone.vae.config.scaling_factor)
    with torch.no_grad():
        decoded = backbone.vae.decode(latents / backbone.vae.config.scaling_factor).sample
    torch.testing.assert_close(backbone.latents_to_images(latents), ((decoded + 1) / 2).clamp(0, 1))
    with pytest.raises(PrefalignError):
        backbone.images_to_latents(torch.rand(1, 3, 15, 16))


def test_decoding_is_differentiable_in_the_latents(backbones):
    backbone = backbones["sd"]
    latents = (0.1 * torch.randn(1, 4, 8, 8)).requires_grad_(True)
    backbone.latents_to_images(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.vae.parameters())


@pytest.mark.parametrize("name", INPAINT)
def test_inpaint_condition_matches_diffusers_preprocessing(backbones, name):
    backbone = backbones[name]
    pipeline = backbone.pipeline
    cond, x_T, images, masks = _inputs(backbone)
    assert cond.concat.shape == (2, 5, 8, 8)
    # diffusers' own preprocessing: [-1, 1] image, binarised mask, image · (mask < 0.5), nearest resize
    init_image = pipeline.image_processor.preprocess(images, height=RESOLUTION, width=RESOLUTION)
    mask_condition = pipeline.mask_processor.preprocess(masks, height=RESOLUTION, width=RESOLUTION)
    with torch.no_grad():
        masked_latents = pipeline.vae.encode(init_image * (mask_condition < 0.5)).latent_dist.mode()
    expected_mask = F.interpolate(mask_condition, size=(8, 8))
    torch.testing.assert_close(cond.concat[:, :1], expected_mask, rtol=0, atol=0)
    scaling = pipeline.vae.config.scaling_factor
    torch.testing.assert_close(cond.concat[:, 1:], masked_latents * scaling, rtol=0, atol=1e-5)
    # the UNet sees 9 channels: x_t, mask, masked-image latents
    seen = []
    hook = backbone.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    try:
        backbone.predict_eps(x_T, 500, cond, guidance_scale=GUIDANCE)
    finally:
        hook.remove()
    assert seen == [torch.Size([4, 9, 8, 8])]


def test_inpaint_conditioning_errors(backbones):
    sd, inpaint = backbones["sd"], backbones["sd-inpaint"]
    images, masks = torch.rand(2, 3, RESOLUTION, RESOLUTION), torch.ones(2, 1, RESOLUTION, RESOLUTION)
    with pytest.raises(PrefalignError, match="inpainting"):
        sd.inpaint_conditioning(sd.encode_prompts(PROMPTS), images, masks)
    with pytest.raises(PrefalignError, match="masks"):
        inpaint.inpaint_conditioning(inpaint.encode_prompts(PROMPTS), images, masks[:, :, :8])
    with pytest.raises(PrefalignError, match="prompt"):
        inpaint.inpaint_conditioning(inpaint.encode_prompts(PROMPTS[:1]), images, masks)


# --- dtype ---------------------------------------------------------------------------------------------


def test_dtype_is_respected(folders):
    backbone = load_backbone(folders["sd"], dtype=torch.bfloat16)
    assert backbone.dtype == torch.bfloat16 and backbone.vae.dtype == torch.bfloat16
    cond = backbone.encode_prompts(PROMPTS)
    x_t = torch.randn(2, 4, 8, 8)
    eps = backbone.predict_eps(x_t, 500, cond, guidance_scale=GUIDANCE)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


# --- errors and dispatch ---------------------------------------------------------------------------------


def _copy(folder, tmp_path):
    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    return copy


def test_missing_path(tmp_path):
    with pytest.raises(PrefalignError, match="not found"):
        load_backbone(tmp_path / "nope")
    with pytest.raises(PrefalignError, match="not found"):
        load_backbone("some-org/some-hub-model")


def test_empty_folder_and_file(tmp_path):
    with pytest.raises(PrefalignError, match="model_index.json") as error:
        load_backbone(tmp_path)
    assert "\n" not in str(error.value)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(PrefalignError, match="is a file"):
        load_backbone(file)


def test_missing_component_is_named(folders, tmp_path):
    copy = _copy(folders["sd"], tmp_path)
    shutil.rmtree(copy / "vae")
    with pytest.raises(PrefalignError, match="vae") as error:
        load_backbone(copy)
    assert "unet" not in str(error.value) and "\n" not in str(error.value)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (copy / "tokenizer" / "tokenizer.json").unlink()
    (copy / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(PrefalignError) as error:
        load_backbone(copy)
    assert all(name in str(error.value) for name in ("vae", "unet", "tokenizer"))


def test_missing_sdxl_second_encoder_is_named(folders, tmp_path):
    copy = _copy(folders["sdxl"], tmp_path)
    index = json.loads((copy / "model_index.json").read_text())
    del index["text_encoder_2"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PrefalignError, match="text_encoder_2"):
        load_backbone(copy)


def test_unsupported_pipeline_class_lists_supported(folders, tmp_path):
    copy = _copy(folders["sd"], tmp_path)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PrefalignError, match="KandinskyPipeline") as error:
        load_backbone(copy)
    assert all(name in str(error.value) for name in SUPPORTED_PIPELINES)


def test_nine_channel_unet_under_a_text_to_image_class_loads_as_inpainting(folders, tmp_path):
    copy = _copy(folders["sd-inpaint"], tmp_path)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    backbone = load_backbone(copy)
    assert backbone.kind == "sd-inpaint"
    assert type(backbone.pipeline).__name__ == "StableDiffusionInpaintPipeline"


def test_shapes_names_and_folders_go_to_the_shapes_loader(tmp_path, monkeypatch):
    calls = []

    def fake_loader(path, device, dtype):
        calls.append(str(path))
        return "shapes"

    monkeypatch.setattr(loading, "load_shapes_backbone", fake_loader)
    assert load_backbone("shapes-t2i") == "shapes"
    (tmp_path / "prefalign.json").write_text("{}")
    assert load_backbone(tmp_path) == "shapes"
    assert calls == ["shapes-t2i", str(tmp_path)]
