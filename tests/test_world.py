"""The shapes world: prompts, renderer, defects, styles, masks, and the annotator."""

from __future__ import annotations

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.worlds.shapes.annotator import FEATURES, PERSONAS, Annotator, measure
from prefalign.worlds.shapes.masks import MASK_KINDS, make_masks
from prefalign.worlds.shapes.prompts import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_COMBINATIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Scene,
    all_scenes,
    parse_prompt,
    sample_scenes,
)
from prefalign.worlds.shapes.render import DEFECTS, render


@pytest.fixture(scope="module")
def annotator() -> Annotator:
    return Annotator()


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(120, seed=7, split="all", style_probability=0.25)


# ---- prompts ------------------------------------------------------------------------------------


def test_grammar_sizes_and_held_out_split():
    assert (len(COLOURS), len(SHAPES), len(SIZES), len(POSITIONS), len(BACKGROUNDS)) == (8, 6, 3, 5, 4)
    everything, train, held_out = all_scenes(), all_scenes("train"), all_scenes("held_out")
    assert len(everything) == 8 * 6 * 3 * 5 * 4
    assert len(train) + len(held_out) == len(everything)
    assert all((s.colour, s.shape) not in HELD_OUT_COMBINATIONS for s in train)
    assert len(held_out) == len(HELD_OUT_COMBINATIONS) * 3 * 5 * 4
    # every colour and every shape is still seen in training
    assert {s.colour for s in train} == set(COLOURS) and {s.shape for s in train} == set(SHAPES)


def test_prompts_round_trip_through_the_parser():
    for scene in sample_scenes(50, seed=1, split="all", style_probability=0.5):
        assert parse_prompt(scene.prompt) == scene
    with pytest.raises(PrefalignError, match="not a shapes-world prompt"):
        parse_prompt("a photo of a cat")
    with pytest.raises(PrefalignError, match="unknown colour"):
        parse_prompt("a small teal circle at the center on a gray background")


def test_sampling_scenes_is_deterministic():
    assert sample_scenes(20, seed=3) == sample_scenes(20, seed=3)
    assert sample_scenes(20, seed=3) != sample_scenes(20, seed=4)


# ---- renderer -----------------------------------------------------------------------------------


def test_render_shape_range_and_determinism(scenes):
    a = render(scenes[:8], seed=5).images
    b = render(scenes[:8], seed=5).images
    c = render(scenes[:8], seed=6).images
    assert a.shape == (8, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # jitter depends on the seed
    assert render(scenes[:2], seed=0, size=24).images.shape == (2, 3, 24, 24)


def test_every_defect_and_style_changes_the_image():
    scene = Scene("red", "triangle", "medium", "center", "beige")
    clean = render([scene], seed=0).images
    for defect in DEFECTS:
        assert (render([scene], seed=0, defects=[defect]).images - clean).abs().mean() > 0.005, defect
    for style in STYLES:
        assert (render([scene.with_style(style)], seed=0).images - clean).abs().mean() > 0.02, style


def test_bad_render_arguments_are_clear_errors():
    scene = Scene("red", "triangle", "medium", "center", "beige")
    with pytest.raises(PrefalignError, match="unknown defect"):
        render([scene], defects=["smudge"])
    with pytest.raises(PrefalignError, match="too small"):
        render([scene], size=4)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_are_binary_partial_and_deterministic(kind):
    scenes = sample_scenes(12, seed=2)
    images = render(scenes, seed=2).images
    masks = make_masks(kind, images, seed=4)
    assert masks.shape == (12, 1, 32, 32)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    covered = masks.mean((1, 2, 3))
    assert (covered > 0).all() and (covered < 0.8).all()
    assert torch.equal(masks, make_masks(kind, images, seed=4))
    with pytest.raises(PrefalignError):
        make_masks("hole", images)


def test_warp_holes_sit_on_the_object():
    scene = Scene("blue", "square", "large", "center", "white")
    image = render([scene], seed=0).images
    mask = make_masks("warp", image, seed=0)[0, 0]
    object_mask = measure(image).mask[0] > 0.3
    # most of the hole away from the image border lies on or next to the object
    inner = mask[3:-3, 3:-3].bool()
    near_object = torch.nn.functional.max_pool2d(object_mask[None, None].float(), 3, 1, 1)[0, 0, 3:-3, 3:-3].bool()
    assert inner.any() and (inner & near_object).sum() >= 0.9 * inner.sum()


# ---- annotator ----------------------------------------------------------------------------------


def test_clean_render_beats_each_defect_for_95_percent_of_prompts(annotator, scenes):
    prompts = [s.prompt for s in scenes]
    clean = annotator.score(render(scenes, seed=11).images, prompts)
    for defect in DEFECTS:
        defective = annotator.score(render(scenes, seed=11, defects=[defect] * len(scenes)).images, prompts)
        share = (clean > defective).float().mean().item()
        assert share >= 0.95, f"{defect}: clean preferred for only {share:.1%} of prompts"


def test_attribute_checks_pass_on_clean_renders_and_catch_wrong_attributes(annotator):
    scenes = sample_scenes(60, seed=9, split="all")
    prompts = [s.prompt for s in scenes]
    checks = annotator.attribute_checks(render(scenes, seed=1).images, prompts)
    for name, ok in checks.items():
        assert ok.float().mean() >= 0.95, f"{name} check fails on clean renders: {ok.float().mean():.2f}"
    # render a different colour / shape than the prompt says: the check must catch it
    colours, shapes = list(COLOURS), list(SHAPES)
    wrong_colour = [Scene(colours[(colours.index(s.colour) + 3) % 8], s.shape, s.size, s.position, s.background) for s in scenes]
    wrong_shape = [Scene(s.colour, shapes[(shapes.index(s.shape) + 2) % 6], s.size, s.position, s.background) for s in scenes]
    assert annotator.attribute_checks(render(wrong_colour, seed=1).images, prompts)["colour"].float().mean() <= 0.1
    assert annotator.attribute_checks(render(wrong_shape, seed=1).images, prompts)["shape"].float().mean() <= 0.2


def _one_feature(annotator, images, prompt, name):
    return annotator.features(images, [prompt] * images.shape[0])[name]


def test_each_feature_moves_the_right_way_on_constructed_cases(annotator):
    scene = Scene("red", "square", "medium", "center", "gray")
    prompt = scene.prompt
    clean = render([scene], seed=0, jitter=False).images

    def feature(image, name, text=prompt):
        return float(_one_feature(annotator, image, text, name)[0])

    for name in FEATURES:
        assert feature(clean, name) > 0.9, name
    # colour: a greener object is less faithful, monotonically
    greener = [render([Scene("red", "square", "medium", "center", "gray")], seed=0, jitter=False).images]
    shifted = clean.clone()
    object_pixels = measure(clean).mask[0] > 0.5
    values = []
    for amount in (0.0, 0.15, 0.3):
        image = clean.clone()
        image[0, 1][object_pixels] += amount
        values.append(feature(image.clamp(0, 1), "colour_fidelity"))
    assert values[0] > values[1] > values[2]
    # shape: a circle is a worse square than a square
    circle = render([Scene("red", "circle", "medium", "center", "gray")], seed=0, jitter=False).images
    assert feature(circle, "shape_fidelity") < feature(clean, "shape_fidelity") - 0.05
    # sharpness falls with blur, clean background falls with noise
    blurred = render([scene], seed=0, jitter=False, defects=["blur"]).images
    noisy = render([scene], seed=0, jitter=False, defects=["noise"]).images
    assert feature(blurred, "sharpness") < feature(clean, "sharpness") - 0.2
    assert feature(noisy, "clean_background") < feature(clean, "clean_background") - 0.3
    # position / size / in-frame
    moved = render([Scene("red", "square", "medium", "top left", "gray")], seed=0, jitter=False).images
    larger = render([Scene("red", "square", "large", "center", "gray")], seed=0, jitter=False).images
    cut = render([scene], seed=0, jitter=False, defects=["cut_by_border"]).images
    assert feature(moved, "position") < 0.2
    assert feature(larger, "size") < feature(clean, "size") - 0.3
    assert feature(cut, "in_frame") < 0.8
    blocky = render([scene], seed=0, jitter=False, defects=["blockiness"]).images
    assert feature(blocky, "no_blockiness") < 0.5
    # style adherence: a winter image under a plain prompt, and a plain image under a winter prompt
    winter = scene.with_style("winter")
    winter_image = render([winter], seed=0, jitter=False).images
    assert feature(winter_image, "style_adherence") < 0.5
    assert feature(winter_image, "style_adherence", winter.prompt) > 0.9
    assert feature(clean, "style_adherence", winter.prompt) < 0.5
    del greener, shifted


def test_style_classifier(annotator):
    scenes = sample_scenes(25, seed=3)
    for style in (None, *STYLES):
        styled = [s.with_style(style) for s in scenes]
        images = render(styled, seed=0).images
        predicted = annotator.classify_style(images, [s.prompt for s in scenes])
        accuracy = sum(p == style for p in predicted) / len(predicted)
        assert accuracy >= 0.95, f"{style}: {accuracy:.2f}"


def test_pairwise_labels_are_reproducible_and_follow_bradley_terry(annotator):
    scenes = sample_scenes(200, seed=4)
    prompts = [s.prompt for s in scenes]
    clean = render(scenes, seed=0).images
    blurred = render(scenes, seed=0, defects=["blur"] * len(scenes)).images
    labels = annotator.label_pairs(clean, blurred, prompts, seed=1)
    assert torch.equal(labels, annotator.label_pairs(clean, blurred, prompts, seed=1))
    assert not torch.equal(labels, annotator.label_pairs(clean, blurred, prompts, seed=2))
    assert set(labels.unique().tolist()) <= {0.0, 0.5, 1.0}
    decided = labels[labels != 0.5]
    assert decided.mean() > 0.9  # the clean image wins most decided pairs
    # identical images: a fair coin among decided pairs
    same = annotator.label_pairs(clean, clean, prompts, seed=3)
    assert 0.35 < same[same != 0.5].mean() < 0.65


@pytest.mark.parametrize("tie_rate", [0.0, 0.1, 0.3])
def test_ties_appear_at_the_configured_rate(tie_rate):
    annotator = Annotator(tie_rate=tie_rate)
    scenes = sample_scenes(100, seed=4)
    prompts = [s.prompt for s in scenes]
    a = render(scenes, seed=0).images
    b = render(scenes, seed=1).images
    rates = [float((annotator.label_pairs(a, b, prompts, seed=s) == 0.5).float().mean()) for s in range(10)]
    assert abs(sum(rates) / len(rates) - tie_rate) < 0.03


def test_pointwise_ratings_are_one_to_seven_with_rater_noise(annotator):
    scenes = sample_scenes(100, seed=6)
    prompts = [s.prompt for s in scenes]
    clean, noisy = render(scenes, seed=0).images, render(scenes, seed=0, defects=["noise"] * 100).images
    ratings = annotator.rate(clean, prompts, seed=0)
    assert ratings.min() >= 1 and ratings.max() <= 7 and torch.equal(ratings, ratings.round())
    assert torch.equal(ratings, annotator.rate(clean, prompts, seed=0))
    assert not torch.equal(ratings, annotator.rate(clean, prompts, seed=1))  # rater noise
    assert ratings.mean() > annotator.rate(noisy, prompts, seed=0).mean() + 1


def test_personas_weigh_features_differently():
    assert len(PERSONAS) >= 3
    scenes = sample_scenes(40, seed=8)
    prompts = [s.prompt for s in scenes]
    blocky = render(scenes, seed=0, defects=["blockiness"] * 40).images
    moved = render(scenes, seed=0, defects=["off_position"] * 40).images
    clean = render(scenes, seed=0).images
    literal, aesthete = Annotator("literal"), Annotator("aesthete")

    def drops(annotator):
        base = annotator.score(clean, prompts)
        return (base - annotator.score(moved, prompts)).mean(), (base - annotator.score(blocky, prompts)).mean()

    # relative to blockiness, the literal rater minds a misplaced object more than the aesthete does
    literal_moved, literal_blocky = drops(literal)
    aesthete_moved, aesthete_blocky = drops(aesthete)
    assert literal_moved / literal_blocky > 2 * aesthete_moved / aesthete_blocky
    assert aesthete_blocky > literal_blocky
    with pytest.raises(PrefalignError, match="unknown annotator persona"):
        Annotator("grumpy")
    with pytest.raises(PrefalignError, match="only rate shapes-world prompts"):
        Annotator().score(blocky[:1], ["a cat"])
