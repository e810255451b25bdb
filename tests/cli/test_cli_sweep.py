"""End-to-end tests of ``lightkv sweep``, ``lightkv report`` and ``lightkv check`` (tiny model, CPU)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cli_output import _all_text, _assert_user_error, _flat
from test_cli import SAMPLE_IMAGES

from lightkv_cli.cli import app

FAST = ["--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
PROFILES = Path(__file__).parents[2] / "profiles"


def _sweep(runner, *args):
    """``lightkv sweep ARGS`` on the random-weight ``tiny`` model unless ARGS name a model or a config."""
    model = [] if "--model" in args or "--config" in args else ["--model", "tiny"]
    return runner.invoke(app, ["sweep", *model, *args])


def _check(runner, *args):
    return runner.invoke(app, ["check", *args])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep of 2 methods × 2 targets on 2 images, with a saved profile (shared by the tests below)."""
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("sweep")
    imgs = tmp / "imgs"
    imgs.mkdir()
    for name in ("skimage_chelsea.png", "skimage_coffee.png"):
        (imgs / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    out = tmp / "out"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--model",
            "tiny",
            "--images",
            str(imgs),
            "--methods",
            "lightkv,lightkv-uniform",
            "--retentions",
            "0.8,0.5",
            *FAST,
            "--output",
            str(out),
            "--min-answer-match",
            "0.5",
            "--min-top1",
            "0.5",
            # 2 inputs: the lower 95% bound of 2 of 2 is 0.34 < 0.5, so decide on the mean to get a compressed run.
            "--decide-on",
            "mean",
            "--save-profile",
            "unit",
            "--profiles-dir",
            str(tmp / "profiles"),
            "--gpu-memory",
            "1GiB",
        ],
    )
    assert result.exit_code == 0, _all_text(result)
    return {
        "tmp": tmp,
        "imgs": imgs,
        "out": out,
        "text": _flat(_all_text(result)),
        "profile": tmp / "profiles" / "unit.toml",
        "results": json.loads((out / "results.json").read_text()),
    }


def test_sweep_writes_results_reports_and_profile(swept):
    res = swept["results"]
    assert [r["id"] for r in res["runs"]] == [
        "uncompressed",
        "lightkv@0.8",
        "lightkv@0.5",
        "lightkv-uniform@0.8",
        "lightkv-uniform@0.5",
    ]
    assert all(r["status"] == "ok" for r in res["runs"]) and res["complete"] is True
    assert res["settings"]["methods"] == ["lightkv", "lightkv-uniform"]
    assert res["thresholds"]["min_answer_match"] == 0.5 and res["thresholds"]["max_kl"] is None
    assert res["capacity"]["memory_bytes"] == 2**30 and res["capacity"]["source"] == "--gpu-memory 1GiB"
    html = (swept["out"] / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "NVML not sampled" in html
    md = (swept["out"] / "report.md").read_text()
    assert all(f"| {r['id']}" in md for r in res["runs"])
    rec = res["recommendation"]["run"]
    assert rec is not None and rec != "uncompressed"
    assert f"recommended: {rec}" in swept["text"]
    prof = swept["profile"].read_text()
    assert f'run = "{rec}"' in prof and 'kind = "measured"' in prof


def test_check_profile_passes_then_fails_when_a_threshold_is_tightened(runner, swept, tmp_path):
    base = ["--profile", str(swept["profile"]), "--images", str(swept["imgs"]), "--device", "cpu", "--warmup", "0"]
    ok = _check(runner, *base, "--junit", str(tmp_path / "ok.xml"))
    assert ok.exit_code == 0, _all_text(ok)
    assert "PASS" in _flat(_all_text(ok))
    suite = ET.parse(tmp_path / "ok.xml").getroot().find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "0"  # the three default fidelity floors

    # The measured KV bytes of the operating point are in the profile; demand 1 byte less.
    kv = float(
        next(ln for ln in swept["profile"].read_text().splitlines() if ln.startswith("kv_bytes =")).split("=")[1]
    )
    tight = swept["profile"].parent / "tight.toml"
    tight.write_text(swept["profile"].read_text().replace("[thresholds]\n", f"[thresholds]\nmax_kv_bytes = {kv - 1}\n"))
    bad = _check(runner, "--profile", str(tight), *base[2:], "--junit", str(tmp_path / "bad.xml"))
    assert bad.exit_code == 1, _all_text(bad)
    flat = _flat(_all_text(bad))
    assert "FAIL" in flat and "KV bytes per request" in flat and "over by 1" in flat
    suite = ET.parse(tmp_path / "bad.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    failure = suite.find("testcase[@name='max_kv_bytes']/failure")
    assert failure is not None and "over by 1" in failure.get("message")


def test_check_results_file(runner, swept, no_model_load):
    path = str(swept["out"] / "results.json")
    rec = swept["results"]["recommendation"]["run"]
    ok = _check(runner, path)
    assert ok.exit_code == 0, _all_text(ok)
    assert rec in _flat(_all_text(ok))
    # A KL ceiling below what the recommended run measured fails.
    measured = next(r for r in swept["results"]["runs"] if r["id"] == rec)["quality"]["continuation_kl_max"]
    bad = _check(runner, path, "--max-kl", f"{measured / 2}")
    assert bad.exit_code == 1 and "max continuation KL" in _flat(_all_text(bad))
    other = _check(runner, path, "--run", "uncompressed", "--max-kl", "0")
    assert other.exit_code == 0, _all_text(other)
    _assert_user_error(_check(runner, path, "--run", "nope"), "has no run 'nope'", "uncompressed")
    # With a profile: the run with the profile's schedule is checked (not the recommended one).
    from lightkv_cli.profiles import profile_from_results, save_profile

    other = next(r["id"] for r in swept["results"]["runs"] if r["id"] not in (rec, "uncompressed"))
    prof = save_profile(profile_from_results(swept["results"], other, "other"), swept["tmp"] / "other.toml")
    with_profile = _check(runner, path, "--profile", str(prof), "--min-answer-match", "0", "--min-top1", "0")
    assert with_profile.exit_code == 0 and f"lightkv check · {other}" in _flat(_all_text(with_profile))
    _assert_user_error(_check(runner, path, "--min-accuracy", "0.5"), "min_accuracy is set", "--prompts with answers")


def test_report_rerenders_without_a_model(runner, swept, tmp_path, no_model_load):
    out = tmp_path / "again"
    result = runner.invoke(app, ["report", str(swept["out"] / "results.json"), "--output", str(out)])
    assert result.exit_code == 0, _all_text(result)
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 4
    assert "## Recommendation" in (out / "report.md").read_text()


def test_resume_skips_finished_runs(runner, swept, tmp_path, monkeypatch):
    import lightkv_cli.engine.sweep as prof

    out = tmp_path / "out"
    out.mkdir()
    results = dict(swept["results"])
    results["runs"] = results["runs"][:2]  # as if interrupted after lightkv@0.8
    results["complete"] = False
    (out / "results.json").write_text(json.dumps(results))
    seen = []
    real = prof.greedy_generate

    def spy(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=None, **kw):
        seen.append(None if press is None else round(press.expected_retention, 1))
        return real(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=press, **kw)

    monkeypatch.setattr(prof, "greedy_generate", spy)
    args = [
        "--images",
        str(swept["imgs"]),
        "--methods",
        "lightkv,lightkv-uniform",
        "--retentions",
        "0.8,0.5",
        *FAST,
        "--output",
        str(out),
        "--min-answer-match",
        "0.5",
        "--min-top1",
        "0.5",
        "--gpu-memory",
        "1GiB",
    ]
    result = _sweep(runner, *args, "--resume")
    assert result.exit_code == 0, _all_text(result)
    assert "resuming: 2 run(s)" in _flat(_all_text(result))
    # quality pass: the reference recomputed once (one batch of both inputs), then the three runs still to go;
    # then the timing pass (not started before the interruption): 5 runs × 2 inputs × 1 round
    assert seen[:4] == [None, 0.5, 0.8, 0.5]
    assert len(seen) == 4 + 5 * 2 and seen[4:].count(None) == 2
    final = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in final["runs"]] == [r["id"] for r in swept["results"]["runs"]]
    assert final["complete"] is True
    # Another sweep without --resume keeps the old files aside, as numbered backups.
    result = _sweep(runner, *args, "--retentions", "0.8")  # the last --retentions wins
    assert result.exit_code == 0, _all_text(result)
    assert (out / "results.json.1.bak").is_file() and (out / "report.html.1.bak").is_file()


def test_sweep_config_file_and_command_line_override(runner, two_images, tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(
        f'model = "tiny"\nimages = ["{two_images}"]\nmethods = ["lightkv-uniform"]\nmax_new_tokens = 2\nrepeats = '
        "1\nwarmup = 0\n"
        'device = "cpu"\nlimit = 1\noutput = "cfg-out"\n'
        "[[schedules]]\nlayers = [4, 8]\nwindows = [2, 1]\nratios = [0.5]\n"
        "[thresholds]\nmin_answer_match = 0.0\nmin_top1_agreement = 0.0\n"
    )
    result = _sweep(runner, "--config", str(cfg), "--max-new-tokens", "3")
    assert result.exit_code == 0, _all_text(result)
    res = json.loads((tmp_path / "cfg-out" / "results.json").read_text())
    assert [r["id"] for r in res["runs"]] == ["uncompressed", "lightkv-uniform[L4-8/W2-1/r0.5-0.5]"]
    assert res["settings"]["max_new_tokens"] == 3 and len(res["inputs"]) == 1
    assert res["thresholds"]["min_answer_match"] == 0.0
    assert res["runs"][1]["target_retention"] is None and res["runs"][1]["params"]["layers"] == [4, 8]


def test_explicit_schedule_grid_from_options(runner, two_images, tmp_path):
    out = tmp_path / "o"
    result = _sweep(
        runner,
        "--images",
        str(two_images),
        "--limit",
        "1",
        *FAST,
        "--output",
        str(out),
        "--layers",
        "4,8",
        "--windows",
        "2,1",
        "--ratios",
        "0.5",
        "--ratios",
        "0.25",
    )
    assert result.exit_code == 0, _all_text(result)
    ids = [r["id"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert ids == ["uncompressed", "lightkv[L4-8/W2-1/r0.5-0.5]", "lightkv[L4-8/W2-1/r0.25-0.25]"]


def test_script_in_prompt_is_not_live_in_html(runner, two_images, tmp_path):
    out = tmp_path / "o"
    result = _sweep(
        runner,
        "--images",
        str(two_images),
        "--limit",
        "1",
        *FAST,
        "--output",
        str(out),
        "--retentions",
        "0.5",
        "--prompt",
        "<script>alert('x')</script> what is this?",
    )
    assert result.exit_code == 0, _all_text(result)
    html = (out / "report.html").read_text()
    assert "<script" not in html.lower() and "&lt;script&gt;" in html


# --------------------------------------------------------------------------------------------------
# robustness: one clear line, exit 2
# --------------------------------------------------------------------------------------------------


def test_sweep_config_with_a_wrong_field(runner, tmp_path, no_model_load):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('methods = ["lightkv"]\nretention = [0.5]\n')
    _assert_user_error(_sweep(runner, "--config", str(cfg)), "unknown field 'retention'", "did you mean 'retentions'")


def test_results_from_a_newer_schema(runner, tmp_path, no_model_load):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema": "lightkv.results/9", "runs": []}))
    _assert_user_error(runner.invoke(app, ["report", str(path)]), "lightkv.results/9", "upgrade lightkv")
    _assert_user_error(_check(runner, str(path), "--min-answer-match", "0.9"), "upgrade lightkv")


def test_profile_for_another_model(runner, two_images, no_model_load):
    result = _check(
        runner,
        "--profile",
        str(PROFILES / "llava-1.5-7b.published.toml"),
        "--images",
        str(two_images),
        "--model",
        "tiny",
    )
    _assert_user_error(result, "is for model 'llava-hf/llava-1.5-7b-hf', not 'tiny'")


def test_profile_schedule_deeper_than_the_model(runner, two_images, tmp_path):
    text = (PROFILES / "llava-1.5-7b.published.toml").read_text().replace('"llava-hf/llava-1.5-7b-hf"', '"tiny"')
    p = tmp_path / "p.toml"
    p.write_text(text)
    _assert_user_error(
        _check(runner, "--profile", str(p), "--images", str(two_images), "--device", "cpu"),
        "32-layer model",
        "16 decoder layers",
    )


def test_profile_with_a_wrong_field(runner, two_images, tmp_path, no_model_load):
    p = tmp_path / "p.toml"
    p.write_text((PROFILES / "llava-1.5-7b.published.toml").read_text().replace("ratios =", "ratio ="))
    _assert_user_error(
        _check(runner, "--profile", str(p), "--images", str(two_images)),
        "unknown field 'method.ratio'",
        "did you mean 'ratios'",
    )


def test_sweep_empty_image_directory(runner, tmp_path, no_model_load):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(_sweep(runner, "--images", str(empty), "--output", str(tmp_path / "o")), str(empty))
    assert not (tmp_path / "o").exists()


def test_sweep_prompts_file_with_a_bad_line(runner, two_images, tmp_path, no_model_load):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"image": "skimage_chelsea.png", "question": "What?"}\n{"image": oops}\n')
    _assert_user_error(_sweep(runner, "--images", str(two_images), "--prompts", str(bad)), "p.jsonl:2")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--methods", "lightkv,fastvv"], "unknown method 'fastvv'"),
        (["--windows", "4,2,1"], "--windows/--ratios need --layers"),
        (["--layers", "12,x"], "--layers: '12,x' is not a comma-separated list"),
        (["--gpu-memory", "lots"], "'lots' is not a memory size"),
        (["--save-profile", "../x"], "--save-profile '../x'"),
        (["--layers", "4,8", "--windows", "2,1,1"], "one window count and one ratio per layer"),
    ],
)
def test_sweep_bad_options(runner, two_images, tmp_path, no_model_load, args, fragment):
    _assert_user_error(_sweep(runner, "--images", str(two_images), "--output", str(tmp_path / "o"), *args), fragment)


def test_check_usage_errors(runner, tmp_path, no_model_load):
    _assert_user_error(_check(runner), "give a results file")
    _assert_user_error(_check(runner, "--profile", str(PROFILES / "llava-1.5-7b.published.toml")), "give --images")
