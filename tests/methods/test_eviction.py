"""Post-prefill eviction (VL-Cache, SnapKV) computed in batched device ops equals plain references.

- budgets (closed form on the device) equal the plain bisection + largest-remainder rule;
- the batched kept-index selection of several layers equals the one-layer rule;
- on the tiny LLaVA model, for batches of 1 and 3 rows: densities and budgets of each row, kept indices
  per row and KV head and the recorded vision counts equal a brute-force per-row, per-head computation
  from the eager model's full float32 attention matrices (left-padded batches:
  ``test_padded_eviction.py``);
- what eviction adds to a prefill and to a decode step: no host-synchronising op, and a decode step no
  more work than the uncompressed one (up to 5%); the eager attention path (masks built per cached
  length) decodes as the SDPA path (no masks).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_comparison import QUESTION, _assert_same_top
from test_lightkv import _added, _decode_step, _generate, _hook_baseline, _hooks
from torch.profiler import ProfilerActivity, profile

from lightkv_cli.methods.eviction import select_kept, select_per_head
from lightkv_cli.methods.hf_compat import cache_kwarg, output_cache
from lightkv_cli.methods.snapkv import SnapKV
from lightkv_cli.methods.vlcache import VLCache, layer_budget_tensor, layer_budgets

SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::unique", "aten::_unique2", "aten::masked_select")


@pytest.fixture(scope="module")
def eager(tiny):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(
        tiny.source, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module", params=[1, 3], ids=["batch1", "batch3"])
def batch(request, encode, images):
    """Rows of equal length (one image each, the same question): no padding, vision at the same positions."""
    imgs = [images[i % len(images)] for i in range(request.param)]
    inputs = encode(imgs, [QUESTION] * request.param)
    assert bool(inputs["attention_mask"].bool().all())
    return inputs


@pytest.fixture(scope="module")
def brute(eager, batch):
    """Every layer's full ``(B, H, S, S)`` float32 attention matrix from the eager model."""
    with torch.no_grad():
        return [a.float() for a in eager(**batch, output_attentions=True).attentions]


# ------------------------------------------------------------------------------------------- references


def _reference_budgets(density, alpha, S, min_fraction=0.01):
    """The budget rule with Python floats: bisection on the common factor, then largest remainder one by one."""
    L = len(density)
    lo = max(1, math.ceil(min_fraction * S - 1e-9))
    total = min(max(int(round(alpha * L * S)), L * lo), L * S)
    d = [max(0.0, float(x)) for x in density]
    if sum(d) <= 0:
        d = [1.0] * L
    d = [max(x, 1e-9 * max(d)) for x in d]

    def real(c):
        return [min(max(c * x * S, lo), S) for x in d]

    c = alpha * L / sum(d)
    if abs(sum(real(c)) - total) > 1e-6:
        low, high = 0.0, 1.0
        while sum(real(high)) < total:
            high *= 2
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (mid, high) if sum(real(mid)) < total else (low, mid)
        c = high
    k_real = real(c)
    k = [min(max(math.floor(x + 1e-9), lo), S) for x in k_real]
    frac = [x - y for x, y in zip(k_real, k)]
    while sum(k) < total:
        i = max((j for j in range(L) if k[j] < S), key=lambda j: (frac[j], -j))
        k[i] += 1
        frac[i] -= 1
    while sum(k) > total:
        i = min((j for j in range(L) if k[j] > lo), key=lambda j: (frac[j], j))
        k[i] -= 1
        frac[i] += 1
    return k


@pytest.mark.parametrize("seed", range(12))
def test_budgets_equal_the_bisection_reference(seed):
    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(2, 40, (1,), generator=g))
    S = int(torch.randint(20, 3000, (1,), generator=g))
    density = torch.rand(L, generator=g) ** (1 + 4 * seed % 5)  # skewed: some layers clip at S or at the floor
    if seed % 3 == 0:
        density[: L // 3] = 0.0  # layers of density 0
    alpha = [0.01, 0.05, 0.3, 0.7, 0.95, 1.0][seed % 6]
    want = _reference_budgets(density.tolist(), alpha, S)
    got, betas = layer_budgets(density.tolist(), alpha, S)
    assert got == want
    assert betas == [k / S for k in want]
    assert layer_budget_tensor(density.double(), alpha, S).tolist() == want


def test_budgets_hand_made_clipping_cases():
    for density, alpha, S in [
        ([1.0, 0.0, 0.0, 0.0], 0.5, 100),
        ([0.0, 0.0, 0.0], 0.4, 10),
        ([5.0, 1.0, 1.0, 1.0, 1.0], 0.6, 77),
        ([0.9, 0.5, 0.2, 0.05], 0.01, 37),
        ([0.3] * 6, 1.0, 50),
    ]:
        assert layer_budgets(density, alpha, S)[0] == _reference_budgets(density, alpha, S), (density, alpha, S)


@pytest.mark.parametrize("seed", range(4))
def test_select_kept_equals_the_one_layer_rule(seed):
    g = torch.Generator().manual_seed(seed)
    G, B, H, S = 5, 3, 2, 41
    scores = (torch.rand(G, B, H, S, generator=g) * 8).round() / 8  # many ties
    keep = torch.randint(1, S + 1, (G,), generator=g)
    recent = (keep.double() * torch.rand(G, generator=g)).floor().long()
    got = select_kept(scores, keep, recent)
    for i in range(G):
        k = int(keep[i])
        assert torch.equal(got[i, ..., :k], select_per_head(scores[i], k, int(recent[i])))
        assert bool((got[i, ..., k:] == S).all())
    same = select_kept(scores, 7, 3)  # one count for every layer
    for i in range(G):
        assert torch.equal(same[i, ..., :7], select_per_head(scores[i], 7, 3))


# ------------------------------------------------------------------------- brute force on the tiny model


def _run(tiny, batch, press):
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**batch, use_cache=True)
    return out, press.last_prefill


def _check_kept(rec, out, batch, scores_of, recent_of, vision):
    """Per layer, row and KV head: the recent window is kept, the rest are the top brute-force scores, and
    the cache holds exactly those entries (a row with a smaller budget than the layer's slots: fillers
    −1 before them); the recorded vision counts are the kept vision tokens."""
    B = batch["input_ids"].shape[0]
    S = batch["input_ids"].shape[1]
    assert len(rec.row_budgets) == B
    for layer, (K, idx) in enumerate(zip(rec.budgets, rec.kept_index)):
        scores = scores_of(layer)  # (B, H_kv, S)
        Hkv = scores.shape[1]
        assert tuple(idx.shape) == (B, Hkv, K) and idx.device.type == "cpu"
        assert output_cache(out).layers[layer].keys.shape[-2] == K
        assert max(r[layer] for r in rec.row_budgets) == K
        row_vis = []
        for b in range(B):
            k = rec.row_budgets[b][layer]
            r = recent_of(k)
            assert bool((idx[b, :, : K - k] == -1).all())  # fillers
            for h in range(Hkv):
                kept = idx[b, h, K - k :]
                assert bool((kept.diff() > 0).all())
                assert bool((kept[k - r :] == torch.arange(S - r, S)).all())
                _assert_same_top(scores[b, h, : S - r], kept[: k - r], k - r)
            row_vis.append(float(vision[idx[b, :, K - k :]].float().sum(-1).mean()))
            assert rec.row_layer_vision_tokens[b][layer] == pytest.approx(row_vis[-1])
        assert rec.layer_vision_tokens[layer] == pytest.approx(sum(row_vis) / B)


def test_vlcache_equals_per_row_per_head_brute_force(tiny, batch, brute):
    """Each row's densities and budgets are its own (what it would get alone)."""
    out, rec = _run(tiny, batch, VLCache(budget=0.3))
    ids = batch["input_ids"]
    S = ids.shape[1]
    vision = ids[0] == tiny.adapter.image_token_id()
    t0 = int(torch.nonzero(vision).max()) + 1
    Hkv = tiny.adapter.text_config.num_key_value_heads
    B = ids.shape[0]
    scores = []
    for layer, A in enumerate(brute):
        H = A.shape[1]
        per_head = torch.zeros(B, H, S)
        for b in range(B):
            zero, rows = 0.0, 0
            for h in range(H):
                post = A[b, h, t0:]  # (τ, S) rows of the post-vision queries
                for i in range(post.shape[0]):
                    row = post[i, : t0 + i + 1]  # the causally visible keys
                    zero += float((row < 0.01 * row.max()).float().mean())
                    rows += 1
                per_head[b, h] = post.sum(0)
            assert rec.details["row_density"][b][layer] == pytest.approx(1 - zero / rows, abs=1e-4), (b, layer)
        scores.append(per_head.view(B, Hkv, -1, S).mean(2))
    assert rec.details["density"] == rec.details["row_density"][0]
    for b in range(B):
        assert rec.row_budgets[b] == _reference_budgets(rec.details["row_density"][b], 0.3, S)
        assert sum(rec.row_budgets[b]) == round(0.3 * len(brute) * S)
        assert rec.details["row_beta"][b] == [k / S for k in rec.row_budgets[b]]
    assert rec.budgets == [max(col) for col in zip(*rec.row_budgets)]
    if B == 1:
        assert rec.row_budgets == [rec.budgets] and rec.details["beta"] == [k / S for k in rec.budgets]
        assert rec.row_layer_vision_tokens == [rec.layer_vision_tokens]
    _check_kept(rec, out, batch, scores.__getitem__, lambda k: math.floor(0.1 * k), vision)


def test_snapkv_equals_per_row_per_head_brute_force(tiny, batch, brute):
    import torch.nn.functional as F

    out, rec = _run(tiny, batch, SnapKV(budget=0.3, window=8, kernel=5))
    ids = batch["input_ids"]
    S = ids.shape[1]
    vision = ids[0] == tiny.adapter.image_token_id()
    k = round(0.3 * S)
    assert rec.budgets == [k] * len(brute)
    assert rec.row_budgets == [[k] * len(brute)] * ids.shape[0]
    Hkv = tiny.adapter.text_config.num_key_value_heads
    scores = []
    for A in brute:
        B = A.shape[0]
        out_scores = torch.zeros(B, Hkv, S)
        for b in range(B):
            mean = A[b, :, S - 8 :].mean(1).view(Hkv, -1, S).mean(1)  # (H_kv, S)
            for h in range(Hkv):
                pooled = F.avg_pool1d(mean[h, None, : S - 8], 5, stride=1, padding=2, count_include_pad=False)[0]
                out_scores[b, h] = torch.cat([pooled, mean[h, S - 8 :]])
        scores.append(out_scores)
    _check_kept(rec, out, batch, scores.__getitem__, lambda k: min(8, k), vision)


# ------------------------------------------------------------------------------------------------- cost


def _count(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return len(events), sum(1 for e in events if e in SYNC_OPS)


def _prefill_and_step(model, inputs, press):
    """(prefill ops, prefill syncs, decode-step ops, decode-step syncs) under ``press`` (None: uncompressed)."""
    import contextlib

    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        model(**inputs, use_cache=True)  # warm-up
        held = {}
        p_ops, p_sync = _count(lambda: held.setdefault("out", model(**inputs, use_cache=True)))
        out = held["out"]
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        kw = cache_kwarg(model.forward, output_cache(out))
        d_ops, d_sync = _count(lambda: model(input_ids=nxt, attention_mask=mask, use_cache=True, **kw))
    return p_ops, p_sync, d_ops, d_sync


@pytest.mark.parametrize("press", [VLCache(budget=0.3), SnapKV(budget=0.3, window=8)], ids=["vlcache", "snapkv"])
def test_eviction_adds_no_host_sync_and_no_decode_work(tiny, batch, press):
    base = _prefill_and_step(tiny.model, batch, None)
    got = _prefill_and_step(tiny.model, batch, press)
    assert got[1] == base[1]  # prefill: no nonzero / item() / unique (the two reads are one .tolist() each)
    assert got[3] == base[3]  # decode step: nothing read from the device
    assert got[2] <= 1.05 * base[2]
    assert got[0] - base[0] <= 0.25 * base[0]


def test_statistics_hooks_live_through_the_prefill_only(tiny, encode, images):
    """Per-layer statistics hooks exist during an evicting prefill only; decode runs the decode pre-hooks."""
    model = tiny.model
    inputs = encode(images[:1], [QUESTION])
    everything, layers, before_all, before_layers = _hook_baseline(tiny, inputs)
    q_projs = [layer.self_attn.q_proj for layer in layers]
    before_q = _hooks(q_projs)
    with torch.no_grad(), VLCache(budget=0.3)(model):
        assert _added(everything, before_all) == [0]  # the top-level pre- and post-hooks
        out = model(**inputs, use_cache=True)
        assert _added(layers, before_layers, kind=1) == [] and _added(q_projs, before_q) == []
        assert _added(layers, before_layers, kind=0) == list(range(len(layers)))  # decode pre-hooks
        _decode_step(model, inputs, out)
        assert len(_added(everything, before_all)) == 1 + len(layers)
    assert _hooks(everything) == before_all


def test_eager_attention_decodes_as_sdpa(tiny, eager, encode, images):
    """The eager model needs a mask per cached length in decode (built once per length and step); the SDPA
    model none: both decode the same under eviction."""
    one = encode(images[:1], [QUESTION])
    a = _generate(tiny.model, one, n=5, press=VLCache(budget=0.3))
    b = _generate(eager, one, n=5, press=VLCache(budget=0.3))
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert (x - y).abs().max().item() <= 1e-4
