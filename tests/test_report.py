"""``prefalign report``: the HTML file opened in a real browser (headless Chromium driven by
Selenium): a screenshot is taken, every image has loaded (naturalWidth > 0), and the metrics table
has one row per run. The browser check itself is shown to catch a broken image.

Chromium and its driver are Debian packages (``chromium``, ``chromium-driver``), installed by
.ci/run; without them the browser test is skipped, unless PREFALIGN_REQUIRE_BROWSER=1 (CI) makes it
fail."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefalign.backbones.shapes import DEFAULT_SCHEDULER_CONFIG, ShapesBackbone, new_shapes_unet, shapes_unet_config
from prefalign.evaluation import EvaluationSettings, SamplingSettings

PROMPTS = [
    "a small red circle at the center on a white background",
    "a large blue star in the top left on a beige background",
    "a medium green triangle in the bottom right on a gray background",
]
METHODS = ("dpo", "rpo")


def tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    unet = new_shapes_unet(shapes_unet_config(16, block_out_channels=(8, 16, 16)))
    ShapesBackbone(unet, DEFAULT_SCHEDULER_CONFIG, 16).save_pretrained(path)
    return path


def write_pairs(path: Path, count: int = 8, size: int = 16) -> Path:
    from prefalign.data.card import write_card
    from prefalign.data.preference import PAIRWISE_SCHEMA, pair_record
    from prefalign.data.storage import ShardWriter, write_meta

    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(path, "train", PAIRWISE_SCHEMA, shard_size=count)
    for i in range(count):
        smooth = (0.5 + 0.4 * torch.rand(3, 1, 1, generator=generator)).expand(3, size, size)
        writer.write(pair_record(PROMPTS[i % len(PROMPTS)], smooth, torch.rand(3, size, size, generator=generator), float(i % 2), ranking_id=i))
    writer.close()
    write_meta(path, {"kind": "pairwise", "schema": "pick-a-pic-v2", "splits": {"train": count}, "image_size": [size, size], "origin": {"scorer": "annotator"}})
    write_card(path)
    return path


def tiny_reward_model(path: Path) -> Path:
    from prefalign.rewards.prefpaint import RewardModel, RewardModelConfig
    from prefalign.rewards.training import plot_error_vs_bound

    torch.manual_seed(0)
    config = RewardModelConfig(d_model=16, num_heads=2, feedforward_dim=16, mlp_dims=(16,), feature_dim=8)
    RewardModel(config).save_pretrained(path)
    rng = np.random.default_rng(0)
    bounds = rng.uniform(0, 2, 40)
    plot_error_vs_bound(bounds, bounds * rng.uniform(0, 0.1, 40), ["in-distribution"] * 40, {"intercept": 0.0, "slope": 0.1, "quantile": 0.95}, path / "error_vs_bound.png")
    return path


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    from prefalign.report import build_report
    from prefalign.training.config import load_align_config
    from prefalign.training.trainer import train

    root = tmp_path_factory.mktemp("report")
    model, data, reward = tiny_model(root / "model"), write_pairs(root / "pairs"), tiny_reward_model(root / "reward")
    runs = []
    for method in METHODS:
        overrides = [
            "data.num_workers=0", "logging.every=1", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=2",
            "eval.every=1", "eval.prompts=2", "eval.sampling_steps=2", "optimizer.learning_rate=1e-3", f"{method}.beta=500",
        ]
        config = load_align_config(None, overrides, method=method, model=str(model), steps=2, batch_size=2, **{"data.path": str(data)})
        train(config, root / method)
        runs.append(root / method)
    settings = EvaluationSettings(prompts=3, sampling=SamplingSettings(per_prompt=2, steps=2))
    return build_report(
        runs, root / "report.html", reward_models=[reward], evaluation=settings, grid_prompts=2,
        grid_sampling=SamplingSettings(per_prompt=1, steps=2), progress=False,
    )


def test_report_is_self_contained_html_with_every_section(report_file):
    text = report_file.read_text()
    assert text.startswith("<!DOCTYPE html>")
    for section in ("Metrics", "Base vs aligned", "Training curves", "Reward model: error vs confidence bound", "Dataset card", "Run configs"):
        assert f"<h2>{section}" in text
    assert "src='http" not in text and 'src="http' not in text and "<script" not in text and "<link" not in text
    # grids (2 prompts × (base + 2 runs)), the curves figure, the reward model's plot
    assert text.count("class='sample'") == 6 and text.count("src='data:image/png;base64,") == 8
    assert "annotator win rate" in text and "Wilson" in text
    for method in METHODS:
        assert (report_file.parent / method / "evaluation.json").is_file()


def _browser():
    binary, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if binary is None or driver_path is None or webdriver is None:
        message = "headless Chromium needs the Debian packages chromium and chromium-driver and selenium (pip install -e '.[dev]')"
        if os.environ.get("PREFALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def _loaded_page(driver, path: Path) -> list[dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))"
    )


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def test_report_in_a_real_browser(report_file, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    images = _loaded_page(browser, report_file)
    assert len(images) == 8
    broken = [i["alt"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    rows = browser.find_elements(By.CSS_SELECTOR, "table#metrics tbody tr")
    assert len(rows) == len(METHODS)
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows] == list(METHODS)
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 1000
        assert len(shot.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # rendered content, not a blank page

    # the check can fail: a corrupt embedded PNG has naturalWidth 0
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><img alt='corrupt' src='data:image/png;base64,iVBORw0KGgoAAAAN'></body></html>")
    assert [i["width"] for i in _loaded_page(browser, bad)] == [0]
