"""The trainer: checkpoints and bit-identical resume after SIGKILL, the NaN guard, config errors,
logging, evaluation hooks, export, data order."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
from prefalign.errors import PrefalignError
from prefalign.methods import METHODS, register_method
from prefalign.methods.dpo import DPO
from prefalign.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from prefalign.training.config import ScheduleConfig, load_align_config
from prefalign.training.trainer import NonFiniteLossError, Trainer, lr_at

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a small red circle in the centre on a white background",
    "a large blue square in the top left on a beige background",
    "a medium green triangle in the bottom right on a grey background",
]


# --------------------------------------------------------------------------------------------------
# Fixtures shared with test_multiprocess.py
# --------------------------------------------------------------------------------------------------


def make_tiny_shapes_model(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 16×16 shapes model folder (block widths 8/16/16)."""
    torch.manual_seed(seed)
    unet = new_shapes_unet(shapes_unet_config(16, block_out_channels=(8, 16, 16)))
    ShapesBackbone(unet, DEFAULT_SCHEDULER_CONFIG, 16).save_pretrained(path)
    return path


def write_pairs(path: Path, count: int = 16, size: int = 16, seed: int = 0, with_ties: bool = True) -> Path:
    """A pairwise dataset folder: image 0 smooth and bright, image 1 noisy; labels cycle 1, 0, (0.5)."""
    from prefalign.data.preference import PAIRWISE_SCHEMA, pair_record
    from prefalign.data.storage import ShardWriter

    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(path, "train", PAIRWISE_SCHEMA, shard_size=max(1, count // 2))
    labels = [1.0, 0.0, 0.5] if with_ties else [1.0, 0.0]
    for i in range(count):
        smooth = (0.5 + 0.4 * torch.rand(3, 1, 1, generator=generator)).expand(3, size, size)
        noisy = torch.rand(3, size, size, generator=generator)
        writer.write(pair_record(PROMPTS[i % len(PROMPTS)], smooth, noisy, labels[i % len(labels)], ranking_id=i))
    writer.close()
    return path


def tiny_overrides(**extra) -> list[str]:
    values = {
        "data.num_workers": 0,
        "logging.every": 1,
        "logging.progress": False,
        "eval.annotator": False,
        "checkpoint.every": 2,
        "optimizer.learning_rate": 1e-3,
        "dpo.beta": 500,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(model: Path, data: Path, method: str = "dpo", steps: int = 4, batch_size: int = 2, **extra):
    return load_align_config(
        None, tiny_overrides(**extra), method=method, model=str(model), steps=steps, batch_size=batch_size, **{"data.path": str(data)}
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return make_tiny_shapes_model(root / "model"), write_pairs(root / "pairs")


# --------------------------------------------------------------------------------------------------
# Kill / resume
# --------------------------------------------------------------------------------------------------

RUNNER = """
import os, sys, time
from pathlib import Path
from prefalign.methods.dpo import DPO
from prefalign.training.config import load_align_config
from prefalign.training.trainer import Trainer

model, data, run, resume, slow = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1", float(sys.argv[5])
original = DPO.loss
def slow_loss(self, batch, models):
    time.sleep(slow)
    return original(self, batch, models)
DPO.loss = slow_loss
overrides = {overrides!r}
config = load_align_config(None, overrides, method="dpo", model=model, steps=6, batch_size=2, **{{"data.path": data}})
Trainer(config, run).train(resume=resume)
"""


def _checkpoint_tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, _ = load_checkpoint(latest_checkpoint(run))
    return tensors


def test_sigkill_and_resume_is_bit_identical(world, tmp_path):
    model, data = world
    overrides = tiny_overrides(**{"data.num_workers": 1, "threads": 1, "ema.enabled": True, "ema.decay": 0.9, "data.ties": "random"})
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(overrides=overrides))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}

    def launch(run: Path, resume: bool, slow: float) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(model), str(data), str(run), "1" if resume else "0", str(slow)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

    straight = launch(tmp_path / "straight", False, 0.0)
    killed = launch(tmp_path / "killed", False, 0.4)
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "killed") is None:
        assert killed.poll() is None, killed.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait() == 0, straight.stdout.read().decode()[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000002"]  # killed mid-run

    resumed = launch(tmp_path / "killed", True, 0.0)
    assert resumed.wait() == 0, resumed.stdout.read().decode()[-2000:]
    a, b = _checkpoint_tensors(tmp_path / "straight"), _checkpoint_tensors(tmp_path / "killed")
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000006"
    assert set(a) == set(b) == {"trainable", "optimizer", "ema"}
    for group in a:
        assert set(a[group]) == set(b[group])
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}/{key} differs after resume"
    # the comparison can fail: the weights moved away from the killed run's checkpoint
    early, _ = load_checkpoint(tmp_path / "killed" / "checkpoints" / "step-00000002")
    lora = next(k for k in a["trainable"] if "lora_B" in k)
    assert not torch.equal(early["trainable"][lora], a["trainable"][lora])
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["resumed_from"] == 2 and metrics["steps"] == 6


# --------------------------------------------------------------------------------------------------
# NaN guard, config errors, run-folder rules
# --------------------------------------------------------------------------------------------------


class NaNAfterTwoSteps(DPO):
    name = "nan_test"

    def loss(self, batch, models):
        out = super().loss(batch, models)
        if models.step >= 2:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    model, data = world
    register_method(NaNAfterTwoSteps)
    try:
        config = tiny_config(model, data, method="nan_test", steps=5)
        with pytest.raises(NonFiniteLossError) as error:
            Trainer(config, tmp_path / "run").train()
    finally:
        METHODS.pop("nan_test")
    message = str(error.value)
    assert "\n" not in message and "non-finite loss" in message and "at step 3" in message
    assert "step-00000002" in message and "--resume" in message
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "stopped"
    tensors, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in tensors["trainable"].values())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["dpo.betaa=3"], "dpo.betaa: Extra inputs are not permitted"),
        (["dpo.beta=-1"], "dpo.beta: Input should be greater than 0"),
        (["method=ppo"], "unknown method 'ppo'"),
        (["optimizer.name=sgd"], "optimizer.name"),
        (["inpo.cache_inversions=true"], "cache_inversions needs inversion_network=reference"),
        (["finetune.rank=zero"], "finetune.rank"),
        (["stepz=3"], "stepz: Extra inputs are not permitted"),
    ],
)
def test_bad_config_is_a_one_line_error(overrides, expected):
    with pytest.raises(PrefalignError) as error:
        load_align_config(None, overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_bad_yaml_and_cli_errors_are_one_line(tmp_path, world):
    import typer
    from typer.testing import CliRunner

    from prefalign.commands.align import align

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpo\ndpo:\n  beta: 100\n  temperature: 3\n")
    with pytest.raises(PrefalignError, match=r"dpo\.temperature: Extra inputs"):
        load_align_config(bad)
    app = typer.Typer()
    app.command()(align)
    model, data = world
    result = CliRunner().invoke(app, ["dpo", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "r"), "--set", "dpo.beta=-5"])
    assert isinstance(result.exception, PrefalignError) and "\n" not in str(result.exception)
    # the example configs all validate
    for file in sorted((ROOT / "configs").glob("*.yaml")):
        load_align_config(file)


def test_run_folder_rules(world, tmp_path):
    model, data = world
    run = tmp_path / "run"
    Trainer(tiny_config(model, data, steps=2), run).train()
    with pytest.raises(PrefalignError, match="already holds checkpoints"):
        Trainer(tiny_config(model, data, steps=2), run).train()
    with pytest.raises(PrefalignError, match="differs from the run's saved .* dpo.beta"):
        Trainer(tiny_config(model, data, steps=4, **{"dpo.beta": 7}), run).train(resume=True)
    result = Trainer(tiny_config(model, data, steps=3), run).train(resume=True)  # more steps: continues
    assert result.steps == 3 and latest_checkpoint(run).name == "step-00000003"


# --------------------------------------------------------------------------------------------------
# A whole run: logs, metrics, hooks, export
# --------------------------------------------------------------------------------------------------


def test_a_run_logs_evaluates_checkpoints_and_exports(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefalign.backbones.loading import load_backbone

    model, data = world
    calls = []

    def hook(context):
        calls.append(context.step)
        return {"custom": float(context.step)}

    overrides = {"checkpoint.keep_last": 1, "eval.every": 2, "eval.annotator": True, "eval.prompts": 3, "eval.sampling_steps": 2}
    result = Trainer(tiny_config(model, data, steps=4, **overrides), tmp_path / "run", hooks=[hook]).train()
    run = tmp_path / "run"
    assert calls == [0, 2, 4]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps"] == 4 and len(metrics["history"]) == 4
    assert {"loss", "implicit_accuracy", "error_model_w", "error_model_l", "error_ref_w", "error_ref_l", "grad_norm", "lr"} <= set(metrics["final"])
    assert metrics["eval"][-1]["custom"] == 4.0 and 0 <= metrics["eval"][-1]["annotator_win_rate"] <= 1
    assert metrics["eval"][0]["annotator_win_rate"] == 0.5  # the base model against itself
    events = [p for p in (run / "tensorboard").rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/implicit_accuracy", "train/error_model_w", "train/error_ref_l", "train/grad_norm", "train/lr", "eval/annotator_score"} <= tags
    assert (run / "config.yaml").is_file()

    # the export is a shapes model folder with the LoRA merged: same outputs as the trained policy
    exported = load_backbone(run / "export")
    policy = result.backbone
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        expected = policy.model_output(x, torch.tensor([10, 700]), cond)
        got = exported.model_output(x, torch.tensor([10, 700]), cond)
    assert torch.allclose(expected, got, atol=1e-5)
    with torch.no_grad():
        policy.unet.disable_adapters()
        base = policy.model_output(x, torch.tensor([10, 700]), cond)
        policy.unet.enable_adapters()
    assert not torch.allclose(base, got, atol=1e-5)  # training moved the model
    info = json.loads((run / "export" / "prefalign_export.json").read_text())
    assert info["method"] == "dpo" and info["steps"] == 4 and info["lora"]["r"] == 16


def test_full_finetuning_adafactor_cosine_accumulation_and_bf16(world, tmp_path):
    model, data = world
    config = tiny_config(
        model, data, method="sft", steps=2,
        **{"finetune.mode": "full", "optimizer.name": "adafactor", "schedule.name": "cosine", "schedule.warmup_steps": 1,
           "gradient_accumulation_steps": 2, "ema.enabled": True, "mixed_precision": "bf16"},
    )
    result = Trainer(config, tmp_path / "run").train()
    assert math.isfinite(result.metrics["final"]["loss"]) and result.metrics["global_pairs_per_step"] == 4
    assert result.metrics["trainable_parameters"] == sum(p.numel() for p in result.backbone.unet.parameters())
    config = tiny_config(model, data, method="inpo", steps=1, **{"finetune.mode": "full", "inpo.inversion": "reference"})
    result = Trainer(config, tmp_path / "run2").train()
    assert result.metrics["final"]["inversion_steps"] >= 1


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def test_learning_rate_schedules():
    constant = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_at(s, 1.0, 10, constant) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    cosine = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(0, 1.0, 11, cosine) == pytest.approx(1.0) and lr_at(10, 1.0, 11, cosine) == pytest.approx(0.1)
    linear = ScheduleConfig(name="linear")
    assert lr_at(5, 2.0, 11, linear) == pytest.approx(1.0)


def test_pairs_are_oriented_ordered_and_decoded_identically_in_workers(world):
    from prefalign.data.validation import decode_image
    from prefalign.training.pairs import BatchLayout, StepPairBatches, open_pairs, pair_loader

    _, data = world
    dropped = open_pairs(data, "drop")
    kept = open_pairs(data, "random")
    assert len(dropped) == 11 and len(kept) == 16  # 5 of 16 labels are ties
    layout = BatchLayout(batch_size=3, num_processes=1, process_index=0, accumulation=1)
    batches = StepPairBatches(dropped, layout, 0, 4, seed=0, resolution=(16, 16), shuffle=False)
    first = batches[0]
    raw = dropped.dataset[0]
    assert raw["label_0"] == 1.0 and torch.equal(first["images_w"][0], decode_image(raw["jpg_0"]))
    raw = dropped.dataset[1]
    assert raw["label_0"] == 0.0 and torch.equal(first["images_w"][1], decode_image(raw["jpg_1"]))
    shuffled = StepPairBatches(dropped, layout, 0, 8, seed=0, resolution=(16, 16))
    rows = torch.cat([shuffled[k]["rows"] for k in range(len(shuffled))]).tolist()
    assert sorted(rows[:11]) != rows[:11] and len(set(rows[:11])) == 11  # an epoch visits every pair once
    from_workers = list(pair_loader(shuffled, num_workers=2))
    assert all(torch.equal(a["images_w"], shuffled[k]["images_w"]) and a["prompts"] == shuffled[k]["prompts"] for k, a in enumerate(from_workers))
    # two processes split the same global batch
    halves = [StepPairBatches(dropped, BatchLayout(2, 2, p, 1), 0, 2, seed=0, resolution=(16, 16)) for p in (0, 1)]
    whole = StepPairBatches(dropped, BatchLayout(4, 1, 0, 1), 0, 2, seed=0, resolution=(16, 16))
    assert torch.cat([halves[0][1]["rows"], halves[1][1]["rows"]]).tolist() == whole[1]["rows"].tolist()
    resized = StepPairBatches(dropped, layout, 0, 1, seed=0, resolution=(8, 8))[0]
    assert resized["images_w"].shape == (3, 3, 8, 8)
