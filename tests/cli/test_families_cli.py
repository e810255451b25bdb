"""The command line with every family's tiny model: profile on sample images (per-image retention in the
results), video input for the Qwen families (a folder of frames), clear errors, `lightkv models`, and
the shipped configs of the aliased real models."""

from __future__ import annotations

import json

import pytest
import torch

from lightkv_cli.cli import app

FAST = ["--retentions", "1.0,0.55", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "3", "--device", "cpu"]


@pytest.mark.parametrize("model", ["tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_profile_runs_on_sample_images(runner, two_images, tmp_path, model):
    out = tmp_path / "out"
    res = runner.invoke(app, ["profile", "--model", model, "--images", str(two_images), "-o", str(out), *FAST])
    assert res.exit_code == 0, res.output
    assert "lightkv@0.55" in res.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["name"] == model and results["model"]["layers"] == 12
    run = next(r for r in results["runs"] if r["id"] == "lightkv@0.55")
    assert run["status"] == "ok"
    assert abs(run["vision_retention"] - 0.55) < 0.05
    for p, inp in zip(run["per_input"], results["inputs"]):
        assert len(p["per_image_retention"]) == 1  # one image per input
        assert p["per_image_retention"][0] == pytest.approx(p["vision_retention"], abs=1e-12)
        assert inp["kind"] == "image"
    # dynamic resolution: the two sample images (different sizes) give different token counts
    if model != "tiny-llava-next":
        assert results["inputs"][0]["vision_tokens"] != results["inputs"][1]["vision_tokens"]


def _frames(images, folder, n=3):
    folder.mkdir()
    for i in range(n):
        images[0].resize((140, 112)).rotate(15 * i).save(folder / f"frame{i:02d}.png")
    return folder


def test_profile_takes_a_video_folder_for_qwen(runner, two_images, images, tmp_path):
    frames = _frames(images, tmp_path / "clip")  # 3 frames: padded to 4 = 2 frame groups
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "profile",
            "--model",
            "tiny-qwen2-vl",
            "--images",
            str(two_images),
            "--video",
            str(frames),
            "-o",
            str(out),
            *FAST,
        ],
    )
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    video = results["inputs"][-1]
    assert video["kind"] == "video" and video["id"] == "clip"
    assert video["vision_tokens"] == 2 * (112 // 28) * (140 // 28)  # 2 groups × 4×5 tokens
    run = next(r for r in results["runs"] if r["id"] == "lightkv@0.55")
    assert run["status"] == "ok" and len(run["per_input"]) == 3
    assert len(run["per_input"][-1]["per_image_retention"]) == 1  # the video is one visual input


def test_video_is_rejected_for_families_without_video(runner, two_images, images, tmp_path, monkeypatch):
    frames = _frames(images, tmp_path / "clip", n=2)
    res = runner.invoke(
        app,
        [
            "profile",
            "--model",
            "tiny-llava-next",
            "--images",
            str(two_images),
            "--video",
            str(frames),
            "-o",
            str(tmp_path / "o"),
            *FAST,
        ],
    )
    assert res.exit_code == 2
    assert "takes no video input" in res.output and "Traceback" not in res.output


def test_video_file_without_pyav_or_empty_folder_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from lightkv_cli.errors import UserError
    from lightkv_cli.inputs import load_video

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no frame images"):
        load_video(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        load_video(tmp_path / "nope.mp4")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(UserError, match=r"lightkv\[video\]"):
        load_video(clip)


def test_renumber_for_qwen_is_one_line(runner, two_images, tmp_path):
    res = runner.invoke(
        app,
        [
            "profile",
            "--model",
            "tiny-qwen2-vl",
            "--images",
            str(two_images),
            "--positions",
            "renumber",
            "-o",
            str(tmp_path / "o"),
            *FAST,
        ],
    )
    assert res.exit_code == 2
    assert "M-RoPE" in res.output and "Traceback" not in res.output


def test_models_lists_every_alias(runner):
    from lightkv_cli.models.loader import ALIASES, TINY_NAMES, list_models

    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    for name in [*TINY_NAMES, *ALIASES]:
        assert name in res.output
    rows = {m["name"]: m for m in list_models()}
    assert rows["qwen2.5-vl"]["layers"] == 28 and rows["qwen2.5-vl"]["family"] == "qwen2_5_vl"
    assert rows["qwen2.5-vl"]["published_schedule"]["layers"] == [12, 17, 22]
    assert rows["llava-next"]["published_schedule"]["windows"] == [4, 2, 1]
    assert rows["qwen2-vl"]["published_schedule"] is None
    assert rows["tiny-qwen2-vl"]["weights"] == "embedded"
    assert all(rows[a]["weights"] in ("local", "missing") for a in ALIASES)


@pytest.mark.parametrize(
    "source, family, layers, heads, kv_heads, params",
    [
        ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", 32, 32, 32, (7.0e9, 7.1e9)),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", 32, 32, 8, (7.5e9, 7.6e9)),
        ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", 28, 28, 4, (8.2e9, 8.35e9)),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 28, 28, 4, (8.2e9, 8.35e9)),
    ],
)
def test_shipped_configs_of_the_aliased_models(monkeypatch, source, family, layers, heads, kv_heads, params):
    from lightkv_cli.models import loader
    from lightkv_cli.models.adapters import adapter_for

    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    config = loader._load_config(source, local=False)
    assert config.model_type == family
    with torch.device("meta"):
        model = loader._family_class(family)(config)
    n = sum(p.numel() for p in model.parameters())
    assert params[0] < n < params[1]
    tc = config.get_text_config()
    assert (tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (layers, heads, kv_heads)
    adapter = adapter_for(model)
    assert adapter.num_layers == layers
    if family == "llava_next":  # square image at 672 px: 24×24 base + 48×48 high-res + 48 newlines
        assert adapter.vision_tokens_per_image() == 576 + 48 * 48 + 48
