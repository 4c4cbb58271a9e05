"""Export an aligned model in the form its users load (RUN/export/).

- shapes model → a model folder (LoRA merged into the weights) that ``load_backbone`` and every
  ``--model`` option accept;
- diffusers pipeline + LoRA → ``pytorch_lora_weights.safetensors`` written by the pipeline class's own
  ``save_lora_weights`` (peft state dict converted to the diffusers format, rank/alpha as adapter
  metadata), so ``pipeline.load_lora_weights(RUN/export)`` accepts it; with
  ``export.merged_pipeline`` also a complete pipeline with the LoRA merged (RUN/export/pipeline);
- diffusers pipeline, full fine-tuning → ``RUN/export/unet/`` (``UNet2DConditionModel.from_pretrained``;
  with ``export.merged_pipeline`` the complete pipeline in RUN/export/pipeline).

Every export also holds ``prefalign_export.json`` (method, base model, steps, LoRA config). The folder
is written atomically (temporary folder, then rename).

A one-step generator (Diff-Instruct++: ``backbone.one_step`` set) is marked with ``one_step.json``;
for diffusers models its export is also the complete pipeline with the generator's UNet (LoRA merged)
at the top of RUN/export, so ``prefalign sample --model RUN/export --steps 1`` runs it (the LoRA
weights file stays next to it).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from prefalign.backbones.base import Backbone
from prefalign.training.checkpoint import atomic_tree_write
from prefalign.training.lora import lora_config_dict

EXPORT_INFO = "prefalign_export.json"


def merged_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A fresh ``UNet2DConditionModel`` holding W + (alpha/r)·B·A for every LoRA layer of ``unet``
    (a plain copy when it has no adapters)."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    clone = copy.deepcopy(unet)
    for module in clone.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in clone.state_dict().items() if "lora_" not in k}
    fresh = UNet2DConditionModel.from_config(unet.config)
    fresh.load_state_dict(state, strict=True)
    dtype = next(unet.parameters()).dtype
    return (fresh if dtype == torch.float32 else fresh.to(dtype=dtype)).eval()


def _lora_metadata(unet: torch.nn.Module) -> dict | None:
    config = lora_config_dict(unet)
    if config is None:
        return None
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def export_aligned(backbone: Backbone, out_dir: str | Path, config, step: int) -> Path:
    """Write the export of ``backbone`` (its unet unwrapped, adapters enabled) to ``out_dir``."""
    out_dir = Path(out_dir)
    unet = backbone.unet
    lora = _lora_metadata(unet)
    info = {
        "method": config.method,
        "base_model": config.model,
        "steps": step,
        "finetune": config.finetune.mode,
        "lora": lora,
        "ema": bool(config.ema.enabled and config.ema.export),
        "kind": backbone.kind,
    }
    one_step = getattr(backbone, "one_step", None)
    if one_step is not None:
        info["one_step"] = one_step.to_dict()

    def write(tmp: Path) -> None:
        if backbone.kind.startswith("shapes"):
            _export_shapes(backbone, tmp, info)
        else:
            _export_diffusers(backbone, tmp, lora, config.export.merged_pipeline)
            if one_step is not None:  # deployable as is: the whole pipeline, generator UNet merged
                pipeline = backbone.pipeline
                type(pipeline)(**{**pipeline.components, "unet": merged_unet(backbone.unet)}).save_pretrained(tmp, safe_serialization=True)
        if one_step is not None:
            from prefalign.backbones.one_step import write_one_step

            write_one_step(tmp, one_step)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))

    return atomic_tree_write(out_dir, write)


def _export_shapes(backbone, folder: Path, info: dict) -> None:
    from prefalign.backbones.shapes import ShapesBackbone

    merged = merged_unet(backbone.unet)
    model_config = {k: v for k, v in backbone.model_config.items() if k not in ("kind", "image_size", "max_tokens", "text_encoder")}
    model_config["aligned"] = info
    exported = ShapesBackbone(merged, backbone.scheduler_config, backbone.image_size, backbone.kind, backbone.max_tokens, model_config)
    card = (
        f"# {info['base_model']} aligned with {info['method']}\n\n"
        f"{info['steps']} steps of `prefalign align {info['method']}` ({info['finetune']} fine-tuning"
        f"{', LoRA merged' if info['lora'] else ''}). Load it with `--model` or `load_backbone(this folder)`.\n"
    )
    exported.save_pretrained(folder, card=card)


def _export_diffusers(backbone, folder: Path, lora: dict | None, merged_pipeline: bool) -> None:
    pipeline = backbone.pipeline
    unet = backbone.unet
    if lora is not None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        type(pipeline).save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=lora, safe_serialization=True)
        if merged_pipeline:
            components = {**pipeline.components, "unet": merged_unet(unet)}
            type(pipeline)(**components).save_pretrained(folder / "pipeline", safe_serialization=True)
    else:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        if merged_pipeline:
            pipeline.save_pretrained(folder / "pipeline", safe_serialization=True)
