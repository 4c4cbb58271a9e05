"""Helpers shared by the command modules: overrides, prompt files, the model option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel, ValidationError

from prefalign.errors import PrefalignError

MODEL_HELP = "a shipped model name (shapes-t2i) or a folder: a shapes model or a diffusers pipeline"


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → nested dict with YAML-parsed values."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise PrefalignError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return result


def load_config(model: type[BaseModel], config_file: Path | None, overrides: list[str] | None, **explicit: Any) -> BaseModel:
    """Defaults ← YAML file ← --set overrides ← explicit CLI options (those not None)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        if not config_file.is_file():
            raise PrefalignError(f"config file not found: {config_file}")
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as error:
            raise PrefalignError(f"{config_file} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise PrefalignError(f"{config_file} must hold a mapping of settings")
        data.update(loaded)
    data.update(parse_overrides(overrides))
    data.update({k: v for k, v in explicit.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PrefalignError(f"invalid config: {problems}") from None


def read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    """Prompts from repeated --prompt and/or a file (.txt one per line, .jsonl/.json with "prompt"
    or "caption", .csv with a prompt/caption column)."""
    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise PrefalignError(f"prompts file not found: {prompts_file}")
        text = prompts_file.read_text()
        suffix = prompts_file.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
            for i, row in enumerate(rows):
                value = row if isinstance(row, str) else row.get("prompt", row.get("caption"))
                if not isinstance(value, str):
                    raise PrefalignError(f"{prompts_file}: row {i} has no 'prompt' or 'caption' string")
                prompts.append(value)
        elif suffix == ".csv":
            import csv

            reader = csv.DictReader(text.splitlines())
            column = next((c for c in ("prompt", "caption") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise PrefalignError(f"{prompts_file}: needs a 'prompt' or 'caption' column")
            prompts.extend(row[column] for row in reader)
        else:
            prompts.extend(line.strip() for line in text.splitlines() if line.strip())
    return prompts


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=float))
