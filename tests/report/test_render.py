"""Report rendering: Markdown table text, self-contained HTML (plots, thumbnails, escaping), atomic writes, plots.

Results dictionaries are synthetic (schema ``lightkv.results/1``, see docs/results-schema.md); one of them
copies the shape of an older real results file (no NVML, no capacity, no confidence intervals, time to
first token as a plain float, a ``min_fidelity`` recommendation).
"""

from __future__ import annotations

import base64
import copy
import io
import re

import pytest
from PIL import Image

from lightkv_cli.report import plots
from lightkv_cli.report.html import render_html
from lightkv_cli.report.markdown import render_markdown
from lightkv_cli.report.write import write_reports
from lightkv_cli.results import check_schema

MIB = 2**20
SCRIPT_PROMPT = "<script>alert(1)</script> What is shown?"


def _spread(median, p25=None, p75=None, n=6):
    p25 = median * 0.95 if p25 is None else p25
    p75 = median * 1.05 if p75 is None else p75
    return {"median": median, "p25": p25, "p75": p75, "min": p25 * 0.9, "max": p75 * 1.1, "n": n}


def _nvml(peak_gib: float, available: bool = True) -> dict:
    if not available:
        return {"available": False, "note": "NVML not available: no NVIDIA driver (CPU-only run)"}
    t = [0.0, 20.0, 40.0, 60.0, 80.0]
    used = [1.0 * 2**30, 1.5 * 2**30, peak_gib * 2**30, 1.4 * 2**30, 1.0 * 2**30]
    return {
        "available": True,
        "interval_ms": 20,
        "samples": 5,
        "peak_used_bytes": max(used),
        "baseline_used_bytes": used[0],
        "peak_utilization_pct": 90.0,
        "mean_utilization_pct": 50.0,
        "timeline": {"t_ms": t, "used_bytes": used, "utilization_pct": [0, 50, 90, 60, 0]},
    }


def _run(
    run_id,
    method,
    retention,
    kv,
    kv_vision,
    prefill,
    *,
    am,
    top1,
    kl,
    acc,
    tokens,
    flops,
    mcr,
    nvml,
    answers,
    status="ok",
    decode=9.5,
):
    q = {
        "answer_match": am,
        "token_f1": am,
        "top1_agreement": top1,
        "first_token_kl_mean": kl / 2,
        "first_token_kl_max": kl,
        "accuracy": acc,
        "n_inputs": 2,
        "n_with_answers": 2,
        "ci": {
            "answer_match": [max(0.0, am - 0.1), min(1.0, am + 0.05)],
            "top1_agreement": [max(0.0, top1 - 0.1), min(1.0, top1 + 0.05)],
            "accuracy": [max(0.0, acc - 0.2), min(1.0, acc + 0.2)],
        },
    }
    return {
        "id": run_id,
        "method": method,
        "params": {},
        "target_retention": retention,
        "expected_retention": retention,
        "status": status,
        "vision_retention": retention,
        "kv_bytes": kv,
        "kv_bytes_vision": kv_vision,
        "kv_bytes_per_layer": [kv / 4] * 4,
        "cached_tokens_per_layer": tokens,
        "vision_tokens_per_layer": [t - 20 for t in tokens],
        "kv_ratio": kv / (4 * MIB),
        "kv_vision_ratio": kv_vision / (3 * MIB),
        "flops_ratio": flops,
        "prefill_ms": _spread(prefill),
        "time_to_first_token_ms": _spread(prefill + 10.0),
        "decode_ms_per_token": _spread(decode),
        "tokens_per_s": 1000.0 / decode,
        "peak_memory_bytes": 2 * 2**30,
        "peak_memory_kind": "cuda_allocator",
        "nvml": nvml,
        "flops_prefill": 1e10 * flops,
        "capacity": {
            "kv_bytes_per_request": kv + 0.1 * MIB,
            "max_concurrent_requests": mcr,
            "ratio_vs_uncompressed": mcr / 40,
        },
        "quality": q,
        "per_input": [
            {"input": "in0", "answer": answers[0], "generated_tokens": 3},
            {"input": "in1", "answer": answers[1], "generated_tokens": 3},
        ],
    }


def _rich_results(image_dir, nvml: bool = True) -> dict:
    """Three methods, an oom run and an error run, recommendation lightkv@0.5, two inputs (one image missing)."""
    good = image_dir / "a<b>.jpg"
    if not good.exists():
        Image.new("RGB", (400, 300), (200, 40, 40)).save(good, format="JPEG")
    env_nvml = (
        {"available": True, "note": "", "device_name": "NVIDIA H100 80GB HBM3", "driver": "999.1"}
        if nvml
        else _nvml(0, available=False)
    )
    common = {"nvml": None}
    runs = [
        _run(
            "uncompressed",
            "uncompressed",
            1.0,
            4 * MIB,
            3 * MIB,
            200.0,
            am=1.0,
            top1=1.0,
            kl=0.0,
            acc=0.5,
            tokens=[100.0] * 4,
            flops=1.0,
            mcr=40,
            answers=["a <i>cat</i>", "2"],
            **common,
        ),
        _run(
            "lightkv@0.5",
            "lightkv",
            0.5,
            2.5 * MIB,
            1.5 * MIB,
            120.0,
            am=0.9,
            top1=0.95,
            kl=0.012,
            acc=0.5,
            tokens=[100.0, 100.0, 60.0, 60.0],
            flops=0.61,
            mcr=64,
            answers=["a dog", "3"],
            **common,
        ),
        _run(
            "lightkv@0.25",
            "lightkv",
            0.25,
            1.75 * MIB,
            0.75 * MIB,
            90.0,
            am=0.5,
            top1=0.6,
            kl=0.2,
            acc=0.0,
            tokens=[100.0, 60.0, 40.0, 40.0],
            flops=0.4,
            mcr=90,
            answers=["no", "no"],
            **common,
        ),
        _run(
            "lightkv-uniform@0.5",
            "lightkv-uniform",
            0.5,
            2.5 * MIB,
            1.5 * MIB,
            125.0,
            am=0.8,
            top1=0.85,
            kl=0.05,
            acc=0.5,
            tokens=[100.0, 60.0, 60.0, 60.0],
            flops=0.55,
            mcr=64,
            answers=["cat", "2"],
            **common,
        ),
        {
            "id": "lightkv-uniform@0.25",
            "method": "lightkv-uniform",
            "params": {},
            "target_retention": 0.25,
            "expected_retention": 0.25,
            "status": "oom",
            "error": "CUDA out of memory. Tried to allocate <huge> | 2.00 GiB",
        },
        {
            "id": "lightkv-prompt@0.5",
            "method": "lightkv-prompt",
            "params": {},
            "target_retention": 0.5,
            "expected_retention": 0.5,
            "status": "error",
            "error": "boom <b>bad</b>\nsecond line",
        },
    ]
    if nvml:
        runs[0]["nvml"] = _nvml(2.0)
        runs[1]["nvml"] = _nvml(1.6)
    else:
        for r in runs[:4]:
            r["nvml"] = _nvml(0, available=False)
    return {
        "schema": "lightkv.results/1",
        "tool_version": "0.1.0",
        "created": "2026-11-21T11:01:12+00:00",
        "command": "lightkv sweep --images '<imgs>' --output out",
        "environment": {
            "python": "3.11.7",
            "torch": "2.15.0",
            "transformers": "5.23.0",
            "platform": "Linux",
            "device": "cuda" if nvml else "cpu",
            "device_name": "NVIDIA H100" if nvml else "AMD EPYC",
            "cpu_count": 16,
            "total_memory_bytes": 128 * 2**30,
            "cuda": nvml,
            "dtype": "bfloat16",
            "nvml": env_nvml,
        },
        "model": {
            "name": "tiny<model>",
            "source": "/models/tiny",
            "family": "llava",
            "architecture": "LlavaForConditionalGeneration",
            "init": "pretrained",
            "weights_meaningful": True,
            "layers": 4,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vision_tokens_per_image": 80,
            "image_grid": [8, 10],
            "parameters": 1_000_000,
            "weight_bytes": 2 * MIB,
            "dtype": "bfloat16",
            "device": "cuda",
        },
        "settings": {
            "methods": ["lightkv", "lightkv-uniform", "lightkv-prompt"],
            "retentions": [0.5, 0.25],
            "max_new_tokens": 3,
            "repeats": 2,
            "warmup": 1,
            "nvml_interval_ms": 20,
        },
        "thresholds": {
            "min_answer_match": 0.85,
            "min_top1_agreement": 0.9,
            "min_accuracy": None,
            "max_kl": None,
            "max_vision_retention": None,
            "max_kv_bytes": 3 * MIB,
            "max_prefill_ms": None,
        },
        "capacity": {"memory_bytes": 80 * 2**30, "source": "--gpu-memory 80GB", "weight_bytes": 2 * MIB},
        "inputs": [
            {
                "id": "in0",
                "image": str(good),
                "sha256": "0" * 64,
                "width": 400,
                "height": 300,
                "question": SCRIPT_PROMPT,
                "answer": "a cat",
                "prompt_tokens": 100,
                "vision_tokens": 80,
            },
            {
                "id": "in1",
                "image": str(image_dir / "missing.png"),
                "sha256": "1" * 64,
                "width": 10,
                "height": 10,
                "question": "How many?",
                "answer": "2 | 3",
                "prompt_tokens": 100,
                "vision_tokens": 80,
            },
        ],
        "inputs_fingerprint": "sha256:00",
        "skipped": [{"path": "bad<x>.txt", "reason": "not an image"}],
        "runs": runs,
        "recommendation": {
            "run": "lightkv@0.5",
            "reason": "cheapest run meeting every threshold",
            "failures": [],
            "vision_retention": 0.5,
            "kv_bytes": 2.5 * MIB,
            "kv_bytes_vision": 1.5 * MIB,
        },
        "complete": True,
    }


def _legacy_results() -> dict:
    """The shape of an older real results file (tiny model, CPU, 3 runs), trimmed to what rendering reads."""

    def run(run_id, method, r, kv, kvv, tokens, prefill, decode, tps, flops, am, kl):
        return {
            "id": run_id,
            "method": method,
            "params": {},
            "target_retention": round(r, 2),
            "expected_retention": r,
            "status": "ok",
            "vision_retention": r,
            "kv_bytes": kv,
            "kv_bytes_vision": kvv,
            "cached_tokens_per_layer": tokens,
            "prefill_ms": prefill,
            "time_to_first_token_ms": prefill["median"],
            "decode_ms_per_token": decode,
            "tokens_per_s": tps,
            "peak_memory_bytes": 918933504,
            "peak_memory_kind": "process_rss_peak",
            "flops_prefill": 1.7e10 * flops,
            "quality": {
                "answer_match": am,
                "token_f1": am,
                "top1_agreement": am,
                "first_token_kl_mean": kl,
                "first_token_kl_max": kl,
                "accuracy": None,
                "n_inputs": 3,
                "n_with_answers": 0,
            },
            "per_input": [{"input": "matplotlib_grace_hopper.jpg", "answer": "M\ufffdM\ufffd"}],
            "flops_ratio": flops,
            "kv_vision_ratio": r,
        }

    return {
        "schema": "lightkv.results/1",
        "tool_version": "0.1.0",
        "created": "2026-11-21T11:01:12+00:00",
        "command": "lightkv profile --images sample_images --retentions 1.0,0.75,0.5 --output /tmp/sample-out",
        "environment": {
            "python": "3.11.7",
            "torch": "2.15.0+cu132",
            "transformers": "5.23.0",
            "platform": "Linux",
            "device": "cpu",
            "device_name": "AMD EPYC",
            "cpu_count": 2,
            "total_memory_bytes": 25276510208,
            "cuda": False,
            "dtype": "float32",
        },
        "model": {
            "name": "tiny",
            "source": "/root/.cache/lightkv/models/tiny",
            "family": "llava",
            "architecture": "LlavaForConditionalGeneration",
            "init": "random",
            "weights_meaningful": False,
            "layers": 16,
            "vision_tokens_per_image": 576,
            "image_grid": [24, 24],
            "parameters": 11441920,
            "weight_bytes": 45767680,
            "dtype": "float32",
            "device": "cpu",
            "notes": ["tiny: random weights; answers and quality figures are not meaningful"],
        },
        "settings": {
            "retentions": [1.0, 0.75, 0.5],
            "guidance": "cross",
            "max_new_tokens": 4,
            "repeats": 1,
            "warmup": 0,
            "min_fidelity": 0.95,
        },
        "inputs": [
            {
                "id": "matplotlib_grace_hopper.jpg",
                "image": "sample_images/does-not-exist.jpg",
                "sha256": "a8" * 32,
                "width": 512,
                "height": 600,
                "question": "Describe this image in one sentence.",
                "answer": None,
                "prompt_tokens": 631,
                "vision_tokens": 576,
            }
        ],
        "skipped": [],
        "runs": [
            run(
                "uncompressed",
                "uncompressed",
                1.0,
                5169152.0,
                4718592.0,
                [631.0] * 16,
                _spread(279.60975, 238.0158735, 355.4696555, 3),
                _spread(8.616828, 8.347146, 9.551182, 9),
                116.05198571910685,
                1.0,
                1.0,
                0.0,
            ),
            run(
                "lightkv@0.75",
                "lightkv",
                0.7555338541666666,
                4015616.0,
                3565056.0,
                [631.0] * 7 + [487.0] * 3 + [371.0] * 3 + [284.0] * 3,
                _spread(143.944272, 136.744383, 149.124803, 3),
                _spread(8.377101, 8.31624, 9.514619, 9),
                119.37303847715337,
                0.7532277785403354,
                1.0,
                0.0012646650417201043,
            ),
            run(
                "lightkv@0.5",
                "lightkv",
                0.4969618055555556,
                2795520.0,
                2344960.0,
                [631.0] * 5 + [375.0] * 2 + [235.0] * 2 + [155.0] * 7,
                _spread(87.027538, 86.4885685, 93.2234635, 3),
                _spread(7.986568, 7.795092, 8.237672, 9),
                125.21022797276628,
                0.5142510431178952,
                0.6666666666666666,
                0.004737628229502444,
            ),
        ],
        "recommendation": {
            "run": "lightkv@0.75",
            "target_retention": 0.75,
            "vision_retention": 0.7555338541666666,
            "kv_bytes_vision": 3565056.0,
            "min_fidelity": 0.95,
            "reason": "lowest vision retention with answer match 1.00 and top-1 agreement 1.00",
        },
        "complete": True,
    }


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def rich(image_dir):
    return _rich_results(image_dir, nvml=True)


@pytest.fixture(scope="module")
def rich_html(rich):
    return render_html(rich)


@pytest.fixture(scope="module")
def cpu_results(image_dir):
    return _rich_results(image_dir, nvml=False)


@pytest.fixture(scope="module")
def cpu_html(cpu_results):
    return render_html(cpu_results)


def _pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html_text)]


def _table_rows(md: str) -> list[str]:
    lines = md.split("## Runs", 1)[1].split("\n\n", 2)[1].splitlines()
    return lines[2:]  # header and separator


# ------------------------------------------------------------------------------------------------ Markdown


def test_markdown_one_row_per_run_with_exact_text(rich):
    md = render_markdown(rich)
    rows = _table_rows(md)
    assert len(rows) == len(rich["runs"]) == 6
    assert rows[1] == (
        "| lightkv@0.5 ★ | lightkv | 0.500 | 2.5 MiB | 1.5 MiB | 120.0 | 130.0 | 9.50 | – | 105.3 | 61% | "
        "64 | 0.90 | 0.95 | 1.20e-02 | – | – | 0.50 |"
    )  # no paired ratio, token agreement or continuation KL in this (version 1 style) run: a dash
    evicted = copy.deepcopy(rich)
    evicted["runs"][1]["quality"].update(
        {"prefill_unchanged": True, "top1_agreement": None, "token_agreement": 0.875, "continuation_kl_mean": 0.0123}
    )
    assert "| 0.90 | n/a | n/a | 0.88 | 1.23e-02 | 0.50 |" in _table_rows(render_markdown(evicted))[1]
    paired = copy.deepcopy(rich)
    paired["runs"][1]["timing_ratio"] = {"prefill": {"median": 0.6, "low": 0.55, "high": 0.65, "n": 24}}
    assert "| 9.50 | 0.60× [0.55–0.65] | 105.3 |" in _table_rows(render_markdown(paired))[1]
    assert rows[0].startswith("| uncompressed | uncompressed | 1.000 | 4.0 MiB | 3.0 MiB | 200.0 | 210.0 |")
    assert rows[4].startswith("| lightkv-uniform@0.25 | lightkv-uniform | oom | – |")
    assert rows[5].startswith("| lightkv-prompt@0.5 | lightkv-prompt | error | – |")
    assert "prefill ms (GPU)" in md and "timings are GPU times" in md
    assert "tiny\\<model\\>" in md
    # the error message's pipe is escaped and its newline folded, so the list item stays one line
    assert "allocate \\<huge\\> \\| 2.00 GiB" in md
    assert "boom \\<b\\>bad\\</b\\> second line" in md


def test_markdown_thresholds_and_recommendation(rich):
    md = render_markdown(rich)
    thresholds = md.split("## Thresholds", 1)[1].split("##", 1)[0]
    assert "- answer match ≥ 0.85" in thresholds
    assert "- top-1 agreement ≥ 0.9" in thresholds
    assert "- KV bytes per request ≤ 3.0 MiB" in thresholds
    assert "accuracy" not in thresholds and "prefill" not in thresholds
    assert "Recommended: lightkv@0.5 — measured vision retention 0.500, KV cache 2.5 MiB per request" in md
    assert "64 concurrent requests fit" in md
    assert "Random weights" not in md


def test_markdown_without_recommendation_lists_failures(rich):
    res = copy.deepcopy(rich)
    res["recommendation"] = {
        "run": None,
        "reason": "no run meets every threshold",
        "failures": [
            {
                "run": "lightkv@0.5",
                "threshold": "min_answer_match",
                "required": 0.95,
                "measured": 0.9,
                "short_by": 0.05,
            },
            {
                "run": "lightkv@0.5",
                "threshold": "max_kv_bytes",
                "required": 2 * MIB,
                "measured": 2.5 * MIB,
                "short_by": 0.5 * MIB,
            },
        ],
    }
    md = render_markdown(res)
    assert "No run meets every threshold." in md
    assert "| lightkv@0.5 | min_answer_match | 0.95 | 0.9 | 0.05 |" in md
    assert "| lightkv@0.5 | max_kv_bytes | 2.0 MiB | 2.5 MiB | 0.5 MiB |" in md
    assert "★" not in "\n".join(_table_rows(md))


# ------------------------------------------------------------------------------------------------ HTML


def test_html_embeds_all_plots_with_nvml_timeline(rich_html):
    pngs = _pngs(rich_html)
    assert len(pngs) == len(plots.ALL_PLOTS) == 6
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "NVML not available" not in rich_html
    assert "NVIDIA H100 80GB HBM3" in rich_html


def test_html_without_nvml_has_five_plots_and_the_note(cpu_html):
    assert len(_pngs(cpu_html)) == 5
    assert "NVML not available: no NVIDIA driver (CPU-only run)" in cpu_html
    assert "prefill ms (CPU)" in cpu_html


def test_html_escapes_user_text_and_has_no_script_or_external_resources(rich_html):
    low = rich_html.lower()
    assert "<script" not in low
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rich_html
    assert "a&lt;b&gt;.jpg" in rich_html and "a<b>.jpg" not in rich_html
    assert "<b>bad</b>" not in rich_html and "boom &lt;b&gt;bad&lt;/b&gt;" in rich_html
    assert "a &lt;i&gt;cat&lt;/i&gt;" in rich_html and "<i>cat" not in rich_html
    assert "tiny&lt;model&gt;" in rich_html and "bad&lt;x&gt;.txt" in rich_html
    assert "--images &#x27;&lt;imgs&gt;&#x27;" in rich_html
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", rich_html, re.IGNORECASE)
    assert "<link" not in low and "@import" not in low and "url(" not in low


def test_html_oom_and_error_runs_show_status_and_error(rich_html):
    runs = rich_html.split('<section id="runs">', 1)[1].split("</section>", 1)[0]
    assert runs.count("<tr") == 1 + 6
    oom = re.search(r'<tr class="failed"><td>lightkv-uniform@0\.25</td>.*?</tr>', runs).group(0)
    assert '<td class="n">oom</td>' in oom and "Tried to allocate &lt;huge&gt; | 2.00 GiB" in oom
    assert re.search(r'<tr class="rec"><td>lightkv@0\.5 ★</td>', runs)


def test_html_thumbnail_inlined_and_missing_image_placeholder(rich_html):
    # the inputs table (the "What changed" gallery above it shows the same thumbnail again)
    inputs = rich_html.split('<section id="inputs">', 1)[1].split("</section>", 1)[0]
    jpegs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", inputs)
    assert len(jpegs) == 1
    with Image.open(io.BytesIO(base64.b64decode(jpegs[0]))) as im:
        assert im.format == "JPEG" and im.size == (160, 120)
    assert inputs.count("image not available") == 1
    assert "answer of lightkv@0.5" in inputs and "a dog" in inputs and "2 | 3" in inputs


def test_relative_image_path_resolved_from_cwd(image_dir, monkeypatch):
    monkeypatch.chdir(image_dir)
    res = {
        "model": {"name": "m"},
        "runs": [],
        "inputs": [{"id": "x", "image": "a<b>.jpg", "question": "q"}, {"id": "y", "image": None, "question": "q"}],
    }
    out = render_html(res)
    assert out.count("data:image/jpeg;base64,") == 1 and "image not available" in out


def test_legacy_results_file_renders(image_dir):
    res = _legacy_results()
    md = render_markdown(res)
    out = render_html(res)
    rows = _table_rows(md)
    assert len(rows) == 3
    assert rows[1].startswith("| lightkv@0.75 ★ | lightkv | 0.756 | 3.8 MiB | 3.4 MiB | 143.9 | 143.9 | 8.38 |")
    assert "Random weights" in md and "Random weights" in out
    assert "min fidelity, older results file" in md
    assert len(_pngs(out)) == 5 and "NVML not available" in out
    assert "No capacity budget recorded" in out and "image not available" in out


def test_write_reports_atomic(rich, tmp_path):
    out = tmp_path / "new" / "dir"
    html_path, md_path = write_reports(rich, out)
    assert (html_path, md_path) == (out / "report.html", out / "report.md")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert md_path.read_text(encoding="utf-8") == render_markdown(rich)
    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and len(_pngs(text)) == 6
    write_reports({"model": {"name": "second"}, "runs": []}, out)  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert "second" in md_path.read_text(encoding="utf-8") and "data:image/png" not in html_path.read_text()


# ------------------------------------------------------------------------------------------------ plots


def test_layer_tokens_png_size(rich):
    png = plots.layer_tokens(rich)
    assert png is not None and png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (round(plots.FIGSIZE[0] * plots.DPI), round(plots.FIGSIZE[1] * plots.DPI))


def test_quality_plot_adds_accuracy_panel_only_when_measured(rich):
    with Image.open(io.BytesIO(plots.quality_vs_retention(rich))) as im:
        wide = im.size
    no_acc = copy.deepcopy(rich)
    for r in no_acc["runs"]:
        if "quality" in r:
            r["quality"]["accuracy"] = None
    with Image.open(io.BytesIO(plots.quality_vs_retention(no_acc))) as im:
        narrow = im.size
    assert narrow == (704, 396) and wide[0] > narrow[0] and wide[1] == narrow[1]


def test_plots_skip_failed_runs_and_return_none_without_ok_runs(rich):
    only_failed = copy.deepcopy(rich)
    only_failed["runs"] = [r for r in only_failed["runs"] if r["status"] != "ok"]
    assert all(fn(only_failed) is None for _, fn in plots.ALL_PLOTS)
    out = render_html(only_failed)
    assert "data:image/png" not in out and "oom" in out and "No plot: no finished run" in out
    no_nvml = copy.deepcopy(rich)
    for r in no_nvml["runs"]:
        r.pop("nvml", None)
    assert plots.nvml_timeline(no_nvml) is None


def test_method_colours_are_stable_and_distinct():
    known = ["uncompressed", "lightkv", "lightkv-prompt", "lightkv-uniform"]
    assert len({plots.method_colour(m) for m in known}) == 4
    assert plots.method_colour("my-method") == plots.method_colour("my-method")


def test_synthetic_results_follow_the_results_schema(rich, cpu_results):
    # The fixtures are results files the reader accepts (docs/results-schema.md), the legacy one included.
    for res in (rich, cpu_results, _legacy_results()):
        assert check_schema(res, "synthetic") is res


# ------------------------------------------------------------------------------------------------ page structure

SECTION_ORDER = (
    "recommendation",
    "lead",
    "figures",
    "what-changed",
    "breakdowns",
    "runs",
    "capacity",
    "thresholds",
    "inputs",
    "skipped-inputs",
    "environment",
    "model",
    "about",
)


def _section_positions(html_text: str) -> dict[str, int]:
    return {m.group(1): m.start() for m in re.finditer(r'<section id="([a-z-]+)">', html_text)}


def _with_prompt_types(res: dict) -> dict:
    out = copy.deepcopy(res)
    out["inputs"][0]["type"] = "counting"
    out["inputs"][1]["type"] = "colour"
    out["inputs"][1]["tags"] = ["<tag>"]
    return out


def test_html_leads_with_the_decision_then_figures_then_tables(rich):
    page = render_html(_with_prompt_types(rich))
    pos = _section_positions(page)
    assert list(pos) == list(SECTION_ORDER)  # every section, in this order, once
    # the first image of the page is the full-width lead figure, inside the lead section
    lead = page[pos["lead"] : pos["figures"]]
    assert '<figure class="lead"><img src="data:image/png;base64,' in lead
    first_png = _pngs(page)[0]
    with Image.open(io.BytesIO(first_png)) as im:
        assert im.size == (round(plots.LEAD_FIGSIZE[0] * plots.DPI), round(plots.LEAD_FIGSIZE[1] * plots.DPI))
    assert first_png == plots.quality_vs_cost(rich)
    # the recommendation comes before any figure and carries the headline numbers of the recommended run
    rec = page[pos["recommendation"] : pos["lead"]]
    assert "data:image" not in rec and "Recommended: lightkv@0.5" in rec
    assert '<div class="tile-value">2.5 MiB</div>' in rec and "38% less than uncompressed" in rec
    # breakdowns by prompt type and tag
    bd = page[pos["breakdowns"] : pos["runs"]]
    assert "by type" in bd and "by tag" in bd and "&lt;tag&gt;" in bd and "<tag>" not in bd


def test_html_sections_without_prompt_types_and_without_runs(rich):
    pos = _section_positions(render_html(rich))
    assert list(pos) == [s for s in SECTION_ORDER if s != "breakdowns"]
    empty = render_html({"model": {"name": "m"}, "runs": []})
    assert "No plot: no finished compressed run" in empty and "No runs." in empty and "No inputs." in empty
    assert "breakdowns" not in _section_positions(empty)


def test_what_changed_gallery_shows_changed_answers_escaped(rich, rich_html):
    from lightkv_cli.report.changes import changed_inputs

    entries = changed_inputs(rich)["entries"]
    assert len(entries) >= 2 and {e["input"] for e in entries} == {"in0", "in1"}
    pos = _section_positions(rich_html)
    gallery = rich_html[pos["what-changed"] : pos["runs"]]
    assert gallery.count('<div class="card">') == len(entries)
    n_in0 = sum(e["input"] == "in0" for e in entries)  # in0's image exists, in1's does not
    assert gallery.count("data:image/jpeg;base64,") == n_in0
    assert gallery.count("image not available") == len(entries) - n_in0
    assert "<i>cat" not in gallery and "a &lt;i&gt;cat&lt;/i&gt;" in gallery  # uncompressed answer
    assert '<dd class="changed">a dog</dd>' in gallery and "<dt>ground truth</dt><dd>a cat</dd>" in gallery
    assert "&lt;script&gt;alert(1)&lt;/script&gt; What is shown?" in gallery


def test_html_has_no_script_and_no_remote_references(rich_html, cpu_html):
    for page in (rich_html, cpu_html, render_html(_legacy_results())):
        low = page.lower()
        assert "<script" not in low and "http://" not in low and "https://" not in low
        assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", page, re.IGNORECASE)
        assert page.count("<style>") == 1 and "@import" not in low and "url(" not in low


def test_user_text_is_never_unescaped_anywhere(rich):
    res = _with_prompt_types(rich)
    res["inputs"][1]["question"] = 'How "many"? \x07<b>bold</b> & more'
    page = render_html(res)
    raw = [
        SCRIPT_PROMPT,
        "a <i>cat</i>",
        "tiny<model>",
        "a<b>.jpg",
        "<b>bad</b>",
        "bad<x>.txt",
        "<huge>",
        "'<imgs>'",
        "<tag>",
        "<b>bold</b>",
    ]
    for s in raw:
        assert s not in page, s
    assert page.count("How &quot;many&quot;? &lt;b&gt;bold&lt;/b&gt; &amp; more") >= 2  # inputs table and gallery
    assert "\x07" not in page  # control characters dropped


def test_pareto_frontier_keeps_runs_no_other_beats_on_both():
    pts = [(4.0, 1.0, "u"), (2.5, 0.9, "a"), (2.5, 0.8, "b"), (1.75, 0.5, "c"), (3.0, 0.85, "d"), (1.75, 0.5, "c2")]
    assert [p[2] for p in plots.pareto_frontier(pts)] == ["c", "a", "u"]
    assert plots.pareto_frontier([]) == []


def test_quality_axes_fit_the_data_not_zero_to_one():
    from lightkv_cli.report.plot_base import fit_limits

    lo, hi = fit_limits([0.87, 0.93, 1.0, 0.95], pad=0.1, min_span=0.04, bounds=(0.0, 1.0))
    assert 0.85 < lo < 0.87 and 1.0 < hi < 1.02
    lo, hi = fit_limits([1.0, 1.0], pad=0.1, min_span=0.04, bounds=(0.0, 1.0))  # all perfect: widen downwards
    assert 0.95 < lo < 0.96 and 1.0 < hi < 1.01
    assert fit_limits([None, float("nan")]) is None


def test_markdown_leads_with_the_recommendation_and_lists_what_changed(rich):
    md = render_markdown(_with_prompt_types(rich))
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Recommendation", "## Runs", "## What changed", "## Breakdowns", "## Thresholds"]
    changed = md.split("## What changed", 1)[1].split("##", 1)[0]
    assert "- **lightkv@0.5** on in0 — \\<script\\>alert(1)\\</script\\> What is shown?" in changed
    assert "uncompressed “a \\<i\\>cat\\</i\\>” → compressed “a dog” (ground truth “a cat”)" in changed
    assert "data:image" not in md


def test_how_each_run_was_set_is_listed_in_both_reports(rich):
    res = copy.deepcopy(rich)
    runs = res["runs"]
    assert len(runs) >= 2
    runs[1].setdefault("params", {})["schedule_note"] = "DART keeps 4 + 8·TOPK tokens, so 44 is the nearest <b>"
    md, html = render_markdown(res), render_html(res)
    expect = f"- {runs[1]['id']}: DART keeps 4 + 8·TOPK tokens, so 44 is the nearest"
    assert expect in md and "How each run was set" in md
    assert "so 44 is the nearest &lt;b&gt;" in html and "How each run was set" in html
    for r in runs:
        (r.get("params") or {}).pop("schedule_note", None)
    assert "How each run was set" not in render_markdown(res) and "How each run was set" not in render_html(res)
