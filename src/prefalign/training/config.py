"""Align configs: YAML validated by pydantic (unknown fields and bad values are one-line errors).

An align config has the trainer's sections (``optimizer``, ``schedule``, ``finetune``, …) and one
section per registered method (``dpo:``, ``rpo:``, …) holding that method's options; only the section
of ``method`` is used, the others keep their defaults. Example (see ``configs/``)::

    method: dpo
    model: shapes-t2i
    data: {path: prefs/shapes}
    steps: 1000
    batch_size: 16
    optimizer: {name: adamw, learning_rate: 1.0e-4}
    finetune: {mode: lora, rank: 16}
    dpo: {beta: 5000, prompt_dropout: 0.2}

``align_config_class()`` builds the pydantic model for the methods registered now (so methods added
by later issues get their section automatically); :func:`load_align_config` reads defaults ← YAML
file ← ``--set key=value`` overrides ← explicit CLI options.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from prefalign.errors import PrefalignError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(Section):
    name: Literal["adamw", "adafactor"] = Field("adamw", description="AdamW (torch) or Adafactor (transformers, as Diffusion-DPO's SDXL runs)")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    scale_lr: bool = Field(False, description="multiply the learning rate by the global batch (pairs per optimiser step), as the reference code")
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after the warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 (reference code: constant_with_warmup)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of linear/cosine decay, as a fraction of the peak")


class FinetuneConfig(Section):
    mode: Literal["lora", "full"] = Field("lora", description="lora: reference = adapters disabled; full: reference = a frozen copy")
    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale alpha/r); default = rank")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="module names (suffixes) that get LoRA adapters"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    init: Literal["gaussian", "default"] = Field("gaussian", description="peft init of A (B starts at zero either way)")


class DataConfig(Section):
    path: str | None = Field(None, description="preference data: a folder of Parquet shards (Pick-a-Pic v2 schema)")
    ties: Literal["drop", "random"] = Field("drop", description="pairs with label_0 = 0.5: drop (reference) or orient at random")
    num_workers: int = Field(2, ge=0, description="DataLoader processes that decode images")
    random_flip: bool = Field(False, description="flip winner and loser together with probability 1/2")
    shuffle: bool = Field(True, description="a fresh permutation of the pairs every epoch (seeded)")
    limit: int | None = Field(None, ge=1, description="use only the first N pairs (after dropping ties)")
    validation: Literal["full", "lazy"] = Field(
        "full",
        description="full: decode every image when the data is opened (report first; images must share one size); "
        "lazy: check only captions/labels at open, decode and resize each image when read, replace an undecodable "
        "record by the next one with a warning (Pick-a-Pic-size data: opens in seconds, memory flat in dataset size)",
    )
    cache_dir: str | None = Field(None, description="where datasets writes the memory-mapped Arrow copy of the shards (default: HF_DATASETS_CACHE)")
    latent_cache: str | None = Field(
        None, description="folder of cached VAE latents of the pairs' images (memory-mapped, filled as rows are first read or by "
        "precompute_latents; latents rounded to float16): later epochs skip the VAE. See training/latent_cache.py",
    )


class EMAConfig(Section):
    enabled: bool = False
    decay: float = Field(0.999, ge=0, lt=1)
    warmup: bool = Field(True, description="decay_t = min(decay, (1+t)/(10+t))")
    export: bool = Field(True, description="export (and evaluate) the EMA weights")


class CheckpointConfig(Section):
    every: int = Field(500, ge=1, description="checkpoint every N optimiser steps (and at the end)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept (older ones are deleted)")


class LoggingConfig(Section):
    every: int = Field(10, ge=1, description="log window means every N steps (TensorBoard, progress bar)")
    tensorboard: bool = True
    progress: bool = True


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="run the evaluation hooks every N steps (0: only hooks given in code, at the end)")
    annotator: bool = Field(True, description="shapes models: the annotator's score and win rate against the base model")
    prompts: int = Field(64, ge=1, description="evaluation prompts (fixed; seeds fixed)")
    prompt_seed: int = 2024
    split: Literal["all", "train", "held_out"] = "train"
    sampling_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    persona: str = "balanced"


class ExportConfig(Section):
    enabled: bool = True
    merged_pipeline: bool = Field(False, description="diffusers models: also write the whole pipeline with LoRA merged (RUN/export/pipeline)")


class TrainConfig(Section):
    """Trainer settings shared by every method (the method's own options live in its section)."""

    method: str = Field("dpo", description="sft | dpo | rpo | inpo (and methods of later issues)")
    model: str = Field("shapes-t2i", description="a shipped model name or a model folder (shapes model or diffusers pipeline)")
    data: DataConfig = Field(default_factory=DataConfig)
    steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(8, ge=1, description="pairs per process per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0: no clipping)")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in the backward pass (less memory, ~30 % slower)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from prefalign.methods import METHODS

        value = value.replace("-", "_")  # diff-instruct-pp = diff_instruct_pp
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(sorted(METHODS))}")
        return value

    def method_config(self):
        """The options of the selected method (its section)."""
        return getattr(self, self.method)


_CLASS_CACHE: dict[tuple[str, ...], type[TrainConfig]] = {}


def align_config_class() -> type[TrainConfig]:
    """The pydantic model of an align config: :class:`TrainConfig` + one section per registered method."""
    from prefalign.methods import METHODS

    key = tuple(sorted((name, id(cls.config_class)) for name, cls in METHODS.items()))
    if key not in _CLASS_CACHE:
        fields: dict[str, Any] = {
            name: (cls.config_class, Field(default_factory=cls.config_class, description=f"options of {name}"))
            for name, cls in METHODS.items()
        }
        _CLASS_CACHE[key] = create_model("AlignConfig", __base__=TrainConfig, **fields)
    return _CLASS_CACHE[key]


def load_align_config(config_file: Path | None = None, overrides: list[str] | None = None, **explicit: Any) -> TrainConfig:
    """Defaults ← the method's ``trainer_defaults`` ← YAML file ← ``--set key=value`` overrides ← explicit values (those not None;
    dotted keys allowed, e.g. ``**{"data.path": DIR}``). Nested sections are merged key by key.
    Any problem is a one-line :class:`PrefalignError`."""
    from prefalign.commands.common import parse_overrides

    data: dict[str, Any] = {}
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise PrefalignError(f"config file not found: {config_file}")
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as error:
            first = str(error).strip().splitlines()[0]
            raise PrefalignError(f"{config_file} is not valid YAML: {first}") from None
        if not isinstance(loaded, dict):
            raise PrefalignError(f"{config_file} must hold a mapping of settings")
        data = _short_forms(loaded)
    data = _deep_merge(data, _short_forms(parse_overrides(overrides)))
    nested: dict[str, Any] = {}
    for key, value in explicit.items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    data = _deep_merge(data, nested)
    return validate_config(_with_method_defaults(data))


def _with_method_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The selected method's ``trainer_defaults`` under ``data`` (e.g. Diff-Instruct++: Adam β1 = 0)."""
    from prefalign.methods import METHODS

    method = METHODS.get(str(data.get("method", TrainConfig.model_fields["method"].default)).replace("-", "_"))
    defaults = getattr(method, "trainer_defaults", None)
    return _deep_merge(defaults, data) if defaults else data


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a config mapping; a problem is one line: ``invalid config: dpo.betaa: Extra inputs …``."""
    try:
        return align_config_class().model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
        raise PrefalignError(f"invalid config: {problems}") from None


def _short_forms(data: dict[str, Any]) -> dict[str, Any]:
    """``data: DIR`` is short for ``data: {path: DIR}``."""
    if isinstance(data.get("data"), str):
        data = {**data, "data": {"path": data["data"]}}
    return data


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_from_yaml_text(text: str) -> TrainConfig:
    return validate_config(yaml.safe_load(text) or {})


#: Fields that may change when a run is resumed (everything else must match the saved config).
RESUMABLE_CHANGES = ("steps", "logging", "eval", "export", "data.num_workers", "data.cache_dir", "threads", "checkpoint")


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Dotted keys whose values differ, ignoring :data:`RESUMABLE_CHANGES`."""
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_digest(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
