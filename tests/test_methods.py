"""The losses of METHODS.md §1–3 on fixed tensors, their identities, and one optimisation step each."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
from prefalign.diffusion import NoiseSchedule, bdia_invert, ddim_invert
from prefalign.errors import PrefalignError
from prefalign.methods import DPO, RPO, SFT, InPO, get_method
from prefalign.methods.base import PreferenceBatch, StepRandomness, TrainingModels
from prefalign.methods.dpo import DPOConfig, dpo_loss
from prefalign.methods.inpo import (
    InPOConfig,
    batched_bdia_invert,
    batched_ddim_invert,
    exact_grid,
    inpo_target,
    reference_grid,
)
from prefalign.methods.rpo import RPOConfig, pair_embeddings, rpo_loss, rpo_weights
from prefalign.methods.sft import sft_loss
from prefalign.training.config import FinetuneConfig
from prefalign.training.lora import prepare_finetuning


def _nll_sigmoid(x: float) -> float:
    """−log σ(x), by hand."""
    return math.log(1 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# Losses on fixed tensors
# --------------------------------------------------------------------------------------------------


def test_dpo_loss_matches_hand_computation():
    model_w, model_l = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    ref_w, ref_l = torch.tensor([0.12, 0.18]), torch.tensor([0.29, 0.12])
    loss, inside = dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0)
    # pair 1: Δ = (0.10−0.12) − (0.30−0.29) = −0.03 → −(β/2)Δ = 0.15;  pair 2: Δ = 0.04 → −0.2
    assert inside.tolist() == pytest.approx([0.15, -0.2], abs=1e-6)
    assert float(loss) == pytest.approx((_nll_sigmoid(0.15) + _nll_sigmoid(-0.2)) / 2, abs=1e-6)
    assert float((inside > 0).float().mean()) == 0.5  # implicit accuracy


def test_sft_loss_is_the_per_sample_mean_error():
    prediction = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 0.0]]]])
    # sample errors: (1 + 9)/2 = 5 and (4 + 0)/2 = 2 → mean 3.5 (a mean over C,H,W, not a sum)
    assert float(sft_loss(prediction, target)) == pytest.approx(3.5)


def test_rpo_loss_matches_hand_computation():
    delta_w = torch.tensor([0.01, -0.02])
    delta_l = torch.tensor([0.03, 0.00])
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # unit vectors, cosine 0.6
    beta, tau = 10.0, 0.5
    loss, logits, weights = rpo_loss(delta_w, delta_l, embeddings, beta, tau, "inside")
    L = [[-(beta / 2) * (delta_w[i].item() - delta_l[j].item()) for j in range(2)] for i in range(2)]
    off = math.exp(-(1 - 0.6) / tau)
    w = [[1 / (1 + off), off / (1 + off)], [off / (1 + off), 1 / (1 + off)]]
    expected_inside = sum(_nll_sigmoid(w[i][j] * L[i][j]) for i in range(2) for j in range(2)) / 4
    expected_outside = sum(sum(w[i][j] * _nll_sigmoid(L[i][j]) for j in range(2)) for i in range(2)) / 2
    assert torch.allclose(logits, torch.tensor(L), atol=1e-6)
    assert torch.allclose(weights, torch.tensor(w), atol=1e-6)
    assert float(loss) == pytest.approx(expected_inside, abs=1e-6)
    outside, _, _ = rpo_loss(delta_w, delta_l, embeddings, beta, tau, "outside")
    assert float(outside) == pytest.approx(expected_outside, abs=1e-6)


def test_rpo_with_one_pair_is_dpo():
    torch.manual_seed(0)
    for _ in range(5):
        mw, ml, rw, rl = torch.rand(4, 1) * 0.2
        dpo, _ = dpo_loss(mw, ml, rw, rl, 5000.0)
        for weighting in ("inside", "outside"):
            rpo, _, _ = rpo_loss(mw - rw, ml - rl, torch.randn(1, 8), 5000.0, 0.5, weighting)
            assert float(rpo) == float(dpo)


def test_rpo_weights_rows_sum_to_one_and_favour_similar_pairs():
    embeddings = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    weights = rpo_weights(embeddings, 0.5)
    assert torch.allclose(weights.sum(1), torch.ones(3))
    assert weights[0, 1] > weights[0, 2]
    both = pair_embeddings("both", torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5))
    assert both.shape == (3, 9) and torch.allclose(both.norm(dim=1), torch.ones(3))


def test_inpo_target_reconstructs_the_latent():
    schedule = NoiseSchedule.from_config(DEFAULT_SCHEDULER_CONFIG)
    torch.manual_seed(0)
    x0, x_t = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    alpha_bar = schedule.alpha_bar(t)
    eps = inpo_target(x_t, x0, alpha_bar)
    rebuilt = alpha_bar.sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - alpha_bar).sqrt().float().view(-1, 1, 1, 1) * eps
    assert (rebuilt - x_t).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------------
# InPO inversion
# --------------------------------------------------------------------------------------------------


def _toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1))) if torch.is_tensor(t) else float(t)
    return 0.3 * torch.tanh(x) + 0.001 * t * torch.sin(x)


def test_inversion_grids():
    schedule = NoiseSchedule.from_config(DEFAULT_SCHEDULER_CONFIG)
    for t in (0, 1, 57, 500, 999):
        grid = exact_grid(schedule, t, 10)
        assert grid[0] == -1 and grid[-1] == t and len(grid) - 1 == max(1, math.ceil((t + 1) * 10 / 1000))
        coarse = reference_grid(schedule, t, 10, "at_or_above")
        assert coarse[-1] >= t and coarse[-1] - t < 100  # nearest grid point above t (grid spacing 100)


def test_batched_inversions_match_the_diffusion_module():
    schedule = NoiseSchedule.from_config(DEFAULT_SCHEDULER_CONFIG)
    torch.manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ts = [37, 512, 998]
    eps_fn = lambda x, t, rows: _toy_eps(x, t)  # noqa: E731
    grids = [exact_grid(schedule, t, 10) for t in ts]
    batched = batched_ddim_invert(eps_fn, x0, grids, schedule)
    for i, grid in enumerate(grids):
        single = ddim_invert(_toy_eps, x0[i : i + 1], schedule, None, levels=grid)
        assert torch.allclose(batched[i : i + 1], single, atol=1e-12)
    # reference variant: coarse grid, stochastic term, target-level ε
    grids = [reference_grid(schedule, t, 10, "at_or_above") for t in ts]
    generators = [torch.Generator().manual_seed(k) for k in range(3)]
    batched = batched_ddim_invert(eps_fn, x0, grids, schedule, stochastic_scale=0.1, noise_generators=generators, eps_timestep="target")
    for i, grid in enumerate(grids):
        single = ddim_invert(
            _toy_eps, x0[i : i + 1], schedule, None, levels=grid, stochastic_scale=0.1,
            generator=torch.Generator().manual_seed(i), eps_timestep="target",
        )
        assert torch.allclose(batched[i : i + 1], single, atol=1e-12)
    # BDIA: the top of bdia_invert's pair
    grids = [exact_grid(schedule, t, 10) for t in ts]
    batched = batched_bdia_invert(eps_fn, x0, grids, schedule, gamma=0.9)
    for i, grid in enumerate(grids):
        top, _ = bdia_invert(_toy_eps, x0[i : i + 1], schedule, None, 0.9, levels=grid)
        assert torch.allclose(batched[i : i + 1], top, atol=1e-10)


def test_inpo_options_are_validated():
    with pytest.raises(ValueError, match="cache_inversions"):
        InPOConfig(cache_inversions=True)
    with pytest.raises(ValueError, match="bdia_gamma"):
        InPOConfig(inversion="reference", bdia_gamma=0.9)
    assert InPOConfig().resolved_stochastic_scale() == 0.0
    assert InPOConfig(inversion="reference").resolved_stochastic_scale() == 0.1
    with pytest.raises(PrefalignError, match="unknown method"):
        get_method("ppo")


# --------------------------------------------------------------------------------------------------
# Methods on a tiny model
# --------------------------------------------------------------------------------------------------


class LocalModels(TrainingModels):
    """A single-process TrainingModels (as the trainer builds, without accelerate)."""

    def __init__(self, backbone, switch):
        self.backbone, self.switch = backbone, switch
        self.image_embedder = None

    @contextmanager
    def reference(self):
        with self.switch(self.backbone) as reference:
            yield reference

    def gather(self, tensor):
        return tensor


def tiny_models(mode: str = "lora", seed: int = 0) -> LocalModels:
    torch.manual_seed(seed)
    backbone = ShapesBackbone(new_shapes_unet(shapes_unet_config(16, block_out_channels=(8, 16, 16))), DEFAULT_SCHEDULER_CONFIG, 16)
    switch = prepare_finetuning(backbone, FinetuneConfig(mode=mode, rank=4, init="default"), needs_reference=True)
    if mode == "lora":  # start away from policy == reference, so errors differ
        with torch.no_grad():
            for name, p in backbone.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return LocalModels(backbone, switch)


def tiny_batch(size: int = 4, seed: int = 0, step: int = 0) -> PreferenceBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red circle in the centre on a white background", "a blue square in the top left on a beige background"] * size
    return PreferenceBatch(
        prompts=prompts[:size],
        images_w=torch.rand(size, 3, 16, 16, generator=g),
        images_l=torch.rand(size, 3, 16, 16, generator=g),
        rows=torch.arange(size),
        rng=StepRandomness(seed, step, 0, tuple(range(size))),
    )


def test_rpo_method_with_one_pair_equals_dpo_method():
    models = tiny_models()
    batch = tiny_batch(1)
    params = [p for p in models.backbone.unet.parameters() if p.requires_grad]
    out_dpo = DPO(DPOConfig(beta=500.0)).loss(batch, models)
    grads_dpo = torch.autograd.grad(out_dpo.loss, params)
    out_rpo = RPO(RPOConfig(beta=500.0)).loss(batch, models)
    grads_rpo = torch.autograd.grad(out_rpo.loss, params)
    assert float(out_dpo.loss.detach()) == pytest.approx(float(out_rpo.loss.detach()), abs=1e-7)
    assert float(out_dpo.loss.detach()) != pytest.approx(math.log(2), abs=1e-6)  # policy ≠ reference: a real test
    assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(grads_dpo, grads_rpo))


def test_randomness_is_independent_of_the_process_split():
    a = StepRandomness(3, 7, 0, (0, 1, 2, 3))
    b = StepRandomness(3, 7, 0, (2, 3))
    assert torch.equal(torch.randn(2, generator=a.per_sample("eps")[2]), torch.randn(2, generator=b.per_sample("eps")[0]))
    assert torch.equal(torch.randn(2, generator=a.shared("t")), torch.randn(2, generator=a.per_sample("t")[0]))
    assert not torch.equal(torch.randn(2, generator=a.per_sample("eps")[0]), torch.randn(2, generator=a.per_sample("eps")[1]))


@pytest.mark.parametrize(
    "method",
    [
        SFT(),
        DPO(DPOConfig(beta=200.0)),
        RPO(RPOConfig(beta=200.0)),
        InPO(InPOConfig(beta=200.0)),
        InPO(InPOConfig(beta=200.0, inversion="reference", inversion_network="reference", cache_inversions=True)),
        InPO(InPOConfig(beta=200.0, bdia_gamma=0.9)),
    ],
    ids=["sft", "dpo", "rpo", "inpo-exact", "inpo-reference-cached", "inpo-bdia"],
)
def test_one_step_improves_the_loss_on_its_batch(method):
    models = tiny_models()
    batch = tiny_batch(4)
    params = [p for p in models.backbone.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05 if method.name == "sft" else 2e-3)
    before = method.loss(batch, models)
    optimizer.zero_grad()
    before.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = method.loss(batch, models)
    assert after.loss.item() < before.loss.item()
    if method.name != "sft":
        assert set(before.metrics) >= {"implicit_accuracy", "error_model_w", "error_model_l", "error_ref_w", "error_ref_l"}
    if method.name in ("dpo", "rpo") or (method.name == "inpo" and method.config.inversion_network == "reference"):
        # the reference did not move (a policy-inverted InPO latent moves with the policy)
        assert float(after.metrics["error_ref_w"]) == pytest.approx(float(before.metrics["error_ref_w"]), abs=1e-6)
    if method.name == "inpo" and method.config.cache_inversions:
        assert method.cache_hits == 8  # the second pass reused all 8 inversions


def test_inpo_latents_sit_on_the_forward_process():
    """x_t of the exact variant satisfies x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε* with the loss's ε*."""
    models = tiny_models()
    method = InPO(InPOConfig())
    backbone = models.backbone
    batch = tiny_batch(2)
    x0 = backbone.images_to_latents(batch.images_w)
    cond = backbone.encode_prompts(batch.prompts)
    grids = [method.grid(backbone.schedule, t) for t in (123, 877)]
    x_t = method.invert(models, x0, cond, grids, [torch.Generator() for _ in grids])
    alpha_bar = backbone.schedule.alpha_bar(torch.tensor([123, 877]))
    eps = inpo_target(x_t, x0, alpha_bar)
    rebuilt = backbone.schedule.add_noise(x0, eps, torch.tensor([123, 877]))
    assert (rebuilt - x_t).abs().max() < 1e-6
    assert not torch.allclose(x_t, x0)


def test_full_finetuning_reference_is_a_frozen_copy():
    models = tiny_models("full")
    batch = tiny_batch(2)
    out = DPO(DPOConfig(beta=100.0)).loss(batch, models)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # identical networks at the start
    out.loss.backward()
    assert models.switch.frozen_copy is not None
    assert all(p.grad is None for p in models.switch.frozen_copy.parameters())
