"""Atomic, resumable checkpoints: a directory of safetensors + JSON, written to a temporary
directory and renamed into place, so a run killed mid-write never leaves a half checkpoint behind.

Layout of ``RUN/checkpoints/step-00001000/``:
- ``*.safetensors``: tensors (model weights, EMA weights, optimiser state tensors);
- ``state.json``: step, optimiser hyper-parameters and non-tensor state, RNG states (as lists).
Nothing is unpickled: optimiser state is split into tensors (safetensors) and plain JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prefalign.errors import PrefalignError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def atomic_directory_write(final_dir: Path, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final_dir`` (replacing it)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for file in tmp.iterdir():  # make the data durable before the rename publishes it
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final_dir.exists():
        old = final_dir.parent / f".old-{final_dir.name}-{os.getpid()}"
        final_dir.rename(old)
        tmp.rename(final_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(final_dir)
    return final_dir


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into a flat tensor dict and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        plain_state[str(param_id)] = {}
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.contiguous()
            else:
                plain_state[str(param_id)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> dict[str, list[int]]:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, list[int]]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``RUN/checkpoints/step-XXXXXXXX`` atomically: one safetensors file per entry of
    ``tensors`` and ``state.json``; then delete all but the newest ``keep_last`` checkpoints."""

    def write(tmp: Path) -> None:
        for name, named in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))

    path = atomic_directory_write(Path(run_dir) / "checkpoints" / f"step-{step:08d}", write)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise PrefalignError(f"{path} is not a checkpoint (no state.json); pass a RUN/checkpoints/step-* folder")
    tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    return tensors, json.loads(state_file.read_text())


def atomic_tree_write(final_dir: Path, write: Any) -> Path:
    """Like :func:`atomic_directory_write`, for folders with sub-folders (a model export): call
    ``write(tmp_dir)``, fsync every file below it, then rename ``tmp_dir`` to ``final_dir``
    (replacing it)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if final_dir.exists():
        old = final_dir.parent / f".old-{final_dir.name}-{os.getpid()}"
        final_dir.rename(old)
        tmp.rename(final_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(final_dir)
    return final_dir
