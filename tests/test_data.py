"""Preference datasets: Parquet round trips, bad-record reporting, imports, cards, `prefs` commands."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from prefalign.data import PairwiseDataset, PointwiseDataset, ValidationReport, dataset_kind, load_pairwise, load_pointwise, load_preference_data, pair_record, point_records, stream_pairwise
from prefalign.data.card import write_card
from prefalign.data.importing import import_preferences
from prefalign.data.pointwise import POINTWISE_SCHEMA, ranks_within_groups
from prefalign.data.preference import PAIRWISE_SCHEMA
from prefalign.data.stats import average_ranks, pairwise_agreement, spearman_correlation
from prefalign.data.storage import ShardWriter, write_meta
from prefalign.errors import PrefalignError
from prefalign.rewards.labelling import bradley_terry_labels, pair_indices
from prefalign.worlds.shapes.prompts import sample_scenes
from prefalign.worlds.shapes.render import render

runner = CliRunner()


def _quantised(images: torch.Tensor) -> torch.Tensor:
    """Images exactly representable as 8-bit PNG."""
    return (images * 255).round() / 255


def _write_pairs(folder, rows, shard_size=3, split="train"):
    writer = ShardWriter(folder, split, PAIRWISE_SCHEMA, shard_size)
    writer.write_many(rows)
    shards = writer.close()
    write_meta(folder, {"kind": "pairwise"})
    return shards


def _world_pairs(count: int, seed: int = 0):
    scenes = sample_scenes(count, seed)
    a = _quantised(render(scenes, seed=seed, size=16).images)
    b = _quantised(render(scenes, seed=seed + 1, size=16, defects=["blur"] * count).images)
    return scenes, a, b


def test_pairwise_round_trip_through_parquet_shards(tmp_path):
    scenes, a, b = _world_pairs(7)
    labels = [1.0, 0.0, 0.5, 1.0, 0.5, 0.0, 1.0]
    shards = _write_pairs(tmp_path, [pair_record(s.prompt, a[i], b[i], labels[i], ranking_id=i) for i, s in enumerate(scenes)])
    assert [p.name for p in shards] == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    data = load_pairwise(tmp_path, cache_dir=tmp_path / "cache")
    assert isinstance(data, PairwiseDataset) and len(data) == 7 and not data.report.bad
    batch = data.batch(range(7))
    assert batch.captions == [s.prompt for s in scenes]
    assert batch.label_0.tolist() == labels
    assert torch.equal(batch.images_0, a) and torch.equal(batch.images_1, b)
    assert batch.rows.tolist() == list(range(7))
    record = data[2]
    assert record["label_0"] == 0.5 and torch.equal(record["image_1"], b[2])
    # ties can be filtered; the rest stays in order with its row ids
    no_ties = load_pairwise(tmp_path, drop_ties=True, cache_dir=tmp_path / "cache")
    assert len(no_ties) == 5 and no_ties.report.ties_dropped == 2
    assert no_ties.batch(range(5)).rows.tolist() == [0, 1, 3, 5, 6]
    # streaming gives the same records without a cache
    streamed = list(stream_pairwise(tmp_path, batch_size=4))
    assert [len(s) for s in streamed] == [4, 3]
    assert torch.equal(torch.cat([s.images_0 for s in streamed]), a)
    assert dataset_kind(tmp_path) == "pairwise"


def test_bad_records_are_reported_with_row_ids(tmp_path):
    scenes, a, b = _world_pairs(6)
    rows = [pair_record(s.prompt, a[i], b[i], 1.0) for i, s in enumerate(scenes)]
    rows[1]["jpg_0"] = b"\x89PNG\r\n\x1a\n not really a png"  # unreadable image
    rows[2]["caption"] = None  # missing field
    rows[3]["jpg_1"] = pair_record("x", torch.rand(3, 8, 8), torch.rand(3, 8, 8), 1.0)["jpg_0"]  # size mismatch within the pair
    rows[4]["label_0"] = None  # missing label
    big = torch.rand(3, 24, 24)
    rows.append(pair_record(scenes[0].prompt, big, big, 0.0))  # size mismatch with the dataset
    rows.append(pair_record(scenes[0].prompt, a[0], b[0], 1.0))
    rows[-1]["label_1"] = 0.7  # inconsistent labels
    _write_pairs(tmp_path, rows)
    data = load_pairwise(tmp_path, cache_dir=tmp_path / "cache")
    report = data.report
    assert report.total == 8 and report.usable == 2 and len(data) == 2
    assert report.bad_rows == [1, 2, 3, 4, 6, 7]
    reasons = {b.row: (b.field, b.reason) for b in report.bad}
    assert reasons[1][0] == "jpg_0" and "not a readable image" in reasons[1][1]
    assert reasons[2] == ("caption", "is missing")
    assert reasons[3][0] == "jpg_1" and "size mismatch" in reasons[3][1]
    assert reasons[4] == ("label_0", "is missing")
    assert "24×24" in reasons[6][1] and "16×16" in reasons[6][1]
    assert reasons[7][0] == "label_1"
    assert "row 1" in report.summary() and "6 of 8 records are bad" in report.summary()
    assert data.batch([0, 1]).rows.tolist() == [0, 5]
    # the same report when streaming
    streamed = ValidationReport("stream")
    list(stream_pairwise(tmp_path, report=streamed))
    assert streamed.bad_rows == [1, 2, 3, 4, 6, 7]
    saved = json.loads(report.write(tmp_path / "report.json").read_text())
    assert saved["bad"] == 6 and saved["bad_records"][0]["row"] == 1


def test_a_dataset_without_usable_records_is_a_clear_error(tmp_path):
    scenes, a, b = _world_pairs(3)
    rows = [pair_record(s.prompt, a[i], b[i], 1.0) for i, s in enumerate(scenes)]
    for row in rows:
        row["jpg_1"] = b"garbage"
    _write_pairs(tmp_path / "bad", rows)
    with pytest.raises(PrefalignError, match="no usable records.*jpg_1 is not a readable image"):
        load_pairwise(tmp_path / "bad", cache_dir=tmp_path / "cache")
    with pytest.raises(PrefalignError, match="no usable records"):
        list(stream_pairwise(tmp_path / "bad"))
    # a missing column is named
    writer = ShardWriter(tmp_path / "nolabel", "train", PAIRWISE_SCHEMA.remove(PAIRWISE_SCHEMA.get_field_index("label_0")), 10)
    writer.write({"caption": "x", "jpg_0": rows[0]["jpg_0"], "jpg_1": rows[0]["jpg_0"]})
    writer.close()
    with pytest.raises(PrefalignError, match="no label_0 column"):
        load_pairwise(tmp_path / "nolabel")
    with pytest.raises(PrefalignError, match="not found"):
        load_pairwise(tmp_path / "nowhere")
    with pytest.raises(PrefalignError, match="no 'test' split.*train"):
        load_pairwise(tmp_path / "bad", split="test")


def test_pointwise_round_trip_ranks_and_mask_checks(tmp_path):
    scenes, a, _ = _world_pairs(5)
    masks = torch.zeros(5, 1, 16, 16)
    masks[:, :, :, :6] = 1
    masked = a * (1 - masks)
    rows = point_records(list(a), [3, 7, 5, 5, 1], ["g0", "g0", "g0", "g1", "g1"], [s.prompt for s in scenes], list(masked), list(masks), ["outpaint"] * 5)
    assert [r["rank"] for r in rows] == [3, 1, 2, 1, 2]
    rows.append(dict(rows[0], mask=pair_record("x", torch.rand(3, 8, 8), torch.rand(3, 8, 8), 1)["jpg_0"]))  # mask size mismatch
    rows.append(dict(rows[0], score=float("nan")))
    writer = ShardWriter(tmp_path, "train", POINTWISE_SCHEMA, 4)
    writer.write_many(rows)
    writer.close()
    write_meta(tmp_path, {"kind": "pointwise", "inpainting": True})
    data = load_preference_data(tmp_path, cache_dir=tmp_path / "cache")
    assert isinstance(data, PointwiseDataset) and data.inpainting and len(data) == 5
    assert data.report.bad_rows == [5, 6]
    assert "mask" == data.report.bad[0].field and "size mismatch" in data.report.bad[0].reason
    batch = data.batch(range(5))
    assert torch.equal(batch.images, a) and torch.equal(batch.masks, masks) and torch.equal(batch.masked_images, masked)
    assert batch.scores.tolist() == [3, 7, 5, 5, 1] and batch.mask_kinds == ["outpaint"] * 5
    assert sorted(data.group_pairs()) == [(1, 0), (1, 2), (2, 0), (3, 4)]
    assert ranks_within_groups([7, 5, 5, 3], ["a"] * 4) == [1, 2, 2, 4]


def _png(path, image: torch.Tensor):
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def test_import_from_a_folder_and_csv_reports_bad_rows(tmp_path):
    scenes, a, b = _world_pairs(4)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        _png(images / f"{i}a.png", a[i])
        _png(images / f"{i}b.png", b[i])
    (images / "broken.png").write_bytes(b"not an image")
    _png(images / "big.png", torch.rand(3, 20, 20))
    lines = ["caption,image_0,image_1,label_0,split"]
    lines += [f'"{scenes[i].prompt}",{i}a.png,{i}b.png,{[1, 0, 0.5, 1][i]},{"test" if i == 3 else ""}' for i in range(4)]
    lines += [f'"{scenes[0].prompt}",missing.png,0b.png,1', f'"{scenes[0].prompt}",broken.png,0b.png,1', f'"{scenes[0].prompt}",0a.png,0b.png,', f'"{scenes[0].prompt}",0a.png,big.png,0']
    (tmp_path / "prefs.csv").write_text("\n".join(lines) + "\n")
    report = import_preferences(images, tmp_path / "prefs.csv", tmp_path / "out")
    assert report.total == 8 and report.bad_rows == [4, 5, 6, 7]
    reasons = {b.row: b for b in report.bad}
    assert "file not found" in reasons[4].reason and "not a readable image" in reasons[5].reason
    assert reasons[6].field == "label_0" and "size mismatch" in reasons[7].reason
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["bad"] == 4
    train = load_pairwise(tmp_path / "out")
    test = load_pairwise(tmp_path / "out", split="test")
    assert (len(train), len(test)) == (3, 1)
    assert train.label_0.tolist() == [1.0, 0.0, 0.5]
    assert torch.equal(train.batch([1]).images_1[0], b[1])
    # JSONL, pointwise; all rows bad → error, and nothing is written
    (tmp_path / "scores.jsonl").write_text("\n".join(json.dumps({"image": f"{i}a.png", "score": 1 + i, "group_id": "g"}) for i in range(4)) + "\n")
    import_preferences(images, tmp_path / "scores.jsonl", tmp_path / "points")
    points = load_pointwise(tmp_path / "points")
    assert points.scores.tolist() == [1, 2, 3, 4] and not points.inpainting
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "broken.png", "score": 1}) + "\n")
    with pytest.raises(PrefalignError, match="no usable records"):
        import_preferences(images, tmp_path / "bad.jsonl", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_card_counts_ties_and_agreement_with_the_noiseless_annotator(tmp_path):
    from prefalign.worlds.shapes.annotator import Annotator

    scenes, a, b = _world_pairs(8)
    truth = Annotator().score(a, [s.prompt for s in scenes]) - Annotator().score(b, [s.prompt for s in scenes])
    labels = [1.0 if float(t) > 0 else 0.0 for t in truth]
    labels[0], labels[1] = 0.5, 1.0 - labels[1]  # one tie, one label against the annotator
    _write_pairs(tmp_path, [pair_record(s.prompt, a[i], b[i], labels[i]) for i, s in enumerate(scenes)])
    card = write_card(tmp_path)
    split = card["splits"]["train"]
    assert split["ties"] == 1 and split["tie_rate"] == pytest.approx(1 / 8)
    assert split["annotator_agreement"] == pytest.approx(6 / 7)
    assert "tie rate" in (tmp_path / "README.md").read_text() and json.loads((tmp_path / "card.json").read_text())["kind"] == "pairwise"


def test_statistics_and_label_helpers():
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1, 3.5, 2]
    assert spearman_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    accuracy, count = pairwise_agreement(torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.5, 0.0]))
    assert (accuracy, count) == (pytest.approx(0.5), 3)
    assert pair_indices(3, "all") == [(0, 1), (0, 2), (1, 2)] and pair_indices(4, "adjacent") == [(0, 1), (2, 3)]
    generator = torch.Generator().manual_seed(0)
    labels = bradley_terry_labels(torch.full((4000,), 1.0), torch.zeros(4000), 1.0, 0.2, generator)
    decided = labels[labels != 0.5]
    assert abs((labels == 0.5).float().mean() - 0.2) < 0.03
    assert abs(decided.mean() - torch.sigmoid(torch.tensor(1.0))) < 0.03


def _tiny_shapes_model(folder):
    from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config

    torch.manual_seed(0)
    config = shapes_unet_config(16, block_out_channels=(8, 16, 16), attention_head_dim=2) | {"norm_num_groups": 4}
    ShapesBackbone(new_shapes_unet(config).eval(), DEFAULT_SCHEDULER_CONFIG, 16).save_pretrained(folder)
    return folder


def _mean_brightness(images, prompts):
    return images.mean((1, 2, 3))


def _cli() -> typer.Typer:
    from prefalign.commands import prefs

    app = typer.Typer()
    app.add_typer(prefs.app, name="prefs")
    return app


def test_prefs_make_and_show_commands(tmp_path):
    model = _tiny_shapes_model(tmp_path / "t2i")
    app = _cli()
    out = tmp_path / "prefs"
    args = ["prefs", "make", "--prompts", "6", "--per-prompt", "3", "--model", str(model), "--steps", "2", "--out", str(out), "--test-fraction", "0.34", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads(result.output[result.output.index("{") :])
    assert card["splits"]["train"]["usable"] + card["splits"]["test"]["usable"] == 18
    assert 0 <= card["splits"]["train"]["annotator_agreement"] <= 1
    train, test = load_pairwise(out), load_pairwise(out, split="test")
    assert not set(train.captions) & set(test.captions)  # split by prompt
    assert (out / "README.md").is_file()
    # the same command again refuses to overwrite; --overwrite replaces it
    assert runner.invoke(app, args).exit_code != 0
    # any scorer: module:function → Bradley–Terry draws of σ((s_a − s_b)/T), no ties by default
    custom = tmp_path / "custom"
    result = runner.invoke(app, ["prefs", "make", "--prompts", "3", "--per-prompt", "2", "--model", str(model), "--steps", "2", "--scorer", "test_data:_mean_brightness", "--temperature", "0.001", "--test-fraction", "0", "--out", str(custom)])
    assert result.exit_code == 0, result.output
    pairs = load_pairwise(custom)
    batch = pairs.batch(range(len(pairs)))
    brighter = (batch.images_0.mean((1, 2, 3)) > batch.images_1.mean((1, 2, 3))).float()
    assert torch.equal(batch.label_0, brighter)
    result = runner.invoke(app, ["prefs", "show", str(out), "--out", str(tmp_path / "grid.png"), "--count", "4"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 200 and grid.height > 60
    # pointwise (PrefPaint shape) from a text-to-image model: groups of per_prompt images rated 1–7
    result = runner.invoke(app, ["prefs", "make", "--format", "pointwise", "--prompts", "2", "--per-prompt", "3", "--model", str(model), "--steps", "2", "--test-fraction", "0", "--out", str(tmp_path / "points")])
    assert result.exit_code == 0, result.output
    points = load_pointwise(tmp_path / "points")
    assert len(points) == 6 and len(set(points.group_ids)) == 2 and set(points.scores.tolist()) <= set(range(1, 8))
    assert runner.invoke(app, ["prefs", "show", str(tmp_path / "points"), "--out", str(tmp_path / "points.png")]).exit_code == 0


def test_prefs_import_command(tmp_path):
    _, a, b = _world_pairs(2)
    for i in range(2):
        _png(tmp_path / f"{i}a.png", a[i])
        _png(tmp_path / f"{i}b.png", b[i])
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"prompt": "anything", "image_0": f"{i}a.png", "image_1": f"{i}b.png", "label_0": 1}) for i in range(2)) + "\n" + json.dumps({"prompt": "x", "image_0": "nope.png", "image_1": "0b.png", "label_0": 1}) + "\n")
    result = runner.invoke(_cli(), ["prefs", "import", str(tmp_path), str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    assert "row 2" in result.output and "1 of 3 records are bad" in result.output
    assert len(load_pairwise(tmp_path / "ds")) == 2
    card = json.loads((tmp_path / "ds" / "card.json").read_text())
    assert card["splits"]["train"]["annotator_agreement"] is None  # not world prompts


def test_image_codec_handles_jpeg_and_masks():
    from prefalign.data import decode_image, encode_image

    image = _quantised(torch.rand(3, 8, 8))
    assert torch.equal(decode_image(encode_image(image)), image)
    assert decode_image(encode_image(image, "JPEG")).shape == (3, 8, 8)
    mask = (torch.rand(1, 8, 8) > 0.5).float()
    assert torch.equal(decode_image(encode_image(mask), channels=1), mask)
    with Image.open(io.BytesIO(encode_image(mask))) as pil:
        assert pil.mode == "L"


def test_prefs_make_style_prefers_the_styled_render_of_the_same_scene(tmp_path):
    from prefalign.worlds.shapes.annotator import Annotator
    from prefalign.worlds.shapes.prompts import parse_prompt

    app = _cli()
    out = tmp_path / "winter"
    result = runner.invoke(app, ["prefs", "make-style", "--style", "winter", "--prompts", "10", "--image-size", "16", "--test-fraction", "0.2", "--seed", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output[result.output.index("{") :])
    assert card["style_check"]["kept"] == 10 and card["splits"]["train"]["annotator_agreement"] is None
    train, test = load_pairwise(out), load_pairwise(out, split="test")
    assert len(train) + len(test) == 10 and not set(train.captions) & set(test.captions)
    batch = train.batch(range(len(train)))
    labels = batch.label_0.tolist()
    assert set(labels) == {0.0, 1.0}  # the winner's position is a coin, not always jpg_0
    winners = torch.stack([a if label == 1.0 else b for a, b, label in zip(batch.images_0, batch.images_1, labels)])
    losers = torch.stack([b if label == 1.0 else a for a, b, label in zip(batch.images_0, batch.images_1, labels)])
    scenes = [parse_prompt(c) for c in batch.captions]
    assert all(s.style is None for s in scenes)  # the caption is the plain prompt
    annotator = Annotator()
    assert annotator.classify_style(winners, batch.captions) == ["winter"] * len(train)
    assert all(style != "winter" for style in annotator.classify_style(losers, batch.captions))
    # the pair is two renders of one scene with one seed: the loser is the plain render, the winner the styled one
    from prefalign.rewards.labelling import world_prompts

    all_scenes = [parse_prompt(p) for p in world_prompts(10, 3, "train", 0.0)]
    ids = list(train.dataset["ranking_id"])
    plain = render(all_scenes, seed=3, size=16).images[ids]
    styled = render([s.with_style("winter") for s in all_scenes], seed=3, size=16).images[ids]
    assert (losers - plain).abs().max() <= 0.5 / 255 + 1e-6 and (winners - styled).abs().max() <= 0.5 / 255 + 1e-6
    assert batch.captions == [all_scenes[i].prompt for i in ids]
    # styled captions on request; an unknown style is a one-line error
    result = runner.invoke(app, ["prefs", "make-style", "--style", "sketch", "--prompts", "2", "--image-size", "16", "--caption", "styled", "--test-fraction", "0", "--out", str(tmp_path / "sketch")])
    assert result.exit_code == 0, result.output
    assert all(c.endswith(", sketch style") for c in load_pairwise(tmp_path / "sketch").captions)
    result = runner.invoke(app, ["prefs", "make-style", "--style", "sepia", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "sketch" in str(result.exception or result.output)


def test_prefs_make_style_from_model_samples(tmp_path):
    from prefalign.backbones.loading import load_backbone
    from prefalign.data.style import style_check, styled_prompt
    from prefalign.rewards.labelling import world_prompts
    from prefalign.sampling import generate

    model = _tiny_shapes_model(tmp_path / "t2i")
    app = _cli()
    base = ["prefs", "make-style", "--style", "starry", "--source", "model", "--model", str(model), "--prompts", "4", "--steps", "2", "--seed", "5", "--test-fraction", "0"]
    result = runner.invoke(app, [*base, "--no-check-style", "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    data = load_pairwise(tmp_path / "all")
    assert len(data) == 4
    prompts = world_prompts(4, 5, "train", 0.0)
    backbone = load_backbone(str(model))
    styled = generate(backbone, [styled_prompt(p, "starry") for p in prompts], seed=5, steps=2)
    plain = generate(backbone, prompts, seed=5, steps=2)  # same initial noise as the styled sample
    batch = data.batch(range(4))
    ids = list(data.dataset["ranking_id"])
    models = list(zip(data.dataset["model_0"], data.dataset["model_1"]))
    for k, i in enumerate(ids):
        winner, loser = (batch.images_0[k], batch.images_1[k]) if batch.label_0[k] == 1 else (batch.images_1[k], batch.images_0[k])
        assert (winner - styled[i]).abs().max() <= 0.5 / 255 + 1e-6 and (loser - plain[i]).abs().max() <= 0.5 / 255 + 1e-6
        assert models[k][0 if batch.label_0[k] == 1 else 1] == f"{model}+starry"
    # with the style check, only pairs whose styled sample looks starry (and plain one does not) stay
    passing = int(style_check(styled, plain, prompts, "starry").sum())
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "checked")])
    if passing == 0:
        assert result.exit_code != 0 and "no pair passed the style check" in str(result.exception)
    else:
        assert result.exit_code == 0 and len(load_pairwise(tmp_path / "checked")) == passing


def test_pointwise_prefs_from_an_inpainting_pipeline_keep_the_masked_prompt_image(tmp_path):
    """PrefPaint's shape from a diffusers inpainting folder: masks and masked images at the
    pipeline's pixel resolution (not its latent size), one masked prompt image per group."""
    from prefalign.rewards.labelling import MakePrefsConfig, make_preferences
    from tiny_pipelines import make_tiny_sd_inpaint

    model = make_tiny_sd_inpaint(tmp_path / "inpaint")
    config = MakePrefsConfig(format="pointwise", prompts=3, per_prompt=2, steps=2, model=str(model), test_fraction=0)
    card = make_preferences(config, tmp_path / "data", progress=False)
    data = load_pointwise(tmp_path / "data")
    assert data.inpainting and len(data) == 6 and not data.report.bad
    batch = data.batch(range(6))
    assert batch.images.shape == batch.masked_images.shape == (6, 3, 16, 16) and batch.masks.shape == (6, 1, 16, 16)
    assert set(batch.mask_kinds) == {"outpaint", "warp"} and batch.masks.sum() > 0
    assert torch.equal(batch.masked_images[0], batch.masked_images[1]) and batch.group_ids[0] == batch.group_ids[1]
    assert (batch.masked_images * batch.masks).abs().max() == 0  # the repainted region is blank in the prompt image
    assert card["splits"]["train"]["inpainting"] and card["splits"]["train"]["image_size"] == [16, 16]


def test_prefs_make_labels_with_a_reward_model_folder(tmp_path):
    """--scorer RM_FOLDER: labels are Bradley–Terry draws of σ((r_a − r_b)/T) under the reward model."""
    from prefalign.rewards.base import load_scorer
    from prefalign.rewards.clip import ClipConfig, ShapesClip
    from prefalign.rewards.prefpaint import RewardModel, RewardModelConfig

    torch.manual_seed(0)
    clip = ShapesClip(ClipConfig(image_size=16, channels=(8, 8, 8, 8), head_channels=4, groups=4))
    config = RewardModelConfig(d_model=32, num_heads=2, feedforward_dim=32, mlp_dims=(32,), feature_dim=16)
    RewardModel(config, clip=clip).eval().save_pretrained(tmp_path / "rm")
    model = _tiny_shapes_model(tmp_path / "t2i")
    args = ["prefs", "make", "--prompts", "4", "--per-prompt", "3", "--model", str(model), "--steps", "2", "--test-fraction", "0"]
    result = runner.invoke(_cli(), [*args, "--scorer", str(tmp_path / "rm"), "--temperature", "1e-6", "--out", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    data = load_pairwise(tmp_path / "data")
    batch = data.batch(range(len(data)))
    scorer = load_scorer(str(tmp_path / "rm"))
    margin = scorer.score_batched(batch.images_0, batch.captions) - scorer.score_batched(batch.images_1, batch.captions)
    assert len(data) == 12 and torch.equal(batch.label_0, (margin > 0).float())
    assert json.loads((tmp_path / "data" / "prefalign_dataset.json").read_text())["origin"]["scorer"] == str(tmp_path / "rm")
