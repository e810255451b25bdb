"""End-to-end tests of the ``lightkv`` command line (in-process with typer's CliRunner, plus one real
console-script run). Every profile uses the embedded ``tiny`` model on CPU with tiny settings, so the
whole file runs in seconds; ``conftest.py`` points ``LIGHTKV_CACHE`` at a per-session temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_output import _all_text, _assert_user_error, _flat, _plain
from typer.testing import CliRunner

from lightkv_cli import __version__
from lightkv_cli.cli import app

SAMPLE_IMAGES = Path(__file__).parents[2] / "sample_images"
PROMPTS = SAMPLE_IMAGES / "prompts.jsonl"

#: Small settings shared by every profile run (fast on CPU).
FAST = ["--max-new-tokens", "4", "--repeats", "1", "--warmup", "0", "--retentions", "1.0,0.6", "--device", "cpu"]

OK_RUN_KEYS = {
    "id",
    "method",
    "params",
    "target_retention",
    "expected_retention",
    "status",
    "vision_retention",
    "kv_bytes",
    "kv_bytes_vision",
    "kv_bytes_per_layer",
    "cached_tokens_per_layer",
    "vision_tokens_per_layer",
    "prefill_ms",
    "decode_ms_per_token",
    "peak_memory_bytes",
    "peak_memory_kind",
    "flops_prefill",
    "flops_ratio",
    "kv_vision_ratio",
    "quality",
    "per_input",
}
QUALITY_KEYS = {
    "answer_match",
    "token_f1",
    "top1_agreement",
    "first_token_kl_mean",
    "first_token_kl_max",
    "accuracy",
    "n_inputs",
    "n_with_answers",
}
TOP_LEVEL_KEYS = {
    "schema",
    "tool_version",
    "created",
    "command",
    "environment",
    "model",
    "settings",
    "inputs",
    "skipped",
    "runs",
    "recommendation",
    "complete",
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _invoke(runner: CliRunner, args: list[str]):
    """``lightkv profile ARGS`` on the random-weight ``tiny`` model unless ARGS name a model (these
    tests check the profiler's mechanics; the trained default model has its own tests)."""
    model = [] if "--model" in args else ["--model", "tiny"]
    return runner.invoke(app, ["profile", *model, *args])


def _read_results(out: Path) -> dict:
    path = out / "results.json"
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------------------------------


def test_profile_sample_images_happy_path(runner, tmp_path):
    out = tmp_path / "out"
    result = _invoke(runner, ["--images", str(SAMPLE_IMAGES), "--limit", "2", *FAST, "--output", str(out)])
    text = _all_text(result)
    assert result.exit_code == 0, f"exception {result.exception!r}\n{text}"

    results = _read_results(out)
    assert results.keys() >= TOP_LEVEL_KEYS
    assert results["schema"] == "lightkv.results/2"
    assert results["tool_version"] == __version__
    assert results["complete"] is True
    assert len(results["inputs"]) == 2
    assert results["skipped"] == []
    assert results["settings"]["retentions"] == [1.0, 0.6]
    assert results["model"]["weights_meaningful"] is False

    runs = {r["id"]: r for r in results["runs"]}
    assert [r["id"] for r in results["runs"]] == ["uncompressed", "lightkv@0.6"]
    base, lkv = runs["uncompressed"], runs["lightkv@0.6"]
    for r in (base, lkv):
        assert r["status"] == "ok", r.get("error")
        assert r.keys() >= OK_RUN_KEYS, OK_RUN_KEYS - r.keys()
        assert r["quality"].keys() >= QUALITY_KEYS
        assert {"median", "p25", "p75", "min", "max", "n"} <= r["prefill_ms"].keys()
        assert len(r["kv_bytes_per_layer"]) == results["model"]["layers"]
        assert len(r["per_input"]) == 2
        assert r["quality"]["n_inputs"] == 2

    # retention: exact for the reference, as planned for LightKV, near the target
    assert base["vision_retention"] == 1.0
    assert lkv["vision_retention"] < 1.0
    assert lkv["vision_retention"] == pytest.approx(lkv["expected_retention"], abs=1e-9)
    assert abs(lkv["vision_retention"] - 0.6) <= 0.06

    # bytes and FLOPs follow the retention
    ratio = lkv["kv_bytes_vision"] / base["kv_bytes_vision"]
    assert ratio == pytest.approx(lkv["vision_retention"], abs=1e-9)
    assert lkv["kv_vision_ratio"] == pytest.approx(ratio, abs=1e-9)
    assert lkv["kv_bytes"] < base["kv_bytes"]
    assert base["flops_ratio"] == pytest.approx(1.0)
    assert lkv["flops_ratio"] < 1.0

    # the reference agrees with itself perfectly
    q = base["quality"]
    assert q["answer_match"] == 1.0
    assert q["top1_agreement"] == 1.0
    assert q["first_token_kl_mean"] == 0.0

    assert results["recommendation"]["run"] in runs

    flat = _flat(text)
    assert "recommended" in flat
    assert "results:" in flat
    assert "results.json" in flat
    assert "ignored" in flat and "LICENSES.md" in flat and "prompts.jsonl" in flat
    assert "Traceback" not in text


def test_profile_with_prompts_file(runner, tmp_path):
    out = tmp_path / "out"
    result = _invoke(runner, ["--prompts", str(PROMPTS), "--limit", "4", *FAST, "--output", str(out)])
    text = _all_text(result)
    assert result.exit_code == 0, f"exception {result.exception!r}\n{text}"

    results = _read_results(out)
    assert results["complete"] is True
    expected = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    assert len(expected) == 4
    assert len(results["inputs"]) == 4
    for inp, exp in zip(results["inputs"], expected):
        assert Path(inp["image"]).name == exp["image"]
        assert inp["question"] == exp["question"]
        assert inp["answer"] == exp["answer"]
    for run in results["runs"]:
        assert run["status"] == "ok", run.get("error")
        quality = run["quality"]
        assert quality["n_inputs"] == 4
        assert quality["n_with_answers"] == 4
        assert isinstance(quality["accuracy"], float)
        assert 0.0 <= quality["accuracy"] <= 1.0


def test_mixed_directory_skips_broken_file_and_goes_on(runner, tmp_path, two_images):
    (two_images / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    result = _invoke(runner, ["--images", str(two_images), *FAST, "--output", str(out)])
    text = _all_text(result)
    assert result.exit_code == 0, f"exception {result.exception!r}\n{text}"
    flat = _flat(text)
    assert "broken.png" in flat
    assert "empty" in flat

    results = _read_results(out)
    assert results["complete"] is True
    assert len(results["inputs"]) == 2
    assert {Path(i["image"]).name for i in results["inputs"]} == {"skimage_chelsea.png", "skimage_coffee.png"}
    assert len(results["skipped"]) == 1
    skipped = results["skipped"][0]
    assert Path(skipped["path"]).name == "broken.png"
    assert "empty" in skipped["reason"]


# --------------------------------------------------------------------------------------------------
# user mistakes: exit 2, one clear line
# --------------------------------------------------------------------------------------------------


def test_missing_images_directory(runner, tmp_path, no_model_load):
    missing = tmp_path / "nope"
    result = _invoke(runner, ["--images", str(missing), *FAST, "--output", str(tmp_path / "out")])
    _assert_user_error(result, "does not exist", "nope")
    assert not no_model_load
    assert not (tmp_path / "out").exists()


def test_unknown_model(runner, tmp_path, two_images):
    result = _invoke(
        runner,
        [
            "--images",
            str(two_images),
            "--model",
            "no-such-model",
            "--limit",
            "1",
            *FAST,
            "--output",
            str(tmp_path / "out"),
        ],
    )
    _assert_user_error(result, "unknown model", "no-such-model")
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("1.5", "outside (0, 1]"), ("0", "outside (0, 1]"), ("abc", "is not a number")],
)
def test_invalid_retention_fails_before_model_load(runner, tmp_path, no_model_load, value, fragment):
    args = ["--images", str(SAMPLE_IMAGES), "--limit", "1", *FAST, "--output", str(tmp_path / "out")]
    args[args.index("--retentions") + 1] = value
    result = _invoke(runner, args)
    flat = _assert_user_error(result, "--retentions", fragment, value)
    assert not no_model_load
    # failed before even reading the images (nothing was listed as ignored or skipped)
    assert "ignored" not in flat and "skipped" not in flat


def test_directory_with_only_broken_files(runner, tmp_path, no_model_load):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    (d / "b.jpg").write_text("this is not a JPEG, just text\n")
    png = (SAMPLE_IMAGES / "skimage_chelsea.png").read_bytes()
    (d / "c.png").write_bytes(png[: len(png) // 2])

    result = _invoke(runner, ["--images", str(d), *FAST, "--output", str(tmp_path / "out")])
    flat = _assert_user_error(result, "nothing could be processed")
    assert "a.png: empty file" in flat
    assert "b.jpg: not a recognised image" in flat
    assert "c.png: truncated or corrupt image" in flat
    assert not no_model_load


def test_prompts_file_with_bad_json_line(runner, tmp_path, no_model_load):
    prompts = tmp_path / "prompts.jsonl"
    good = json.dumps(
        {"image": str(SAMPLE_IMAGES / "skimage_chelsea.png"), "question": "What animal?", "answer": "cat"}
    )
    prompts.write_text(good + "\n" + '{"image": "x.png", "question": \n')
    result = _invoke(runner, ["--prompts", str(prompts), *FAST, "--output", str(tmp_path / "out")])
    flat = _assert_user_error(result, ":2:", "invalid JSON")
    assert f"{prompts}:2:" in flat
    assert not no_model_load


def test_prompt_and_prompts_together(runner, tmp_path, no_model_load):
    result = _invoke(
        runner,
        ["--prompt", "X", "--prompts", str(PROMPTS), *FAST, "--output", str(tmp_path / "out")],
    )
    _assert_user_error(result, "--prompt", "--prompts")
    assert not no_model_load


def test_output_is_an_existing_file(runner, tmp_path, two_images, no_model_load):
    target = tmp_path / "results-here"
    target.write_text("not a directory\n")
    result = _invoke(runner, ["--images", str(two_images), "--limit", "1", *FAST, "--output", str(target)])
    _assert_user_error(result, "--output", "not a directory")
    assert target.read_text() == "not a directory\n"
    assert not no_model_load


def test_output_that_cannot_be_created(runner, tmp_path, two_images, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _invoke(runner, ["--images", str(two_images), "--limit", "1", *FAST, "--output", str(blocker / "sub")])
    _assert_user_error(result, "--output", "cannot create the directory")
    assert not no_model_load


# --------------------------------------------------------------------------------------------------
# version, help, real console script
# --------------------------------------------------------------------------------------------------


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, _all_text(result)
    assert _plain(result.stdout).strip() == f"lightkv {__version__}"


def test_profile_help(runner):
    result = runner.invoke(app, ["profile", "--help"])
    assert result.exit_code == 0, _all_text(result)
    flat = _flat(result.output)
    assert "--retentions" in flat
    assert "--images" in flat


def _console_script() -> str | None:
    beside = Path(sys.executable).parent / "lightkv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("lightkv")


def test_console_script_missing_directory(tmp_path):
    script = _console_script()
    if script is None:
        pytest.skip("the lightkv console script is not installed")
    missing = tmp_path / "nope"
    env = {**os.environ, "LIGHTKV_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [script, "profile", "--images", str(missing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    stderr = _plain(proc.stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    assert str(missing) in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "lightkv-out").exists()


def test_ctrl_c_keeps_finished_runs_and_exits_130(runner, tmp_path, two_images, monkeypatch):
    import lightkv_cli.engine.sweep as prof

    real = prof.greedy_generate

    def interrupted(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=None, **kw):
        if press is not None:
            raise KeyboardInterrupt
        return real(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=press, **kw)

    monkeypatch.setattr(prof, "greedy_generate", interrupted)
    out = tmp_path / "out"
    result = _invoke(runner, ["--images", str(two_images), "--limit", "1", *FAST, "--output", str(out)])
    assert result.exit_code == 130, _all_text(result)
    assert "interrupted" in _flat(_all_text(result))
    saved = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in saved["runs"]] == ["uncompressed"] and saved["complete"] is False


def test_recorded_command_of_a_resumed_profile_runs_again(runner, tmp_path, two_images):
    """Flags are recorded as flags (``--resume``, not ``--resume True``), so the command re-runs as written."""
    import shlex

    out = tmp_path / "out"
    args = ["--images", str(two_images), "--limit", "1", "--output", str(out), *FAST]
    assert _invoke(runner, args).exit_code == 0
    result = _invoke(runner, [*args, "--resume"])
    assert result.exit_code == 0, _all_text(result)
    command = json.loads((out / "results.json").read_text())["command"]
    assert " --resume" in command and "--resume True" not in command
    argv = shlex.split(command)
    assert argv[:2] == ["lightkv", "profile"]
    again = runner.invoke(app, argv[1:])
    assert again.exit_code == 0, _all_text(again)
