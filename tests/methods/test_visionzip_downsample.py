"""VisionZip and the downsampling baseline (pre-LLM): what the decoder receives against plain-loop references
built from an eager run of the vision tower, the kept counts, the published split, and the refusals.

The cached-decode, identity and token-count checks of every family are in ``test_matrix.py``; the padded
batch against single rows in ``test_prellm.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_families import encode, load, sized

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.methods.downsample import Downsample, pooled_shape
from lightkv_cli.methods.hf_compat import output_cache
from lightkv_cli.methods.registry import KIND_PRE, METHODS, make_press
from lightkv_cli.methods.visionzip import VisionZip, split_counts, vision_layer
from lightkv_cli.runtime import cache_stats

TOL = 1e-5


def _decoder_input(lm, inputs, press):
    """What decoder layer 0 receives under ``press``: ``(S', D)`` hidden states of row 0."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)[0].detach().clone()

    h = lm.adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), press(lm.model):
            lm.model(**inputs, use_cache=True)
    finally:
        h.remove()
    return seen["h"]


def _features(lm, inputs) -> torch.Tensor:
    """``(n, D)`` projector outputs of the prompt's one image, as the decoder would receive them."""
    with torch.no_grad():
        out = lm.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0).reshape(-1, out.pooler_output[0].shape[-1])


def test_split_and_registry(tiny):
    assert split_counts(64) == (54, 10) and split_counts(128) == (108, 20) and split_counts(192) == (162, 30)
    assert split_counts(1) == (1, 0)
    assert METHODS["visionzip"].kind == METHODS["downsample"].kind == KIND_PRE
    assert "0.111" in METHODS["visionzip"].published
    press = make_press("visionzip", tiny.model, target=64 / 576)
    assert press.predict(tiny.model) == [64] * tiny.adapter.num_layers
    assert "54 dominant + 10 contextual" in press.schedule_note
    assert pooled_shape(24, 24, 0.55) == (15, 21) and pooled_shape(24, 24, 0.25) == (12, 12)
    assert pooled_shape(24, 24, 0.15) == (8, 11) and pooled_shape(16, 16, 0.3) == (7, 11)
    assert pooled_shape(3, 7, 1.0) == (3, 7) and pooled_shape(1, 1, 0.1) == (1, 1)
    for r, c, R in [(24, 24, 0.3), (16, 16, 0.55), (12, 30, 0.2), (5, 9, 0.4)]:  # the closest count, brute force
        gr, gc = pooled_shape(r, c, R)
        ok = [
            abs(a * b - R * r * c)
            for a in range(1, r + 1)
            for b in range(1, c + 1)
            if abs(math.log((b / a) / (c / r))) <= math.log(2) + 1e-9
        ]
        assert abs(gr * gc - R * r * c) == min(ok), (r, c, R)


def test_visionzip_cls_attention_equals_eager_attention(tiny, images):
    inputs = encode(tiny, images[:1])
    press = VisionZip(ratio=0.3)
    tower = tiny.model.model.vision_tower
    _, index = vision_layer(tiny.model)
    with torch.no_grad(), press(tiny.model):
        tower(inputs["pixel_values"], output_hidden_states=True)
        got = dict(press._captured)
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = impl
    attn = eager.attentions[index]  # (1, H, N, N), the full eager matrix
    assert (got["cls"] - attn[:, :, 0, 1:].sum(1)).abs().max().item() <= TOL
    assert (got["x"] - eager.hidden_states[index + 1]).abs().max().item() <= TOL  # SDPA vs eager rounding


@pytest.mark.parametrize("ratio", [64 / 576, 0.3])
def test_visionzip_decoder_input_equals_a_plain_reference(tiny, images, ratio):
    inputs = encode(tiny, images[:1])
    ids = inputs["input_ids"][0]
    vis = torch.nonzero(tiny.adapter.vision_mask(inputs["input_ids"])[0]).flatten().tolist()
    n = len(vis)
    k = round(ratio * n)
    dom_n, ctx_n = split_counts(k)
    # the reference: an eager tower run, then the published rule in plain Python
    tower = tiny.model.model.vision_tower
    layer, index = vision_layer(tiny.model)
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
            keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))[0]  # (N, width)
    finally:
        tower.config._attn_implementation = impl
    H = layer.self_attn.num_heads
    a = out.attentions[index][0, :, 0, 1:].sum(0).tolist()  # (P,)
    M = keys.view(keys.shape[0], H, -1).mean(1)[1:]  # (P, d)
    X = out.hidden_states[index + 1][0, 1:]  # (P, width)
    dominant = sorted(sorted(range(n), key=lambda j: -a[j])[:dom_n])
    rest = [j for j in range(n) if j not in set(dominant)]
    step = max(1, len(rest) // ctx_n)
    targets = rest[0 : len(rest) : step][:ctx_n]
    groups = {t: [] for t in targets}
    for j in rest:
        if j in groups:
            continue
        sims = [float(F.cosine_similarity(M[j], M[t], dim=0)) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda i: sims[i])]].append(j)
    with torch.no_grad():
        feats = _features(tiny, inputs)
        merged = {
            t: tiny.model.model.multi_modal_projector(X[t] + (X[g].mean(0) if g else 0)) for t, g in groups.items()
        }
    kept = sorted(dominant + targets)
    expect = [feats[j] if j in set(dominant) else merged[j] for j in kept]
    got = _decoder_input(tiny, inputs, VisionZip(ratio=ratio))
    S = ids.shape[0]
    first = vis[0]
    assert got.shape[0] == S - n + k
    emb = tiny.model.get_input_embeddings()(ids)
    assert torch.equal(got[:first], emb[:first])  # text before the image untouched
    for i, e in enumerate(expect):
        assert (got[first + i] - e).abs().max().item() <= TOL, i
    assert torch.equal(got[first + k :], emb[vis[-1] + 1 :])


@pytest.mark.parametrize("ratio", [0.25, 0.55])
def test_downsample_decoder_input_is_the_pooled_grid(tiny, images, ratio):
    inputs = encode(tiny, images[:1])
    vis = torch.nonzero(tiny.adapter.vision_mask(inputs["input_ids"])[0]).flatten().tolist()
    rows = cols = 24
    gr, gc = pooled_shape(rows, cols, ratio)
    feats = _features(tiny, inputs).view(rows, cols, -1)
    expect = []
    for i in range(gr):  # adaptive average pooling cell by cell
        r0, r1 = (i * rows) // gr, -((-(i + 1) * rows) // gr)
        for j in range(gc):
            c0, c1 = (j * cols) // gc, -((-(j + 1) * cols) // gc)
            expect.append(feats[r0:r1, c0:c1].reshape(-1, feats.shape[-1]).mean(0))
    press = Downsample(ratio=ratio)
    got = _decoder_input(tiny, inputs, press)
    first = vis[0]
    assert got.shape[0] == inputs["input_ids"].shape[1] - len(vis) + gr * gc
    for c, e in enumerate(expect):
        assert (got[first + c] - e).abs().max().item() <= TOL, c
    # the pooled tokens sit at their cells' centre tokens
    kept = press.last_prefill.kept_index[0][0]
    ri = [int((i + 0.5) * rows / gr) for i in range(gr)]
    ci = [int((j + 0.5) * cols / gc) for j in range(gc)]
    assert kept[first : first + gr * gc].tolist() == [vis[r * cols + c] for r in ri for c in ci]


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2.5-vl"])
def test_downsample_counts_on_dynamic_grids(images, name):
    lm = load(name)
    inputs = encode(lm, sized(name, images)[:1])
    press = Downsample(ratio=0.3)
    with torch.no_grad(), press(lm.model):
        out = lm.model(**inputs, use_cache=True)
    rec = press.last_prefill
    m = sum(r * c for r, c in rec.grids)
    share = press.grid_ratio(m, rec.special_tokens)  # the never-pooled tokens count as kept
    assert share == pytest.approx((0.3 * (m + rec.special_tokens) - rec.special_tokens) / m)
    expect = rec.special_tokens + sum(a * b for a, b in (pooled_shape(r, c, share) for r, c in rec.grids))
    stats = cache_stats(output_cache(out), rec.vision_tokens, rec)
    assert stats.layer_vision_tokens == [expect] * lm.adapter.num_layers
    assert press.predict(lm.model, grids=rec.grids, special=rec.special_tokens)[0] == expect
    assert abs(rec.vision_retention - 0.3) < 0.02  # the measured R is the target's, newlines included


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny"])
def test_divprune_measured_retention_counts_special_tokens(images, name):
    lm = load(name)
    inputs = encode(lm, sized(name, images)[:1])
    press = make_press("divprune", lm.model, target=0.35)
    with torch.no_grad(), press(lm.model):
        lm.model(**inputs, use_cache=True)
    rec = press.last_prefill
    n = rec.vision_tokens
    assert rec.layer_vision_tokens[0] == round(0.35 * n)  # newlines (LLaVA-NeXT) among the kept
    assert abs(rec.vision_retention - 0.35) <= 0.5 / n


def test_visionzip_refusals():
    for name in ("tiny-llava-next", "tiny-qwen2-vl"):
        lm = load(name)
        press = make_press("visionzip", lm.model, target=0.3)  # built; the sweep records the refusal
        assert "LLaVA-1.5 only" in press.schedule_note
        with pytest.raises(UnsupportedInputError, match=r"LLaVA-1\.5 only"), press(lm.model):
            pass
