"""Shared fixtures: the embedded tiny LLaVA model (random weights, CPU, float32), built once per run.

The tiny checkpoint is built into a per-session temporary cache (``LIGHTKV_CACHE``), so tests never
touch the user's cache and never download anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = ROOT / "sample_images"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("LIGHTKV_CACHE")
    os.environ["LIGHTKV_CACHE"] = str(tmp_path_factory.mktemp("lightkv-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("LIGHTKV_CACHE", None)
    else:
        os.environ["LIGHTKV_CACHE"] = old


@pytest.fixture(scope="session")
def tiny(_isolated_cache):
    """The tiny model as the CLI loads it (``LoadedModel``), on CPU in float32."""
    from lightkv_cli.models.loader import load_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def images():
    """Two real sample images as RGB PIL images (different sizes)."""
    from lightkv_cli.inputs import load_image

    return [load_image(SAMPLE_IMAGES / "skimage_chelsea.png"), load_image(SAMPLE_IMAGES / "skimage_coffee.png")]


@pytest.fixture(scope="session")
def encode(tiny):
    """``encode(images, questions)`` → processor output for one row per question (left padded)."""

    def _encode(imgs, questions, num_images_per_prompt=1):
        texts = [tiny.adapter.format_prompt(q, num_images=num_images_per_prompt) for q in questions]
        batch = tiny.processor(images=imgs, text=texts, return_tensors="pt", padding=True)
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    return _encode


# Fixtures shared by the command-line tests.


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if the command gets as far as loading a model."""
    import lightkv_cli.models.loader as loader

    calls = []

    def _fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("load_model must not be called for this input error")

    monkeypatch.setattr(loader, "load_model", _fake)
    return calls


@pytest.fixture
def two_images(tmp_path) -> Path:
    """A folder with two (small) sample images."""
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("skimage_chelsea.png", "skimage_coffee.png"):
        shutil.copyfile(SAMPLE_IMAGES / name, d / name)
    return d


@pytest.fixture
def captured(monkeypatch):
    """The ``SweepRequest`` of the command; the command then stops with a user error ``captured``."""
    import lightkv_cli.engine.job as job
    from lightkv_cli.errors import UserError

    got = []

    def _capture(request, events=None):
        got.append(request)
        raise UserError("captured")

    monkeypatch.setattr(job, "run_sweep", _capture)
    return got
