"""Damaged results files, profiles and sweep configurations, and file names that are not UTF-8, never
crash ``lightkv report`` or ``lightkv check`` (issue 22): one line naming the file and the field, exit 2,
nothing written over earlier files. No model is loaded. Ends with a seeded fuzz of a few hundred mutated
results files (wrong types, deleted keys, nested junk) through report, check and the comparison.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from cli_output import _all_text, _assert_user_error
from test_render import _rich_results
from typer.testing import CliRunner

from lightkv_cli.cli import app


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return _rich_results(tmp_path_factory.mktemp("hostile-images"))


@pytest.fixture
def fast_figures(monkeypatch):
    """Figures are drawn in their own guarded step; skip the drawing to keep the fuzz fast."""
    import lightkv_cli.report.html as html
    import lightkv_cli.report.plots as plots

    monkeypatch.setattr(plots, "ALL_PLOTS", tuple((name, lambda r: None) for name, _ in plots.ALL_PLOTS))
    monkeypatch.setattr(html, "token_map_figures", lambda *a, **k: [])


def _write(tmp_path: Path, data, name: str = "results.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _set(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize("command", ["report", "check"])
@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff", "is not a lightkv results file: line 1 is not UTF-8 text"),
        (b'{"schema": "lightkv.results/1", "runs": [{"id": "x"', "is not valid JSON"),
        (("[" * 100_000).encode(), "nested too deeply"),
    ],
)
def test_unreadable_results_file_is_one_line(tmp_path, no_model_load, command, content, fragment):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    (tmp_path / "report.html").write_text("earlier")
    result = CliRunner().invoke(
        app, [command, str(path), "--min-answer-match", "0.5"][: 2 if command == "report" else 4]
    )
    _assert_user_error(result, "results.json", fragment)
    assert (tmp_path / "report.html").read_text() == "earlier"


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (("runs",), [1, "two"], "field 'runs.0': Input should be a valid dictionary"),
        (("runs", 1, "kv_bytes"), "lots", "field 'runs.1.kv_bytes'"),
        (("runs", 1, "quality", "ci", "answer_match"), [0.5], "field 'runs.1.quality.ci.answer_match'"),
        (("runs", 0, "id"), "", "field 'runs.0.id': is empty"),
        (("model",), [1], "field 'model'"),
    ],
)
def test_results_with_wrong_types_name_the_field(tmp_path, base, no_model_load, path, value, fragment):
    results = _write(tmp_path, _set(base, path, value))
    for args in (["report", str(results)], ["check", str(results), "--min-answer-match", "0.5"]):
        _assert_user_error(CliRunner().invoke(app, args), fragment)


@pytest.mark.parametrize("path", [("model",), ("runs", 1, "quality"), ("environment",), ("runs", 1, "prefill_ms")])
def test_null_sections_still_render(tmp_path, base, no_model_load, fast_figures, path):
    results = _write(tmp_path, _set(base, path, None))
    result = CliRunner().invoke(app, ["report", str(results)])
    assert result.exit_code == 0, _all_text(result)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()


def test_file_names_that_are_not_utf8_are_shown_escaped(tmp_path, base, no_model_load, fast_figures):
    data = copy.deepcopy(base)
    latin1 = "caf\udce9.png"  # b"caf\xe9.png" as Python decodes a latin-1 file name
    data["inputs"][0]["image"] = str(tmp_path / latin1)
    data["skipped"] = [{"path": str(tmp_path / "\udcff[bold red]x.png"), "reason": "empty file"}]
    results = _write(tmp_path, data)
    result = CliRunner().invoke(app, ["report", str(results)])
    assert result.exit_code == 0, _all_text(result)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "caf\\xe9.png" in html and "\\xff[bold red]x.png" in html
    (tmp_path / "b").mkdir()
    compared = CliRunner().invoke(app, ["report", str(results), str(results), "-o", str(tmp_path / "b")])
    assert compared.exit_code == 0, _all_text(compared)


@pytest.mark.parametrize(
    "option, content, fragment",
    [
        ("--config", b"\xff\xfe\x00model", "sweep config"),
        ("--config", b'model = ["tiny"]\n', "field 'model': Input should be a valid string"),
        ("--config", b"schedules = [1]\n", "field 'schedules.0'"),
        ("--profile", b"\x89PNG\x00\xff", "is not UTF-8 text"),
        ("--profile", b"[profile]\nname = 3\n", "field 'profile.name'"),
    ],
)
def test_damaged_config_and_profile_are_one_line(tmp_path, no_model_load, option, content, fragment):
    path = tmp_path / "file.toml"
    path.write_bytes(content)
    command = "sweep" if option == "--config" else "check"
    _assert_user_error(CliRunner().invoke(app, [command, option, str(path)]), "file.toml", fragment)


def test_resume_of_a_damaged_results_file_is_one_line(tmp_path, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(b"\x00\xff\xfe binary")
    image = Path(__file__).parents[2] / "sample_images" / "skimage_chelsea.png"
    args = ["profile", "--model", "tiny", "--images", str(image), "--device", "cpu", "-o", str(out), "--resume"]
    _assert_user_error(CliRunner().invoke(app, args), "results.json", "not UTF-8 text")
    assert (out / "results.json").read_bytes() == b"\x00\xff\xfe binary"


# --------------------------------------------------------------------------------------------------
# fuzz: seeded mutations of a valid results file through report, check and compare
# --------------------------------------------------------------------------------------------------

_JUNK = [{"junk": [1, {"x": None}]}, [[["deep"]]], "junk", 12345, -1.5, True, None, [], {}, "[/]"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate(rng: random.Random, data: dict) -> dict:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _paths(data) if p])
        node = data
        for key in path[:-1]:
            node = node[key]
        if rng.random() < 0.4:
            del node[path[-1]]
        else:
            node[path[-1]] = copy.deepcopy(rng.choice(_JUNK))
    return data


def test_fuzz_damaged_results_files(tmp_path, base, no_model_load, fast_figures):
    rng = random.Random(2026)
    runner = CliRunner()
    intact = _write(tmp_path, base, "intact.json")
    out = tmp_path / "out"
    out.mkdir()
    codes = {0: 0, 1: 0, 2: 0}
    for i in range(240):
        text = json.dumps(_mutate(rng, base))
        surely_invalid = False
        if i % 10 == 0:  # cut short, or binary bytes inside
            cut = rng.randrange(1, len(text))
            text = text[:cut] if i % 20 == 0 else text[:cut] + "\udcff\x00" + text[cut:]
            surely_invalid = True
        path = tmp_path / f"r{i}.json"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        (out / "report.html").write_text("earlier")
        command = [
            ["report", str(path), "-o", str(out)],
            ["check", str(path), "--min-answer-match", "0.5"],
            ["report", str(path), str(intact), "-o", str(out)],
        ][i % 3]
        result = runner.invoke(app, command)
        out_text = _all_text(result)
        assert "Traceback" not in out_text, f"case {i}\n{out_text}"
        assert result.exception is None or isinstance(result.exception, SystemExit), f"case {i}: {result.exception!r}"
        assert result.exit_code in (0, 1, 2), f"case {i}\n{out_text}"  # check exits 1 when a threshold fails
        codes[result.exit_code] += 1
        if result.exit_code == 2:
            assert len([ln for ln in out_text.splitlines() if ln.startswith("error:")]) == 1, out_text
            assert (out / "report.html").read_text() == "earlier"  # nothing written over earlier reports
        if surely_invalid:
            assert result.exit_code == 2, f"case {i}\n{out_text}"
    assert codes[2] > 60 and codes[0] > 30, codes  # the mutations hit both sides of validation
