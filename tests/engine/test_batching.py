"""The measurement engine's two passes: batches of inputs (grouping, left padding), batched quality equal to
batch 1 on every tiny family, the interleaved timing pass with paired ratios, and its resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLE_IMAGES
from tiny_families import ALL_FAMILIES, load

from lightkv_cli.engine.batching import (
    batch_key,
    collate,
    pad_token_id,
    plan_batches,
    timing_sample,
    timing_units,
)
from lightkv_cli.engine.plan import SweepSettings
from lightkv_cli.engine.prepare import prepare_inputs
from lightkv_cli.engine.sweep import Sweep
from lightkv_cli.inputs import PromptItem, collect_images
from lightkv_cli.measure.paired import median_interval, pair_ratios, paired_ratio
from lightkv_cli.results import load_results


def _fake(n_vis: int, seq: int, pixels=(3, 4, 4)) -> SimpleNamespace:
    ids = torch.arange(seq).view(1, seq) + 10
    return SimpleNamespace(
        vision_tokens=n_vis,
        tensors={
            "input_ids": ids,
            "attention_mask": torch.ones(1, seq, dtype=torch.long),
            "pixel_values": torch.full((1, *pixels), float(seq)),
        },
    )


def test_collate_left_pads_per_token_tensors_and_stacks_the_rest():
    inputs = [_fake(4, 6), _fake(4, 9), _fake(4, 7)]
    batch = collate(inputs, [0, 1, 2], pad_token_id=0)
    assert batch.pads == (3, 0, 2) and batch.size == 3
    ids, mask = batch.tensors["input_ids"], batch.tensors["attention_mask"]
    assert ids.shape == mask.shape == (3, 9)
    assert mask.sum(dim=1).tolist() == [6, 9, 7]
    assert mask[0, :3].tolist() == [0, 0, 0] and ids[0, :3].tolist() == [0, 0, 0]
    assert torch.equal(ids[0, 3:], inputs[0].tensors["input_ids"][0])  # the prompt ends at the last position
    assert batch.tensors["pixel_values"].shape == (3, 3, 4, 4)
    assert batch.tensors["pixel_values"][:, 0, 0, 0].tolist() == [6.0, 9.0, 7.0]
    with pytest.raises(ValueError, match="share"):
        collate([_fake(4, 6), _fake(5, 6)], [0, 1], pad_token_id=0)


def test_batches_group_by_vision_count_and_visual_shape():
    inputs = [_fake(4, 6), _fake(8, 6), _fake(4, 7), _fake(4, 8, pixels=(5, 3, 4, 4)), _fake(4, 9)]
    assert batch_key(inputs[0]) == batch_key(inputs[2]) != batch_key(inputs[3])
    assert plan_batches(inputs, 2) == [[0, 2], [4], [1], [3]]
    assert plan_batches(inputs, 1) == [[0], [2], [4], [1], [3]]
    with pytest.raises(ValueError):
        plan_batches(inputs, 0)


def test_pad_token_is_never_a_vision_token():
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2), [4]) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=4, eos_token_id=2), [4]) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None), [0, 1]) == 2


def test_timing_sample_spreads_over_groups_deterministically():
    # six inputs with 4 vision tokens, two with 8: round-robin gives each group 2 of 4 picks,
    # evenly spaced through the group (positions 0 and 3 of the six)
    inputs = [_fake(4, 6 + i) for i in range(6)] + [_fake(8, 6), _fake(8, 7)]
    assert timing_sample(inputs, 4) == [0, 3, 6, 7]
    assert timing_sample(inputs, 3) == [0, 3, 6]
    assert timing_sample(inputs, None) == timing_sample(inputs, 99) == list(range(8))
    # batches of a timing batch size: by group, the short group filled by repeating its inputs
    assert timing_units(inputs, [0, 3, 6], 2) == [[0, 3], [6, 6]]
    assert timing_units(inputs, [0, 3, 6], 1) == [[0], [3], [6]]


def test_paired_ratio_median_and_interval():
    assert pair_ratios([[2.0, 4.0], [3.0, None]], [[1.0, 2.0], [2.0, 1.0]]) == [2.0, 2.0, 1.5]
    got = median_interval([1.0, 2.0, 3.0, 4.0, 100.0])
    assert got.median == 3.0 and got.n == 5 and 1.0 <= got.low <= got.median <= got.high <= 100.0
    assert median_interval([1.1, 1.1]).to_dict() == {"median": 1.1, "low": 1.1, "high": 1.1, "n": 2}
    assert paired_ratio([[None]], [[1.0]]) is None
    with pytest.raises(ValueError):
        pair_ratios([[1.0]], [])


def _inputs(lm, pairs):
    """Prepared inputs for ``(question, sample image name)`` pairs (an image may be asked several questions)."""
    images, _, _ = collect_images(sorted({SAMPLE_IMAGES / name for _, name in pairs}))
    by_name = {im.path.name: im for im in images}
    chosen = [by_name[name] for _, name in pairs]
    items = [
        PromptItem(image=im.path, question=q, answer=None, line=i + 1)
        for i, (im, (q, _)) in enumerate(zip(chosen, pairs))
    ]
    return prepare_inputs(lm, chosen, items)


COMPARED = ("answer", "generated_tokens", "kv_bytes", "kv_bytes_vision", "vision_retention", "flops_prefill")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_quality_pass_equals_batch_one(family):
    """Left-padded batches give every input exactly what it gets alone: the same greedy tokens, KV bytes,
    retention, FLOPs and token maps, and first-token logits to float32 rounding (the tiny models, float32)."""
    lm = load(family)
    inputs = _inputs(
        lm,
        [
            ("Describe this image.", "skimage_chelsea.png"),
            ("What animal is in this picture, and what colour is its fur?", "skimage_chelsea.png"),
            ("What is on the table?", "skimage_coffee.png"),
            ("Is there a cup?", "skimage_chelsea.png"),
        ],
    )
    methods = ["lightkv", "fastv", "random", "vlcache", "snapkv", "divprune", "downsample"]
    # 0.45, not 0.5: at 0.5 FastV's 71st and 72nd scores of tiny-qwen2-vl's first input tie exactly in float32
    # (torch 2.14), so one ulp of batched rounding decides which is kept; an exact tie is no decision to compare
    common = dict(methods=methods, retentions=[1.0, 0.45], max_new_tokens=4, repeats=1, warmup=0, timing_inputs=1)
    alone = Sweep(lm, inputs, SweepSettings(batch_size=1, **common)).run()
    batched = Sweep(lm, inputs, SweepSettings(batch_size=3, **common)).run()
    assert batched["quality_pass"]["batch_size"] == 3
    assert [r["id"] for r in alone["runs"]] == [r["id"] for r in batched["runs"]]
    for a, b in zip(alone["runs"], batched["runs"]):
        assert a["status"] == b["status"] == "ok", (family, a["id"], a.get("error"), b.get("error"))
        for pa, pb in zip(a["per_input"], b["per_input"]):
            for key in COMPARED:
                assert pa[key] == pb[key], (family, a["id"], pa["input"], key)
            assert pa.get("token_map") == pb.get("token_map"), (family, a["id"], pa["input"])
            assert pa.get("per_image_retention") == pytest.approx(pb.get("per_image_retention"), abs=1e-12)
            kl_a, kl_b = pa["quality"]["first_token_kl"], pb["quality"]["first_token_kl"]
            assert kl_a == pytest.approx(kl_b, abs=1e-5), (family, a["id"], pa["input"])
        assert a["kv_bytes_per_layer"] == b["kv_bytes_per_layer"]


def test_timing_pass_interleaves_runs_and_pairs_ratios(tiny, tmp_path):
    inputs = _inputs(tiny, [("Describe this image.", "skimage_chelsea.png"), ("Any cats?", "skimage_coins.png")])
    settings = SweepSettings(
        methods=["lightkv", "random"],
        retentions=[1.0, 0.5],
        max_new_tokens=3,
        repeats=2,
        warmup=1,
        timing_batches=[1, 2],
        seed=5,
    )
    path = tmp_path / "results.json"
    results = Sweep(tiny, inputs, settings, results_path=path).run()
    assert load_results(path) == json.loads(json.dumps(results))
    tp = results["timing_pass"]
    ids = [r["id"] for r in results["runs"]]
    assert tp["rounds_done"] == 2 and tp["batch_sizes"] == [1, 2] and tp["inputs"] == [i.id for i in inputs]
    assert [sorted(o) for o in tp["order"]] == [sorted(ids)] * 2  # every run once per round
    again = Sweep(tiny, inputs, settings)
    assert again.results["timing_pass"]["order"] == []
    again.run()
    assert again.results["timing_pass"]["order"] == tp["order"]  # the order is seeded
    for run in results["runs"]:
        one, two = run["timing"]["batches"]
        assert one["batch_size"] == 1 and one["units"] == [[inputs[0].id], [inputs[1].id]]
        assert two["batch_size"] == 2 and two["units"] == [[inputs[0].id, inputs[1].id]]
        assert [len(x) for x in one["samples"]["prefill_ms"]] == [2, 2]  # [input][round]
        assert [len(x) for x in two["samples"]["prefill_ms"]] == [2]
        assert run["prefill_ms"] == one["prefill_ms"] and run["prefill_ms"]["n"] == 4
        assert two["tokens_per_s"] == pytest.approx(2000.0 / two["decode_ms_per_token"]["median"])
        for p, prefill in zip(run["per_input"], one["samples"]["prefill_ms"]):
            assert p["prefill_ms"] == pytest.approx(sorted(prefill)[0] / 2 + sorted(prefill)[1] / 2)
        if run["method"] == "uncompressed":
            assert run["timing_ratio"] is None and one["ratio"] is None
            continue
        base = results["runs"][0]["timing"]["batches"][0]["samples"]["prefill_ms"]
        pairs = sorted(m / b for mine, ref in zip(one["samples"]["prefill_ms"], base) for m, b in zip(mine, ref))
        r = run["timing_ratio"]["prefill"]
        assert r["n"] == 4 and r["median"] == pytest.approx((pairs[1] + pairs[2]) / 2)
        assert r["low"] <= r["median"] <= r["high"]
        assert set(two["ratio"]) == {"prefill", "time_to_first_token", "decode_ms_per_token"}


def test_timing_pass_resumes_at_its_next_round(tiny, tmp_path):
    inputs = _inputs(tiny, [("Describe this image.", "skimage_chelsea.png"), ("Any cats?", "skimage_coins.png")])
    settings = SweepSettings(retentions=[1.0, 0.5], max_new_tokens=2, repeats=3, warmup=0)
    path = tmp_path / "results.json"
    timed = []

    def stop_in_second_round(phase, run_id, n):
        if phase == "timing":
            timed.append(run_id)
            if len(timed) == 2 * 2 + 1:  # two runs × two inputs per round: the second round's first input
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Sweep(tiny, inputs, settings, results_path=path, on_progress=stop_in_second_round).run()
    partial = load_results(path)
    assert partial["timing_pass"]["rounds_done"] == 1 and partial["complete"] is False
    first_round = {r["id"]: r["timing"]["batches"][0]["samples"]["prefill_ms"] for r in partial["runs"]}
    assert all(len(x) == 1 for s in first_round.values() for x in s)
    seen = []
    resumed = Sweep(
        tiny, inputs, settings, results_path=path, previous=partial, on_progress=lambda p, r, n: seen.append(p)
    )
    assert resumed.pending == [] and resumed.total_steps == 0
    final = resumed.run()
    assert seen == ["timing"] * (2 * 2 * 2)  # rounds 2 and 3 only; no quality pass to redo
    assert final["timing_pass"]["rounds_done"] == 3 and len(final["timing_pass"]["order"]) == 3
    assert final["timing_pass"]["order"][0] == partial["timing_pass"]["order"][0]
    for r in final["runs"]:
        samples = r["timing"]["batches"][0]["samples"]["prefill_ms"]
        assert [x[:1] for x in samples] == first_round[r["id"]] and all(len(x) == 3 for x in samples)
