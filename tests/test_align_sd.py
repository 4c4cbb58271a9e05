"""Two-step runs of every method on tiny SD and SDXL pipeline folders, and the export loaded back
by diffusers itself (``pipeline.load_lora_weights(RUN/export)``, ``UNet2DConditionModel.from_pretrained``)."""

from __future__ import annotations

import math

import pytest
import torch

from test_trainer import tiny_config, write_pairs
from tiny_pipelines import make_tiny_sd, make_tiny_sdxl

from prefalign.training.trainer import Trainer


def colour_embedding(images: torch.Tensor) -> torch.Tensor:
    """A toy image encoder for RPO's image weights: mean colour + spread, [B, 6]."""
    return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {"sd": make_tiny_sd(root / "sd"), "sdxl": make_tiny_sdxl(root / "sdxl"), "pairs": write_pairs(root / "pairs", count=8)}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["sft", "dpo", "rpo", "inpo"])
def test_two_steps_of_every_method(folders, tmp_path, family, method):
    extra = {"checkpoint.every": 1, "export.enabled": False}
    if method == "rpo":
        extra["rpo.embedding"] = "both"
        extra["rpo.image_encoder"] = "test_align_sd:colour_embedding"
    if method == "inpo":
        extra["inpo.inversion_steps"] = 20
    result = Trainer(tiny_config(folders[family], folders["pairs"], method=method, steps=2, **extra), tmp_path / "run").train()
    final = result.metrics["final"]
    assert result.steps == 2 and math.isfinite(final["loss"]) and final["grad_norm"] > 0
    if method != "sft":
        assert 0 <= final["implicit_accuracy"] <= 1


def _unet_inputs(backbone, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *backbone.latent_shape, generator=g)
    cond = backbone.encode_prompts(["a red cat", "the blue dog"])
    return x, torch.tensor([5, 600]), cond


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_export_loads_in_diffusers_and_samples(folders, tmp_path, family):
    import diffusers

    config = tiny_config(folders[family], folders["pairs"], method="dpo", steps=2, **{"finetune.alpha": 8, "optimizer.learning_rate": 1e-2})
    result = Trainer(config, tmp_path / "run").train()
    export = tmp_path / "run" / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()

    policy = result.backbone
    x, t, cond = _unet_inputs(policy)
    with torch.no_grad():
        trained = policy.model_output(x, t, cond)
        policy.unet.disable_adapters()
        base = policy.model_output(x, t, cond)
        policy.unet.enable_adapters()
    assert not torch.allclose(trained, base, atol=1e-4)  # the LoRA learned something

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {"add_watermarker": False} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipeline = cls.from_pretrained(folders[family], local_files_only=True, **extra)
    pipeline.load_lora_weights(export)
    with torch.no_grad():
        loaded = pipeline.unet(
            x, t, encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs or None
        ).sample
    assert torch.allclose(loaded, trained, atol=1e-5)  # same network as the trained policy (alpha/rank included)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a red cat", num_inference_steps=2, height=16, width=16, output_type="np", guidance_scale=2.0).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_full_finetuning_exports_a_unet_folder(folders, tmp_path):
    from diffusers import UNet2DConditionModel

    from prefalign.backbones.loading import load_backbone

    config = tiny_config(folders["sd"], folders["pairs"], method="dpo", steps=2, **{"finetune.mode": "full", "export.merged_pipeline": True})
    result = Trainer(config, tmp_path / "run").train()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "export" / "unet")
    policy = result.backbone
    x, t, cond = _unet_inputs(policy)
    with torch.no_grad():
        expected = policy.model_output(x, t, cond)
        got = unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
    assert torch.allclose(expected, got, atol=1e-6)
    merged = load_backbone(tmp_path / "run" / "export" / "pipeline")  # a complete pipeline every --model accepts
    with torch.no_grad():
        assert torch.allclose(merged.model_output(x, t, cond), expected, atol=1e-6)
