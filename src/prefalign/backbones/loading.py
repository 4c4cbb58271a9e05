"""One entry point for every model: ``load_backbone(name_or_path)``.

- a shipped shapes model name (``shapes-t2i``, ``shapes-inpaint``) or a shapes model folder (it has
  ``prefalign.json``) → :class:`~prefalign.backbones.shapes.ShapesBackbone`;
- a diffusers pipeline folder (it has ``model_index.json``) →
  :class:`~prefalign.backbones.diffusers_sd.StableDiffusionBackbone` (SD 1.x/2.x, SDXL, inpainting).

Nothing is ever downloaded: Hub ids are not resolved, pipelines load with ``local_files_only=True``.
A folder with ``one_step.json`` (a one-step generator, :mod:`prefalign.backbones.one_step`) gets
``backbone.one_step`` set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefalign.backbones.base import Backbone
from prefalign.backbones.diffusers_sd import SUPPORTED_PIPELINES, load_diffusers_backbone
from prefalign.backbones.one_step import attach_one_step
from prefalign.backbones.shapes import SHIPPED_MODELS, MODEL_CONFIG_FILE, is_shapes_model_folder, load_shapes_backbone
from prefalign.errors import PrefalignError


def load_backbone(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Load a backbone by shipped name or local folder (see the module docstring).

    Raises :class:`PrefalignError` (one line, saying what to do) when the path does not exist, the
    folder is neither a shapes model nor a diffusers pipeline, a pipeline component is missing, or
    the pipeline class is not supported.
    """
    name = str(name_or_path)
    if name in SHIPPED_MODELS:
        return load_shapes_backbone(name, device=device, dtype=dtype)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise PrefalignError(
            f"model {name!r} not found: it is neither a shipped model ({', '.join(SHIPPED_MODELS)}) "
            "nor an existing folder; "
            "give a local folder (Hub ids are not downloaded: fetch one first, e.g. "
            "`huggingface-cli download ID --local-dir DIR`, and pass DIR)"
        )
    if not path.is_dir():
        raise PrefalignError(
            f"{path} is a file; give the model folder (a shapes model with {MODEL_CONFIG_FILE}, or a diffusers "
            "pipeline with model_index.json; convert single-file checkpoints with diffusers' from_single_file "
            "+ save_pretrained)"
        )
    if is_shapes_model_folder(path):
        return attach_one_step(load_shapes_backbone(path, device=device, dtype=dtype), path)
    if (path / "model_index.json").is_file():
        return attach_one_step(load_diffusers_backbone(path, device=device, dtype=dtype), path)
    raise PrefalignError(
        f"{path} is neither a shapes model folder (no {MODEL_CONFIG_FILE}) nor a diffusers pipeline folder "
        f"(no model_index.json); give a folder saved by `prefalign pretrain` or by a diffusers pipeline's "
        f"save_pretrained ({', '.join(SUPPORTED_PIPELINES)})"
    )
