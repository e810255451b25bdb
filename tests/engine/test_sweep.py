"""The sweep engine: the grid, results written as runs finish, resume, failures recorded, capacity."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_IMAGES

from lightkv_cli.engine.plan import SweepSettings, plan_runs
from lightkv_cli.engine.prepare import prepare_inputs
from lightkv_cli.engine.sweep import Sweep
from lightkv_cli.errors import UserError
from lightkv_cli.inputs import PromptItem, collect_images
from lightkv_cli.measure.costs import kv_bytes_per_token
from lightkv_cli.methods.schedule import Schedule
from lightkv_cli.results import load_results, write_json_atomic

FAST = dict(max_new_tokens=3, repeats=1, warmup=0)
#: Fields of a run that do not depend on timing or on the machine's memory.
DETERMINISTIC = (
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
    "flops_prefill",
    "flops_ratio",
    "kv_ratio",
    "quality",
)


@pytest.fixture(scope="module")
def two_inputs(tiny):
    images, _, _ = collect_images([SAMPLE_IMAGES / "skimage_chelsea.png", SAMPLE_IMAGES / "skimage_coins.png"])
    items = [PromptItem(image=im.path, question="Describe this image.", answer=None, line=0) for im in images]
    return prepare_inputs(tiny, images, items)


def test_plan_runs_grid(tiny):
    sched = Schedule.build([4, 8], [2, 1], [0.5])
    runs = plan_runs(
        tiny, SweepSettings(methods=["lightkv", "lightkv-uniform"], retentions=[1.0, 0.5, 0.9, 0.5], schedules=[sched])
    )
    assert [r.id for r in runs] == [
        "uncompressed",
        "lightkv@0.9",
        "lightkv@0.5",
        "lightkv[L4-8/W2-1/r0.5-0.5]",
        "lightkv-uniform@0.9",
        "lightkv-uniform@0.5",
        "lightkv-uniform[L4-8/W2-1/r0.5-0.5]",
    ]
    assert runs[0].press is None and runs[4].press.guidance == "uniform" and runs[1].press.guidance == "cross"
    assert runs[3].target_retention is None and runs[3].press.layers == [4, 8]
    assert abs(runs[2].press.expected_retention - 0.5) < 0.02
    with pytest.raises(UserError):
        plan_runs(tiny, SweepSettings(retentions=[1.2]))
    with pytest.raises(UserError, match="16 decoder layers"):
        plan_runs(tiny, SweepSettings(schedules=[Schedule.build([12, 18, 24], [4, 2, 1], [0.5])]))


def test_results_written_after_every_run_and_valid(tiny, two_inputs, tmp_path):
    path = tmp_path / "results.json"
    seen_on_disk = []

    def on_progress(phase, run_id, inputs):
        if phase == "quality" and path.exists():
            seen_on_disk.append(len(json.loads(path.read_text())["runs"]))

    settings = SweepSettings(retentions=[1.0, 0.6], memory_budget=2**30, memory_source="test", **FAST)
    results = Sweep(tiny, two_inputs, settings, results_path=path, on_progress=on_progress).run()
    assert seen_on_disk == [1]  # during the second run (one batch of both inputs), the first is already saved
    on_disk = load_results(path)
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["complete"] is True and on_disk["inputs_fingerprint"].startswith("sha256:")
    base, comp = on_disk["runs"]
    assert base["vision_retention"] == 1.0
    assert comp["vision_retention"] == pytest.approx(comp["expected_retention"], abs=1e-12)
    assert comp["kv_vision_ratio"] == pytest.approx(comp["vision_retention"], abs=1e-12)
    L = on_disk["model"]["layers"]
    assert len(comp["kv_bytes_per_layer"]) == len(comp["vision_tokens_per_layer"]) == L
    assert comp["vision_tokens_per_layer"][0] == 576 and min(comp["vision_tokens_per_layer"]) < 576
    assert comp["prefill_ms"]["n"] == 2 and comp["decode_ms_per_token"]["n"] >= 2
    # Time to first token = preprocessing + prefill, per input.
    pre = sorted(i["preprocess_ms"] for i in on_disk["inputs"])
    assert comp["time_to_first_token_ms"]["min"] >= comp["prefill_ms"]["min"] + pre[0] - 1e-6
    assert [p["input"] for p in comp["per_input"]] == ["skimage_chelsea.png", "skimage_coins.png"]
    assert base["quality"]["answer_match"] == 1.0 and base["quality"]["first_token_kl_max"] == 0.0
    # Wilson interval of 2 of 2: lower bound n / (n + z²) = 2 / (2 + 1.95996²)
    assert base["quality"]["ci"]["answer_match"] == pytest.approx([2 / (2 + 1.959964**2), 1.0], abs=1e-4)
    # CPU: NVML is not sampled, and says so.
    assert comp["nvml"]["available"] is False and "CPU" in comp["nvml"]["note"]
    assert on_disk["environment"]["nvml"]["available"] is False
    # Capacity: (budget − weights) // (prefill KV + max_new_tokens tokens of KV), exactly.
    per_token = kv_bytes_per_token(tiny.adapter.text_config, tiny.dtype) * L
    for r in (base, comp):
        cap = r["capacity"]
        assert cap["kv_bytes_per_request"] == pytest.approx(r["kv_bytes"] + 3 * per_token)
        assert cap["max_concurrent_requests"] == int(
            (2**30 - on_disk["model"]["weight_bytes"]) // cap["kv_bytes_per_request"]
        )
    assert comp["capacity"]["ratio_vs_uncompressed"] == pytest.approx(
        comp["capacity"]["max_concurrent_requests"] / base["capacity"]["max_concurrent_requests"]
    )
    assert comp["capacity"]["ratio_vs_uncompressed"] > 1.0
    assert on_disk["capacity"] == {
        "memory_bytes": 2**30,
        "source": "test",
        "weight_bytes": on_disk["model"]["weight_bytes"],
    }


def test_out_of_memory_in_one_run_is_recorded_and_the_sweep_goes_on(tiny, two_inputs, tmp_path, monkeypatch):
    import lightkv_cli.engine.sweep as prof

    real = prof.greedy_generate

    def flaky(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=None, **kw):
        if press is not None and abs(press.expected_retention - 0.75) < 0.05:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=press, **kw)

    monkeypatch.setattr(prof, "greedy_generate", flaky)
    settings = SweepSettings(retentions=[1.0, 0.75, 0.5], **FAST)
    results = Sweep(tiny, two_inputs, settings, results_path=tmp_path / "r.json").run()
    status = {r["id"]: r["status"] for r in results["runs"]}
    assert status == {"uncompressed": "ok", "lightkv@0.75": "oom", "lightkv@0.5": "ok"}
    assert "out of memory" in results["runs"][1]["error"]
    assert results["complete"] is True and results["recommendation"]["run"] is not None


def test_interrupt_then_resume_equals_an_uninterrupted_sweep(tiny, two_inputs, tmp_path):
    settings = SweepSettings(methods=["lightkv", "lightkv-uniform"], retentions=[0.7, 0.5], **FAST)
    whole = Sweep(tiny, two_inputs, settings).run()

    path = tmp_path / "results.json"

    def stop_in_third_run(phase, run_id, inputs):
        if run_id == "lightkv-uniform@0.7":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Sweep(tiny, two_inputs, settings, results_path=path, on_progress=stop_in_third_run).run()
    partial = load_results(path)
    assert [r["id"] for r in partial["runs"]] == ["uncompressed", "lightkv@0.7", "lightkv@0.5"]
    assert partial["complete"] is False

    seen = []
    resumed = Sweep(
        tiny,
        two_inputs,
        settings,
        results_path=path,
        previous=partial,
        on_progress=lambda phase, run, n: seen.append((phase, run)),
    )
    assert resumed.resumed == ["uncompressed", "lightkv@0.7", "lightkv@0.5"]
    assert [s.id for s in resumed.pending] == ["lightkv-uniform@0.7", "lightkv-uniform@0.5"]
    assert resumed.total_steps == 3 * 2  # the reference is recomputed (not recorded) for scoring
    final = resumed.run()
    quality = [run for phase, run in seen if phase == "quality"]
    assert quality == ["uncompressed", "lightkv-uniform@0.7", "lightkv-uniform@0.5"]  # one batch of 2 each
    # the timing pass (not started before the interruption) visits every run once in its one round, and times
    # each of the two inputs at batch 1
    timed = [run for phase, run in seen if phase == "timing"]
    assert sorted(timed) == sorted(r["id"] for r in whole["runs"] for _ in range(2))
    assert final["complete"] is True and load_results(path)["complete"] is True
    assert [r["id"] for r in final["runs"]] == [r["id"] for r in whole["runs"]]
    for a, b in zip(final["runs"], whole["runs"]):
        for key in DETERMINISTIC:
            assert json.dumps(a.get(key), sort_keys=True) == json.dumps(b.get(key), sort_keys=True), (a["id"], key)
    assert final["recommendation"]["run"] == whole["recommendation"]["run"]


def test_resume_refuses_other_inputs_or_settings(tiny, two_inputs):
    settings = SweepSettings(retentions=[0.6], **FAST)
    previous = Sweep(tiny, two_inputs, settings).results
    with pytest.raises(UserError, match="other images or prompts"):
        Sweep(tiny, two_inputs[:1], settings, previous=previous)
    with pytest.raises(UserError, match="max_new_tokens"):
        Sweep(
            tiny, two_inputs, SweepSettings(retentions=[0.6], max_new_tokens=5, repeats=1, warmup=0), previous=previous
        )


def test_results_file_is_strict_json_even_with_infinite_kl(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"kl": float("inf"), "runs": [{"x": float("nan"), "y": 1.5}]})
    assert json.loads(path.read_text()) == {"kl": None, "runs": [{"x": None, "y": 1.5}]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_load_results_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"schema": "lightkv.results/3", "runs": []}))
    with pytest.raises(UserError, match="newer than this lightkv"):
        load_results(p)
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a lightkv results file"):
        load_results(p)
    p.write_text('{"schema": "lightkv.results/1", "runs": [')
    with pytest.raises(UserError, match="not valid JSON"):
        load_results(p)
    with pytest.raises(UserError, match="does not exist"):
        load_results(tmp_path / "missing.json")
