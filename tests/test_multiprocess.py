"""Two CPU processes under accelerate run DPO and RPO and agree with one process on the same global
batch (RPO's weight matrix spans the global batch: embeddings and per-pair terms are gathered,
gradients flow through the local terms).

Note: in accelerate 1.15 ``accelerate launch --cpu --num_processes 2`` starts ONE process (the simple
launcher; several CPU processes need ``--mpirun_hostfile``). Two CPU processes come from
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``: torchrun + gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import make_tiny_shapes_model, tiny_overrides, write_pairs

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
from pathlib import Path
from prefalign.training.config import load_align_config
from prefalign.training.trainer import Trainer

model, data, out, batch_size = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
overrides = {overrides!r}
results = {{}}
for method in ("dpo", "rpo"):
    config = load_align_config(None, overrides, method=method, model=model, steps=3, batch_size=batch_size, **{{"data.path": data}})
    result = Trainer(config, out / method).train()
    history = result.metrics["history"]
    results[method] = {{key: [h[key] for h in history] for key in ("loss", "implicit_accuracy", "error_model_w", "error_ref_l", "grad_norm")}}
    results[method]["processes"] = result.metrics["processes"]
if result.metrics["processes"] == 1 or __import__("accelerate").PartialState().is_main_process:
    (out / "losses.json").write_text(json.dumps(results))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    model = make_tiny_shapes_model(tmp_path / "model")
    data = write_pairs(tmp_path / "pairs", count=12, with_ties=False)
    overrides = tiny_overrides(**{"rpo.beta": 500, "threads": 1, "export.enabled": False, "checkpoint.every": 100})
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(overrides=overrides))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    single = subprocess.Popen(
        [sys.executable, str(script), str(model), str(data), str(tmp_path / "one"), "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(script), str(model), str(data), str(tmp_path / "two"), "2",
    ]
    double = subprocess.run(launch, env={**env, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, (double.stdout + double.stderr)[-3000:]
    assert single.wait(timeout=300) == 0, single.stdout.read().decode()[-3000:]
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    for method in ("dpo", "rpo"):
        assert one[method]["processes"] == 1 and two[method]["processes"] == 2
        # step 1: the same pairs, noise and timesteps (policy = reference at the LoRA init, so the loss is
        # log 2 in both; the errors and the gradient norm are the informative numbers)
        assert two[method]["loss"][0] == pytest.approx(one[method]["loss"][0], abs=1e-4), method
        assert two[method]["error_model_w"][0] == pytest.approx(one[method]["error_model_w"][0], rel=1e-5), method
        # the gradient of the global loss: DDP averaging (DPO) / gathered matrix × processes (RPO)
        assert two[method]["grad_norm"][0] == pytest.approx(one[method]["grad_norm"][0], rel=1e-4), method
        # after optimiser steps the runs still agree
        assert two[method]["loss"] == pytest.approx(one[method]["loss"], abs=1e-4), method
        assert two[method]["implicit_accuracy"] == pytest.approx(one[method]["implicit_accuracy"], abs=1e-6), method
        assert abs(one[method]["loss"][-1] - 0.693147) > 1e-3  # training moved the loss: the comparison can fail
    assert one["dpo"]["grad_norm"][0] != pytest.approx(one["rpo"]["grad_norm"][0], rel=1e-3)  # RPO is not DPO with 4 pairs
