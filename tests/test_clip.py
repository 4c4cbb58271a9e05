"""The world's CLIP: the shipped encoder's zero-shot accuracy, the contrastive loss, freezing by
fix_rate, and a tiny resumable pretraining run."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.pretrain.clip import PretrainClipConfig, clip_training_batch, contrastive_loss, pretrain_clip
from prefalign.rewards.clip import ClipConfig, ShapesClip, candidate_prompts, load_clip, zero_shot_accuracy
from prefalign.training.checkpoint import list_checkpoints
from prefalign.worlds.shapes.prompts import STYLES, Scene, sample_scenes
from prefalign.worlds.shapes.render import render


def test_shipped_clip_zero_shot_accuracy_is_at_least_90_percent():
    clip = load_clip("shapes-clip")
    scenes = sample_scenes(100, seed=2024, split="train")
    images = render(scenes, seed=2024).images
    assert zero_shot_accuracy(clip, images, scenes, "colour") >= 0.9
    assert zero_shot_accuracy(clip, images, scenes, "shape") >= 0.9
    styles = [None, *STYLES]
    styled = [scene.with_style(styles[i % 4]) for i, scene in enumerate(scenes)]
    assert zero_shot_accuracy(clip, render(styled, seed=2025).images, styled, "style") >= 0.9
    # the card reports the bars it was shipped with
    assert clip.metadata["metrics"]["bars"] == {"colour_accuracy>=0.90": True, "shape_accuracy>=0.90": True, "style_accuracy>=0.90": True}


def test_contrastive_loss_matches_hand_computation():
    identity = torch.eye(2)
    scale = torch.tensor(0.0)  # exp(0) = 1: logits are the cosines
    plain = math.log(1 + math.exp(-1))  # each row and column: softmax of [1, 0]
    assert contrastive_loss(identity, identity, scale).item() == pytest.approx(plain, rel=1e-6)
    # identical captions are not negatives of each other: the off-diagonal drops out
    same = torch.ones(2, 2, dtype=torch.bool)
    assert contrastive_loss(identity, identity, scale, same).item() == pytest.approx(0.0, abs=1e-6)
    # one hard negative for image 0, equal to its caption's embedding: row 0 becomes softmax of [1, 0, 1]
    hard = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    mask = torch.tensor([[True], [False]])
    row_0 = -math.log(math.e / (2 * math.e + 1))
    expected = 0.5 * ((row_0 + plain) / 2 + plain)
    assert contrastive_loss(identity, identity, scale, None, hard, mask).item() == pytest.approx(expected, rel=1e-6)


def test_candidate_prompts_differ_in_one_attribute_only():
    scene = Scene("red", "circle", "small", "center", "gray")
    colours = candidate_prompts(scene, "colour")
    assert len(colours) == 8 and scene.prompt in colours
    assert candidate_prompts(scene, "style")[0] == scene.prompt and candidate_prompts(scene, "style")[1].endswith(", sketch style")
    with pytest.raises(PrefalignError, match="unknown attribute"):
        candidate_prompts(scene, "texture")


def test_fix_rate_freezes_the_first_blocks(tmp_path):
    clip = ShapesClip(ClipConfig(image_size=16, channels=(8, 8, 8, 8), head_channels=4, groups=4))
    assert len(clip.blocks) == 8
    assert clip.set_trainable(0.7) == 5
    assert not any(p.requires_grad for b in clip.blocks[:5] for p in b.parameters())
    assert all(p.requires_grad for b in clip.blocks[5:] for p in b.parameters()) and clip.projection.weight.requires_grad
    assert clip.set_trainable(1.0) == 8 and not any(p.requires_grad for p in clip.parameters())
    with pytest.raises(PrefalignError, match="fix_rate"):
        clip.set_trainable(1.5)
    images = torch.rand(2, 3, 16, 16)
    assert torch.allclose(clip.head(clip.run_blocks(clip.block_input(images, 5), 5)), clip.head(clip.run_blocks(clip._input(images))))
    with pytest.raises(PrefalignError, match="16×16"):
        clip.encode_images(torch.rand(1, 3, 32, 32))
    with pytest.raises(PrefalignError, match="not a CLIP folder"):
        load_clip(tmp_path)


def test_tiny_pretraining_resumes_bit_identically(tmp_path):
    config = PretrainClipConfig(
        image_size=16, channels=(8, 8, 8, 8), head_channels=4, steps=4, batch_size=6, checkpoint_every=2, log_every=1, eval_every=100,
        eval_renders=8, warmup_steps=1, warm_text_cache=False,
    )
    images, captions, negatives = clip_training_batch(0, config)
    assert images.shape == (6, 3, 16, 16) and len(captions) == 6 and all(len(n) == 6 for n in negatives)
    straight = pretrain_clip(config, tmp_path / "straight", progress=False)
    pretrain_clip(config, tmp_path / "killed", progress=False)
    shutil.rmtree(list_checkpoints(tmp_path / "killed")[-1])
    resumed = pretrain_clip(config, tmp_path / "killed", progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_clip(tmp_path / "straight" / "model")
    assert torch.equal(loaded.projection.weight, straight.projection.weight)
    assert set(loaded.metadata["metrics"]["held_in"]) == {f"{k}_accuracy" for k in ("colour", "shape", "size", "position", "background", "style")}
    assert "Zero-shot accuracy" in (tmp_path / "straight" / "model" / "README.md").read_text()


def test_pretrain_clip_command_registers_and_documents_itself():
    import typer
    from typer.testing import CliRunner

    from prefalign.commands import pretrain_clip

    app = typer.Typer()
    app.command("clip")(pretrain_clip.clip)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["clip", "--help"])
    assert result.exit_code == 0 and "--steps" in result.output and "MiniLM" in result.output
