"""The profiler: run planning, recommendation, results written as runs finish, failures recorded."""

from __future__ import annotations

import json

import pytest
import torch

from lightkv_cli.errors import UserError
from lightkv_cli.inputs import PromptItem, collect_images
from lightkv_cli.profiler import ProfileSettings, Profiler, plan_runs, prepare_inputs, recommend

from conftest import SAMPLE_IMAGES

FAST = dict(max_new_tokens=3, repeats=1, warmup=0)


@pytest.fixture(scope="module")
def two_inputs(tiny):
    images, _, _ = collect_images([SAMPLE_IMAGES / "skimage_chelsea.png", SAMPLE_IMAGES / "skimage_coins.png"])
    items = [PromptItem(image=im.path, question="Describe this image.", answer=None, line=0) for im in images]
    return prepare_inputs(tiny, images, items)


def _run(ident, method, r, match, top1, kv=1.0):
    return {"id": ident, "method": method, "status": "ok", "target_retention": r, "vision_retention": r,
            "kv_bytes": kv * r, "kv_bytes_vision": kv * r, "quality": {"answer_match": match, "top1_agreement": top1}}


def test_recommend_picks_lowest_retention_meeting_both_thresholds():
    runs = [
        _run("uncompressed", "uncompressed", 1.0, 1.0, 1.0),
        _run("lightkv@0.9", "lightkv", 0.9, 1.0, 1.0),
        _run("lightkv@0.75", "lightkv", 0.75, 0.96, 0.97),
        _run("lightkv@0.55", "lightkv", 0.55, 0.99, 0.90),  # top-1 below threshold
        _run("lightkv@0.4", "lightkv", 0.4, 0.5, 0.5),
    ]
    rec = recommend(runs, 0.95)
    assert rec["run"] == "lightkv@0.75" and rec["vision_retention"] == 0.75
    assert recommend(runs, 0.8)["run"] == "lightkv@0.55"


def test_recommend_falls_back_to_uncompressed_and_says_why():
    runs = [_run("uncompressed", "uncompressed", 1.0, 1.0, 1.0), _run("lightkv@0.9", "lightkv", 0.9, 0.8, 0.99),
            {"id": "lightkv@0.5", "method": "lightkv", "status": "oom", "target_retention": 0.5}]
    rec = recommend(runs, 0.95)
    assert rec["run"] == "uncompressed"
    assert "lightkv@0.9" in rec["reason"] and "0.80" in rec["reason"]


def test_plan_runs(tiny):
    runs = plan_runs(tiny, ProfileSettings(retentions=[1.0, 0.5, 0.9, 0.5]))
    assert [r.id for r in runs] == ["uncompressed", "lightkv@0.9", "lightkv@0.5"]
    assert runs[0].press is None
    assert abs(runs[2].press.expected_retention - 0.5) < 0.02
    with pytest.raises(UserError):
        plan_runs(tiny, ProfileSettings(retentions=[1.2]))


def test_results_written_after_every_run_and_valid(tiny, two_inputs, tmp_path):
    path = tmp_path / "results.json"
    seen_on_disk = []

    def on_progress(run_id, input_id):
        if path.exists():
            seen_on_disk.append(len(json.loads(path.read_text())["runs"]))

    settings = ProfileSettings(retentions=[1.0, 0.6], **FAST)
    results = Profiler(tiny, two_inputs, settings, results_path=path, on_progress=on_progress).run()
    assert seen_on_disk == [1, 1]  # during the second run, the first is already saved
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["complete"] is True
    base, comp = on_disk["runs"]
    assert base["vision_retention"] == 1.0
    assert comp["vision_retention"] == pytest.approx(comp["expected_retention"], abs=1e-12)
    assert comp["kv_vision_ratio"] == pytest.approx(comp["vision_retention"], abs=1e-12)
    L = on_disk["model"]["layers"]
    assert len(comp["kv_bytes_per_layer"]) == len(comp["vision_tokens_per_layer"]) == L
    assert comp["vision_tokens_per_layer"][0] == 576 and min(comp["vision_tokens_per_layer"]) < 576
    assert comp["prefill_ms"]["n"] == 2 and comp["decode_ms_per_token"]["n"] >= 2
    assert [p["input"] for p in comp["per_input"]] == ["skimage_chelsea.png", "skimage_coins.png"]
    assert base["quality"]["answer_match"] == 1.0 and base["quality"]["first_token_kl_max"] == 0.0


def test_out_of_memory_in_one_run_is_recorded_and_the_profile_goes_on(tiny, two_inputs, tmp_path, monkeypatch):
    import lightkv_cli.profiler as prof

    real = prof.greedy_generate

    def flaky(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=None):
        if press is not None and abs(press.expected_retention - 0.75) < 0.05:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, inputs, vision_tokens, max_new_tokens, eos_token_id, press=press)

    monkeypatch.setattr(prof, "greedy_generate", flaky)
    settings = ProfileSettings(retentions=[1.0, 0.75, 0.5], **FAST)
    results = Profiler(tiny, two_inputs, settings, results_path=tmp_path / "r.json").run()
    status = {r["id"]: r["status"] for r in results["runs"]}
    assert status == {"uncompressed": "ok", "lightkv@0.75": "oom", "lightkv@0.5": "ok"}
    assert "out of memory" in results["runs"][1]["error"]
    assert results["complete"] is True and results["recommendation"]["run"] is not None


def test_interrupt_keeps_finished_runs(tiny, two_inputs, tmp_path):
    path = tmp_path / "results.json"
    calls = []

    def on_progress(run_id, input_id):
        calls.append(run_id)
        if run_id == "lightkv@0.6":
            raise KeyboardInterrupt

    settings = ProfileSettings(retentions=[1.0, 0.6], **FAST)
    with pytest.raises(KeyboardInterrupt):
        Profiler(tiny, two_inputs, settings, results_path=path, on_progress=on_progress).run()
    saved = json.loads(path.read_text())
    assert [r["id"] for r in saved["runs"]] == ["uncompressed"]
    assert saved["complete"] is False


def test_results_file_is_strict_json_even_with_infinite_kl(tmp_path):
    from lightkv_cli.profiler import write_json_atomic

    path = tmp_path / "r.json"
    write_json_atomic(path, {"kl": float("inf"), "runs": [{"x": float("nan"), "y": 1.5}]})
    assert json.loads(path.read_text()) == {"kl": None, "runs": [{"x": None, "y": 1.5}]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
