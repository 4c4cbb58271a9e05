"""Peak memory of a Diffusion-DPO step on an SD-family pipeline: full fine-tuning vs LoRA vs LoRA +
gradient checkpointing (issue 8). The ordering full > LoRA > LoRA + checkpointing must hold.

    python benchmarks/memory.py [--unet sd-shaped|tiny] [--batch-size 2] [--device cpu|cuda]
                                [--mixed-precision no|bf16|fp16] [--name memory]

The pipeline is built in code (tests/tiny_pipelines.py: tiny CLIP text encoder, tiny VAE with scale
factor 2) and saved to disk, then loaded through the real loading code. ``--unet tiny`` keeps the test
pipelines' UNet (block widths 32/64, 8×8 latents: weights and activations are a few MB, below what
CPU RSS resolves); ``--unet sd-shaped`` (default) swaps in an SD1.5-shaped UNet at 1/5 of the widths
(64/128/256/256, two layers per block, cross-attention in the first three levels, 8-channel heads) on
32×32 latents (64×64 images): ~32 M parameters, so weights, optimiser state and activations are all
large enough to measure.

Each variant runs in a fresh process: load the pipeline, note the memory (CPU: RSS; CUDA: allocated),
run ``--steps`` DPO steps through the trainer (accelerate, AdamW, the reference network as the
trainer makes it: a frozen copy for full fine-tuning, adapters disabled for LoRA), and report the peak
(CPU: ``ru_maxrss``; CUDA: ``max_memory_allocated``) and the peak above the loaded model.
Prints a table and writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_isolated, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "full": {"finetune.mode": "full", "gradient_checkpointing": False},
    "lora": {"finetune.mode": "lora", "gradient_checkpointing": False},
    "lora+checkpointing": {"finetune.mode": "lora", "gradient_checkpointing": True},
}


def sd_shaped_unet(cross_attention_dim: int):
    """An SD1.5-shaped UNet at 1/5 of its widths (see the module docstring)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_pipeline(folder: Path, unet: str) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_pipelines
    from diffusers import StableDiffusionPipeline

    if (folder / "model_index.json").is_file():
        return folder
    components = tiny_pipelines._sd_components(folder, 4, "epsilon")
    if unet == "sd-shaped":
        components["unet"] = sd_shaped_unet(tiny_pipelines.HIDDEN_SIZE)
    return tiny_pipelines._save(StableDiffusionPipeline(**components), folder)


def current_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover


def one_variant(model: str, data: str, variant: str, steps: int, batch_size: int, device: str, mixed_precision: str, run_dir: str) -> dict:
    import shutil

    import torch

    torch.set_num_threads(1)
    from prefalign.backbones.loading import load_backbone
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)
    settings = {
        **VARIANTS[variant], "data.num_workers": 0, "threads": 1, "logging.progress": False, "logging.tensorboard": False,
        "eval.annotator": False, "export.enabled": False, "checkpoint.every": 1000, "finetune.rank": 16,
        "mixed_precision": mixed_precision, "device": device,
    }
    config = load_align_config(None, None, method="dpo", model=model, steps=steps, batch_size=batch_size, **{"data.path": data, **settings})
    backbone = load_backbone(model, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = current_memory(device)
    start = time.time()
    result = Trainer(config, run_dir, backbone=backbone).train()
    seconds = time.time() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "trainable_params": result.metrics["trainable_parameters"],
        "unet_params": sum(p.numel() for p in backbone.unet.parameters()),
        "loaded_mib": round(loaded, 1),
        "peak_mib": round(peak, 1),
        "peak_above_model_mib": round(peak - loaded, 1),
        "step_s": result.metrics["step_time_s"] or round(seconds / steps, 3),
        "loss": result.metrics["final"].get("loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=["sd-shaped", "tiny"], default="sd-shaped")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (4 images through the policy with gradients)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prefalign-memory"))
    parser.add_argument("--name", default="memory")
    args = parser.parse_args()

    from make_pickapic import make_pickapic

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_pipeline(args.workdir / f"pipeline-{args.unet}", args.unet)
    resolution = 64 if args.unet == "sd-shaped" else 16
    data = args.workdir / f"pairs-{resolution}"
    if not (data / "synthetic.json").is_file():
        info = make_pickapic(data, 64, image_size=resolution, progress=False)
        (data / "synthetic.json").write_text(json.dumps(info))

    rows = []
    for variant in VARIANTS:
        result, child_peak = run_isolated(
            one_variant, str(model), str(data), variant, args.steps, args.batch_size, args.device, args.mixed_precision, str(args.workdir / f"run-{variant}")
        )
        rows.append(result)
        print(table(rows[-1:]), flush=True)
    peaks = [r["peak_mib"] for r in rows]
    ordering = peaks[0] > peaks[1] > peaks[2]
    print()
    print(table(rows))
    print(f"\nordering full > lora > lora+checkpointing (peak): {'holds' if ordering else 'does NOT hold'}")
    path = write_json(args.name, {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "ordering_holds": ordering})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
