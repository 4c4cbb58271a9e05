"""The inpainting model (widening, pretraining resume), inpainting sampling that keeps the known
region, the seam metric, and ``prefs make-inpaint``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from prefalign.backbones.shapes import load_shapes_backbone
from prefalign.errors import PrefalignError
from prefalign.inpainting import boundary_differences, composite, inpaint, seam_error, world_inpaint_prompts
from prefalign.pretrain.inpaint import PretrainInpaintConfig, inpaint_training_batch, pretrain_inpaint, widen_conv_in
from prefalign.training.checkpoint import latest_checkpoint, list_checkpoints

from prefalign.worlds.shapes.prompts import sample_prompts

from test_trainer import PROMPTS, make_tiny_shapes_model

WORLD_PROMPTS = sample_prompts(4, seed=11)


def _config(init: Path, **overrides) -> PretrainInpaintConfig:
    values = dict(init_from=str(init), image_size=16, block_out_channels=(8, 16, 16), steps=4, batch_size=4, checkpoint_every=2, log_every=1, warmup_steps=1)
    values.update(overrides)
    return PretrainInpaintConfig(**values)


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory) -> Path:
    return make_tiny_shapes_model(tmp_path_factory.mktemp("inpaint") / "t2i", seed=3)


def test_widened_unet_starts_as_the_text_to_image_model(tiny_t2i):
    t2i = load_shapes_backbone(tiny_t2i)
    wide = widen_conv_in(t2i.unet)
    assert wide.config.in_channels == 7 and torch.equal(wide.conv_in.weight[:, :3], t2i.unet.conv_in.weight)
    assert wide.conv_in.weight[:, 3:].abs().sum() == 0
    x = torch.randn(2, 3, 16, 16)
    extra = torch.randn(2, 4, 16, 16)  # any mask / masked image
    cond = t2i.encode_prompts(PROMPTS[:2])
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = t2i.unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        got = wide(torch.cat([x, extra], 1), t, encoder_hidden_states=cond.encoder_hidden_states).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_training_batches_hold_both_mask_kinds_and_are_deterministic(tiny_t2i):
    config = _config(tiny_t2i, batch_size=8, outpaint_share=0.5)
    images, masks, prompts, kinds, _ = inpaint_training_batch(3, config)
    again = inpaint_training_batch(3, config)
    assert torch.equal(masks, again[1]) and torch.equal(images, again[0]) and kinds == again[3]
    assert set(kinds) == {"outpaint", "warp"} and masks.shape == (8, 1, 16, 16)
    assert ((masks == 0) | (masks == 1)).all() and (masks.flatten(1).mean(1) > 0).all()
    assert sum(p == "" for p in prompts) >= 1  # 50 % empty prompts (seeded: 4 of 8 here)


def test_pretrain_inpaint_resumes_bit_identically(tiny_t2i, tmp_path):
    config = _config(tiny_t2i)
    straight = pretrain_inpaint(config, tmp_path / "straight", progress=False)
    pretrain_inpaint(config, tmp_path / "killed", progress=False)
    checkpoints = list_checkpoints(tmp_path / "killed")
    shutil.rmtree(checkpoints[-1])
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000002"
    resumed = pretrain_inpaint(config, tmp_path / "killed", progress=False, resume=True)
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = pretrain_inpaint(_config(tiny_t2i, seed=1), tmp_path / "other", progress=False)
    assert not all(torch.equal(a[k], other.unet.state_dict()[k]) for k in a)
    # the model folder loads as an inpainting model; the mask channels were trained (no longer 0)
    loaded = load_shapes_backbone(tmp_path / "straight" / "model")
    assert loaded.kind == "shapes-inpaint" and loaded.unet.config.in_channels == 7
    assert loaded.unet.conv_in.weight[:, 3:].abs().sum() > 0
    assert "pretrain inpaint" in (tmp_path / "straight" / "model" / "README.md").read_text()


def test_inpainting_keeps_the_known_region_exactly(tiny_t2i, tmp_path):
    config = _config(tiny_t2i, steps=1)
    backbone = pretrain_inpaint(config, tmp_path / "run", progress=False)
    items = world_inpaint_prompts(WORLD_PROMPTS, 16, seed=5)
    assert items.kinds == ["outpaint", "warp", "outpaint", "warp"]
    deterministic = inpaint(backbone, items, seed=1, steps=3)
    stochastic = inpaint(backbone, items, seed=1, steps=3, eta=1.0, prompt_mode="empty")
    keep = items.masks < 0.5
    for images in (deterministic, stochastic):
        assert torch.equal(images.masked_select(keep.expand_as(images)), items.sources.masked_select(keep.expand_as(images)))
    hole = (~keep).expand_as(deterministic)
    assert not torch.equal(deterministic[hole], stochastic[hole])
    raw = inpaint(backbone, items, seed=1, steps=3, keep_known=False)
    assert not torch.equal(raw[keep.expand_as(raw)], items.sources[keep.expand_as(raw)])
    t2i = load_shapes_backbone(tiny_t2i)
    with pytest.raises(PrefalignError, match="not an inpainting model"):
        inpaint(t2i, items)


def test_composite_and_seam_error_by_hand():
    source = torch.zeros(1, 3, 2, 3)
    completion = torch.ones(1, 3, 2, 3)
    mask = torch.tensor([[[[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]]])
    out = composite(completion, source, mask)
    assert torch.equal(out[0, 0], mask[0, 0])
    # boundary pairs (known, hole): (0,0)-(0,1), (1,1)-(1,2) horizontally; (1,1)-(0,1) vertically → 3 pairs, each |0 − 1|
    assert boundary_differences(out, mask).item() == 1.0
    assert boundary_differences(source, mask).item() == 0.0
    assert seam_error(out, source, mask).item() == 1.0
    assert seam_error(source, source, mask).item() == 0.0


def test_prefs_make_inpaint_writes_prefpaint_groups(tiny_t2i, tmp_path):
    from typer.testing import CliRunner

    from prefalign.backbones.shapes import ShapesBackbone
    from prefalign.cli import app
    from prefalign.data.pointwise import load_pointwise

    base = load_shapes_backbone(tiny_t2i)
    model = ShapesBackbone(widen_conv_in(base.unet), base.scheduler_config, 16, "shapes-inpaint").save_pretrained(tmp_path / "inpaint")
    out = tmp_path / "prefs"
    result = CliRunner().invoke(app, ["prefs", "make-inpaint", "--model", str(model), "--out", str(out), "--prompts", "4", "--steps", "2", "--test-fraction", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    train, test = load_pointwise(out, "train"), load_pointwise(out, "test")
    assert (len(train), len(test)) == (9, 3) and train.inpainting
    batch = train.batch(range(len(train)))
    assert set(batch.mask_kinds) == {"outpaint", "warp"} and set(batch.scores.tolist()) <= set(range(1, 8))
    keep = (batch.masks < 0.5).expand_as(batch.images)
    # the masked prompt image is the source with the hole blacked out; the completion keeps the known region
    assert torch.allclose(batch.images[keep], batch.masked_images[keep], atol=1 / 255 + 1e-6)
    assert (batch.masked_images[~keep] == 0).all()
    ranks = train.dataset["rank"]
    for group in set(batch.group_ids):
        members = [i for i, g in enumerate(batch.group_ids) if g == group]
        assert len(members) == 3
        for i in members:
            assert ranks[i] == 1 + sum(batch.scores[j] > batch.scores[i] for j in members)
    assert len(set(batch.captions)) == 3 and all(c for c in batch.captions)
    # the dataset is also a prompt source of the RL methods: one masked prompt image per group
    from prefalign.methods.rl import RLConfig, load_prompt_set

    prompt_set = load_prompt_set(RLConfig(prompts=str(out)), load_shapes_backbone(model))
    assert len(prompt_set) == 3 and prompt_set.world and sorted(prompt_set.captions) == sorted(set(batch.captions))
    first = batch.group_ids.index(prompt_set.keys[0].removeprefix("group-"))
    assert torch.allclose(prompt_set.inpaint.masks[0], batch.masks[first]) and torch.allclose(prompt_set.inpaint.sources[0], batch.masked_images[first])
