"""``lightkv methods`` and a sweep that compares every method side by side (tiny model, CPU)."""

from __future__ import annotations

import json

from cli_output import _all_text, _assert_user_error, _flat

from lightkv_cli.cli import app
from lightkv_cli.methods.registry import METHODS

FAST = ["--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--model", "tiny"]
SIX = ["lightkv", "lightkv-uniform", "vlcache", "fastv", "snapkv", "random"]


def test_methods_lists_every_method_with_its_kind(runner):
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, _all_text(result)
    text = _flat(result.output)
    for m in METHODS.values():
        assert m.name in text and m.kind in text
    assert "equal KV bytes" in text
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})  # wide: the published settings unwrapped
    wide = _flat(result.output)
    for name in ("visionzip", "dart", "divprune", "pdrop", "fastv", "lightkv"):
        assert METHODS[name].published and METHODS[name].published.split("R = ")[-1] in wide, name


def test_sweep_compares_all_methods_at_equal_kv_bytes(runner, tmp_path, two_images):
    out = tmp_path / "out"
    (two_images / "skimage_coffee.png").unlink()  # one image keeps this test short
    result = runner.invoke(
        app,
        [
            "sweep",
            "--images",
            str(two_images),
            "--methods",
            ",".join(SIX),
            "--retentions",
            "0.55",
            *FAST,
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, _all_text(result)
    data = json.loads((out / "results.json").read_text())
    runs = {r["id"]: r for r in data["runs"]}
    assert list(runs) == ["uncompressed"] + [f"{m}@0.55" for m in SIX]
    assert all(r["status"] == "ok" for r in runs.values())
    base = runs["lightkv@0.55"]["kv_bytes"]
    for m in SIX:
        r = runs[f"{m}@0.55"]
        assert abs(r["kv_bytes"] / base - 1) < 0.02, (m, r["kv_bytes"], base)  # comparable KV budgets
        assert r["kv_bytes"] < 0.65 * runs["uncompressed"]["kv_bytes"]
    for m in ("vlcache", "snapkv"):  # eviction: prefill unchanged, text evicted too
        r = runs[f"{m}@0.55"]
        assert r["flops_ratio"] == 1.0
        assert r["params"]["match_retention"] == 0.55
    assert runs["fastv@0.55"]["flops_ratio"] < 0.7
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for m in SIX:
        assert f"{m}@0.55" in html and f"{m}@0.55" in md
    assert "evict after prefill" in md


def test_schedule_for_a_method_without_schedules_is_skipped_not_run(runner, tmp_path, two_images):
    out = tmp_path / "out"
    (two_images / "skimage_coffee.png").unlink()
    result = runner.invoke(
        app,
        [
            "sweep",
            "--images",
            str(two_images),
            "--methods",
            "random,fastv",
            "--layers",
            "3,6,9",
            "--ratios",
            "0.5",
            *FAST,
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, _all_text(result)
    ids = [r["id"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert ids == ["uncompressed", "random[L3-6-9/W4-2-1/r0.5-0.5-0.5]"]
    assert "fastv take(s) no LightKV schedule" in _flat(result.output)


def test_unknown_method_is_one_line(runner, two_images, no_model_load):
    result = runner.invoke(app, ["sweep", "--images", str(two_images), "--methods", "lightkv,h2o"])
    _assert_user_error(result, "unknown method 'h2o'", "vlcache")


def test_profile_compares_methods(runner, tmp_path, two_images):
    out = tmp_path / "out"
    (two_images / "skimage_coffee.png").unlink()
    result = runner.invoke(
        app,
        [
            "profile",
            "--images",
            str(two_images),
            "--methods",
            "lightkv-prompt,random",
            "--retentions",
            "0.55",
            *FAST,
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, _all_text(result)
    ids = [r["id"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert ids == ["uncompressed", "lightkv-prompt@0.55", "random@0.55"]


def test_profile_guidance_and_methods_together_is_one_line(runner, two_images, no_model_load):
    result = runner.invoke(app, ["profile", "--images", str(two_images), "--guidance", "prompt", "--methods", "random"])
    _assert_user_error(result, "either --guidance or --methods")
