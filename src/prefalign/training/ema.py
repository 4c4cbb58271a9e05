"""Exponential moving average of the trainable parameters (kept in float32, checkpointed)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class EMA:
    """shadow ← d·shadow + (1 − d)·θ after every optimiser step, d = min(decay, (1+t)/(10+t)) with
    ``warmup`` (t = optimiser steps so far), else d = decay."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.shadow = [p.detach().clone().float() for p in parameters]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, parameters: Sequence[torch.nn.Parameter], step: int) -> None:
        d = self.decay_at(step)
        for shadow, p in zip(self.shadow, parameters):
            shadow.lerp_(p.detach().float(), 1 - d)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(tensors[str(i)])

    @contextmanager
    def applied(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into ``parameters``."""
        backup = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            for p, s in zip(parameters, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(parameters, backup):
                    p.copy_(b)
