"""Alignment methods, one file per method, each holding its loss next to its equation (METHODS.md).

``METHODS`` maps a method name to its class; later methods register with :func:`register_method`.
"""

from __future__ import annotations

from prefalign.errors import PrefalignError
from prefalign.methods.base import LossOutput, Method, MethodConfig, PreferenceBatch, StepRandomness, TrainingModels
from prefalign.methods.diff_instruct_pp import DiffInstructPP, DiffInstructPPConfig
from prefalign.methods.ddpo import DDPO, DDPOConfig
from prefalign.methods.dpo import DPO, DPOConfig
from prefalign.methods.inpo import InPO, InPOConfig
from prefalign.methods.prefpaint import PrefPaint, PrefPaintConfig
from prefalign.methods.rpo import RPO, RPOConfig
from prefalign.methods.sft import SFT, SFTConfig

METHODS: dict[str, type[Method]] = {"sft": SFT, "dpo": DPO, "rpo": RPO, "inpo": InPO, "diff_instruct_pp": DiffInstructPP, "ddpo": DDPO, "prefpaint": PrefPaint}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under ``cls.name`` (usable as a decorator)."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class of ``name`` (hyphens allowed: ``diff-instruct-pp`` = ``diff_instruct_pp``)."""
    name = name.replace("-", "_")
    if name not in METHODS:
        raise PrefalignError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = [
    "DDPO",
    "DDPOConfig",
    "PrefPaint",
    "PrefPaintConfig",
    "DPO",
    "DPOConfig",
    "DiffInstructPP",
    "DiffInstructPPConfig",
    "InPO",
    "InPOConfig",
    "LossOutput",
    "METHODS",
    "Method",
    "MethodConfig",
    "PreferenceBatch",
    "RPO",
    "RPOConfig",
    "SFT",
    "SFTConfig",
    "StepRandomness",
    "TrainingModels",
    "get_method",
    "register_method",
]
