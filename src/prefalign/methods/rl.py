"""Reward RL on the stochastic-DDIM policy: the PPO of DDPO and PrefPaint (METHODS.md §4, §7).

The policy is stochastic DDIM (η > 0) with ``sampling_steps`` steps; one step is
N(μ_θ(x_t), σ_t²I) with the DDIM mean μ_θ and σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))
(:func:`prefalign.diffusion.ddim_step`); log-probabilities are **means** over elements
(:func:`prefalign.diffusion.ddim_log_prob`, as the reference codes). One **iteration**:

1. rollout (no gradients): ``rollout_batches`` batches of ``batch_size`` trajectories per process,
   sampled by the *sampler* weights (a copy of the policy refreshed every ``sampler_refresh``
   iterations; 1 = always the current policy), storing every latent and step log-probability;
   the final images (inpainting: the known region pasted back) are scored by ``reward``;
2. advantages (:func:`normalize_advantages`): A_i = clip((r_i − mean r)/(std r + eps), ±clip), over
   the rewards **gathered from every process** (``global``) or per prompt with DDPO's
   :class:`PerPromptStatTracker`; each sample gets a weight w_i (DDPO: a constant, 1 by default;
   PrefPaint: the trust factor γ(z_i));
3. ``inner_epochs`` passes over the stored trajectories in micro-batches of ``batch_size``, each on
   ``train_timesteps`` (K) of the trajectory's steps, with PPO-clip (:func:`ppo_clip_terms`):

       ρ_i,t = exp(log π_θ(x_{t−1}|x_t) − log π_sampler(x_{t−1}|x_t))
       L     = reduce_i,t  w_i·max(−A_i·ρ_i,t, −A_i·clip(ρ_i,t, 1−ε, 1+ε))

Trainer integration: an RL method's ``data`` is ``"none"`` (it draws its own prompts; the trainer
passes the micro-step's seeds) and the trainer runs its usual loop;
a micro-step is one micro-batch × K timesteps (one backward). An iteration is
``rollout_batches × inner_epochs`` micro-steps per process, i.e. :meth:`RLMethod.steps_per_iteration`
optimiser steps (with the trainer's ``gradient_accumulation_steps`` micro-steps each); ``rollout``
samples at the first micro-step of each iteration. The rollout buffer, the sampler copy and the
per-prompt statistics are part of the checkpoint (``state_tensors``/``state_dict``), so a resumed
run continues bit-identically, even from the middle of an iteration.

Randomness: global sample g of iteration n (g = r·(P·b) + p·b + i for rollout batch r, process p,
row i) draws its prompt, x_T and step noises from generators seeded by (seed, n, g); so one process
or P processes sample the same trajectories.

Prompts (``prompts``): the world's grammar (default: ``prompt_count`` prompts of ``prompt_split``;
an inpainting model gets clean renders masked with ``mask_kind``), a prompts file (text-to-image,
or world prompts rendered for inpainting), or a pointwise inpainting dataset folder (its masked
prompt images, one per group — PrefPaint's prompts). The policy's text is the caption or "" (PrefPaint:
the masked image is the whole prompt; ``prompt_mode``); the reward always sees the caption and,
for inpainting, ``masked_images``/``masks``.

Choices of the reference codes, each an option (defaults: PrefPaint's released code, github.com/
Kenkenzaii/PrefPaint ``train_inpainting_model.py`` + ``configs/config.yaml``; DDPO's own values,
github.com/kvablack/ddpo-pytorch ``config/base.py``, in the descriptions):
50 sampling steps (DDPO base config: 10), η = 1, guidance 7 (applied to two empty prompts, i.e. a
no-op, which is detected and skipped; DDPO: 5), K = 5 timesteps shared by the batch (DDPO:
``timestep_fraction`` 1.0, a random permutation per sample), PPO clip 1e-4, advantages clipped at
±10 with unbiased std + 1e-7 (DDPO: population std + 1e-8), loss **summed** over samples and
timesteps (DDPO: mean), sampler refreshed every 15 iterations (DDPO: every iteration), one rollout
batch and one inner epoch per iteration (DDPO: 2 and 1). Steps whose σ is 0 (the last step of a
schedule with ``set_alpha_to_one``, e.g. the shapes models) have no density and are never trained.
Trainer settings of PrefPaint's reference — full fine-tuning, AdamW lr 2e-6, weight decay 0.01, no
gradient clipping — are the methods' ``trainer_defaults`` (under any config file and ``--set``; DDPO's
own code: LoRA, lr 1e-4, weight decay 1e-4, gradient clipping 1). A 2e-6 learning rate suits SD's
860 M parameters. On the 2 M-parameter shapes inpainting model the measured sweep (README, PrefPaint)
found no learning rate that raises a learned reward within ~2,000 samples: 1e-5 changes nothing, 1e-4
with full fine-tuning costs 0.1 of annotator score in 5 iterations (Adam moves every weight by ~lr a
step whatever the gradient's signal-to-noise). For prompts of unequal difficulty (inpainting masks),
compare completions of one prompt: ``samples_per_prompt`` > 1 with ``normalization="per_prompt"``
and ``stat_buffer_size`` = ``stat_min_count`` = ``samples_per_prompt`` normalises each group by itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from prefalign.backbones.base import Backbone, Conditioning
from prefalign.diffusion.ddim import ddim_log_prob, ddim_step
from prefalign.errors import PrefalignError
from prefalign.methods.base import LossOutput, Method, MethodConfig, PreferenceBatch, StepRandomness, TrainingModels, seeded_generator

# --------------------------------------------------------------------------------------------------
# The equations (pure functions)
# --------------------------------------------------------------------------------------------------


def policy_mean(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float, clip_range: float | None = None) -> tuple[Tensor, Tensor]:
    """(μ_θ, σ_t) of one stochastic-DDIM step t → prev (DDIM eq. 12, METHODS.md §4).

    x_t, eps: [B, C, h, w]; ᾱ: 0-d or [B] (per-sample levels) → μ [B, C, h, w], σ broadcastable."""
    _, mean, sigma = ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, torch.zeros_like(x_t), clip_range)
    return mean, sigma


def step_log_prob(x_prev: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """log π(x_prev | x_t) = mean over elements of log N(x_prev; μ, σ²I) (DDPO's per-sample mean).
    x_prev is the stored sample (detached). → [B]."""
    return ddim_log_prob(x_prev.detach(), mean, sigma)


def normalize_advantages(rewards: Tensor, eps: float = 1e-7, std: Literal["unbiased", "population"] = "unbiased") -> Tensor:
    """(r − mean r) / (std r + eps) over the whole (gathered) batch (METHODS.md §4).

    ``unbiased``: torch.std (PrefPaint's code); ``population``: np.std (DDPO's). [N] → [N] float32."""
    r = rewards.double()
    spread = r.std(unbiased=True) if (std == "unbiased" and r.numel() > 1) else r.std(unbiased=False)
    return ((r - r.mean()) / (spread + eps)).float()


def clip_advantages(advantages: Tensor, clip: float) -> Tensor:
    """clip(A, −clip, clip) (both references: ``adv_clip_max``)."""
    return advantages.clamp(-clip, clip)


class PerPromptStatTracker:
    """DDPO's per-prompt normalisation (``ddpo_pytorch/stat_tracking.py``): each prompt keeps its
    last ``buffer_size`` rewards; a prompt with at least ``min_count`` of them is normalised by their
    mean and (population) std + 1e-6, otherwise by the whole batch's."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, keys: Sequence[str], rewards: Tensor) -> Tensor:
        values = rewards.double().cpu().numpy()
        keys_array = np.asarray([str(k) for k in keys])
        advantages = np.empty_like(values)
        for key in dict.fromkeys(keys_array.tolist()):
            rows = keys_array == key
            buffer = self.stats.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = values.mean(), values.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[rows] = (values[rows] - mean) / std
        return torch.from_numpy(advantages).float()

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state.items()}


def ppo_clip_terms(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample PPO-clip terms w·max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log π − log π_old)
    (METHODS.md §4; w = PrefPaint's γ, or 1). All [B] → (terms [B], ρ [B])."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    return (terms if weights is None else weights * terms), ratio


def reduce_terms(terms: Tensor, reduction: Literal["sum", "mean"]) -> Tensor:
    """Σ (PrefPaint's code) or mean (DDPO's) of the PPO terms."""
    return terms.sum() if reduction == "sum" else terms.mean()


def rl_metrics(log_prob: Tensor, old_log_prob: Tensor, ratio: Tensor, clip_range: float) -> dict[str, Tensor]:
    """DDPO's diagnostics: approx KL ½·mean((log π − log π_old)²) and the clipped share of ρ."""
    return {
        "approx_kl": 0.5 * (log_prob.detach() - old_log_prob).pow(2).mean(),
        "clip_fraction": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "ratio_mean": ratio.detach().mean(),
    }


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptSet:
    """What the policy is prompted with: ``captions`` (the scene text the reward judges against),
    ``keys`` (one id per prompt, for per-prompt statistics) and, for inpainting, ``inpaint``
    (sources, masks, mask kinds)."""

    captions: list[str]
    keys: list[str]
    inpaint: Any = None  # prefalign.inpainting.InpaintPrompts | None
    world: bool = False  # captions are shapes-world prompts (the annotator can score them)

    def __len__(self) -> int:
        return len(self.captions)


def load_prompt_set(config: RLConfig, backbone: Backbone) -> PromptSet:
    """The prompt set of ``config.prompts`` (see the module docstring)."""
    from prefalign.inpainting import InpaintPrompts, mask_kinds_for, resize_for, world_inpaint_prompts
    from prefalign.training.trainer import pixel_resolution
    from prefalign.worlds.shapes.prompts import sample_prompts, try_parse_prompt

    inpainting = backbone.is_inpainting
    size = pixel_resolution(backbone)
    source = config.prompts
    if source is not None and Path(source).is_dir():
        if not inpainting:
            raise PrefalignError(f"--prompts {source} is a dataset folder; text-to-image RL needs a prompts file (one prompt per line) or the world's prompts")
        from prefalign.data.pointwise import load_pointwise

        data = load_pointwise(source, config.prompt_dataset_split)
        if not data.inpainting:
            raise PrefalignError(f"{source} is not an inpainting dataset (no masked_image/mask columns); give one made by `prefalign prefs make-inpaint`")
        first: dict[str, int] = {}
        for index, group in enumerate(data.group_ids):
            first.setdefault(group, index)
        rows = list(first.values())[: config.prompt_count] if config.prompt_count else list(first.values())
        batch = data.batch(rows)
        sources, masks = resize_for(backbone, batch.masked_images, batch.masks)
        kinds = [k or "unknown" for k in batch.mask_kinds]
        items = InpaintPrompts(list(batch.captions), sources, masks, kinds)
        world = all(try_parse_prompt(c) is not None for c in items.prompts)
        return PromptSet(list(batch.captions), [f"group-{g}" for g in batch.group_ids], items, world)
    if source is not None:
        from prefalign.commands.common import read_prompts

        captions = read_prompts(None, Path(source))
        if not captions:
            raise PrefalignError(f"prompts file {source} holds no prompts")
    else:
        captions = sample_prompts(config.prompt_count, seed=config.prompt_seed, split=config.prompt_split)
    world = all(try_parse_prompt(c) is not None for c in captions)
    keys = [f"{i}" for i in range(len(captions))]
    if not inpainting:
        return PromptSet(captions, keys, None, world)
    if not world:
        raise PrefalignError("inpainting RL from a prompts file needs shapes-world prompts (they are rendered and masked); or give a dataset folder from `prefalign prefs make-inpaint`")
    kinds = mask_kinds_for(len(captions), config.mask_kind)
    items = world_inpaint_prompts(captions, size[0], seed=config.prompt_seed, kinds=kinds)
    return PromptSet(captions, keys, items, True)


# --------------------------------------------------------------------------------------------------
# The rollout buffer
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One iteration's trajectories on this process (N = rollout_batches × batch_size rows).

    latents [N, S+1, C, h, w] (x_T … x_0), log_probs [N, S] (sampler), prompt_rows [N],
    advantages [N], weights [N] (γ or the constant), levels (S+1 ints, shared), trainable (step
    indices with σ > 0)."""

    iteration: int
    latents: Tensor
    log_probs: Tensor
    prompt_rows: Tensor
    advantages: Tensor
    weights: Tensor
    metrics: dict[str, float]

    def tensors(self) -> dict[str, Tensor]:
        return {
            "latents": self.latents,
            "log_probs": self.log_probs,
            "prompt_rows": self.prompt_rows,
            "advantages": self.advantages,
            "weights": self.weights,
            "iteration": torch.tensor([self.iteration]),
            "metric_values": torch.tensor(list(self.metrics.values()), dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metric_names: list[str]) -> Rollout:
        values = tensors["metric_values"].tolist()
        return cls(int(tensors["iteration"][0]), tensors["latents"], tensors["log_probs"], tensors["prompt_rows"].long(),
                   tensors["advantages"], tensors["weights"], dict(zip(metric_names, values)))


@dataclass
class RLBatch:
    """A micro-batch of stored trajectories: rows (into the rollout) and their trained steps
    ``steps`` [b, K] (indices into the trajectory)."""

    rollout: Rollout
    rows: Tensor
    steps: Tensor


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class RLConfig(MethodConfig):
    """Options shared by DDPO and PrefPaint (defaults: PrefPaint's released code; see rl.py)."""

    reward: str = Field("annotator", description="the scorer to maximise: a reward model folder, annotator[:persona] or module:function")
    prompts: str | None = Field(None, description="prompts file, or a pointwise inpainting dataset folder (its masked prompt images); default: the world's prompts")
    prompt_count: int = Field(256, ge=1, description="world prompts drawn (or at most this many groups of a dataset)")
    prompt_split: Literal["train", "held_out", "all"] = "train"
    prompt_seed: int = Field(0, description="seed of the world prompts and their masks")
    prompt_dataset_split: str = Field("train", description="split of a --prompts dataset folder")
    mask_kind: Literal["both", "outpaint", "warp"] = Field("both", description="inpainting masks of world prompts (both: alternating)")
    prompt_mode: Literal["auto", "caption", "empty"] = Field("auto", description="the policy's text: auto = empty for inpainting (PrefPaint: the masked image is the prompt), the caption for text-to-image")
    samples_per_prompt: int = Field(1, ge=1, description="consecutive global samples sharing one prompt (1: each sample draws its own)")
    sampling_steps: int = Field(50, ge=2, description="DDIM steps of the policy (PrefPaint 50; DDPO base config 10)")
    eta: float = Field(1.0, gt=0, description="η of the stochastic DDIM policy")
    guidance_scale: float = Field(7.0, ge=0, description="CFG scale in rollout and loss (PrefPaint 7 on two empty prompts = no-op; DDPO 5)")
    rollout_batches: int = Field(1, ge=1, description="sampling batches (of batch_size) per process per iteration (DDPO num_batches_per_epoch: 2)")
    inner_epochs: int = Field(1, ge=1, description="PPO passes over each rollout (both references: 1)")
    train_timesteps: int | None = Field(5, ge=1, description="K trained steps per trajectory (None: all; DDPO timestep_fraction 1.0)")
    timestep_sampling: Literal["shared", "per_sample"] = Field("shared", description="shared: one set of K steps per micro-batch (PrefPaint); per_sample: a permutation per trajectory (DDPO)")
    shuffle_samples: bool = Field(True, description="shuffle the rollout's rows before each inner epoch (DDPO)")
    clip_range: float = Field(1e-4, gt=0, description="PPO ε (both references 1e-4)")
    advantage_clip: float = Field(10.0, gt=0, description="|A| ≤ this (both references 10)")
    normalization: Literal["global", "per_prompt"] = Field("global", description="advantage normalisation over the gathered batch, or DDPO's per-prompt tracker")
    advantage_std: Literal["unbiased", "population"] = Field("unbiased", description="std of the global normalisation (PrefPaint torch.std; DDPO np.std)")
    advantage_eps: float = Field(1e-7, gt=0, description="added to the std (PrefPaint 1e-7; DDPO 1e-8)")
    stat_buffer_size: int = Field(16, ge=1, description="per-prompt tracker: rewards kept per prompt (DDPO 16)")
    stat_min_count: int = Field(16, ge=1, description="per-prompt tracker: fewer rewards → batch statistics (DDPO 16)")
    loss_reduction: Literal["sum", "mean"] = Field("sum", description="over samples and timesteps: sum (PrefPaint) or mean (DDPO)")
    sampler_refresh: int = Field(15, ge=1, description="refresh the sampling copy of the policy every N iterations (PrefPaint 15; DDPO 1)")
    track_annotator: bool = Field(True, description="shapes world: also log the annotator's score of the rollouts (never trained on)")
    reward_batch_size: int = Field(64, ge=1, description="images per reward-model call")


class RLMethod(Method):
    """Base of the reward-RL methods (see the module docstring); subclasses set :meth:`sample_weights`."""

    data: ClassVar[str] = "none"  # the method draws its own prompts; the trainer passes the micro-step's seeds
    needs_reference: ClassVar[bool] = False
    headline_metric: ClassVar[str] = "reward_mean"
    config_class: ClassVar[type[RLConfig]] = RLConfig
    #: PrefPaint's reference trainer settings (``train_inpainting_model.py`` + ``configs/config.yaml``).
    trainer_defaults: ClassVar[dict[str, Any]] = {
        "finetune": {"mode": "full"},
        "optimizer": {"learning_rate": 2e-6, "weight_decay": 0.01},
        "grad_clip": 0.0,
    }
    METRIC_NAMES: ClassVar[tuple[str, ...]] = (
        "reward_mean", "reward_std", "annotator_score", "advantage_abs_mean", "weight_mean", "bound_mean", "iteration",
    )

    def __init__(self, config: RLConfig | None = None):
        super().__init__(config)
        self.prompt_set: PromptSet | None = None
        self.scorer = None
        self.rollout_buffer: Rollout | None = None
        self.sampler_state: dict[str, Tensor] | None = None
        self.tracker = PerPromptStatTracker(self.config.stat_buffer_size, self.config.stat_min_count)
        self._annotator = None

    # ---- sizes ----------------------------------------------------------------------------------
    def micro_steps_per_iteration(self) -> int:
        return self.config.rollout_batches * self.config.inner_epochs

    def steps_per_iteration(self, train_config) -> int:
        """Optimiser steps of one iteration (rollout_batches × inner_epochs / accumulation)."""
        micro = self.micro_steps_per_iteration()
        accumulation = train_config.gradient_accumulation_steps
        if micro % accumulation:
            raise PrefalignError(
                f"{self.name}: an iteration has rollout_batches × inner_epochs = {micro} micro-steps, not a multiple of "
                f"gradient_accumulation_steps={accumulation}; make them divide"
            )
        return micro // accumulation

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, models: TrainingModels) -> None:
        from prefalign.rewards.base import load_scorer

        config: RLConfig = self.config
        backbone = models.backbone
        train_config = getattr(models, "config", None)
        if train_config is None:
            raise PrefalignError(f"{self.name} needs the trainer's settings (models.config); run it through prefalign.training.Trainer")
        self.steps_per_iteration(train_config)
        if config.sampling_steps > backbone.schedule.num_train_timesteps:
            raise PrefalignError(f"sampling_steps={config.sampling_steps} exceeds the schedule's {backbone.schedule.num_train_timesteps} steps")
        self.prompt_set = load_prompt_set(config, backbone)
        self.scorer = load_scorer(config.reward, device=backbone.device)
        self.levels = backbone.schedule.levels(config.sampling_steps)
        sigmas = [float(_sigma(backbone, t, u, config.eta)) for t, u in zip(self.levels[:-1], self.levels[1:])]
        self.trainable_steps = [j for j, s in enumerate(sigmas) if s > 0]
        k = config.train_timesteps or len(self.trainable_steps)
        if k > len(self.trainable_steps):
            raise PrefalignError(f"train_timesteps={k} but only {len(self.trainable_steps)} of {config.sampling_steps} steps are stochastic; lower it")
        self.k = k
        self.prompt_mode = config.prompt_mode if config.prompt_mode != "auto" else ("empty" if backbone.is_inpainting else "caption")
        self.guidance = self._effective_guidance(backbone)
        if config.track_annotator and self.prompt_set.world and backbone.kind.startswith("shapes"):
            from prefalign.worlds.shapes.annotator import Annotator

            self._annotator = Annotator()
        self.check_scorer()

    def check_scorer(self) -> None:
        """Subclasses check what they need of the scorer (PrefPaint: the confidence bound)."""

    def _effective_guidance(self, backbone: Backbone) -> float:
        """CFG between two identical conditions is the identity: with ``prompt_mode=empty`` and an
        unconditional branch equal to the empty prompt's encoding, skip the second forward."""
        scale = self.config.guidance_scale
        if scale == 1.0 or self.prompt_mode != "empty":
            return scale
        with torch.no_grad():
            empty = backbone.encode_prompts([""])
            uncond = backbone.empty_conditioning(1)
        same = torch.equal(empty.encoder_hidden_states, uncond.encoder_hidden_states) and all(
            torch.equal(empty.added_cond_kwargs[k], uncond.added_cond_kwargs[k]) for k in empty.added_cond_kwargs
        )
        return 1.0 if same else scale

    # ---- conditions -----------------------------------------------------------------------------
    def conditioning(self, backbone: Backbone, rows: Tensor) -> Conditioning:
        """The policy's condition of prompt rows [B] (text, + inpainting channels)."""
        prompt_set = self.prompt_set
        index = rows.tolist()
        text = [prompt_set.captions[i] for i in index] if self.prompt_mode == "caption" else [""] * len(index)
        cond = backbone.encode_prompts(text)
        if prompt_set.inpaint is not None:
            items = prompt_set.inpaint
            cond = backbone.inpaint_conditioning(cond, items.sources[rows], items.masks[rows])
        return cond

    def uncond(self, backbone: Backbone, cond: Conditioning) -> Conditioning | None:
        if self.guidance == 1.0:
            return None
        uncond = backbone.empty_conditioning(len(cond)).to(backbone.device)
        return uncond.with_concat(cond.concat) if cond.concat is not None else uncond

    # ---- rollout --------------------------------------------------------------------------------
    def _position(self, rng: StepRandomness, models: TrainingModels) -> tuple[int, int, int, int]:
        """(iteration, inner epoch, rollout batch, micro index within the iteration) of a micro-step."""
        accumulation = models.config.gradient_accumulation_steps
        flat = rng.step * accumulation + rng.micro_step
        per_iteration = self.micro_steps_per_iteration()
        iteration, within = divmod(flat, per_iteration)
        epoch, batch = divmod(within, self.config.rollout_batches)
        return iteration, epoch, batch, within

    def rollout(self, batch: PreferenceBatch, models: TrainingModels) -> RLBatch:
        """Sample the iteration's rollout if this micro-step starts it; return its micro-batch.
        ``batch`` holds only the micro-step's seeds (``data = "none"``)."""
        seed = batch.rng.seed
        iteration, epoch, batch_index, _ = self._position(batch.rng, models)
        if self.rollout_buffer is None or self.rollout_buffer.iteration != iteration:
            with torch.no_grad(), self._sampler(models, iteration):
                self.rollout_buffer = self.sample_rollout(models, iteration, seed)
        return self.micro_batch(models, iteration, epoch, batch_index, seed)

    def _global_positions(self, models: TrainingModels) -> list[int]:
        """Global sample ids of this process's rollout rows (r-major: g = r·P·b + p·b + i)."""
        b, P, p = models.config.batch_size, models.num_processes, models.process_index
        return [r * P * b + p * b + i for r in range(self.config.rollout_batches) for i in range(b)]

    def sample_rollout(self, models: TrainingModels, iteration: int, seed: int) -> Rollout:
        """Sample, score and weight this process's trajectories of ``iteration`` (no gradients)."""
        config: RLConfig = self.config
        backbone = models.backbone
        positions = self._global_positions(models)
        rows = torch.tensor([
            int(torch.randint(0, len(self.prompt_set), (1,), generator=seeded_generator(seed, iteration, g // config.samples_per_prompt, 0x9F0)))
            for g in positions
        ])
        b = models.config.batch_size
        all_latents, all_log_probs = [], []
        for start in range(0, len(positions), b):
            chunk = slice(start, start + b)
            latents, log_probs = self.sample_trajectories(backbone, rows[chunk], [seeded_generator(seed, iteration, g, 0x5A3) for g in positions[chunk]])
            all_latents.append(latents)
            all_log_probs.append(log_probs)
        latents = torch.cat(all_latents)  # [N, S+1, C, h, w]
        log_probs = torch.cat(all_log_probs)  # [N, S]
        images = self.final_images(backbone, latents[:, -1], rows)
        scored = self.score(images, rows)
        rewards = scored["reward"].float()

        # advantages over the rewards of every process
        gathered = models.gather(rewards.to(backbone.device)).cpu()
        if config.normalization == "per_prompt":
            keys = models.gather(rows.to(backbone.device)).cpu()
            advantages_all = self.tracker.update([self.prompt_set.keys[int(k)] for k in keys], gathered)
        else:
            advantages_all = normalize_advantages(gathered, config.advantage_eps, config.advantage_std)
        advantages_all = clip_advantages(advantages_all, config.advantage_clip)
        start = models.process_index * len(positions)
        advantages = advantages_all[start : start + len(positions)]
        weights = self.sample_weights(scored).float().cpu()

        metrics = {
            "reward_mean": float(gathered.mean()),
            "reward_std": float(gathered.std(unbiased=False)),
            "annotator_score": float("nan"),
            "advantage_abs_mean": float(advantages_all.abs().mean()),
            "weight_mean": float(models.gather(weights.to(backbone.device)).mean()),
            "bound_mean": float(models.gather(scored["bound"].float().to(backbone.device)).mean()) if "bound" in scored else float("nan"),
            "iteration": float(iteration),
        }
        if self._annotator is not None:
            truth = self._annotator.score(images.float().cpu(), [self.prompt_set.captions[int(i)] for i in rows])
            metrics["annotator_score"] = float(models.gather(truth.float().to(backbone.device)).mean())
        return Rollout(iteration, latents.cpu(), log_probs.cpu(), rows, advantages, weights, metrics)

    def sample_trajectories(self, backbone: Backbone, rows: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Stochastic-DDIM trajectories of prompt rows [b] → latents [b, S+1, C, h, w], log-probs [b, S]
        (0 where σ = 0). Sample i's x_T and step noises come from ``generators[i]``."""
        config: RLConfig = self.config
        schedule = backbone.schedule
        cond = self.conditioning(backbone, rows)
        eps_fn = backbone.eps_fn(cond, self.guidance, self.uncond(backbone, cond))
        shape = backbone.latent_shape
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(backbone.device)
        latents, log_probs = [x.float().cpu()], []
        for t, t_prev in zip(self.levels[:-1], self.levels[1:]):
            eps = eps_fn(x, t).float()
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(backbone.device)
            x_prev, mean, sigma = ddim_step(x.float(), eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), config.eta, noise, schedule.clip_sample_range)
            if float(sigma.max()) > 0:
                log_probs.append(step_log_prob(x_prev, mean, sigma).cpu())
            else:
                log_probs.append(torch.zeros(x.shape[0]))
            x = x_prev
            latents.append(x.cpu())
        return torch.stack(latents, 1), torch.stack(log_probs, 1)

    def final_images(self, backbone: Backbone, x0: Tensor, rows: Tensor) -> Tensor:
        """Images of the final latents; inpainting keeps the known region."""
        from prefalign.inpainting import composite

        images = backbone.latents_to_images(x0.to(backbone.device)).float()
        if self.prompt_set.inpaint is not None:
            items = self.prompt_set.inpaint
            images = composite(images, items.sources[rows].to(images.device), items.masks[rows].to(images.device))
        return images

    def reward_condition(self, rows: Tensor) -> dict[str, Tensor]:
        if self.prompt_set.inpaint is None:
            return {}
        items = self.prompt_set.inpaint
        return {"masked_images": items.masked_images[rows], "masks": items.masks[rows]}

    def score(self, images: Tensor, rows: Tensor) -> dict[str, Tensor]:
        """The scorer's reward [N] (PrefPaint adds z, bounds and γ) of the rollout images."""
        captions = [self.prompt_set.captions[int(i)] for i in rows]
        cond = self.reward_condition(rows)
        out = []
        for start in range(0, len(captions), self.config.reward_batch_size):
            chunk = slice(start, start + self.config.reward_batch_size)
            part = {k: v[chunk] for k, v in cond.items()}
            out.append(self.score_chunk(images[chunk], captions[chunk], part))
        return {k: torch.cat([o[k].detach().float().cpu() for o in out]) for k in out[0]}

    def score_chunk(self, images: Tensor, captions: list[str], cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"reward": self.scorer.score(images, captions, **cond)}

    def sample_weights(self, scored: dict[str, Tensor]) -> Tensor:
        """w_i of the PPO terms (DDPO: a constant; PrefPaint: γ(z_i))."""
        return torch.ones_like(scored["reward"])

    # ---- micro-batches --------------------------------------------------------------------------
    def micro_batch(self, models: TrainingModels, iteration: int, epoch: int, batch_index: int, seed: int) -> RLBatch:
        config: RLConfig = self.config
        b = models.config.batch_size
        n = self.rollout_buffer.latents.shape[0]
        order = torch.arange(n)
        if config.shuffle_samples:
            order = torch.randperm(n, generator=seeded_generator(seed, iteration, epoch, models.process_index, 0x5F1))
        rows = order[batch_index * b : (batch_index + 1) * b]
        trainable = torch.tensor(self.trainable_steps)
        if config.timestep_sampling == "shared":
            pick = torch.randperm(len(trainable), generator=seeded_generator(seed, iteration, epoch, batch_index, 0x7E5))[: self.k]
            steps = trainable[pick].expand(len(rows), -1)
        else:
            positions = self._global_positions(models)
            steps = torch.stack([
                trainable[torch.randperm(len(trainable), generator=seeded_generator(seed, iteration, epoch, positions[int(r)], 0x7E6))[: self.k]]
                for r in rows
            ])
        return RLBatch(self.rollout_buffer, rows, steps)

    # ---- the loss -------------------------------------------------------------------------------
    def loss(self, batch: RLBatch, models: TrainingModels) -> LossOutput:
        """PPO-clip over the micro-batch's K trained steps, in one batched forward ([b·K] rows)."""
        config: RLConfig = self.config
        backbone = models.backbone
        schedule = backbone.schedule
        rollout = batch.rollout
        b, k = batch.steps.shape
        sample_rows = batch.rows.repeat_interleave(k)  # [b·K]
        steps = batch.steps.reshape(-1)  # [b·K]
        device = backbone.device
        x_t = rollout.latents[sample_rows, steps].to(device)
        x_prev = rollout.latents[sample_rows, steps + 1].to(device)
        levels = torch.tensor(self.levels)
        t, t_prev = levels[steps].to(device), levels[steps + 1].to(device)
        cond = self.conditioning(backbone, rollout.prompt_rows[sample_rows])
        eps = backbone.predict_eps(x_t, t, cond, self.guidance, self.uncond(backbone, cond)).float()
        mean, sigma = policy_mean(x_t.float(), eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), config.eta, schedule.clip_sample_range)
        log_prob = step_log_prob(x_prev.float(), mean, sigma)  # [b·K]
        old = rollout.log_probs[sample_rows, steps].to(device)
        advantages = rollout.advantages[sample_rows].to(device)
        weights = rollout.weights[sample_rows].to(device)
        terms, ratio = ppo_clip_terms(log_prob, old, advantages, config.clip_range, weights)
        loss = reduce_terms(terms, config.loss_reduction)
        metrics: dict[str, Any] = {"loss": loss.detach(), **rl_metrics(log_prob, old, ratio, config.clip_range)}
        metrics.update({k: v for k, v in rollout.metrics.items() if not math.isnan(v)})
        return LossOutput(loss, metrics)

    # ---- the sampler copy -----------------------------------------------------------------------
    @contextmanager
    def _sampler(self, models: TrainingModels, iteration: int) -> Iterator[None]:
        """Sample with the sampler copy (refreshed every ``sampler_refresh`` iterations)."""
        named = [(n, p) for n, p in models.backbone.unet.named_parameters() if p.requires_grad]
        if self.config.sampler_refresh == 1:
            yield
            return
        if self.sampler_state is None or iteration % self.config.sampler_refresh == 0:
            self.sampler_state = {n: p.detach().cpu().clone() for n, p in named}
        current = {n: p.detach().clone() for n, p in named}
        with torch.no_grad():
            for n, p in named:
                p.copy_(self.sampler_state[n].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(current[n])

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        """The rollout buffer (so a run resumed mid-iteration trains on the same trajectories) and
        the sampler copy of the policy."""
        out: dict[str, dict[str, Tensor]] = {}
        if self.rollout_buffer is not None:
            out["rollout"] = {k: v.contiguous() for k, v in self.rollout_buffer.tensors().items()}
        if self.sampler_state is not None:
            out["sampler"] = {k: v.contiguous() for k, v in self.sampler_state.items()}
        return out

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        if tensors.get("rollout"):
            self.rollout_buffer = Rollout.from_tensors(tensors["rollout"], list(self.METRIC_NAMES))
        self.sampler_state = dict(tensors["sampler"]) if tensors.get("sampler") else None


def _sigma(backbone: Backbone, t: int, t_prev: int, eta: float) -> Tensor:
    from prefalign.diffusion.ddim import ddim_sigma

    schedule = backbone.schedule
    return ddim_sigma(schedule.alpha_bar(t), schedule.alpha_bar(t_prev), eta)


__all__ = [
    "PerPromptStatTracker",
    "PromptSet",
    "RLBatch",
    "RLConfig",
    "RLMethod",
    "Rollout",
    "clip_advantages",
    "load_prompt_set",
    "normalize_advantages",
    "policy_mean",
    "ppo_clip_terms",
    "reduce_terms",
    "rl_metrics",
    "step_log_prob",
]
