"""``prefalign align METHOD --data DIR [--model …] [--steps N] [--config F] [--set k=v] --out RUN [--resume]``.

Aligns a model (a shipped shapes model, a shapes model folder, or a diffusers pipeline folder) with
preference pairs using one of the registered methods (sft, dpo, rpo, inpo, …). Settings: defaults ←
``--config`` YAML ← ``--set key=value`` ← the explicit options; the resolved config is saved as
RUN/config.yaml. ``--resume`` continues from RUN's latest checkpoint (with RUN/config.yaml as the base
config when no --config is given). Multi-GPU / multi-process: ``accelerate launch -m prefalign.cli align …``.

Data-free methods (``diff-instruct-pp``: a one-step generator, METHODS.md §6) need no --data::

    prefalign align diff-instruct-pp --reward RM --alpha-rew A --cfg W --out RUN

``--reward``, ``--alpha-rew`` and ``--cfg`` set ``METHOD.reward``, ``METHOD.alpha_rew`` and
``METHOD.guidance_scale`` of the chosen method (an error for methods without them).

Reward RL (DDPO, PrefPaint: METHODS.md §4, §7) samples its own images from prompts::

    prefalign align prefpaint --model shapes-inpaint --reward RM --prompts PROMPTS --iterations N --out RUN

``--prompts`` (``METHOD.prompts``) is a prompts file or a pointwise inpainting dataset folder (its
masked prompt images; default: the world's prompts); ``--iterations N`` sets ``steps`` to N
iterations (rollout + PPO epochs) of the method.
"""

from __future__ import annotations

from pathlib import Path

import typer

from prefalign.commands.common import MODEL_HELP
from prefalign.errors import PrefalignError


def align(
    method: str = typer.Argument(..., help="the alignment method: sft, dpo, rpo, inpo, diff-instruct-pp, ddpo or prefpaint"),
    data: Path = typer.Option(None, "--data", help="preference pairs: a dataset folder from `prefalign prefs make` / `prefs import`"),
    model: str = typer.Option(None, "--model", help=MODEL_HELP + " (default shapes-t2i)"),
    steps: int = typer.Option(None, "--steps", help="optimiser steps"),
    batch_size: int = typer.Option(None, "--batch-size", help="pairs per process per micro-step"),
    seed: int = typer.Option(None, "--seed", help="seed of data order, noise, timesteps and LoRA init"),
    config: Path = typer.Option(None, "--config", help="YAML align config (see configs/)"),
    set_: list[str] = typer.Option(None, "--set", help="override a setting: key=value, e.g. dpo.beta=2000 (repeatable)"),
    reward: str = typer.Option(None, "--reward", help="diff-instruct-pp: differentiable reward (reward model folder, clip, module:function); ddpo/prefpaint: the reward to maximise"),
    prompts: str = typer.Option(None, "--prompts", help="ddpo/prefpaint: prompts file, or a pointwise inpainting dataset folder (default: the world's prompts)"),
    iterations: int = typer.Option(None, "--iterations", min=1, help="ddpo/prefpaint: RL iterations (each a rollout + PPO epochs); sets the steps"),
    alpha_rew: float = typer.Option(None, "--alpha-rew", help="diff-instruct-pp: weight α_rew of the reward (0: plain CFG distillation)"),
    cfg_scale: float = typer.Option(None, "--cfg", help="diff-instruct-pp: classifier-free guidance ω of the reference teacher"),
    out: Path = typer.Option(..., "--out", help="run folder: config.yaml, checkpoints/, tensorboard/, metrics.json, export/"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in --out"),
) -> None:
    """Align a diffusion model with human preference (METHODS.md §1–3); writes RUN/export/."""
    from prefalign.methods import get_method
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import CONFIG_FILE, train

    base = config
    if resume and base is None and (out / CONFIG_FILE).is_file():
        base = out / CONFIG_FILE
    cfg = load_align_config(
        base, set_, method=method, model=model, steps=steps, batch_size=batch_size, seed=seed,
        **{"data.path": None if data is None else str(data)},
        **{f"{method.replace('-', '_')}.{k}": v for k, v in (("reward", reward), ("alpha_rew", alpha_rew), ("guidance_scale", cfg_scale), ("prompts", prompts))},
    )
    if iterations is not None:
        per_iteration = getattr(get_method(cfg.method)(cfg.method_config()), "steps_per_iteration", None)
        if per_iteration is None:
            raise PrefalignError(f"--iterations is for the RL methods (ddpo, prefpaint); use --steps for {cfg.method}")
        cfg = cfg.model_copy(update={"steps": iterations * per_iteration(cfg)})
    if cfg.data.path is None and get_method(cfg.method).data == "pairs":
        raise PrefalignError("no preference data: pass --data DIR (make one with `prefalign prefs make`)")
    result = train(cfg, out, resume=resume)
    final = result.metrics.get("final", {})
    summary = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "implicit_accuracy", "reward", "reward_mean") if k in final)
    typer.echo(f"{cfg.method}: {result.steps} steps{' (' + summary + ')' if summary else ''}; run folder {out}")
    if result.export_path is not None:
        typer.echo(f"aligned model exported to {result.export_path}")
