"""Issue 8 (scale and real models): the lazy Pick-a-Pic-size reader, the synthetic Pick-a-Pic writer,
a lazy run against a fully validated one, an external CLIP reward model as a scorer, and CUDA-only
smoke tests (bf16 DPO steps on a tiny SD pipeline; peak memory full > LoRA) that skip without a GPU."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_trainer import PROMPTS, make_tiny_shapes_model, tiny_config, write_pairs
from tiny_pipelines import make_tiny_sd, make_tiny_tokenizer

from prefalign.data.loader import LazyPairs, open_lazy_pairs
from prefalign.data.preference import PAIRWISE_SCHEMA, load_pairwise, pair_record
from prefalign.data.storage import ShardWriter
from prefalign.data.validation import decode_image
from prefalign.errors import PrefalignError
from prefalign.training.pairs import BatchLayout, StepPairBatches, open_pairs, resize_images
from prefalign.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _image(seed: int, size: int) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def write_messy_pairs(path: Path) -> Path:
    """8 records: row 2 a tie, row 3 a label out of range, row 4 an undecodable jpg_0, rows 5 and 6
    images of 24×24 (the others 16×16), row 6 with jpg_0 ≠ jpg_1 in size."""
    writer = ShardWriter(path, "train", PAIRWISE_SCHEMA, shard_size=3)
    for row in range(8):
        size_0 = 24 if row in (5, 6) else 16
        size_1 = 24 if row == 5 else 16
        image_0 = b"definitely not a PNG" if row == 4 else _image(2 * row, size_0)
        label = 0.5 if row == 2 else 1.0 if row % 2 else 0.0
        record = pair_record(PROMPTS[row % 3], image_0, _image(2 * row + 1, size_1), label, ranking_id=row)
        if row == 3:
            record["label_0"], record["label_1"] = 1.7, -0.7
        writer.write(record)
    writer.close()
    return path


# --------------------------------------------------------------------------------------------------
# The lazy reader
# --------------------------------------------------------------------------------------------------


def test_lazy_open_checks_small_fields_and_resizes_each_image(tmp_path):
    data = write_messy_pairs(tmp_path / "messy")
    pairs = open_lazy_pairs(data, drop_ties=True)
    assert isinstance(pairs, LazyPairs)
    # at open: the bad label (row 3) is reported, the tie (row 2) dropped; images are not looked at
    assert [b.row for b in pairs.report.bad] == [3] and pairs.report.bad[0].field == "label_0"
    assert pairs.report.ties_dropped == 1 and pairs.report.total == 8
    assert pairs.rows.tolist() == [0, 1, 4, 5, 6, 7]

    # positions 3, 4 are rows 5, 6 (24×24 images; row 6 mixes sizes): each image resized on its own
    batch = pairs.batch([0, 3, 4], size=(16, 16))
    assert batch.rows.tolist() == [0, 5, 6] and batch.images_0.shape == (3, 3, 16, 16)
    assert torch.allclose(batch.images_0[0], decode_image(load_pairwise(data).dataset[0]["jpg_0"]))  # 16×16: untouched
    raw = pairs.raw[6]
    assert torch.allclose(batch.images_0[2], resize_images(decode_image(raw["jpg_0"])[None], (16, 16))[0])
    assert torch.allclose(batch.images_1[2], decode_image(raw["jpg_1"]))
    assert batch.captions == [PROMPTS[0], PROMPTS[2], PROMPTS[0]] and batch.label_0.tolist() == [0.0, 1.0, 0.0]

    # position 2 is row 4, whose jpg_0 does not decode: the next usable record (row 5) stands in, with a warning
    with pytest.warns(UserWarning, match="row 4: jpg_0 is not a readable image"):
        substituted = pairs.batch([2, 1], size=(16, 16))
    assert substituted.rows.tolist() == [5, 1] and list(pairs.bad) == [4]
    with pytest.raises(PrefalignError, match="different sizes"):
        pairs.batch([0, 3])  # without size=, a batch of mixed sizes is an error, not a crash

    # the fully validating reader drops rows 4 (image), 5 and 6 (size) as well
    full = load_pairwise(data, drop_ties=True)
    assert sorted(b.row for b in full.report.bad) == [3, 4, 5, 6]


def test_lazy_open_never_decodes_images(tmp_path):
    writer = ShardWriter(tmp_path / "junk", "train", PAIRWISE_SCHEMA)
    for row in range(5):
        writer.write(pair_record(PROMPTS[0], b"junk-0-%d" % row, b"junk-1-%d" % row, 1.0))
    writer.close()
    pairs = open_lazy_pairs(tmp_path / "junk")
    assert len(pairs) == 5 and not pairs.report.bad  # opened without looking at the (garbage) images
    with pytest.warns(UserWarning), pytest.raises(PrefalignError, match="5 records in a row do not decode|records in a row do not decode"):
        pairs.batch([0])
    with pytest.raises(PrefalignError, match="no usable records"):
        load_pairwise(tmp_path / "junk")


def test_lazy_and_full_readers_give_the_same_training_batches(tmp_path):
    data = write_pairs(tmp_path / "pairs", count=10, with_ties=True)
    lazy, full = open_pairs(data, "random", validate="lazy"), open_pairs(data, "random", validate="full")
    assert len(lazy) == len(full) == 10
    layout = BatchLayout(batch_size=3, num_processes=2, process_index=1, accumulation=2)
    a = StepPairBatches(lazy, layout, 0, 4, seed=5, resolution=(8, 8))
    b = StepPairBatches(full, layout, 0, 4, seed=5, resolution=(8, 8))
    for k in range(len(a)):
        x, y = a[k], b[k]
        assert x["prompts"] == y["prompts"] and torch.equal(x["rows"], y["rows"])
        assert torch.equal(x["images_w"], y["images_w"]) and torch.equal(x["images_l"], y["images_l"])


def test_a_lazy_run_with_workers_matches_a_fully_validated_run(tmp_path):
    model = make_tiny_shapes_model(tmp_path / "model")
    data = write_pairs(tmp_path / "pairs", count=12, size=24)  # 24×24 images for a 16×16 model: resized
    results = {}
    for mode, workers in (("full", 0), ("lazy", 1)):  # lazy: decoded in a DataLoader worker process
        config = tiny_config(model, data, steps=3, **{"data.validation": mode, "data.num_workers": workers, "export.enabled": False})
        results[mode] = Trainer(config, tmp_path / mode).train().metrics["history"]
    assert [h["loss"] for h in results["lazy"]] == pytest.approx([h["loss"] for h in results["full"]], abs=1e-7)
    assert [h["grad_norm"] for h in results["lazy"]] == pytest.approx([h["grad_norm"] for h in results["full"]], rel=1e-6)
    assert results["lazy"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_the_sd_prompt_cache_keeps_to_its_memory_budget(tmp_path):
    from prefalign.backbones.loading import load_backbone

    backbone = load_backbone(make_tiny_sd(tmp_path / "sd"))
    prompts = [f"prompt number {i}" for i in range(12)]
    uncached = backbone.encode_prompts(prompts).encoder_hidden_states
    backbone.clear_prompt_cache()
    one = (16 * 32 + 32) * 4  # one entry: token states 16×32 + pooled sentence embedding 32, float32
    backbone.prompt_cache_mib = 5.5 * one / 2**20  # room for 5 entries
    for prompt in prompts:
        backbone.encode_prompts([prompt])
    assert list(backbone._cache) == prompts[-5:] and backbone._cache_bytes == 5 * one  # least recently used dropped
    again = backbone.encode_prompts(prompts).encoder_hidden_states  # 5 hits, 7 fresh encodings
    assert torch.allclose(again, uncached, atol=1e-6) and backbone._cache_bytes <= 5.5 * one


def test_the_latent_cache_skips_the_vae_on_later_epochs_and_keeps_the_numbers(tmp_path):
    from prefalign.backbones.loading import load_backbone
    from prefalign.training.latent_cache import LatentCache, precompute_latents

    model, data = make_tiny_sd(tmp_path / "sd"), write_pairs(tmp_path / "pairs", count=6, with_ties=False)
    extra = {"export.enabled": False, "checkpoint.every": 100, "dpo.beta": 5000, "optimizer.learning_rate": 1e-2}

    def run(name: str, steps: int = 4, **more):
        config = tiny_config(model, data, steps=steps, batch_size=2, **extra, **more)
        return Trainer(config, tmp_path / name).train().metrics

    plain = run("plain")
    first = run("first", **{"data.latent_cache": str(tmp_path / "cache")})
    # 4 steps × 2 pairs over 6 pairs: epoch 2 starts at step 4; its 2 pairs' 4 images are hits
    assert first["latent_cache"] == {"hits": 4, "misses": 12}
    assert [h["loss"] for h in first["history"]] == pytest.approx([h["loss"] for h in plain["history"]], abs=2e-3)  # float16 rounding only
    second = run("second", **{"data.latent_cache": str(tmp_path / "cache")})  # a new run on the filled cache
    assert second["latent_cache"] == {"hits": 16, "misses": 0}
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in first["history"]]  # hit or miss, the same numbers

    # precomputed: every slot filled before training
    backbone = load_backbone(model)
    pairs = open_pairs(data, "drop", validate="lazy")
    cache = LatentCache.open(tmp_path / "pre", len(pairs.raw), backbone.latent_shape, False, str(model), backbone.resolution)
    assert precompute_latents(cache, pairs, backbone, backbone.resolution, batch_size=4, progress=False) == 12
    assert cache.filled_fraction() == 1.0
    # a call with other images than the slots expect never returns a cached latent
    images = pairs.batch([0]).images_0
    cache.expect([int(pairs.rows[0])], [True], None)
    cache.attach(backbone)
    assert torch.allclose(backbone.images_to_latents(images), backbone.__class__.images_to_latents(backbone, images), atol=1e-2)
    other = torch.rand_like(images)
    hits, misses = cache.hits, cache.misses
    assert torch.allclose(backbone.images_to_latents(other), backbone.__class__.images_to_latents(backbone, other).half().float(), atol=1e-6)
    assert (cache.hits, cache.misses) == (hits, misses + 1)
    cache.detach(backbone)
    assert "images_to_latents" not in vars(backbone)
    with pytest.raises(PrefalignError, match="other settings"):
        LatentCache.open(tmp_path / "pre", len(pairs.raw), backbone.latent_shape, True, str(model), backbone.resolution)


# --------------------------------------------------------------------------------------------------
# The synthetic Pick-a-Pic writer
# --------------------------------------------------------------------------------------------------


def _make_pickapic():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("make_pickapic")


def test_make_pickapic_writes_the_pickapic_schema_deterministically(tmp_path):
    module = _make_pickapic()
    info = module.make_pickapic(tmp_path / "a", 300, image_size=16, seed=3, shard_size=128, tie_rate=0.2, mixed_size_rate=0.1, mixed_size=24, progress=False)
    module.make_pickapic(tmp_path / "b", 300, image_size=16, seed=3, shard_size=128, tie_rate=0.2, mixed_size_rate=0.1, mixed_size=24, progress=False)
    shards = sorted((tmp_path / "a" / "data").glob("*.parquet"))
    assert [p.name for p in shards] == [f"train-0000{i}-of-00003.parquet" for i in range(3)] and info["shards"] == 3
    assert all(p.read_bytes() == (tmp_path / "b" / "data" / p.name).read_bytes() for p in shards)  # same seed, same bytes

    import pyarrow.parquet as pq

    table = pq.read_table(shards)
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "ranking_id", "model_0", "image_0_uid", "has_label"} <= set(table.column_names)
    label_0 = np.asarray(table["label_0"])
    assert set(np.unique(label_0)) <= {0.0, 0.5, 1.0} and np.allclose(label_0 + np.asarray(table["label_1"]), 1)
    assert (label_0 == 0.5).sum() == info["ties"] and 35 <= info["ties"] <= 85  # 20 % of 300, binomial spread
    assert 10 <= info["mixed_size"] <= 50
    # the fully validating reader rejects the 24×24 pairs (one image size per dataset); the lazy one keeps them
    assert len(load_pairwise(tmp_path / "a").report.bad) == info["mixed_size"]
    lazy = open_lazy_pairs(tmp_path / "a", drop_ties=True)
    assert len(lazy) == 300 - info["ties"]
    batch = lazy.batch(range(len(lazy)), size=(16, 16))
    assert batch.images_0.shape == (len(lazy), 3, 16, 16)
    # the preferred image is the less noisy one (a learnable signal): compare high-frequency energy
    winners = torch.where((batch.label_0 > 0.5)[:, None, None, None], batch.images_0, batch.images_1)
    losers = torch.where((batch.label_0 > 0.5)[:, None, None, None], batch.images_1, batch.images_0)
    assert winners.diff(dim=-1).abs().mean() < losers.diff(dim=-1).abs().mean()


# --------------------------------------------------------------------------------------------------
# An external reward model as a scorer (examples/external_scorer.py)
# --------------------------------------------------------------------------------------------------


def _tiny_clip_folder(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = make_tiny_tokenizer(folder / "_tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=24, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def external_scorer(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples"))
    module = importlib.import_module("external_scorer")
    return module, _tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_external_clip_scorer_matches_clip_by_hand(external_scorer, monkeypatch):
    from transformers import CLIPModel

    module, folder = external_scorer
    scorer = module.ClipPreferenceScorer(folder)
    images = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "the blue dog", "a green square in the top left"]
    scores = scorer.score(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32

    # by hand: CLIP's own forward on the same pixels and tokens; PickScore's score = logits_per_image diagonal
    clip = CLIPModel.from_pretrained(folder).eval()
    small = torch.nn.functional.interpolate(images, size=(24, 30), mode="bicubic", antialias=True, align_corners=False)[..., :, 3:27]
    mean, std = torch.tensor(module.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(module.CLIP_STD).view(1, 3, 1, 1)
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=(small - mean) / std).logits_per_image
    assert torch.allclose(scores, logits.diagonal(), atol=1e-4)
    assert not torch.allclose(scores, logits[:, 0], atol=1e-4)  # the pairing matters: row i is prompt i

    # differentiable: gradients reach the images (for Diff-Instruct++), not the frozen weights
    images.requires_grad_(True)
    scorer.score(images, prompts).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.model.parameters())

    # the module:function route users take: a zero-argument factory reading CLIP_SCORER_DIR
    from prefalign.rewards.base import load_scorer

    monkeypatch.setenv(module.ENV_VAR, str(folder))
    loaded = load_scorer("external_scorer:clip_scorer")
    assert loaded.differentiable and torch.allclose(loaded(images.detach(), prompts), scores, atol=1e-5)
    # RPO's image embeddings from the same folder: normalised projected CLIP image features
    embeddings = module.clip_image_embeddings(images.detach())
    with torch.no_grad():
        expected = torch.nn.functional.normalize(module.projected(clip.get_image_features(pixel_values=(small - mean) / std)), dim=-1)
    assert embeddings.shape == (3, 16) and torch.allclose(embeddings, expected, atol=1e-5)


def test_external_clip_scorer_errors_say_what_to_do(external_scorer, tmp_path, monkeypatch):
    module, folder = external_scorer
    with pytest.raises(PrefalignError, match="huggingface-cli download"):
        module.ClipPreferenceScorer(tmp_path / "nowhere")
    monkeypatch.delenv(module.ENV_VAR, raising=False)
    with pytest.raises(PrefalignError, match="set CLIP_SCORER_DIR"):
        module.clip_scorer()
    with pytest.raises(PrefalignError, match="one prompt per image"):
        module.ClipPreferenceScorer(folder).score(torch.rand(2, 3, 24, 24), ["only one"])


# --------------------------------------------------------------------------------------------------
# CUDA only (skipped cleanly without a GPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return make_tiny_sd(root / "sd"), write_pairs(root / "pairs", count=8)


@CUDA
@pytest.mark.parametrize("method", ["dpo", "rpo"])
def test_cuda_bf16_steps_on_a_tiny_sd_pipeline(tiny_sd_world, tmp_path, method):
    model, data = tiny_sd_world
    config = tiny_config(model, data, method=method, steps=3, **{"mixed_precision": "bf16", "device": "cuda", "export.enabled": False, "gradient_checkpointing": True})
    result = Trainer(config, tmp_path / "run").train()
    final = result.metrics["final"]
    assert result.backbone.device.type == "cuda" and math.isfinite(final["loss"]) and final["grad_norm"] > 0
    assert result.metrics["peak_memory_mib"] > 0


@CUDA
def test_cuda_peak_memory_full_above_lora(tiny_sd_world, tmp_path):
    model, data = tiny_sd_world
    peaks = {}
    for mode in ("full", "lora"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        config = tiny_config(model, data, steps=2, **{"finetune.mode": mode, "device": "cuda", "export.enabled": False, "mixed_precision": "bf16"})
        peaks[mode] = Trainer(config, tmp_path / mode).train().metrics["peak_memory_mib"]
    # full fine-tuning holds a frozen reference copy, gradients and AdamW state for every UNet weight
    assert peaks["full"] > peaks["lora"]
