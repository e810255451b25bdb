"""The batched stages make exactly the decisions of a plain per-row reference (issue 16).

Every in-prefill stage (LightKV's windowed bipartite merge with each guidance, RandomDrop, FastV)
runs over all rows at once on :class:`~lightkv_cli.methods.vision.VisionTokens`. Here each stage's
input is captured and the decision recomputed row by row with the per-row functions
(:func:`~lightkv_cli.methods.merging.bipartite_plan`, :func:`~lightkv_cli.methods.guidance.cross_guidance`,
...): same kept tokens, same merge pairs, same merged values (to float32 rounding), same guidance, for
batches of 1, 3 and 8 left-padded rows with two images per prompt.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_families import capture_stages

from lightkv_cli import LightKV
from lightkv_cli.methods.attention import expand_kv, post_rope_qk
from lightkv_cli.methods.fastv import FastV
from lightkv_cli.methods.guidance import cross_guidance, prompt_guidance
from lightkv_cli.methods.merging import bipartite_plan, merges_per_window, window_ids
from lightkv_cli.methods.random_drop import RandomDrop
from lightkv_cli.methods.vision import compact

QUESTIONS = [
    "What is shown?",
    "Describe this image in one sentence.",
    "Which colour is the largest object in these two pictures, and where is it?",
    "Count.",
]
SCHEDULE = dict(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[0.5, 0.3, 0.5])


def _run(tiny, encode, images, press, batch):
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    imgs = [images[i % 2] for i in range(2 * batch)]
    inputs = encode(imgs, qs, num_images_per_prompt=2)
    assert (inputs["attention_mask"] == 0).any() or batch == 1  # left padding is exercised
    seen = capture_stages(press)
    with torch.no_grad(), press(tiny.model):
        tiny.model(**inputs)
    assert seen, "no stage ran"
    return seen


def _row_layout(vis, b):
    return vis.positions[b], vis.coords[b], vis.grid[b], vis.mergeable[b], vis.layouts[b].grids


def _scale(inp, q):
    return float(getattr(inp.module.self_attn, "scaling", q.shape[-1] ** -0.5))


def _reference_guidance(press, inp, adapter):
    B, S, _ = inp.hidden.shape
    vis = inp.vision
    if press.guidance == "uniform":
        return torch.ones(B, vis.count)
    q, k = post_rope_qk(inp, adapter)
    real = inp.attention_mask_2d.bool()
    rows = []
    for b in range(B):
        pos = vis.positions[b]
        vision = torch.zeros(S, dtype=torch.bool)
        vision[pos] = True
        if press.guidance == "cross":
            g = cross_guidance(q[b], k[b], ~vision & real[b], real[b], _scale(inp, q))
        else:
            g = prompt_guidance(q[b], k[b], vision, real[b], _scale(inp, q))
            if g is None:
                g = torch.ones(S)
        rows.append(g[pos])
    return torch.stack(rows)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("guidance", ["cross", "prompt", "uniform"])
def test_lightkv_stages_equal_per_row_reference(tiny, images, encode, batch, guidance):
    press = LightKV(**SCHEDULE, guidance=guidance)
    seen = _run(tiny, encode, images, press, batch)
    for inp, out in seen:
        k = press.layers.index(inp.layer)
        W, ratio = press.windows[k], press.ratios[k]
        vis = inp.vision
        plans, idxs = [], []
        for b in range(batch):
            pos, coords, grid, mergeable, grids = _row_layout(vis, b)
            idx = torch.nonzero(mergeable).flatten()
            wid = window_ids(coords[idx], grid[idx], grids, W)
            plans.append(bipartite_plan(inp.hidden[b, pos[idx]], wid, len(grids) * W * W, ratio))
            idxs.append(idx)
        m = min(len(p) for p in plans)
        if m == 0:
            assert out is None
            continue
        assert out.removed == m
        g = _reference_guidance(press, inp, tiny.adapter)
        torch.testing.assert_close(out.guidance, g, atol=1e-6, rtol=1e-5)
        keep = torch.ones_like(out.keep)
        expected = inp.hidden.clone()
        for b in range(batch):
            plan = plans[b].top(m)
            pos = vis.positions[b]
            src, dst = idxs[b][plan.src], idxs[b][plan.dst]
            assert torch.equal(out.pairs[b], torch.stack([pos[src], pos[dst]], dim=1))
            x = inp.hidden[b, pos].float()
            gb = out.guidance[b]
            num, den = x * gb.unsqueeze(1), gb.clone()
            num.index_add_(0, dst, x[src] * gb[src].unsqueeze(1))
            den.index_add_(0, dst, gb[src])
            recv = torch.unique(dst)
            expected[b, pos[recv]] = (num[recv] / den[recv].unsqueeze(1)).to(expected.dtype)
            keep[b, pos[src]] = False
        assert torch.equal(out.keep, keep)
        torch.testing.assert_close(out.hidden, expected, atol=1e-6, rtol=1e-6)
        untouched = keep & ~torch.zeros_like(keep).scatter_(1, out.pairs[..., 1], True)
        assert torch.equal(out.hidden[untouched], inp.hidden[untouched])  # bit for bit


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_random_drop_stages_equal_per_row_reference(tiny, images, encode, batch):
    press = RandomDrop(**SCHEDULE, seed=3)
    seen = _run(tiny, encode, images, press, batch)
    for inp, out in seen:
        k = press.layers.index(inp.layer)
        W, ratio = press.windows[k], press.ratios[k]
        vis = inp.vision
        gen = torch.Generator().manual_seed(press.seed * 1_000_003 + k * 7919)
        r_all = torch.rand(1, vis.count, generator=gen, dtype=torch.float64).expand(batch, -1)  # same draws per row
        drops, draws = [], []
        for b in range(batch):
            _, coords, grid, mergeable, grids = _row_layout(vis, b)
            idx = torch.nonzero(mergeable).flatten()
            r = r_all[b, idx]
            wid = window_ids(coords[idx], grid[idx], grids, W)
            sizes = torch.bincount(wid, minlength=len(grids) * W * W)
            rank = torch.empty_like(wid)
            order = torch.argsort(wid.double() + r)
            starts = torch.cumsum(sizes, 0) - sizes
            rank[order] = torch.arange(idx.numel()) - starts[wid[order]]
            drop = rank < merges_per_window(sizes, ratio)[wid]
            drops.append(idx[drop])
            draws.append(r[drop])
        m = min(d.numel() for d in drops)
        if m == 0:
            assert out is None
            continue
        keep = torch.ones_like(out.keep)
        for b in range(batch):
            d = drops[b][torch.argsort(draws[b])[:m]]
            keep[b, vis.positions[b][d]] = False
        assert out.removed == m and torch.equal(out.keep, keep)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fastv_stage_equals_per_row_reference(tiny, images, encode, batch):
    press = FastV(layer=2, ratio=0.5)
    seen = _run(tiny, encode, images, press, batch)
    (inp, out), *_ = seen
    vis = inp.vision
    q, k = post_rope_qk(inp, tiny.adapter)
    k = expand_kv(k, q.shape[1])
    real = inp.attention_mask_2d.bool()
    n_drop = math.floor(0.5 * min(int(vis.mergeable[b].sum()) for b in range(batch)) + 1e-9)
    keep = torch.ones_like(out.keep)
    for b in range(batch):
        logits = torch.einsum("hd,hsd->hs", q[b, :, -1], k[b]) * _scale(inp, q)  # (H, S)
        probs = torch.softmax(logits.masked_fill(~real[b], float("-inf")), dim=-1).mean(0)
        pos = vis.positions[b]
        torch.testing.assert_close(out.guidance[b], probs[pos], atol=1e-7, rtol=1e-6)
        droppable = torch.nonzero(vis.mergeable[b]).flatten()
        order = torch.sort(out.guidance[b][droppable], stable=True).indices[:n_drop]
        keep[b, pos[droppable[order]]] = False
    assert out.removed == n_drop and torch.equal(out.keep, keep)


def test_compact_equals_nonzero():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, N = 4, 37
        count = int(torch.randint(0, N + 1, (1,), generator=gen))
        mask = torch.zeros(B, N, dtype=torch.bool)
        for b in range(B):
            mask[b, torch.randperm(N, generator=gen)[:count]] = True
        expected = torch.nonzero(mask)[:, 1].view(B, count)
        assert torch.equal(compact(mask, count), expected)
