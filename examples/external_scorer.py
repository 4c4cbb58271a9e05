"""Wrap an external reward model whose weights you have on disk as a prefalign scorer.

PickScore (``yuvalkirstain/PickScore_v1``), HPS-style and other CLIP-based preference models score an
image for a prompt as the scaled cosine similarity of CLIP embeddings:

    score(x, c) = exp(logit_scale) · ⟨ f_img(x)/‖f_img(x)‖ , f_txt(c)/‖f_txt(c)‖ ⟩

This file loads such a model from a local folder in the Hugging Face ``CLIPModel`` layout
(config.json + model.safetensors, tokenizer files, preprocessor_config.json) with ``transformers`` —
``local_files_only=True``: nothing is downloaded — and exposes ``score(images, prompts) -> Tensor[B]``.
Images are preprocessed in torch (resize of the shorter side, bicubic + antialias; centre crop;
normalisation with the folder's ``image_mean`` / ``image_std``), so the score is differentiable with
respect to the images (``differentiable = True``: Diff-Instruct++ can back-propagate through it).

Use it wherever prefalign takes a scorer (``--scorer`` of the commands, ``load_scorer`` in Python)::

    export CLIP_SCORER_DIR=/models/PickScore_v1           # the folder you downloaded yourself
    export PYTHONPATH=$PWD/examples:$PYTHONPATH
    prefalign ... --scorer external_scorer:clip_scorer    # a zero-argument factory: reads CLIP_SCORER_DIR

    from prefalign.rewards.base import load_scorer
    scorer = load_scorer("external_scorer:clip_scorer")
    rewards = scorer(images, prompts)                      # [B], higher is better

or in code: ``ClipPreferenceScorer("/models/PickScore_v1", device="cuda")``.

Getting the folder (on a machine with internet access; prefalign itself never downloads):
``huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir /models/PickScore_v1`` — PickScore's
repository has no tokenizer/processor files; copy them from its base model
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) into the same folder. Models in other formats need another
loader in place of ``CLIPModel``: HPS v2 ships an open_clip checkpoint (``open_clip.create_model_and_transforms
("ViT-H-14")`` + ``load_state_dict``), ImageReward a BLIP model (its ``ImageReward`` package); the
``score`` contract stays the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from prefalign.errors import PrefalignError
from prefalign.rewards.base import Scorer

#: OpenAI CLIP's normalisation, used when the folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ENV_VAR = "CLIP_SCORER_DIR"


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → CLIP pixel values [B, 3, size, size]: shorter side to ``size``
    (bicubic, antialiased), centre crop, (x − mean)/std. Differentiable."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new != (height, width):
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def projected(output) -> torch.Tensor:
    """``get_text_features`` / ``get_image_features`` return the projected embedding (transformers 4)
    or an output whose ``pooler_output`` is it (transformers 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def clip_preference_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) · cos(image, text), row by row: [B, D], [B, D] → [B] (PickScore's score)."""
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    return logit_scale.float().exp() * (image_embeds * text_embeds).sum(-1)


class ClipPreferenceScorer(Scorer):
    """A CLIP-based preference model from a local ``CLIPModel`` folder (see the module docstring).

    Args:
        folder: the model folder (config.json, weights, tokenizer files; preprocessor_config.json
            optional: its ``crop_size``/``image_mean``/``image_std`` are used when present).
        device: where the model runs; images are moved there.
        dtype: the model's weights' dtype (float16/bfloat16 halves the memory on a GPU).
    """

    differentiable = True

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise PrefalignError(
                f"no CLIP model folder at {folder} (config.json missing); download the model yourself "
                f"(e.g. `huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir DIR`) and pass DIR or set {ENV_VAR}"
            )
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PrefalignError(f"cannot load the CLIP model in {folder}: {first}; it needs CLIPModel weights and tokenizer files") from None
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.name = f"clip:{folder.name}"
        size = self.model.config.vision_config.image_size
        mean, std = CLIP_MEAN, CLIP_STD
        processor_file = folder / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            crop = processor.get("crop_size", size)
            size = int(crop["height"] if isinstance(crop, dict) else crop)
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        self.image_size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.max_tokens = int(min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings))

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.no_grad():
            return projected(self.model.get_text_features(input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → normalised CLIP image embeddings [B, D] (float32)."""
        pixels = preprocess(images.to(self.device, torch.float32), self.image_size, self.mean, self.std)
        return F.normalize(projected(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str], **cond) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] and B prompts → [B] float32 (gradients reach the images)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise PrefalignError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise PrefalignError(f"got {len(prompts)} prompts for {images.shape[0]} images; give one prompt per image")
        pixels = preprocess(images.to(self.device, torch.float32), self.image_size, self.mean, self.std)
        image_embeds = projected(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)))
        return clip_preference_score(image_embeds, self.text_embeddings(prompts), self.model.logit_scale)


def clip_scorer() -> ClipPreferenceScorer:
    """Zero-argument factory for ``--scorer external_scorer:clip_scorer``: the folder in
    ``$CLIP_SCORER_DIR``, on the GPU when there is one."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        raise PrefalignError(f"set {ENV_VAR} to the folder of a CLIP preference model (e.g. PickScore_v1) to use external_scorer:clip_scorer")
    return ClipPreferenceScorer(folder, device="cuda" if torch.cuda.is_available() else "cpu")


_SHARED: dict[str, ClipPreferenceScorer] = {}


def clip_image_embeddings(images: torch.Tensor) -> torch.Tensor:
    """RPO's image embeddings from the same CLIP (``rpo: {embedding: image | both, image_encoder:
    external_scorer:clip_image_embeddings}``): [B, 3, H, W] in [0, 1] → [B, D], on the images' device.
    The model (``$CLIP_SCORER_DIR``) is loaded once per process."""
    if "scorer" not in _SHARED:
        _SHARED["scorer"] = clip_scorer()
    with torch.no_grad():
        return _SHARED["scorer"].image_embeddings(images).to(images.device)
