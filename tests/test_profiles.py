"""Operating-point profiles and sweep configurations: validation with one clear line, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightkv_cli.errors import UserError
from lightkv_cli.profiles import (
    check_profile_name,
    load_profile,
    load_sweep_config,
    profile_from_results,
    save_profile,
)

PROFILES = Path(__file__).parents[1] / "profiles"

GOOD = """
[profile]
format = "lightkv.profile/1"
name = "docs"
kind = "measured"

[model]
name = "tiny"
layers = 16

[method]
name = "lightkv"
layers = [6, 9, 12]
windows = [4, 2, 1]
ratios = [0.3, 0.3, 0.3]

[thresholds]
min_answer_match = 0.9
"""


def _write(tmp_path, text, name="p.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_published_defaults_ship_and_are_marked():
    expected = {
        "llava-1.5-7b.published.toml": ("llava-hf/llava-1.5-7b-hf", [12, 18, 24], [4, 2, 1]),
        "llava-next-7b.published.toml": ("llava-hf/llava-v1.6-vicuna-7b-hf", [12, 18, 24], [4, 2, 1]),
        "qwen2.5-vl-7b.published.toml": ("Qwen/Qwen2.5-VL-7B-Instruct", [12, 17, 22], [6, 4, 2]),
    }
    for name, (model, layers, windows) in expected.items():
        prof = load_profile(PROFILES / name)
        assert prof.profile.kind == "published-default" and prof.measured is None
        assert prof.model.name == model and prof.method.layers == layers and prof.method.windows == windows
        assert prof.method.ratios == [0.5, 0.5, 0.5]
        assert "PUBLISHED DEFAULT" in (PROFILES / name).read_text()


def test_good_profile_loads(tmp_path):
    prof = load_profile(_write(tmp_path, GOOD))
    assert prof.method.schedule().label() == "L6-9-12/W4-2-1/r0.3-0.3-0.3"
    t = prof.thresholds
    assert t.min_answer_match == 0.9 and t.min_top1_agreement is None


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            ("ratios = [0.3, 0.3, 0.3]", "ratio = [0.3, 0.3, 0.3]"),
            "unknown field 'method.ratio'; did you mean 'ratios'?",
        ),
        (
            ("min_answer_match = 0.9", "min_answer = 0.9"),
            "unknown field 'thresholds.min_answer'; did you mean 'min_answer_match'?",
        ),
        (('name = "lightkv"', 'name = "fastvv"'), "unknown method 'fastvv'"),
        (("windows = [4, 2, 1]", "windows = [4, 2]"), "one window count and one ratio per layer"),
        (("min_answer_match = 0.9", "min_answer_match = 1.5"), "field 'thresholds.min_answer_match'"),
        (
            ("min_answer_match = 0.9", 'min_answer_match = "0.9"'),
            "field 'thresholds.min_answer_match': must be a number",
        ),
        (('format = "lightkv.profile/1"', 'format = "lightkv.profile/7"'), "upgrade lightkv"),
        (("layers = [6, 9, 12]\n", ""), "needs a schedule: missing layers"),
    ],
)
def test_bad_profile_is_one_clear_line(tmp_path, edit, fragment):
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(UserError) as e:
        load_profile(_write(tmp_path, text))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_profile_not_toml_or_missing(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(_write(tmp_path, "[profile\nname="))
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")


def test_sweep_config_wrong_field_and_relative_paths(tmp_path):
    cfg = load_sweep_config(
        _write(tmp_path, 'images = ["imgs"]\nmethods = ["lightkv"]\nretentions = [0.5]\n', "s.toml")
    )
    assert cfg.images == [str(tmp_path / "imgs")] and cfg.retentions == [0.5]
    # [thresholds] is the one Thresholds model; keys it leaves out are unset here (sweep keeps the defaults).
    cfg = load_sweep_config(_write(tmp_path, "[thresholds]\nmax_kl = 0.5\n", "s.toml"))
    assert cfg.thresholds.set_items() == {"max_kl": 0.5}
    with pytest.raises(UserError, match=r"unknown field 'thresholds\.max_kll'; did you mean 'max_kl'"):
        load_sweep_config(_write(tmp_path, "[thresholds]\nmax_kll = 0.5\n", "s.toml"))
    with pytest.raises(UserError, match="unknown field 'retention'; did you mean 'retentions'"):
        load_sweep_config(_write(tmp_path, "retention = [0.5]\n", "s.toml"))
    with pytest.raises(UserError, match=r"unknown field 'schedules\.0\.window'; did you mean 'windows'"):
        load_sweep_config(_write(tmp_path, "[[schedules]]\nlayers = [2]\nwindow = [1]\nratios = [0.5]\n", "s.toml"))


def test_profile_names():
    assert check_profile_name("my-domain.v2") == "my-domain.v2"
    for bad in ("../x", "a/b", "x.toml", "", "-x"):
        with pytest.raises(UserError):
            check_profile_name(bad)


def _results():
    run = {
        "id": "lightkv@0.55",
        "method": "lightkv",
        "status": "ok",
        "target_retention": 0.55,
        "params": {"layers": [6, 9, 12], "windows": [4, 2, 1], "ratios": [0.4, 0.4, 0.4], "positions": "keep"},
        "vision_retention": 0.56,
        "kv_bytes": 2.0e6,
        "kv_bytes_vision": 1.5e6,
        "kv_ratio": 0.6,
        "flops_ratio": 0.7,
        "prefill_ms": {"median": 12.5},
        "time_to_first_token_ms": {"median": 20.0},
        "decode_ms_per_token": None,
        "capacity": {"max_concurrent_requests": 40},
        "quality": {"answer_match": 1.0, "top1_agreement": 1.0, "first_token_kl_max": 0.01, "accuracy": None},
    }
    return {
        "model": {
            "name": "tiny",
            "family": "llava",
            "layers": 16,
            "init": "pretrained",
            "dtype": "float32",
            "device": "cpu",
        },
        "environment": {"device_name": "AMD EPYC"},
        "settings": {"max_new_tokens": 8},
        "thresholds": {"min_answer_match": 0.95, "min_top1_agreement": 0.95, "max_kl": None},
        "inputs": [{"image": "sample_images/a.png"}, {"image": "sample_images/b.png"}],
        "inputs_fingerprint": "sha256:abc",
        "runs": [{"id": "uncompressed", "method": "uncompressed", "status": "ok"}, run],
    }


def test_save_profile_round_trip(tmp_path):
    data = profile_from_results(_results(), "lightkv@0.55", "docs")
    path = save_profile(data, tmp_path / "profiles" / "docs.toml")
    prof = load_profile(path)
    assert prof.profile.kind == "measured" and prof.model.name == "tiny" and prof.model.layers == 16
    assert prof.method.ratios == [0.4, 0.4, 0.4] and prof.method.target_retention == 0.55
    assert prof.thresholds.to_dict()["max_kl"] is None
    assert prof.measured.kv_bytes == 2.0e6 and prof.measured.max_concurrent_requests == 40
    assert prof.measured.accuracy is None and prof.measured.decode_ms_per_token is None
    assert prof.inputs.fingerprint == "sha256:abc" and prof.inputs.count == 2
    assert prof.settings.max_new_tokens == 8
    assert [p.name for p in path.parent.iterdir()] == ["docs.toml"]


def test_cannot_save_the_uncompressed_run():
    with pytest.raises(UserError, match="uncompressed"):
        profile_from_results(_results(), "uncompressed", "x")


def test_saved_profile_names_input_folders_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _results()
    results["inputs"] = [{"image": str(tmp_path / "shots" / "a.png")}, {"image": "/elsewhere/b.png"}]
    data = profile_from_results(results, "lightkv@0.55", "docs")
    assert data["inputs"]["images"] == ["/elsewhere", "shots"]
