"""Which parameters train, and where the reference network comes from (METHODS.md "Notation").

- ``finetune.mode = "lora"``: peft LoRA adapters (rank, alpha, target modules) are added to the UNet
  (diffusers' ``add_adapter``); only they train. The reference ε_ref is **the same network with the
  adapters disabled**: no second copy of the weights.
- ``finetune.mode = "full"``: every UNet parameter trains; the reference is a frozen deep copy made
  before training (as the Diffusion-DPO reference code).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from prefalign.backbones.base import Backbone
from prefalign.errors import PrefalignError
from prefalign.training.config import FinetuneConfig


def add_lora(unet: torch.nn.Module, config: FinetuneConfig) -> None:
    """Freeze the UNet and add one LoRA adapter ("default") on ``config.target_modules``."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    names = [name for name, _ in unet.named_modules()]
    unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if len(unmatched) == len(config.target_modules):
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
        raise PrefalignError(
            f"no UNet module matches finetune.target_modules={config.target_modules}; linear/conv module names include "
            f"{', '.join(leaves[:20])}"
        )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        target_modules=list(config.target_modules),
        lora_dropout=config.dropout,
        init_lora_weights="gaussian" if config.init == "gaussian" else True,
    )
    unet.add_adapter(lora)


def lora_config_dict(unet: torch.nn.Module) -> dict | None:
    """The peft config of the UNet's adapter (JSON-able), or None without adapters."""
    configs = getattr(unet, "peft_config", None)
    if not configs:
        return None
    return configs["default"].to_dict()


class ReferenceSwitch:
    """``with switch(backbone): …`` makes ``backbone`` compute the reference network's outputs.

    ``unwrap(module)`` strips distributed wrappers (the adapters live on the inner UNet)."""

    def __init__(self, mode: str, frozen_copy: torch.nn.Module | None, unwrap: Callable[[torch.nn.Module], torch.nn.Module]):
        self.mode = mode
        self.frozen_copy = frozen_copy
        self.unwrap = unwrap

    @contextmanager
    def __call__(self, backbone: Backbone) -> Iterator[Backbone]:
        if self.mode == "lora":
            inner = self.unwrap(backbone.unet)
            inner.disable_adapters()
            try:
                yield backbone
            finally:
                inner.enable_adapters()
        elif self.frozen_copy is not None:
            policy = backbone.unet
            backbone.unet = self.frozen_copy
            try:
                yield backbone
            finally:
                backbone.unet = policy
        else:
            raise PrefalignError("this method was set up without a reference network")


def prepare_finetuning(
    backbone: Backbone, config: FinetuneConfig, needs_reference: bool, unwrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
) -> ReferenceSwitch:
    """Mark the trainable parameters of ``backbone.unet`` and build the reference switch.

    Call before wrapping the UNet for distributed training (the frozen copy is of the plain module)."""
    unet = backbone.unet
    if config.mode == "lora":
        add_lora(unet, config)
        frozen = None
    else:
        frozen = copy.deepcopy(unet).requires_grad_(False).eval() if needs_reference else None
        unet.requires_grad_(True)
    unet.train()
    return ReferenceSwitch(config.mode, frozen, unwrap)


def trainable_named_parameters(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
