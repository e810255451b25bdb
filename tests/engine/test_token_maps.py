"""Token maps in a sweep: which vision tokens each method kept, recorded compactly per input.

Counts are checked exactly against what the sweep measured from the cache (per-input vision retention,
vision tokens of the last layer), so a map that disagrees with the run it illustrates fails.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_IMAGES

from lightkv_cli.engine.plan import SweepSettings
from lightkv_cli.engine.prepare import prepare_inputs
from lightkv_cli.engine.sweep import Sweep
from lightkv_cli.engine.token_maps import (
    PromptFates,
    first_grid,
    layout_by_forward,
    map_inputs,
    prompt_fates,
    token_map,
)
from lightkv_cli.inputs import PromptItem, collect_images
from lightkv_cli.methods.records import EvictionRecord, PrefillRecord, StageRecord

FAST = dict(max_new_tokens=3, repeats=1, warmup=0)
NAMES = ("skimage_chelsea.png", "skimage_coins.png", "skimage_coffee.png")


@pytest.fixture(scope="module")
def three_inputs(tiny):
    images, _, _ = collect_images([SAMPLE_IMAGES / n for n in NAMES])
    items = [PromptItem(image=im.path, question="Describe this image.", answer=None, line=0) for im in images]
    return prepare_inputs(tiny, images, items)


@pytest.fixture(scope="module")
def results(tiny, three_inputs):
    settings = SweepSettings(methods=["lightkv", "random", "fastv", "snapkv"], retentions=[1.0, 0.5], **FAST)
    return json.loads(json.dumps(Sweep(tiny, three_inputs, settings).run()))


def _cached_vision(tmap: dict, layers: list[int], num_layers: int) -> list[int]:
    """Vision tokens each decoder layer caches according to the map: stage s runs after ``layers[s-1]``."""
    out = []
    for lay in range(num_layers):
        done = sum(1 for s_layer in layers if s_layer < lay)
        out.append(sum(1 for s in tmap["stage"] if s == 0 or s > done))
    return out


def test_every_compressed_run_maps_its_first_inputs(results):
    runs = {r["id"]: r for r in results["runs"]}
    assert set(runs) == {"uncompressed", "lightkv@0.5", "random@0.5", "fastv@0.5", "snapkv@0.5"}
    assert all(r["status"] == "ok" for r in runs.values()), [r.get("error") for r in runs.values()]
    assert not any("token_map" in p for p in runs["uncompressed"]["per_input"])
    kinds = {"lightkv@0.5": "merge", "random@0.5": "drop", "fastv@0.5": "drop", "snapkv@0.5": "evict"}
    for rid, kind in kinds.items():
        maps = [p.get("token_map") for p in runs[rid]["per_input"]]
        assert all(m is not None for m in maps), rid  # 3 inputs < the first 4: every input has one
        assert len(maps) <= 8
        for m in maps:
            assert m["grid"] == [24, 24] and m["kind"] == kind
            cells = 24 * 24
            assert len(m["stage" if kind != "evict" else "kept_share"]) == cells
            assert ("group" in m) == (kind == "merge")


@pytest.mark.parametrize("rid", ["lightkv@0.5", "random@0.5", "fastv@0.5"])
def test_stage_counts_equal_the_measured_cache(results, rid):
    run = next(r for r in results["runs"] if r["id"] == rid)
    L = results["model"]["layers"]
    params = run["params"]
    if "layers" in params:  # LightKV's schedule (RandomDrop shares it): stages where the ratio is not 0
        layers = [lay for lay, r in zip(params["layers"], params["ratios"]) if r > 0]
    else:  # FastV drops after layer K − 1
        layers = [params["layer"] - 1]
    for p in run["per_input"]:
        m = p["token_map"]
        assert m["stages"] == len(layers) and max(m["stage"]) == len(layers)
        kept = sum(1 for s in m["stage"] if s == 0)
        # one image, no special tokens: the grid is all of the vision tokens
        assert kept == run["vision_tokens_per_layer"][-1]
        per_layer = _cached_vision(m, layers, L)
        assert per_layer[0] == 576
        assert sum(per_layer) / (L * 576) == pytest.approx(p["vision_retention"], abs=1e-12)
        if m["kind"] == "merge":
            group = m["group"]
            merged = [i for i, g in enumerate(group) if g >= 0]
            assert len(merged) == 576 - kept  # LightKV only merges
            assert all(m["stage"][group[i]] == 0 and group[group[i]] == -1 for i in merged)
            assert all(group[i] == -1 for i, s in enumerate(m["stage"]) if s == 0)


def test_eviction_kept_share_is_the_measured_retention(results):
    run = next(r for r in results["runs"] if r["id"] == "snapkv@0.5")
    for p in run["per_input"]:
        share = p["token_map"]["kept_share"]
        assert all(0.0 <= x <= 1.0 for x in share)
        assert min(share) < 1.0
        assert sum(share) / len(share) == pytest.approx(p["vision_retention"], abs=1e-3)


def test_map_inputs_first_four_then_changed_answers():
    kinds = ["image"] * 12
    kinds[1] = "video"
    em = [0.0] * 12
    em[6] = 1.0
    assert map_inputs(kinds, em) == [0, 2, 3, 4, 5, 7, 8, 9]
    assert map_inputs(kinds, [1.0] * 12) == [0, 2, 3, 4]
    assert map_inputs(["video", "image"], [0.0, None]) == [1]


def test_records_without_the_information_give_no_map():
    assert prompt_fates(None) is None
    assert prompt_fates(object()) is None
    bad = PrefillRecord(seq_len=10, vision_tokens=4, num_layers=2, stages=[StageRecord(0, 10, 8, 4, 2)])
    assert prompt_fates(bad) is None  # a stage without kept indices


def test_merge_chains_and_eviction_shares_on_hand_made_records():
    # prompt: 2 text tokens then a 2×2 grid at positions 2..5; stage 1 merges 3→2, stage 2 merges 2→4
    s1 = StageRecord(0, 6, 5, 4, 3, merge_pairs=[torch.tensor([[3, 2]])])
    s2 = StageRecord(1, 5, 4, 3, 2, merge_pairs=[torch.tensor([[2, 4]])])
    rec = PrefillRecord(
        seq_len=6,
        vision_tokens=4,
        num_layers=3,
        stages=[s1, s2],
        kept_index=[torch.tensor([[0, 1, 2, 4, 5]]), torch.tensor([[0, 1, 4, 5]])],
    )
    fates = prompt_fates(rec)
    from lightkv_cli.engine.token_maps import GridCells

    grid = GridCells(rows=2, cols=2, positions=torch.tensor([2, 3, 4, 5]))
    m = token_map(fates, grid)
    assert m == {"grid": [2, 2], "kind": "merge", "stages": 2, "stage": [2, 1, 0, 0], "group": [2, 2, -1, -1]}
    ev = EvictionRecord(
        seq_len=6,
        vision_tokens=4,
        num_layers=2,
        budgets=[3, 3],
        layer_vision_tokens=[2.0, 1.5],
        kept_index=[torch.tensor([[[1, 2, 3], [2, 4, 5]]]), torch.tensor([[[0, 1, 2], [1, 2, 5]]])],
    )
    m = token_map(prompt_fates(ev), grid)
    assert m == {"grid": [2, 2], "kind": "evict", "kept_share": [1.0, 0.25, 0.25, 0.5]}
    assert isinstance(prompt_fates(ev), PromptFates)


def test_first_grid_by_forward_equals_the_ids_layout(tiny, three_inputs):
    inp = three_inputs[0]
    grid = first_grid(tiny.adapter, tiny.model, inp.tensors)
    ids = inp.tensors["input_ids"][0]
    vis = torch.nonzero(torch.isin(ids, torch.tensor(tiny.adapter.vision_token_ids())), as_tuple=False).flatten()
    assert (grid.rows, grid.cols) == (24, 24) and torch.equal(grid.positions, vis)
    mask = torch.ones_like(inp.tensors["input_ids"])
    layouts = layout_by_forward(
        tiny.adapter, tiny.model, inp.tensors, mask, tiny.adapter.prefill_position_ids(inp.tensors, mask)
    )
    assert torch.equal(layouts[0].positions, vis) and layouts[0].grids == [(24, 24)]
