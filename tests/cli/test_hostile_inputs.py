"""Nothing a user can feed lightkv crashes it (issue 22): every bad prompts file, option, file name,
checkpoint or resumed sweep ends in one clear line (exit 2, no traceback), or the one bad input is
skipped with its reason and the run goes on. Most cases stop before a model loads; the few that need
one use the embedded ``tiny`` model on CPU with tiny settings. The seeded fuzz of prompts lines and
sweep configurations is at the end.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from cli_output import _all_text, _assert_user_error, _flat
from test_cli import SAMPLE_IMAGES

from lightkv_cli.cli import app
from lightkv_cli.errors import UserError

FAST = ["--max-new-tokens", "2", "--repeats", "1", "--warmup", "0", "--retentions", "1.0", "--device", "cpu"]
IMAGE = SAMPLE_IMAGES / "skimage_chelsea.png"


@pytest.fixture
def stop_at_model_load(monkeypatch):
    """Inputs that pass validation end here with one known line, so a test never loads a model."""
    import lightkv_cli.models.loader as loader

    def _stop(*args, **kwargs):
        raise UserError("STOP: the model would load now")

    monkeypatch.setattr(loader, "load_model", _stop)


def _prompts(tmp_path: Path, *lines: str, name: str = "p.jsonl") -> Path:
    shutil.copyfile(IMAGE, tmp_path / "cat.png")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _profile(runner, *args):
    model = [] if "--model" in args else ["--model", "tiny"]
    return runner.invoke(app, ["profile", *model, *args])


# --------------------------------------------------------------------------------------------------
# 1. answers that normalise to nothing ("A", "the", "?") are scored as written, the run finishes
# --------------------------------------------------------------------------------------------------


def test_answers_that_normalise_to_nothing_are_scored(runner, tmp_path):
    lines = [json.dumps({"image": "cat.png", "question": f"Pick one {i}", "answer": a}) for i, a in enumerate("A")]
    lines.append(json.dumps({"image": "cat.png", "question": "Which word?", "answer": "the"}))
    out = tmp_path / "out"
    result = _profile(runner, "--prompts", str(_prompts(tmp_path, *lines)), *FAST, "--output", str(out))
    assert result.exit_code == 0, _all_text(result)
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["status"] == "ok" and run["quality"]["n_with_answers"] == 2
    assert all(p["quality"]["accuracy"] in (0.0, 1.0) for p in run["per_input"])


def test_empty_answer_is_one_line(runner, tmp_path, stop_at_model_load):
    path = _prompts(tmp_path, json.dumps({"image": "cat.png", "question": "What?", "answer": "  "}))
    _assert_user_error(_profile(runner, "--prompts", str(path)), "p.jsonl:1", '"answer" is empty')


# --------------------------------------------------------------------------------------------------
# 2. prompts validated before the model loads; what does not fit the model is skipped once it is loaded
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, fragment",
    [
        ({"image": "cat.png", "question": 5}, '"question" must be a string, got a number'),
        ({"image": ["cat.png"], "question": "q"}, '"image" must be a string, got an array'),
        ({"image": "cat.png", "question": "q", "answer": {"a": 1}}, '"answer" must be a string, a number or null'),
        ({"image": "cat.png", "question": "q", "type": 3}, '"type" must be a string'),
        ({"image": "cat.png", "question": "q", "tags": "x"}, '"tags" must be an array of strings'),
        ({"image": "cat.png", "question": "a \ud800 b"}, '"question" is not valid Unicode text: character 3'),
        ({"image": "cat.png", "question": "q", "answer": "\udfff"}, '"answer" is not valid Unicode text'),
        ({"image": "cat.png", "question": "q", "tags": ["\ud83d"]}, '"tags"[0] is not valid Unicode text'),
        ({"image": "cat\ud800.png", "question": "q"}, '"image" is not valid Unicode text'),
        ({"image": "cat\u0000.png", "question": "q"}, '"image" holds a NUL character'),
        ({"image": "cat.png", "question": "x" * 20_000}, '"question" is 20,000 characters long'),
    ],
)
def test_bad_prompts_line_is_one_line_before_the_model_loads(runner, tmp_path, stop_at_model_load, line, fragment):
    good = json.dumps({"image": "cat.png", "question": "fine"})
    path = _prompts(tmp_path, good, json.dumps(line))
    flat = _assert_user_error(_profile(runner, "--prompts", str(path)), "p.jsonl:2", fragment)
    assert "STOP" not in flat


def test_bad_prompt_option_is_one_line(runner, tmp_path, stop_at_model_load):
    _assert_user_error(
        _profile(runner, "--images", str(IMAGE), "--prompt", "what \udc80?"), "--prompt is not valid Unicode text"
    )


def test_input_too_long_for_the_model_is_skipped_and_the_run_goes_on(runner, tmp_path):
    long_q = "describe " * 800  # ~7,200 byte-level tokens: more than tiny's 4,096 positions
    lines = [
        json.dumps({"image": "cat.png", "question": "What is it?"}),
        json.dumps({"image": "cat.png", "question": long_q}),
    ]
    out = tmp_path / "out"
    result = _profile(runner, "--prompts", str(_prompts(tmp_path, *lines)), *FAST, "--output", str(out))
    text = _flat(_all_text(result))
    assert result.exit_code == 0, text
    assert "Traceback" not in text
    assert "(prompts line 2); shorten the question or lower --max-new-tokens" in text
    data = json.loads((out / "results.json").read_text())
    assert len(data["inputs"]) == 1 and "max_position_embeddings" in data["skipped"][0]["reason"]


def test_max_new_tokens_beyond_the_model_is_a_usage_error(runner, tmp_path):
    out = tmp_path / "out"
    result = _profile(runner, "--images", str(IMAGE), *FAST, "--max-new-tokens", "5000", "--output", str(out))
    _assert_user_error(result, "--max-new-tokens 5000 is too large", "4096 positions (max_position_embeddings)")
    assert not (out / "results.json").exists()


# --------------------------------------------------------------------------------------------------
# 3. user text is printed literally, never read as rich markup
# --------------------------------------------------------------------------------------------------


def test_markup_in_a_path_is_printed_literally(runner, tmp_path, stop_at_model_load):
    missing = tmp_path / "x[/]y[bold red]z.jsonl"
    _assert_user_error(_profile(runner, "--prompts", str(missing)), "x[/]y[bold red]z.jsonl", "does not exist")


def test_markup_in_a_skipped_file_name_is_printed_literally(runner, tmp_path, stop_at_model_load):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copyfile(IMAGE, folder / "cat.png")
    (folder / "[bold red]broken.png").write_bytes(b"")
    result = _profile(runner, "--images", str(folder))
    assert "skipped [bold red]broken.png: empty file" in _flat(_all_text(result))
    _assert_user_error(result, "STOP")


def test_video_extra_is_named_in_full(runner, tmp_path, stop_at_model_load):
    try:
        import av  # noqa: F401

        has_av = True
    except ImportError:
        has_av = False
    help_text = _flat(runner.invoke(app, ["profile", "--help"]).output.replace("│", " "))  # rich panel borders
    assert 'pip install "lightkv[video]"' in help_text
    if not has_av:
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"\x00" * 64)
        result = _profile(runner, "--model", "tiny-qwen2-vl", "--video", str(clip))
        _assert_user_error(result, 'pip install "lightkv[video]"')


# --------------------------------------------------------------------------------------------------
# 6. --resume refuses settings that would mix runs; more windows than the grid has rows is refused
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-image profile of the tiny model (uncompressed only)."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("resume") / "out"
    result = CliRunner().invoke(app, ["profile", "--model", "tiny", "--images", str(IMAGE), *FAST, "-o", str(out)])
    assert result.exit_code == 0, _all_text(result)
    return out


@pytest.mark.parametrize(
    "change, fragment",
    [
        (["--repeats", "2"], "--repeats was 1, now 2"),
        (["--warmup", "1"], "--warmup was 0, now 1"),
        (["--retentions", "1.0,0.5"], "--retentions was 1.0, now 1.0,0.5"),
        (["--methods", "random"], "--methods was lightkv, now random"),
    ],
)
def test_resume_with_other_settings_is_refused(runner, finished, no_model_load, change, fragment):
    before = (finished / "results.json").read_bytes()
    args = ["--images", str(IMAGE), *FAST, *change, "-o", str(finished), "--resume"]
    _assert_user_error(_profile(runner, *args), "cannot resume", fragment, "drop --resume")
    assert (finished / "results.json").read_bytes() == before


def test_more_windows_than_grid_rows_is_refused(runner, tmp_path):
    args = ["sweep", "--model", "tiny", "--images", str(IMAGE), *FAST[:-4], "--device", "cpu"]
    result = runner.invoke(app, [*args, "--layers", "2", "--windows", "100", "-o", str(tmp_path / "o")])
    _assert_user_error(result, "--windows 100", "24×24 vision-token grid", "give at most 24")


# --------------------------------------------------------------------------------------------------
# 7. a damaged local checkpoint is one line naming the file
# --------------------------------------------------------------------------------------------------


def _corrupt_config_no_model_type(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_type")
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (_corrupt_config_no_model_type, 'config.json\' has no "model_type"'),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json' holds a JSON list"),
        (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00{"), "config.json' is not UTF-8 text"),
        (lambda d: (d / "config.json").write_text('{"model_type": "lla'), "config.json' is not valid JSON"),
        (_truncate_weights, "model.safetensors' holds"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"), "not a valid safetensors file"),
    ],
)
def test_damaged_local_checkpoint_is_one_line(runner, tmp_path, damage, fragment):
    from lightkv_cli.models.tiny import ensure_tiny_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ensure_tiny_checkpoint(name="tiny"), ckpt)
    damage(ckpt)
    result = _profile(runner, "--model", str(ckpt), "--images", str(IMAGE), *FAST, "-o", str(tmp_path / "o"))
    flat = _assert_user_error(result, fragment)
    assert "Hugging Face cache" not in flat and "hf download" not in flat


# --------------------------------------------------------------------------------------------------
# 8. fuzz: a few hundred malformed prompts lines and sweep configurations, seeded
# --------------------------------------------------------------------------------------------------

_JUNK = [None, True, 7, -1.5, "", "  ", [], {}, ["x", 1], {"nested": [{"deep": None}]}, "\ud800", "[/]"]


def _valid(key: str, value) -> bool:
    """Whether ``value`` is a valid value of the prompts key ``key`` (of the junk values above)."""
    if key == "answer":
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) or value == "[/]"
    if key == "tags":
        return value is None or value == []
    if key in ("type", "question"):
        return value == "[/]" or (key == "type" and value is None)
    return False  # image: none of the junk names an existing file


def _mutated_prompt_lines(rng: random.Random, n: int) -> list[tuple[str, bool]]:
    """(line, surely invalid) pairs: wrong types, missing keys, junk keys, truncation, binary bytes."""
    base = {"image": "cat.png", "question": "What is it?", "answer": "cat", "type": "kind", "tags": ["a"]}
    out = []
    for _ in range(n):
        obj = dict(base)
        kind = rng.choice(["type", "missing", "unknown", "truncate", "junk_line"])
        if kind == "type":
            key = rng.choice(list(base))
            obj[key] = rng.choice([v for v in _JUNK if not _valid(key, v)])
            out.append((json.dumps(obj), True))
        elif kind == "missing":
            del obj[rng.choice(["image", "question"])]
            out.append((json.dumps(obj), True))
        elif kind == "unknown":
            obj[rng.choice(["img", "Question", "\ud800", "[b]"])] = rng.choice(_JUNK)
            out.append((json.dumps(obj), True))
        elif kind == "truncate":
            line = json.dumps(obj)
            out.append((line[: rng.randrange(1, len(line) - 1)], True))
        else:
            out.append((rng.choice(["[1, 2]", "null", '"text"', "42", "[" * 5000 + "]" * 5000]), True))
    return out


def test_fuzz_prompts_lines(runner, tmp_path, stop_at_model_load):
    rng = random.Random(22)
    cases = _mutated_prompt_lines(rng, 160)
    good = json.dumps({"image": "cat.png", "question": "fine"})
    for i, (line, invalid) in enumerate(cases):
        path = _prompts(tmp_path, good, line, name=f"p{i}.jsonl")
        if rng.random() < 0.1:  # bytes that are not UTF-8
            path.write_bytes(path.read_bytes() + b"\xff\xfe\x80\n")
        result = _profile(runner, "--prompts", str(path))
        text = _all_text(result)
        assert result.exit_code == 2 and "Traceback" not in text, f"case {i}: {line[:120]!r}\n{text}"
        assert result.exception is None or isinstance(result.exception, SystemExit), f"case {i}: {result.exception!r}"
        error_lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(error_lines) == 1, f"case {i}: {line[:120]!r}\n{text}"
        if invalid:
            assert "STOP" not in text and f"p{i}.jsonl" in text, f"case {i}: {line[:120]!r}\n{text}"


def _config_cases(rng: random.Random, n: int) -> list[bytes]:
    import tomli_w

    base = {
        "model": "tiny",
        "images": ["imgs"],
        "methods": ["lightkv"],
        "retentions": [0.9, 0.5],
        "max_new_tokens": 4,
        "repeats": 1,
        "thresholds": {"min_answer_match": 0.9},
        "schedules": [{"layers": [2], "windows": [2], "ratios": [0.5]}],
    }
    wrong = {str: [3, [1], {"a": 1}], list: ["x", 3, {"a": 1}], int: ["x", [1], 0.5, {"a": 1}], dict: [3, "x", [1]]}
    out = []
    for _ in range(n):
        data = json.loads(json.dumps(base))
        kind = rng.choice(["type", "unknown", "truncate", "binary", "nested"])
        if kind == "type":
            key = rng.choice(list(base))
            data[key] = rng.choice(wrong[type(base[key])])
        elif kind == "unknown":
            data[rng.choice(["modle", "retention", "max-new-tokens"])] = 1
        elif kind == "nested":
            data["schedules"][0][rng.choice(["layers", "windows", "ratios"])] = rng.choice(["x", [[1]], {"a": 1}])
        text = tomli_w.dumps(data).encode()
        if kind == "truncate":
            text = text[: rng.randrange(5, len(text) // 2)] + b'"\n['
        elif kind == "binary":
            text = bytes(rng.randrange(256) for _ in range(64))
        out.append(text)
    return out


def test_fuzz_sweep_configs(runner, tmp_path, stop_at_model_load):
    rng = random.Random(2222)
    (tmp_path / "imgs").mkdir()
    shutil.copyfile(IMAGE, tmp_path / "imgs" / "cat.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"sentinel": true}')
    for i, raw in enumerate(_config_cases(rng, 120)):
        path = tmp_path / f"c{i}.toml"
        path.write_bytes(raw)
        result = runner.invoke(app, ["sweep", "--config", str(path), "--output", str(out)])
        text = _all_text(result)
        assert result.exit_code == 2 and "Traceback" not in text, f"case {i}: {raw[:200]!r}\n{text}"
        assert "STOP" not in text and f"c{i}.toml" in text, f"case {i}: {raw[:200]!r}\n{text}"
        assert (out / "results.json").read_text() == '{"sentinel": true}'
