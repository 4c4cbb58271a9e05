"""Exact inversion and editing (issue #3; METHODS.md §5): library (prefalign.editing) and CLI
(prefalign invert / prefalign edit) on the shipped shapes model and on a tiny SD pipeline."""

import json

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from prefalign.backbones.loading import load_backbone
from prefalign.commands import invert as invert_commands
from prefalign.editing import (
    STATE_FILE,
    edit_image,
    invert_image,
    load_input_image,
    load_inversion,
    regenerate,
)
from prefalign.errors import PrefalignError
from prefalign.images import save_image
from prefalign.worlds.shapes.prompts import parse_prompt
from prefalign.worlds.shapes.render import render

# The shipped model on purpose: the round trip is checked on the real network. If the model folder is
# missing, load_backbone raises and these tests fail (they are never skipped).
MODEL = "shapes-t2i"
PROMPTS = [
    "a large red circle at the center on a beige background",
    "a medium blue triangle in the top left on a white background",
]
RED = PROMPTS[0]
BLUE = "a large blue circle at the center on a beige background"


@pytest.fixture(scope="module")
def shipped():
    return load_backbone(MODEL)


@pytest.fixture(scope="module")
def rendered():
    return render([parse_prompt(p) for p in PROMPTS], seed=0).images  # [2, 3, 32, 32]


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("invert")(invert_commands.invert)
    app.command("edit")(invert_commands.edit)
    return app


def _unet_forward_counter(backbone):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    return calls, backbone.unet.register_forward_hook(hook)


# --------------------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------------------


def test_bdia_inversion_costs_as_many_network_evaluations_as_ddim(shipped, rendered):
    steps = 10
    seen = {}
    for method in ("ddim", "bdia"):
        calls, handle = _unet_forward_counter(shipped)
        try:
            result = invert_image(shipped, rendered, PROMPTS, method, steps, 1.0, 1.0, "float32", roundtrip=False)
        finally:
            handle.remove()
        seen[method] = (result.nfe, calls["n"])
    # count_calls' eps-evaluation count and the UNet's own forward count agree, and are N for both
    assert seen["ddim"] == seen["bdia"] == (steps, steps)


def test_round_trip_on_the_shipped_model(shipped, rendered, record_property):
    """50 steps, γ = 1: BDIA is exact to ~1e-12 in float64 and ≤ 1e-4 in float32; DDIM is far worse."""
    bdia64 = invert_image(shipped, rendered, PROMPTS, "bdia", 50, 1.0, 1.0, "float64")
    ddim64 = invert_image(shipped, rendered, PROMPTS, "ddim", 50, 1.0, 1.0, "float64")
    bdia32 = invert_image(shipped, rendered, PROMPTS, "bdia", 50, 1.0, 1.0, "float32")
    for name, result in (("bdia64", bdia64), ("ddim64", ddim64), ("bdia32", bdia32)):
        record_property(f"{name}_roundtrip_rel_err", result.roundtrip_rel_err)
    print(f"round trip: BDIA f64 {bdia64.roundtrip_rel_err:.2e}, DDIM f64 {ddim64.roundtrip_rel_err:.2e}, "
          f"BDIA f32 {bdia32.roundtrip_rel_err:.2e}")
    assert bdia64.state[0].dtype == bdia64.reconstruction.dtype == torch.float64
    assert shipped.dtype == torch.float32  # the float64 run used a cast copy, not the shared model
    assert len(bdia64.state) == 2 and len(ddim64.state) == 1
    assert bdia64.nfe == ddim64.nfe == 50 and bdia64.regeneration_nfe == 49
    assert float(bdia64.per_image_rel_err.max()) <= 1e-9
    assert float(bdia32.per_image_rel_err.max()) <= 1e-4
    assert ddim64.roundtrip_rel_err >= 100 * bdia64.roundtrip_rel_err
    assert ddim64.roundtrip_rel_err > 1e-5  # DDIM's ε(x_u, u) ≈ ε(x_s, s) really costs something


def test_exact_in_latent_space_on_a_tiny_sd_pipeline(tmp_path_factory):
    from tiny_pipelines import make_tiny_sd

    backbone = load_backbone(make_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd"))
    images = torch.rand(2, 3, *backbone.resolution, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "the red one"]
    exact = invert_image(backbone, images, prompts, "bdia", 20, 1.0, 2.0, "float64")
    ddim = invert_image(backbone, images, prompts, "ddim", 20, 1.0, 2.0, "float64")
    unguided = invert_image(backbone, images, prompts, "bdia", 20, 0.9, 1.0, "float64")
    assert exact.latents.shape == (2, *backbone.latent_shape) and exact.state[0].shape == exact.latents.shape
    assert exact.reconstruction_images.shape == images.shape
    # the latents came back; the VAE's own reconstruction error is not part of this
    assert float(exact.per_image_rel_err.max()) <= 1e-9
    assert float(unguided.per_image_rel_err.max()) <= 1e-9
    assert ddim.roundtrip_rel_err >= 100 * exact.roundtrip_rel_err
    assert backbone.dtype == torch.float32 and exact.state[0].dtype == torch.float64
    # regenerate() alone, from the state, gives the same latents
    again = regenerate(backbone, exact.state, prompts, "bdia", 20, 1.0, 2.0, "float64")
    assert torch.equal(again.latents, exact.reconstruction) and again.nfe == 19


def test_edit_changes_the_image_and_the_same_prompt_gives_it_back(shipped, record_property):
    image = render([parse_prompt(RED)], seed=3).images
    steps = 20
    edited = edit_image(shipped, image, RED, BLUE, "bdia", steps, 0.96, 2.0, "float32")
    same = edit_image(shipped, image, RED, RED, "bdia", steps, 0.96, 2.0, "float32")
    change = float((edited.images - image).abs().mean())

    def centre_blue_minus_red(x):  # the circle sits in the centre
        return float((x[0, 2, 12:20, 12:20] - x[0, 0, 12:20, 12:20]).mean())

    same_error = float((same.latents - same.inversion.latents).norm() / same.inversion.latents.norm())
    record_property("edit_mean_abs_change", change)
    record_property("same_prompt_rel_err", same_error)
    assert edited.nfe == same.nfe == 2 * steps - 1
    assert change > 0.01
    assert centre_blue_minus_red(image) < -0.5 and centre_blue_minus_red(edited.images) > 0  # red became blue
    assert same_error <= 1e-4
    assert float((same.images - image).abs().max()) <= 1e-3


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_wrong_size_is_resized_with_a_warning_or_refused(shipped, cli, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path)
    with pytest.warns(UserWarning, match="resizing 48×40 to 32×32"):
        image = load_input_image(shipped, path)
    assert image.shape == (1, 3, 32, 32)

    result = CliRunner().invoke(
        cli,
        ["invert", "--model", MODEL, "--image", str(path), "--prompt", RED, "--no-resize", "--steps", "2",
         "--out", str(tmp_path / "o")],
    )
    assert isinstance(result.exception, PrefalignError), result.output
    message = str(result.exception)
    assert "48×40" in message and "32×32" in message and "\n" not in message
    assert not (tmp_path / "o" / STATE_FILE).exists()


def test_a_file_that_is_not_an_image_is_a_one_line_error(shipped, cli, tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(PrefalignError, match="not a readable image") as raised:
        load_input_image(shipped, path)
    assert "\n" not in str(raised.value)
    result = CliRunner().invoke(
        cli,
        ["edit", "--model", MODEL, "--image", str(path), "--prompt", RED, "--edit-prompt", BLUE,
         "--out", str(tmp_path / "o")],
    )
    assert isinstance(result.exception, PrefalignError) and "\n" not in str(result.exception)


def test_invert_rejects_bad_settings(shipped, rendered):
    for kwargs in (dict(method="edict"), dict(gamma=0.0), dict(dtype="float16"), dict(steps=0)):
        settings = dict(method="bdia", steps=5, gamma=1.0, dtype="float32") | kwargs
        with pytest.raises(PrefalignError):
            invert_image(shipped, rendered, PROMPTS, **settings)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_invert_json_and_files(shipped, rendered, cli, tmp_path):
    path = save_image(rendered[0], tmp_path / "in.png")
    out = tmp_path / "inv"
    result = CliRunner().invoke(
        cli,
        ["invert", "--model", MODEL, "--image", str(path), "--prompt", PROMPTS[0], "--steps", "10", "--dtype", "float64",
         "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"roundtrip_rel_err", "nfe"} <= set(summary)
    assert summary["nfe"] == 10 and 0 <= summary["roundtrip_rel_err"] <= 1e-9
    for name in (STATE_FILE, "reconstruction.png", "side_by_side.png", "metrics.json"):
        assert (out / name).is_file(), name
    state, meta = load_inversion(out / STATE_FILE)
    assert len(state) == 2 and state[0].dtype == torch.float64
    keys = ("method", "gamma", "steps", "prompt", "cfg", "dtype", "model")
    assert tuple(meta[k] for k in keys) == ("bdia", 1.0, 10, PROMPTS[0], 1.0, "float64", MODEL)
    assert Image.open(out / "side_by_side.png").width > 3 * 32
    # the saved state and its metadata are enough to get the image back
    again = regenerate(shipped, state, meta["prompts"], meta["method"], meta["steps"], meta["gamma"], meta["cfg"],
                       meta["dtype"], levels=meta["levels"])
    x0 = shipped.images_to_latents(load_input_image(shipped, path)).double()  # as invert_image computes x0
    assert float((again.latents - x0).norm() / x0.norm()) <= 1e-9

    edited = tmp_path / "edit"
    result = CliRunner().invoke(
        cli,
        ["edit", "--model", MODEL, "--image", str(path), "--prompt", RED, "--edit-prompt", BLUE, "--steps", "5",
         "--out", str(edited), "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["nfe"] == 9
    assert (edited / "edited.png").is_file() and (edited / "side_by_side.png").is_file()
