"""Diff-Instruct++ (Luo, 2024; METHODS.md §6): align a one-step generator with a reward, kept near the
CFG-guided reference diffusion model by the Integral KL, without image data.

Three networks: the one-step generator g_θ (the trainer's policy: LoRA adapters or the full UNet,
:mod:`prefalign.backbones.one_step`), the teaching assistant (TA) diffusion s_ψ that tracks the
generator's distribution, and the frozen reference ε_ref (the trainer's reference switch). g_θ and s_ψ
both start as the reference (zero-initialised LoRA B, or copies), so at step 0 g_θ(z, c) is the
reference's one-step x̂_0 at t*. One optimiser step of the trainer is

    K_TA times (TA step):   x0 = sg(g_θ(z, c));  t ~ π(t);  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
                            L_ψ = mean_B λ(t)·‖ε_ψ(x_t, t, c) − ε‖²                 (sum over C, H, W)
    generator step:         x0 = g_θ(z, c);  t ~ π(t);  x_t as above
                            ε_cfg = ε_ref(x_t, t, ∅) + ω·(ε_ref(x_t, t, c) − ε_ref(x_t, t, ∅))
                            g     = w(t)·sg(ε_cfg − ε_ψ(x_t, t, c))       ∝ +(s_ψ − s_ref)  (s = −ε/σ_t)
                            L_θ   = mean_B [ Σ_{C,H,W} g·x_t ] − α_rew·mean_B r(x0, c)

so ∂L_θ/∂x_t = g/B and the generator moves along −g ∝ s_ref − s_ψ: towards where the CFG teacher puts
more mass than the generator does (the IKL gradient, Diff-Instruct eq. 3.6: Grad(θ) =
E w(t)·(s_ψ − s_ref)ᵀ ∂x_t/∂θ).

**Sign.** METHODS.md §6 writes g = w(t)·sg(ε_ψ − ε_cfg). With s = −ε/σ_t that is ∝ −(s_ψ − s_ref),
which *ascends* the KL (a test on Gaussians, where every score is known, shows it diverging); this file
uses ε_cfg − ε_ψ, the sign of the Diff-Instruct / DMD / SiD reference code (DMD's gradient on x0 is
(x̂_0^fake − x̂_0^real)/w = (σ_t/α_t)·(ε_real − ε_fake)/w).

Reference-code defaults (SiD-LSG's Stable-Diffusion code, ``sid_training_loop.py``, which the DI++ SD
experiments build on; DMD for the weighting), each a named option:

- t* = 625 (``generator_timestep``), the generator input √(1−ᾱ_{t*})·z, x̂_0 clamped as the scheduler
  config says (``generator_clip``);
- π(t) = U{20, …, 979} (``t_min``, ``t_max`` exclusive);
- w(t) = σ_t / (ᾱ_t·m), m = mean_{C,H,W}|x0 − x̂_0^cfg| clipped at 1e-5 (``weighting="dmd"``): the
  generator's gradient on x0 is exactly DMD's (x̂_0^ψ − x̂_0^cfg)/m; ``"mean_abs"``: w = 1/m (METHODS.md's
  example); ``"none"``: w = 1;
- λ(t) = 1 on ε (``ta_weighting="epsilon"``; for v-models the reference's v-MSE·snr/(snr+1) is the same
  number), ``"snr"``: ᾱ/(1−ᾱ) (x̂_0-MSE);
- K_TA = 1 TA step per generator step (``ta_steps``); Adam with β1 = 0 for both networks (the TA's
  optimiser here, the generator's through the method's trainer defaults); non-finite gradients of
  both replaced by nan_to_num(nan=0, ±inf=±1e5) as the reference; an EMA of the generator (trainer).
- ω = 3 (``guidance_scale``, the shapes models' sampling scale), α_rew = 0 (``alpha_rew``: plain
  distillation of the CFG teacher — "CFG is secretly RLHF"; give ``reward`` and α_rew > 0 for DI++).

Prompts (the method is data-free): ``prompts`` (a prompts file) or, for shapes models, the world's
prompts of ``prompt_split``; sample i of a micro-step draws its prompt with its own seeded generator.
The reward r is any differentiable scorer: a reward model folder, ``clip`` / ``clip:FOLDER`` (the world's
CLIP score, cosine of image and prompt embeddings) or ``module:function``; for latent models it sees
the VAE-decoded image (gradients through the decoder).

Networks: with LoRA fine-tuning the TA is a second adapter ("ta") on the same UNet (the reference
stays "adapters disabled"; no copy of the weights); with full fine-tuning it is a copy of the UNet. The
TA's weights and optimiser state are checkpointed with the run. With gradient accumulation the TA
steps run once per optimiser step (first micro-step), on one micro-batch each.

The policy is marked as a one-step generator (``backbone.one_step``), so evaluation during training
(``eval.every``; one-step samples by the method's trainer defaults) and the export sample it with one
network call; the annotator hook's "base" is then the generator at step 0 (the reference's one-step
x̂_0), not the multi-step base model — ``benchmarks/diff_instruct_pp.py`` compares with that.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from prefalign.backbones.base import Backbone
from prefalign.backbones.one_step import OneStepSpec, generator_x0
from prefalign.diffusion.schedule import NoiseSchedule, predicted_x0
from prefalign.errors import PrefalignError
from prefalign.methods.base import (
    LossOutput,
    Method,
    MethodConfig,
    PreferenceBatch,
    StepRandomness,
    TrainingModels,
    drop_prompts,
    rand_per_sample,
    randint_per_sample,
    randn_per_sample,
    replace_nonfinite_gradients_,
)
from prefalign.rewards.base import Scorer

Weighting = Literal["dmd", "mean_abs", "none"]
TAWeighting = Literal["epsilon", "snr"]
TA_ADAPTER = "ta"


# --------------------------------------------------------------------------------------------------
# The equations (METHODS.md §6)
# --------------------------------------------------------------------------------------------------


def sample_levels(generators: Sequence[torch.Generator], t_min: int, t_max: int) -> Tensor:
    """π(t): t ~ U{t_min, …, t_max − 1}, one per generator. → [B] int64 (CPU)."""
    return randint_per_sample(generators, t_max - t_min) + t_min


def ikl_weight(x0: Tensor, x0_ref: Tensor, alpha_bar_t: Tensor, weighting: Weighting) -> Tensor:
    """w(t) per sample [B] (float32).

    m = mean_{C,H,W} |x0 − x̂_0^cfg| clipped at 1e-5 (the reference's normaliser);
    ``dmd``: w = √(1−ᾱ_t)/(ᾱ_t·m) — then α_t·w·(ε_cfg − ε_ψ) = (x̂_0^ψ − x̂_0^cfg)/m, DMD's gradient on x0;
    ``mean_abs``: w = 1/m;  ``none``: w = 1.
    x0, x0_ref: [B, C, h, w]; alpha_bar_t: [B] float64."""
    if weighting == "none":
        return torch.ones(x0.shape[0], device=x0.device)
    m = (x0.float() - x0_ref.float()).abs().flatten(1).mean(1).clamp(min=1e-5)  # [B]
    if weighting == "mean_abs":
        return 1 / m
    alpha_bar_t = alpha_bar_t.to(device=x0.device, dtype=torch.float64)
    return ((1 - alpha_bar_t).sqrt() / alpha_bar_t).float() / m


def ikl_gradient(eps_ta: Tensor, eps_cfg: Tensor, weight: Tensor) -> Tensor:
    """g = w(t)·(ε_cfg − ε_ψ) [B, C, h, w] (no gradients): the IKL gradient with respect to x_t,
    ∝ s_ψ − s_ref (s = −ε/σ_t). weight: [B]."""
    return (weight.view(-1, *([1] * (eps_ta.dim() - 1))) * (eps_cfg.float() - eps_ta.float())).detach()


def ikl_surrogate(x_t: Tensor, gradient: Tensor) -> Tensor:
    """Σ_{C,H,W} sg(g)·x_t per sample [B]: its gradient with respect to x_t is exactly g."""
    return (gradient.detach() * x_t.float()).flatten(1).sum(1)


def generator_objective(ikl: Tensor, reward: Tensor | None, alpha_rew: float) -> Tensor:
    """L_θ = mean_B ikl − α_rew·mean_B r (a scalar; the reward term only when α_rew > 0)."""
    loss = ikl.mean()
    if reward is not None and alpha_rew > 0:
        loss = loss - alpha_rew * reward.float().mean()
    return loss


def ta_lambda(alpha_bar_t: Tensor, ta_weighting: TAWeighting) -> Tensor:
    """λ(t) [B] float32: 1 (``epsilon``) or ᾱ/(1−ᾱ) (``snr``: the x̂_0-MSE)."""
    if ta_weighting == "epsilon":
        return torch.ones(alpha_bar_t.shape, dtype=torch.float32, device=alpha_bar_t.device)
    return (alpha_bar_t / (1 - alpha_bar_t)).float()


def ta_loss(eps_pred: Tensor, eps: Tensor, weight: Tensor) -> Tensor:
    """L_ψ = mean_B λ(t)·Σ_{C,H,W} (ε_ψ − ε)² (the reference's loss.sum()/batch). → scalar."""
    per_sample = (eps_pred.float() - eps.float()).pow(2).flatten(1).sum(1)  # [B]
    return (weight.to(per_sample.device) * per_sample).mean()


# --------------------------------------------------------------------------------------------------
# The teaching assistant network
# --------------------------------------------------------------------------------------------------


def _unwrap(models: TrainingModels, module: torch.nn.Module) -> torch.nn.Module:
    accelerator = getattr(models, "accelerator", None)
    return accelerator.unwrap_model(module) if accelerator is not None else module


class TeachingAssistant:
    """``with ta(backbone): …`` makes ``backbone`` compute the TA's ε_ψ (see the module docstring).

    LoRA: a second adapter on the (unwrapped) policy UNet, made active for the block; the
    ``requires_grad`` flags of every parameter are restored afterwards (peft's ``set_adapter`` changes
    them). Full fine-tuning: a separate copy of the UNet, swapped in for the block. In both cases the
    block runs the unwrapped UNet, so TA steps never go through a distributed wrapper."""

    def __init__(self, unet: torch.nn.Module, mode: Literal["lora", "full"], copy_module: torch.nn.Module | None = None):
        self.unet = unet
        self.mode = mode
        self.copy = copy_module
        module = copy_module if mode == "full" else unet
        if mode == "full":
            self.named = [(n, p) for n, p in module.named_parameters()]
        else:
            self.named = [(n, p) for n, p in module.named_parameters() if f".{TA_ADAPTER}." in n and "lora_" in n]
        for _, p in self.named:
            p.requires_grad_(True)

    @classmethod
    def create(cls, unet: torch.nn.Module) -> TeachingAssistant:
        """Build the TA for the (unwrapped) policy UNet: a LoRA adapter with the policy adapter's config
        (B = 0, so the TA starts as the reference) or a full copy (the policy equals the reference at set-up)."""
        configs = getattr(unet, "peft_config", None) or {}
        if "default" in configs:
            if TA_ADAPTER not in configs:
                flags = {n: p.requires_grad for n, p in unet.named_parameters()}
                with warnings.catch_warnings():  # peft warns about a second adapter: that is the point
                    warnings.simplefilter("ignore", UserWarning)
                    unet.add_adapter(copy.deepcopy(configs["default"]), adapter_name=TA_ADAPTER)
                unet.set_adapter("default")
                for name, p in unet.named_parameters():
                    p.requires_grad_(flags.get(name, False))
            return cls(unet, "lora")
        return cls(unet, "full", copy.deepcopy(unet).train())

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    @contextmanager
    def __call__(self, backbone: Backbone) -> Iterator[Backbone]:
        wrapped = backbone.unet
        if self.mode == "full":
            backbone.unet = self.copy
            try:
                yield backbone
            finally:
                backbone.unet = wrapped
            return
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        backbone.unet = self.unet
        self.unet.set_adapter(TA_ADAPTER)
        try:
            yield backbone
        finally:
            self.unet.set_adapter("default")
            for p, flag in flags:
                p.requires_grad_(flag)
            backbone.unet = wrapped


# --------------------------------------------------------------------------------------------------
# Prompts and rewards
# --------------------------------------------------------------------------------------------------


def prompt_pool(backbone: Backbone, prompts_file: str | None, split: str) -> list[str]:
    """The prompts the generator trains on: a prompts file, or the shapes world's prompts of ``split``."""
    if prompts_file is not None:
        from prefalign.commands.common import read_prompts

        pool = read_prompts(None, Path(prompts_file))
        if not pool:
            raise PrefalignError(f"{prompts_file} holds no prompts; give a file with one prompt per line")
        return pool
    if not backbone.kind.startswith("shapes"):
        raise PrefalignError(
            "diff_instruct_pp needs prompts for this model: set diff_instruct_pp.prompts to a prompts file "
            "(.txt one per line, .jsonl/.json/.csv with a prompt column)"
        )
    from prefalign.worlds.shapes.prompts import all_scenes

    return [scene.prompt for scene in all_scenes(split)]


def draw_prompts(pool: Sequence[str], generators: Sequence[torch.Generator]) -> list[str]:
    """One prompt per sample, uniformly from ``pool`` with the sample's own generator."""
    return [pool[int(i)] for i in randint_per_sample(generators, len(pool))]


class ClipScore(Scorer):
    """The world's CLIP score: cosine similarity of the image and prompt embeddings [B] (differentiable
    with respect to the images; the encoder is frozen)."""

    differentiable = True

    def __init__(self, clip: torch.nn.Module, name: str = "clip"):
        self.clip = clip.eval().requires_grad_(False)
        self.name = name

    def score(self, images: Tensor, prompts: Sequence[str], **cond: Any) -> Tensor:
        device = self.clip.logit_scale.device
        return self.clip.similarity(images.to(device), list(prompts))


def load_reward(spec: str, device: torch.device | str = "cpu") -> Scorer:
    """``clip`` / ``shapes-clip`` / ``clip:FOLDER`` (the world's CLIP score) or any
    :func:`prefalign.rewards.base.load_scorer` spec (reward model folder, ``module:function``, annotator).
    A scorer that is an ``nn.Module`` is frozen (gradients reach only the images)."""
    if spec in ("clip", "shapes-clip") or spec.startswith("clip:"):
        from prefalign.rewards.clip import load_clip

        source = "shapes-clip" if ":" not in spec else spec.split(":", 1)[1]
        return ClipScore(load_clip(source, device), name=spec)
    from prefalign.rewards.base import load_scorer

    scorer = load_scorer(spec, device=device)
    if isinstance(scorer, torch.nn.Module):
        scorer.eval().requires_grad_(False)
    return scorer


# --------------------------------------------------------------------------------------------------
# Optimiser state ↔ (tensors, JSON)
# --------------------------------------------------------------------------------------------------


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        plain[str(param_id)] = {}
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().clone()
            else:
                plain[str(param_id)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class DiffInstructPPConfig(MethodConfig):
    """Diff-Instruct++ options (defaults: the reference code; see the module docstring)."""

    reward: str | None = Field(None, description="differentiable reward: a reward model folder, clip / clip:FOLDER (the world's CLIP score) or module:function")
    alpha_rew: float = Field(0.0, ge=0, description="α_rew, weight of the reward (0: plain distillation of the CFG teacher)")
    guidance_scale: float = Field(3.0, ge=0, description="ω, classifier-free guidance of the reference teacher")
    generator_timestep: int = Field(625, ge=0, description="t*, the level the one-step generator evaluates the UNet at (SiD-LSG: 625)")
    generator_clip: Literal["scheduler", "none"] = Field("scheduler", description="clamp the generator's x̂_0 as the scheduler's clip_sample says, or never")
    t_min: int = Field(20, ge=0, description="π(t) = U{t_min, …, t_max − 1} (reference 20)")
    t_max: int = Field(980, ge=1, description="exclusive upper level of π(t) (reference 980)")
    weighting: Weighting = Field("dmd", description="w(t): dmd = σ/(ᾱ·mean|x0 − x̂0_cfg|) (reference), mean_abs = 1/mean|x0 − x̂0_cfg|, none = 1")
    ta_steps: int = Field(1, ge=1, description="K_TA, teaching-assistant steps per generator step")
    ta_learning_rate: float | None = Field(None, gt=0, description="TA learning rate (None: the generator's learning rate of the step)")
    ta_betas: tuple[float, float] = Field((0.0, 0.999), description="Adam betas of the TA (reference: β1 = 0)")
    ta_weighting: TAWeighting = Field("epsilon", description="λ(t) of the TA loss: epsilon (ε-MSE, reference) or snr (x̂0-MSE)")
    ta_prompt_dropout: float = Field(0.0, ge=0, le=1, description="share of TA captions replaced by the empty prompt")
    prompts: str | None = Field(None, description="prompts file to train on (default for shapes models: the world's prompts)")
    prompt_split: Literal["train", "all"] = Field("train", description="shapes world prompts: train (held-out combinations excluded) or all")

    @model_validator(mode="after")
    def _check_levels(self) -> DiffInstructPPConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
        return self


class DiffInstructPP(Method):
    """Diff-Instruct++: the one-step generator step of METHODS.md §6 as the loss, K_TA TA steps in the
    rollout (on the first micro-step of each optimiser step)."""

    name = "diff_instruct_pp"
    config_class = DiffInstructPPConfig
    data = "none"
    replace_nonfinite_gradients = True
    #: Trainer settings of the reference (under any config file and --set): Adam with β1 = 0 and no
    #: weight decay, no gradient-norm clipping, an EMA of the generator, one-step evaluation samples.
    trainer_defaults: ClassVar[dict[str, Any]] = {
        "optimizer": {"betas": [0.0, 0.999], "weight_decay": 0.0},
        "grad_clip": 0.0,
        "ema": {"enabled": True, "decay": 0.99},
        "eval": {"sampling_steps": 1},
    }

    def __init__(self, config: DiffInstructPPConfig | None = None):
        super().__init__(config)
        self.headline_metric = "reward" if self.config.reward else "ta_loss"
        self.spec: OneStepSpec | None = None
        self.ta: TeachingAssistant | None = None
        self.ta_optimizer: torch.optim.Optimizer | None = None
        self.scorer: Scorer | None = None
        self.pool: list[str] = []
        self._saved_optimizer: dict | None = None

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, models: TrainingModels) -> None:
        config: DiffInstructPPConfig = self.config
        backbone = models.backbone
        schedule = backbone.schedule
        T = schedule.num_train_timesteps
        if config.t_max > T or config.generator_timestep >= T:
            raise PrefalignError(
                f"diff_instruct_pp levels must lie in 0..{T - 1}: t_max={config.t_max} (exclusive), generator_timestep={config.generator_timestep}"
            )
        if backbone.is_inpainting:
            raise PrefalignError("diff_instruct_pp trains text-to-image one-step generators; give a text-to-image model")
        clip = schedule.clip_sample_range if config.generator_clip == "scheduler" else None
        self.spec = OneStepSpec(config.generator_timestep, clip, self.name, config.guidance_scale)
        backbone.one_step = self.spec  # evaluation hooks and the export sample it in one step
        self.pool = prompt_pool(backbone, config.prompts, config.prompt_split)
        if config.alpha_rew > 0 and config.reward is None:
            raise PrefalignError("diff_instruct_pp.alpha_rew > 0 needs a reward: pass --reward (a reward model folder, clip, or module:function)")
        if config.reward is not None:
            self.scorer = load_reward(config.reward, backbone.device)
            if config.alpha_rew > 0 and not self.scorer.differentiable:
                raise PrefalignError(
                    f"the reward {config.reward!r} is not differentiable (gradients cannot reach the images); use a reward model "
                    "folder or clip, or set --alpha-rew 0 to only log it"
                )
        self.ta = TeachingAssistant.create(_unwrap(models, backbone.unet))
        self.ta_optimizer = torch.optim.AdamW(
            self.ta.parameters, lr=config.ta_learning_rate or 0.0, betas=tuple(config.ta_betas), eps=1e-8, weight_decay=0.0
        )

    # ---- TA steps (the rollout) --------------------------------------------------------------
    def rollout(self, batch: PreferenceBatch, models: TrainingModels) -> PreferenceBatch:
        if batch.rng.micro_step == 0:
            batch.extras["ta_metrics"] = self.teaching_assistant_steps(batch.rng, models)
        return batch

    def teaching_assistant_steps(self, rng: StepRandomness, models: TrainingModels) -> dict[str, float]:
        """K_TA steps of L_ψ on detached generator samples; returns the mean TA loss."""
        config: DiffInstructPPConfig = self.config
        backbone = models.backbone
        lr = config.ta_learning_rate or models.learning_rate
        if not lr > 0:
            raise PrefalignError("no learning rate for the teaching assistant: set diff_instruct_pp.ta_learning_rate")
        for group in self.ta_optimizer.param_groups:
            group["lr"] = lr
        losses, mses = [], []
        for k in range(config.ta_steps):
            prompts = draw_prompts(self.pool, rng.per_sample(f"ta{k}_prompt"))
            with torch.no_grad():
                x0 = generator_x0(backbone, self._noise(rng, f"ta{k}_z", backbone), backbone.encode_prompts(prompts), self.spec)
            t = sample_levels(rng.per_sample(f"ta{k}_t"), config.t_min, config.t_max).to(backbone.device)
            eps = self._noise(rng, f"ta{k}_eps", backbone)
            x_t = backbone.schedule.add_noise(x0.detach(), eps, t)
            dropped = drop_prompts(prompts, rand_per_sample(rng.per_sample(f"ta{k}_dropout")), config.ta_prompt_dropout)
            cond = backbone.encode_prompts(dropped)
            with self.ta(backbone) as ta_backbone:
                eps_pred = ta_backbone.predict_eps(x_t, t, cond)
                loss = ta_loss(eps_pred, eps, ta_lambda(backbone.schedule.alpha_bar(t), config.ta_weighting))
                models.guard(loss, "teaching-assistant loss")
                self.ta_optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self._reduce_ta_gradients(models)
            replace_nonfinite_gradients_(self.ta.parameters)
            self.ta_optimizer.step()
            self.ta_optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            mses.append(float((eps_pred.detach().float() - eps.float()).pow(2).mean()))
        return {"ta_loss": sum(losses) / len(losses), "ta_mse": sum(mses) / len(mses)}

    def _reduce_ta_gradients(self, models: TrainingModels) -> None:
        """Average the TA's gradients over processes (the TA runs unwrapped, outside DDP)."""
        if models.num_processes <= 1:
            return
        import torch.distributed as dist

        for p in self.ta.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= models.num_processes

    @staticmethod
    def _noise(rng: StepRandomness, stream: str, backbone: Backbone) -> Tensor:
        return randn_per_sample(rng.per_sample(stream), backbone.latent_shape).to(backbone.device)

    # ---- the generator step (the loss) -------------------------------------------------------
    def loss(self, batch: PreferenceBatch, models: TrainingModels) -> LossOutput:
        config: DiffInstructPPConfig = self.config
        backbone = models.backbone
        schedule: NoiseSchedule = backbone.schedule
        rng = batch.rng
        prompts = draw_prompts(self.pool, rng.per_sample("prompt"))
        cond = backbone.encode_prompts(prompts)
        x0 = generator_x0(backbone, self._noise(rng, "z", backbone), cond, self.spec)  # [B, C, h, w], with gradients
        t = sample_levels(rng.per_sample("t"), config.t_min, config.t_max).to(backbone.device)
        alpha_bar = schedule.alpha_bar(t)  # [B] float64
        x_t = schedule.add_noise(x0, self._noise(rng, "eps", backbone), t)
        with torch.no_grad():
            fixed = x_t.detach()
            with self.ta(backbone) as ta_backbone:
                eps_ta = ta_backbone.predict_eps(fixed, t, cond)
            with models.reference() as reference:
                eps_cfg = reference.predict_eps(fixed, t, cond, guidance_scale=config.guidance_scale)
            x0_ref = predicted_x0(fixed, eps_cfg, alpha_bar)
            weight = ikl_weight(x0.detach(), x0_ref, alpha_bar, config.weighting)  # [B]
            gradient = ikl_gradient(eps_ta, eps_cfg, weight)
        ikl = ikl_surrogate(x_t, gradient)  # [B]
        reward = None
        if self.scorer is not None:
            with torch.set_grad_enabled(config.alpha_rew > 0 and torch.is_grad_enabled()):
                reward = self.scorer.score(backbone.latents_to_images(x0), prompts).float()  # [B]
        loss = generator_objective(ikl, reward, config.alpha_rew)
        metrics: dict[str, Any] = {
            "loss": loss.detach(),
            "score_gap": (eps_cfg.float() - eps_ta.float()).abs().mean(),
            "ikl_weight": weight.mean(),
            "x0_ref_distance": (x0.detach().float() - x0_ref.float()).abs().mean(),
        }
        if reward is not None:
            metrics["reward"] = reward.detach().mean()
        metrics.update(batch.extras.get("ta_metrics", {}))
        return LossOutput(loss, metrics)

    # ---- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.ta_optimizer is None:
            return {}
        return {"ta_optimizer": _split_optimizer_state(self.ta_optimizer)[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved_optimizer = state.get("ta_optimizer")

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        if self.ta is None:
            return {}
        return {"ta": {n: p.detach() for n, p in self.ta.named}, "ta_optimizer": _split_optimizer_state(self.ta_optimizer)[0]}

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        if "ta" not in tensors:
            raise PrefalignError("the checkpoint has no teaching-assistant weights (method_ta.safetensors); it is not a diff_instruct_pp run")
        saved = tensors["ta"]
        missing = [n for n, _ in self.ta.named if n not in saved]
        if missing:
            raise PrefalignError(f"the checkpoint's teaching assistant does not match this model ({len(missing)} tensors missing, e.g. {missing[0]})")
        with torch.no_grad():
            for name, p in self.ta.named:
                p.copy_(saved[name])
        if self._saved_optimizer is not None:
            self.ta_optimizer.load_state_dict(_join_optimizer_state(tensors.get("ta_optimizer", {}), self._saved_optimizer))
