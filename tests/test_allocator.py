"""prefalign.allocator: the glibc settings are applied, can be opted out of, and stop the page faults
of a sampler (which allocates and frees activation-sized tensors at every step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefalign import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    from prefalign.allocator import keep_freed_memory
    assert keep_freed_memory()
from prefalign.backbones.loading import load_backbone
from prefalign.sampling import generate
backbone = load_backbone("shapes-t2i")
prompts = ["a red circle on a white background"] * 16
generate(backbone, prompts[:4], seed=0, steps=1, batch_size=4)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
generate(backbone, prompts, seed=0, steps=8, batch_size=16)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "PREFALIGN_MALLOC")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_settings_remove_page_faults_of_sampling():
    """8 DDIM steps of the shipped model on 16 prompts: glibc's defaults give the activations' pages
    back and fault them in again (~2.5·10⁵ minor faults, 8× as many as with the settings: ≥ 3× asserted)."""
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 50_000, default
    assert tuned < default / 3, (tuned, default)


def test_opt_out_and_user_tunables(monkeypatch):
    monkeypatch.setenv("PREFALIGN_MALLOC", "default")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("PREFALIGN_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator.keep_freed_memory() is True
