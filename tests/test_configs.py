"""Every shipped config is valid: align configs load through the trainer's config loader, the
accelerate examples through accelerate's own config reader, and the runbook (docs/real-models.md)
names only configs that exist, with the global batches METHODS.md / the reference runs give."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from prefalign.methods import METHODS
from prefalign.training.config import load_align_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
RUNBOOK = ROOT / "docs" / "real-models.md"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_align_configs_validate(path):
    method = yaml.safe_load(path.read_text()).get("method", "dpo")
    if method not in METHODS:
        pytest.skip(f"method {method!r} is not registered yet")
    config = load_align_config(path)
    assert config.method == method
    assert config.method_config() is not None


def test_real_model_configs_have_the_reference_batches():
    """Pairs per optimiser step on 8 GPUs: DPO/RPO 2048 (reference run), InPO 1024 (METHODS.md §3)."""
    expected = {"sd15-dpo.yaml": 2048, "sd15-rpo.yaml": 2048, "sd15-inpo.yaml": 1024, "sd15-dpo-lora.yaml": 1024, "sdxl-dpo-lora.yaml": 1024}
    for name, pairs in expected.items():
        config = load_align_config(ROOT / "configs" / name)
        assert config.batch_size * config.gradient_accumulation_steps * 8 == pairs, name
        assert config.data.validation == "lazy" and config.mixed_precision == "bf16" and config.gradient_checkpointing, name
    dpo = load_align_config(ROOT / "configs" / "sd15-dpo.yaml")
    assert dpo.optimizer.scale_lr and dpo.optimizer.learning_rate * 2048 == pytest.approx(2.048e-5)
    assert dpo.dpo.beta == 5000 and dpo.steps == 2000 and dpo.schedule.warmup_steps == 500 and dpo.finetune.mode == "full"
    inpo = load_align_config(ROOT / "configs" / "sd15-inpo.yaml")
    assert inpo.inpo.beta == 2000 and inpo.steps == 400
    assert load_align_config(ROOT / "configs" / "sdxl-dpo-lora.yaml").finetune.mode == "lora"


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads; unknown keys raise
    assert isinstance(config, ClusterConfig)
    kind = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}[path.stem.split("-")[0]]
    assert config.distributed_type == kind
    assert config.num_processes % config.num_machines == 0 and config.num_processes >= 2
    assert config.mixed_precision == "bf16" and not config.use_cpu
    if kind == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # LoRA: trainable and frozen weights share units
    if kind == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["gradient_accumulation_steps"] == "auto"  # the align config's value
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


def test_the_runbook_names_existing_configs():
    text = RUNBOOK.read_text()
    named = set(re.findall(r"configs/[\w./-]+\.yaml", text))
    assert {"configs/sd15-dpo.yaml", "configs/sd15-rpo.yaml", "configs/sd15-inpo.yaml", "configs/sdxl-dpo-lora.yaml",
            "configs/sd-inpaint-prefpaint.yaml", "configs/accelerate/ddp-1node.yaml", "configs/accelerate/ddp-multinode.yaml",
            "configs/accelerate/fsdp.yaml", "configs/accelerate/deepspeed-zero2.yaml"} <= named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
    assert "accelerate launch" in text and "-m prefalign.cli align" in text
