"""``lightkv report`` and ``lightkv check results.json`` run without torch and transformers.

A fresh interpreter blocks both (``sys.modules[name] = None`` makes any import of them fail) and
records every attempt to import them, then runs the commands in-process on a small hand-written
results file (schema ``lightkv.results/1``, docs/results-schema.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lightkv_cli.results import SCHEMA, write_json_atomic

MIB = 2**20

SCRIPT = r"""
import builtins, json, sys

for name in ("torch", "transformers"):
    sys.modules[name] = None
attempts = []
_import = builtins.__import__


def _watch(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in ("torch", "transformers"):
        attempts.append(f"{(globals or {}).get('__name__')} imports {name}")
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _watch

from typer.testing import CliRunner

from lightkv_cli.cli import app

out = {}
for key, args in json.loads(sys.argv[1]).items():
    r = CliRunner().invoke(app, args)
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    out[key] = {"exit_code": r.exit_code, "output": r.output, "exception": exc}
out["attempts"] = attempts
print(json.dumps(out))
"""


def _run(method: str, r: float, kv: float, prefill: float, answer_match: float, top1: float, kl: float) -> dict:
    spread = {"median": prefill, "p25": prefill * 0.9, "p75": prefill * 1.1, "min": prefill * 0.8, "max": prefill * 1.2}
    return {
        "id": "uncompressed" if method == "uncompressed" else f"{method}@{r}",
        "method": method,
        "params": {},
        "target_retention": r,
        "expected_retention": r,
        "status": "ok",
        "vision_retention": r,
        "kv_bytes": kv,
        "kv_bytes_vision": kv * 0.8,
        "kv_bytes_per_layer": [kv / 2, kv / 2],
        "cached_tokens_per_layer": [100.0, 100.0 * r],
        "vision_tokens_per_layer": [80.0, 80.0 * r],
        "kv_ratio": kv / (4 * MIB),
        "kv_vision_ratio": kv / (4 * MIB),
        "flops_ratio": r,
        "prefill_ms": {**spread, "n": 2},
        "time_to_first_token_ms": {**spread, "median": prefill + 5.0, "n": 2},
        "decode_ms_per_token": None,
        "tokens_per_s": None,
        "peak_memory_bytes": 2**30,
        "peak_memory_kind": "process_rss_peak",
        "nvml": {"available": False, "note": "NVML not available: no NVIDIA driver (CPU-only run)"},
        "flops_prefill": 1e9 * r,
        "capacity": {"kv_bytes_per_request": kv, "max_concurrent_requests": None, "ratio_vs_uncompressed": None},
        "quality": {
            "answer_match": answer_match,
            "token_f1": answer_match,
            "top1_agreement": top1,
            "first_token_kl_mean": kl / 2,
            "first_token_kl_max": kl,
            "accuracy": None,
            "n_inputs": 2,
            "n_with_answers": 0,
        },
        "per_input": [{"input": "a.png", "answer": "a cat", "generated_tokens": 1}],
    }


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    """A two-run results file (CPU, no answers) recommending lightkv@0.5 (answer match 0.8, top-1 0.95)."""
    path = tmp_path_factory.mktemp("no-torch") / "results.json"
    runs = [
        _run("uncompressed", 1.0, 4 * MIB, 20.0, 1.0, 1.0, 0.0),
        _run("lightkv", 0.5, 2.5 * MIB, 12.0, 0.8, 0.95, 0.02),
        _run("snapkv", 0.5, 2.5 * MIB, 21.0, 0.7, 1.0, 0.0),
    ]
    write_json_atomic(
        path,
        {
            "schema": SCHEMA,
            "tool_version": "0.1.0",
            "created": "2026-01-01T00:00:00+00:00",
            "command": "lightkv sweep --output out",
            "environment": {"python": "3.11", "device": "cpu", "device_name": "CPU", "cuda": False},
            "model": {"name": "tiny", "family": "llava", "layers": 2, "weights_meaningful": True},
            "settings": {"methods": ["lightkv", "snapkv"], "retentions": [1.0, 0.5], "max_new_tokens": 1},
            "thresholds": {"min_answer_match": 0.75, "min_top1_agreement": 0.9, "max_kl": None},
            "capacity": {"memory_bytes": None, "source": "system memory (CPU)", "weight_bytes": MIB},
            "inputs": [{"id": "a.png", "image": "a.png", "kind": "image", "question": "What is shown?"}],
            "inputs_fingerprint": "sha256:00",
            "skipped": [],
            "runs": runs,
            "recommendation": {"run": "lightkv@0.5", "reason": "fewest KV bytes", "failures": []},
            "complete": True,
        },
    )
    return path


def _without_torch(commands: dict[str, list[str]]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROFILE = """
[profile]
format = "lightkv.profile/1"
name = "evict"

[model]
name = "tiny"

[method]
name = "snapkv"
target_retention = 0.5

[thresholds]
min_answer_match = 0.6
"""


def test_report_and_check_of_a_results_file_import_no_torch(results_file, tmp_path):
    out_dir = tmp_path / "reports"
    profile = tmp_path / "evict.toml"
    profile.write_text(PROFILE)
    got = _without_torch(
        {
            "report": ["report", str(results_file), "--output", str(out_dir)],
            # Two files: the regression view (the same file twice: every run shared, nothing differs).
            "compare": ["report", str(results_file), str(results_file), "--output", str(out_dir / "cmp")],
            # Thresholds of the file (top-1 ≥ 0.9) with answer match lowered to 0.5: lightkv@0.5 passes.
            "pass": ["check", str(results_file), "--min-answer-match", "0.5"],
            # Answer match 0.8 < 0.85: fails, exit 1.
            "fail": ["check", str(results_file), "--min-answer-match", "0.85"],
            # The profile's run (snapkv@0.5, answer match 0.7) against its one threshold (answer match ≥ 0.6).
            "profile": ["check", str(results_file), "--profile", str(profile)],
        }
    )
    assert got["attempts"] == []
    for key, code in (("report", 0), ("compare", 0), ("pass", 0), ("fail", 1), ("profile", 0)):
        assert got[key]["exception"] is None, got[key]
        assert "Traceback" not in got[key]["output"], got[key]["output"]
        assert got[key]["exit_code"] == code, got[key]["output"]
    assert (out_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    md = (out_dir / "report.md").read_text()
    assert "| lightkv@0.5 ★ | lightkv | 0.500 | 2.5 MiB |" in md
    assert "snapkv evict after prefill" in md
    assert (out_dir / "cmp" / "compare.html").read_text().startswith("<!DOCTYPE html>")
    cmp_md = (out_dir / "cmp" / "compare.md").read_text()
    assert "Same model, dtype, device, inputs and lightkv version." in cmp_md
    assert "| lightkv@0.5 | lightkv | 0.500 → 0.500 (+0.000) | 2.5 MiB → 2.5 MiB (+0.0 MiB, +0%) |" in cmp_md
    assert "PASS" in got["pass"]["output"] and "meets all 2 thresholds" in got["pass"]["output"]
    assert "answer match 0.800 < 0.850 (short by 0.050)" in got["fail"]["output"]
    assert "PASS: snapkv@0.5 meets all 1 thresholds" in got["profile"]["output"]
