"""Windowing and bipartite matching on synthetic grids (no model)."""

from __future__ import annotations

import pytest
import torch

from lightkv_cli.methods.merging import bands, bipartite_plan, merges_per_window, simulate_counts, window_ids


def _grid(rows, cols):
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return torch.stack([r, c], 1)


@pytest.mark.parametrize("rows,cols,W", [(5, 7, 3), (24, 24, 4), (7, 3, 2), (2, 9, 4), (13, 17, 6), (1, 1, 1)])
def test_windows_cover_a_non_square_grid_exactly_once(rows, cols, W):
    coords = _grid(rows, cols)
    wid = window_ids(coords, torch.zeros(rows * cols, dtype=torch.long), [(rows, cols)], W)
    assert wid.shape == (rows * cols,)
    assert int(wid.min()) >= 0 and int(wid.max()) < W * W  # each token in exactly one window
    for w in torch.unique(wid).tolist():
        cells = coords[wid == w]
        r0, r1 = int(cells[:, 0].min()), int(cells[:, 0].max())
        c0, c1 = int(cells[:, 1].min()), int(cells[:, 1].max())
        # a window is a full rectangle of the grid (a block), never a folded fake square
        assert cells.shape[0] == (r1 - r0 + 1) * (c1 - c0 + 1)
    # band sizes are near-equal, the first size mod W bands one larger
    sizes = torch.bincount(bands(torch.arange(rows), rows, W), minlength=W).tolist()
    expect = [rows // W + (1 if i < rows % W else 0) for i in range(W)]
    assert sizes == expect
    non_empty = min(rows, W) * min(cols, W)
    assert torch.unique(wid).numel() == non_empty


def test_images_never_share_a_window():
    coords = torch.cat([_grid(4, 6), _grid(3, 5)])
    image = torch.cat([torch.zeros(24, dtype=torch.long), torch.ones(15, dtype=torch.long)])
    wid = window_ids(coords, image, [(4, 6), (3, 5)], 1)
    assert set(wid[:24].tolist()) == {0}
    assert set(wid[24:].tolist()) == {1}


@pytest.mark.parametrize(
    "n,rho,expect",
    [
        (36, 0.5, 18),
        (36, 0.9, 18),
        (35, 0.5, 17),
        (10, 0.29, 2),
        (100, 0.29, 29),
        (7, 0.0, 0),
        (1, 0.5, 0),
        (36, 0.2777, 9),
    ],
)
def test_merges_per_window_formula(n, rho, expect):
    assert int(merges_per_window(torch.tensor([n]), rho)[0]) == expect


def test_bipartite_plan_merges_the_most_similar_pairs():
    # one window of 6 tokens in sequence order A B A B A B: A0 ~ B1, A2 ~ B1 weakly, A4 ~ B5
    f = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.5, 0.5], [0.6, 0.8], [0.6, 0.81]])
    plan = bipartite_plan(f, torch.zeros(6, dtype=torch.long), 1, 1 / 3)  # r = 2
    assert len(plan) == 2
    pairs = sorted(zip(plan.src.tolist(), plan.dst.tolist()))
    assert pairs == [(0, 1), (4, 5)]
    # A tokens are even positions and B tokens odd positions of the window
    assert all(s % 2 == 0 for s in plan.src.tolist()) and all(d % 2 == 1 for d in plan.dst.tolist())


def test_bipartite_plan_several_a_may_pick_the_same_b():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
    plan = bipartite_plan(f, torch.zeros(4, dtype=torch.long), 1, 0.5)  # r = 2
    assert sorted(plan.src.tolist()) == [0, 2]
    assert plan.dst.tolist() == [1, 1]


def test_bipartite_plan_respects_windows_and_counts():
    torch.manual_seed(0)
    coords = _grid(5, 7)
    wid = window_ids(coords, torch.zeros(35, dtype=torch.long), [(5, 7)], 2)
    feats = torch.randn(35, 8)
    plan = bipartite_plan(feats, wid, 4, 0.5)
    sizes = torch.bincount(wid, minlength=4)
    assert len(plan) == int((sizes // 2).sum())
    assert torch.equal(wid[plan.src], wid[plan.dst])  # never across windows
    assert plan.src.unique().numel() == len(plan)
    assert set(plan.src.tolist()).isdisjoint(plan.dst.tolist())


def test_top_keeps_the_most_similar():
    torch.manual_seed(1)
    feats = torch.randn(16, 4)
    plan = bipartite_plan(feats, torch.zeros(16, dtype=torch.long), 1, 0.5)
    best3 = plan.top(3)
    assert len(best3) == 3
    assert sorted(best3.score.tolist(), reverse=True) == sorted(plan.score.tolist(), reverse=True)[:3]


def test_simulate_counts_llava_schedule():
    assert simulate_counts((24, 24), [(4, 0.5), (2, 0.5), (1, 0.5)]) == [288, 144, 72]
    assert simulate_counts((24, 24), [(4, 0.0)]) == [576]
    assert simulate_counts((24, 24), [(1, 0.5)], special=1) == [289]
