"""Two sweeps side by side (``lightkv_cli.report.compare`` and ``lightkv report A B``): the shared runs with A,
B and B − A, the runs only one file has, what differs between the files, the Markdown and HTML views
(escaped, self-contained), and the command's one-or-two-files form. Results are synthetic (schema
``lightkv.results/1``, docs/results-schema.md).
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from lightkv_cli.cli import app
from lightkv_cli.report.compare import compare, compare_cells, render_compare_html, render_compare_markdown
from lightkv_cli.results import check_schema, write_json_atomic

MIB = 2**20


def _run(run_id, method, *, r, kv, prefill, decode, am, acc, top1, status="ok"):
    if status != "ok":
        return {"id": run_id, "method": method, "status": status, "error": "out of memory"}
    return {
        "id": run_id,
        "method": method,
        "status": "ok",
        "vision_retention": r,
        "kv_bytes": kv,
        "prefill_ms": {"median": prefill, "p25": prefill, "p75": prefill, "n": 2},
        "decode_ms_per_token": None if decode is None else {"median": decode, "n": 4},
        "quality": {"answer_match": am, "accuracy": acc, "top1_agreement": top1},
    }


def _results(runs, *, dtype="float32", device="cpu", version="0.1.0", created="2026-01-01T00:00:00+00:00"):
    return check_schema(
        {
            "schema": "lightkv.results/1",
            "tool_version": version,
            "created": created,
            "environment": {"device": device, "dtype": dtype, "cuda": device == "cuda"},
            "model": {"name": "tiny"},
            "inputs_fingerprint": "sha256:aa",
            "runs": runs,
        },
        "synthetic",
    )


def _pair():
    a = _results(
        [
            _run(
                "uncompressed", "uncompressed", r=1.0, kv=4 * MIB, prefill=20.0, decode=5.0, am=1.0, acc=0.75, top1=1.0
            ),
            _run("lightkv@0.5", "lightkv", r=0.5, kv=2 * MIB, prefill=12.0, decode=4.0, am=0.9, acc=0.7, top1=0.95),
            _run("snapkv@0.5", "snapkv", r=0.5, kv=2 * MIB, prefill=21.0, decode=4.5, am=0.8, acc=0.6, top1=1.0),
            _run("fastv@0.5", "fastv", r=0.5, kv=2 * MIB, prefill=10.0, decode=4.0, am=0.5, acc=0.4, top1=0.6),
        ]
    )
    b = _results(
        [
            _run("lightkv@0.25", "lightkv", r=0.25, kv=1 * MIB, prefill=9.0, decode=3.0, am=0.6, acc=0.5, top1=0.7),
            _run("snapkv@0.5", "snapkv", r=0.5, kv=2 * MIB, prefill=0, decode=0, am=0, acc=0, top1=0, status="oom"),
            _run("lightkv@0.5", "lightkv", r=0.5, kv=2.5 * MIB, prefill=15.0, decode=None, am=0.8, acc=None, top1=1.0),
            _run(
                "uncompressed", "uncompressed", r=1.0, kv=4 * MIB, prefill=18.0, decode=5.0, am=1.0, acc=0.75, top1=1.0
            ),
        ],
        dtype="bfloat16",
        device="cuda",
        version="0.2.0",
        created="2026-02-01T00:00:00+00:00",
    )
    return a, b


def test_shared_runs_in_a_order_with_differences_b_minus_a():
    a, b = _pair()
    cmp = compare(a, b, "old/results.json", "new/results.json")
    assert [r["id"] for r in cmp["runs"]] == ["uncompressed", "lightkv@0.5", "snapkv@0.5"]
    assert cmp["only_a"] == ["fastv@0.5"] and cmp["only_b"] == ["lightkv@0.25"]
    lkv = cmp["runs"][1]["metrics"]
    assert lkv["kv_bytes"] == {"a": 2 * MIB, "b": 2.5 * MIB, "delta": 0.5 * MIB}
    assert lkv["prefill_ms"] == {"a": 12.0, "b": 15.0, "delta": 3.0}
    assert lkv["decode_ms_per_token"] == {"a": 4.0, "b": None, "delta": None}
    assert lkv["answer_match"]["delta"] == pytest.approx(-0.1)
    assert lkv["accuracy"] == {"a": 0.7, "b": None, "delta": None}
    assert lkv["top1_agreement"]["delta"] == pytest.approx(0.05)
    assert lkv["vision_retention"] == {"a": 0.5, "b": 0.5, "delta": 0.0}
    assert cmp["runs"][0]["metrics"]["prefill_ms"]["delta"] == -2.0
    snap = cmp["runs"][2]
    assert (snap["status_a"], snap["status_b"]) == ("ok", "oom")
    assert snap["metrics"]["kv_bytes"] == {"a": 2 * MIB, "b": None, "delta": None}


def test_header_names_what_differs():
    a, b = _pair()
    cmp = compare(a, b, "A", "B")
    header = {h["field"]: h for h in cmp["header"]}
    assert list(header) == ["model", "dtype", "device", "inputs_fingerprint", "tool_version", "created"]
    assert cmp["differs"] == ["dtype", "device", "tool_version", "created"]
    assert (header["dtype"]["a"], header["dtype"]["b"]) == ("float32", "bfloat16")
    assert header["model"] == {"field": "model", "label": "model", "a": "tiny", "b": "tiny", "differs": False}
    same = compare(a, a, "A", "A")
    assert same["differs"] == [] and same["only_a"] == [] and same["only_b"] == []
    assert all(v["delta"] in (0.0, None) for r in same["runs"] for v in r["metrics"].values())


def test_markdown_and_html_views():
    a, b = _pair()
    a["runs"][1]["id"] = b["runs"][2]["id"] = "<script>alert(1)</script>"
    cmp = compare(a, b, "old/results.json", "new/<b>.json")
    cells = compare_cells(cmp)
    assert cells[1][3] == "2.0 MiB → 2.5 MiB (+0.5 MiB, +25%)"
    assert cells[1][4] == "12.0 → 15.0 (+3.0, +25%)"
    assert cells[1][6] == "0.900 → 0.800 (−0.100)"
    assert cells[2][3] == "2.0 MiB → oom"  # snapkv@0.5 ran out of memory in B
    assert cells[1][5] == "4.0 → –"  # lightkv@0.5 in B: one-token answers, no decode time
    md = render_compare_markdown(cmp)
    assert "Differs: dtype, device, lightkv version." in md
    assert "| dtype ≠ | float32 | bfloat16 |" in md
    assert "| uncompressed | uncompressed | 1.000 → 1.000 (+0.000) | 4.0 MiB → 4.0 MiB (+0.0 MiB, +0%)" in md
    assert "Only in A: `fastv@0.5`" in md and "Only in B: `lightkv@0.25`" in md
    html = render_compare_html(cmp)
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "new/&lt;b&gt;.json" in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    # prefill 12.0 → 15.0 is worse, top-1 0.95 → 1.0 better, in the lightkv row.
    row = html.split("&lt;script&gt;alert(1)&lt;/script&gt;</td>")[1].split("</tr>")[0]
    assert '<td class="worse">+3.0, +25%</td>' in row
    assert '<td class="better">+0.050</td>' in row
    assert "<td>oom</td>" in html  # snapkv@0.5 in B


def _write(tmp_path, name, data):
    path = tmp_path / name / "results.json"
    path.parent.mkdir()
    write_json_atomic(path, data)
    return path


def test_cli_two_files_write_compare_html_and_md(tmp_path):
    a, b = _pair()
    pa, pb = _write(tmp_path, "a", a), _write(tmp_path, "b", b)
    r = CliRunner().invoke(app, ["report", str(pa), str(pb)])
    assert r.exit_code == 0, r.output
    for name in ("compare.html", "compare.md"):
        assert (pa.parent / name).is_file()
        assert str(pa.parent / name) in r.output.replace("\n", "")
    assert not (pa.parent / "report.html").exists()
    assert "Differs: dtype, device, lightkv version." in r.output
    assert "only in A: fastv@0.5" in r.output and "only in B: lightkv@0.25" in r.output
    assert "lightkv@0.5" in r.output
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["report", str(pa), str(pb), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "compare.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "compare.md").read_text().startswith("# lightkv comparison")


def test_cli_three_files_is_a_usage_error(tmp_path):
    a, b = _pair()
    pa, pb = _write(tmp_path, "a", a), _write(tmp_path, "b", b)
    r = CliRunner().invoke(app, ["report", str(pa), str(pb), str(pa)])
    assert r.exit_code == 2
    assert "takes one results file, or two to compare, not 3" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_cli_second_file_is_validated_like_the_first(tmp_path):
    a, _ = _pair()
    pa = _write(tmp_path, "a", a)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "lightkv.results/1", "runs": [{"id": 1}]}')
    r = CliRunner().invoke(app, ["report", str(pa), str(bad)])
    assert r.exit_code == 2
    assert "runs.0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["report", str(pa), str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "does not exist" in r.output
