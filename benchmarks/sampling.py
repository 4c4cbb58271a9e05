"""Speed and memory of the shipped shapes UNet (issue: Foundation, §6).

UNet forward and forward+backward time at batch 32 and 64, images per second of 50-step DDIM
sampling with CFG, and peak memory (peak RSS of a fresh process per measurement on CPU; peak
allocated CUDA memory on a GPU).

    python benchmarks/sampling.py [--device cpu] [--repeats 5]

Prints a table and writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_isolated, table, write_json  # noqa: E402


def measure(task: str, batch: int, device: str, repeats: int, model: str) -> dict:
    import torch

    from prefalign.backbones.loading import load_backbone
    from prefalign.sampling import generate
    from prefalign.worlds.shapes.prompts import sample_prompts

    torch.manual_seed(0)
    backbone = load_backbone(model, device=device)
    prompts = sample_prompts(batch, seed=0)
    cond = backbone.encode_prompts(prompts)
    x = torch.randn(batch, *backbone.latent_shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if task == "forward":
        backbone.unet.eval()

        def step() -> None:
            with torch.no_grad():
                backbone.model_output(x, t, cond)
    elif task == "forward+backward":
        backbone.unet.train()

        def step() -> None:
            loss = backbone.model_output(x, t, cond).pow(2).mean()
            loss.backward()
            backbone.unet.zero_grad(set_to_none=True)
    else:  # sample
        def step() -> None:
            generate(backbone, prompts, seed=0, steps=50, guidance_scale=3.0, batch_size=batch)

    step()  # warm-up
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    seconds = (time.perf_counter() - started) / repeats
    row = {"task": task, "batch": batch, "seconds": seconds}
    if task == "sample":
        row["images_per_s"] = batch / seconds
    else:
        row["images_per_s"] = batch / seconds
    if device.startswith("cuda"):
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="shapes-t2i")
    args = parser.parse_args()

    rows = []
    for task, batch, repeats in [
        ("forward", 32, args.repeats),
        ("forward", 64, args.repeats),
        ("forward+backward", 32, args.repeats),
        ("forward+backward", 64, args.repeats),
        ("sample", 32, 1),
        ("sample", 64, 1),
    ]:
        row, peak = run_isolated(measure, task, batch, args.device, repeats, args.model)
        row["peak_rss_mib"] = peak
        rows.append(row)
        print(table([row]), flush=True)
    print()
    print(table(rows))
    path = write_json("sampling", {"settings": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
