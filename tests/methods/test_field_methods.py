"""DART and PyramidDrop (``shared/docs/METHODS.md`` §5.2, §5.4) against their rules and brute-force references.

- kept counts follow each method's mapping from a target retention (and the published settings' R);
- DART's selection equals a plain per-row Python loop over an uncompressed forward's cache and hidden
  states (pivots by key ℓ1 norm, greedy least-cosine selection);
- PyramidDrop's statistics equal the last row of an eager ``S×S`` attention (transformers'
  ``eager_attention_forward``) at every stage;
- a left-padded batch of 3 keeps, and decodes, what each row keeps and decodes alone.

The methods × families invariants (identity at target 1, cached decode vs. an uncached reference,
counts vs. ``predict``) run for both in ``test_matrix.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_families import capture_stages, full_inputs, generate, load, sized
from tiny_families import encode as encode_one
from transformers.models.llama.modeling_llama import eager_attention_forward

from lightkv_cli.errors import UserError
from lightkv_cli.methods.dart import DART
from lightkv_cli.methods.hf_compat import output_cache
from lightkv_cli.methods.pdrop import PyramidDrop, default_boundaries, retention_of
from lightkv_cli.methods.registry import KIND_DROP, METHODS, make_press

QUESTIONS = ["What is shown?", "Describe this image in one sentence.", "Which colour is the largest object here?"]


def _prefill(tiny, inputs, press):
    with torch.no_grad(), press(tiny.model):
        tiny.model(**inputs, use_cache=True)
    return press.last_prefill


# --------------------------------------------------------------------------------------- registry, mapping


def test_registered_as_in_llm_drops():
    assert METHODS["dart"].kind == METHODS["pdrop"].kind == KIND_DROP
    assert not METHODS["dart"].schedules and not METHODS["pdrop"].schedules


def test_published_settings_actual_retention():
    # DART "128 tokens" on LLaVA-1.5-7B: 576 ×2 layers, 4 + 8·16 = 132 ×30 → R = 0.277
    k = DART(layer=2, topk=16).kept(576)
    assert k == 132 and round((2 * 576 + 30 * k) / (32 * 576), 3) == 0.277
    assert DART(topk=None, budget=(32 / 9 - 2) / 30).per_pivot(576) == 3  # R = 1/9 → topk 3, k = 28
    # PyramidDrop default: [8, 16, 24], λ = 0.5 on 32 layers → 15/32
    assert default_boundaries(32) == [8, 16, 24]
    assert retention_of([8, 16, 24], 0.5, 32) == 15 / 32
    assert retention_of([2, 8, 16], 0.19, 32) == pytest.approx(0.111, abs=2e-3)  # PyramidDrop#29
    assert default_boundaries(28) == [7, 14, 21] and default_boundaries(16) == [4, 8, 12]
    assert default_boundaries(12) == [3, 6, 9] and default_boundaries(4) == [1, 2, 3]
    with pytest.raises(UserError, match="at least 4 decoder layers"):
        default_boundaries(3)


@pytest.mark.parametrize("target", [0.2, 0.35, 0.55, 0.8])
def test_dart_kept_counts_follow_the_mapping(tiny, images, encode, target):
    L, K, n = 16, 2, 576
    press = make_press("dart", tiny.model, target=target)
    k = (target * L - K) * n / (L - K)
    topk = math.floor((k - 4) / 8 + 0.5)  # the nearest count 4 + 8·TOPK
    assert press.per_pivot(n) == topk
    rec = _prefill(tiny, encode(images[:1], QUESTIONS[:1]), press)
    assert rec.layer_vision_tokens == [n] * K + [4 + 8 * topk] * (L - K)
    assert abs(rec.vision_retention - target) <= 4 * (L - K) / (L * n) + 1e-12


def test_dart_fixed_topk_and_refusals(tiny, images, encode):
    rec = _prefill(tiny, encode(images[:1], QUESTIONS[:1]), DART(layer=2, topk=16))
    assert rec.layer_vision_tokens == [576, 576] + [132] * 14  # "128 tokens" keeps 132
    assert make_press("dart", tiny.model, target=1.0).stage_layers(16) == []
    with pytest.raises(UserError, match="at or below what DART reaches"):
        make_press("dart", tiny.model, target=2 / 16)
    with pytest.raises(UserError, match="image pivots"):
        make_press("dart", tiny.model, target=0.126)  # k ≈ 1.6 < 4 pivots
    with pytest.raises(UserError, match="leaves no layer"):
        DART(layer=16).predict(tiny.model)


@pytest.mark.parametrize("target", [0.3, 0.55, 0.8])
def test_pdrop_kept_counts_follow_the_mapping(tiny, images, encode, target):
    L, n = 16, 576
    press = make_press("pdrop", tiny.model, target=target)
    bounds = default_boundaries(L)
    assert retention_of(bounds, press.ratio, L) == pytest.approx(target, abs=3 / n)  # floors aside
    rec = _prefill(tiny, encode(images[:1], QUESTIONS[:1]), press)
    assert rec.vision_retention == pytest.approx(press.expected_retention, abs=1e-12)  # solved on the counts
    expected = [n] * L
    for s, b in enumerate(bounds, start=1):
        expected[b:] = [math.floor(n * press.ratio**s + 1e-9)] * (L - b)
    assert rec.layer_vision_tokens == expected
    assert [st.layer for st in rec.stages] == [b - 1 for b in bounds]
    assert abs(rec.vision_retention - target) < 3 / n


def test_pdrop_refusals_and_identity(tiny):
    with pytest.raises(UserError, match="at or below what PyramidDrop reaches"):
        make_press("pdrop", tiny.model, target=0.25)  # l₁/L = 4/16
    with pytest.raises(UserError, match="beyond this model's last layer"):
        PyramidDrop(layers=[4, 8, 16]).predict(tiny.model)
    with pytest.raises(UserError, match="strictly increasing"):
        PyramidDrop(layers=[8, 8])
    assert make_press("pdrop", tiny.model, target=1.0).stage_layers(16) == []
    explicit = PyramidDrop.for_retention(0.2, tiny.model, layers=[2, 5, 9])
    assert explicit.expected_retention == pytest.approx(0.2, abs=3 / 576)


# --------------------------------------------------------------------------- DART vs. a per-row reference


def _dart_reference(tiny, inputs, layer: int, topk: int) -> torch.Tensor:
    """``(B, n)`` bool kept vision tokens, by a plain loop over an uncompressed forward."""
    with torch.no_grad():
        out = tiny.model(**inputs, use_cache=True, output_hidden_states=True)
        h = out.hidden_states[layer]  # input of layer K = output of layer K-1
        keys = output_cache(out).layers[layer - 1].keys  # (B, H_kv, S, d), post-RoPE
        norm = tiny.adapter.language_model.norm
        ids = inputs["input_ids"]
        vision = tiny.adapter.vision_mask(ids)
        B, S = ids.shape
        rows = []
        for b in range(B):
            nu = [float(keys[b, :, i, :].abs().sum()) for i in range(S)]
            vis = [i for i in range(S) if vision[b, i]]
            image_pivots = sorted(vis, key=lambda i: -nu[i])[:4]
            text_pivots = sorted(range(vis[-1] + 1, S), key=lambda i: -nu[i])[:4]
            hn = norm(h[b]).float()
            valid = [i for i in vis if i not in image_pivots]
            kept = set(image_pivots)
            for p in image_pivots + text_pivots:
                cos = {i: float(F.cosine_similarity(hn[p], hn[i], dim=0)) for i in valid}
                chosen = sorted(valid, key=lambda i: cos[i])[:topk]
                kept.update(chosen)
                valid = [i for i in valid if i not in chosen]
            rows.append(torch.tensor([i in kept for i in vis]))
    return torch.stack(rows)


def test_dart_selection_equals_per_row_reference(tiny, images, encode):
    inputs = encode([images[0], images[1], images[1], images[0], images[0], images[1]], QUESTIONS, 2)
    assert (inputs["attention_mask"] == 0).any()  # left padding is exercised
    press = DART(layer=2, topk=20)
    seen = capture_stages(press)
    _prefill(tiny, inputs, press)
    (inp, out), *_ = seen
    expected = _dart_reference(tiny, inputs, layer=2, topk=20)
    got = out.keep.gather(1, inp.vision.positions)
    assert int(expected.sum(1).min()) == int(expected.sum(1).max()) == 4 + 8 * 20
    assert torch.equal(got, expected)
    assert out.removed == 2 * 576 - 164 and torch.equal(out.guidance, expected.float())


# ------------------------------------------------------------------- PyramidDrop vs. eager full attention


def _eager_last_row(adapter, layer: int, hidden, position_embeddings, mask_2d) -> torch.Tensor:
    """``(B, S)`` head-mean attention of the last token, from a full ``S×S`` eager attention of ``layer``."""
    module = adapter.layers[layer]
    attn = module.self_attn
    B, S, _ = hidden.shape
    d = attn.head_dim
    x = module.input_layernorm(hidden)
    q = attn.q_proj(x).view(B, S, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = adapter.rotary_function(layer)(q, k, cos, sin)
    allowed = torch.ones(S, S, dtype=torch.bool).tril() & mask_2d.bool()[:, None, None, :]
    bias = torch.zeros(B, 1, S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    _, weights = eager_attention_forward(attn, q, k, k, bias, scaling=attn.scaling)  # (B, H, S, S)
    return weights[:, :, -1].mean(dim=1)


def test_pdrop_scores_equal_eager_full_attention(tiny, images, encode):
    inputs = encode(images[:1] * 3, QUESTIONS)
    mask = inputs["attention_mask"]
    assert (mask == 0).any()
    press = PyramidDrop(ratio=0.5)
    seen = capture_stages(press)
    rec = _prefill(tiny, inputs, press)
    assert [inp.layer for inp, _ in seen] == [3, 7, 11]
    with torch.no_grad():
        hs = tiny.model(**inputs, output_hidden_states=True).hidden_states
        lm = tiny.adapter.language_model
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        for s, (inp, out) in enumerate(seen):
            if s == 0:
                assert torch.equal(inp.hidden, hs[4])  # the input of layer l₁, as the plain model computes it
                idx = torch.arange(mask.shape[1]).expand(3, -1)
            else:
                idx = rec.kept_index[s - 1]  # prompt indices of this stage's tokens
            pos_emb = lm.rotary_emb(inp.hidden, positions.gather(1, idx))  # original positions, kept
            ref = _eager_last_row(tiny.adapter, inp.layer + 1, inp.hidden, pos_emb, mask.gather(1, idx))
            torch.testing.assert_close(out.guidance, ref.gather(1, inp.vision.positions), atol=1e-7, rtol=1e-5)
            keep_n = math.floor(576 * 0.5 ** (s + 1))
            top = torch.sort(out.guidance, dim=1, descending=True, stable=True).indices[:, :keep_n]
            got = out.keep.gather(1, inp.vision.positions)
            assert torch.equal(got, torch.zeros_like(got).scatter_(1, top, True)) or _tied(out.guidance, keep_n)


def _tied(scores, keep_n) -> bool:
    s = torch.sort(scores, dim=1, descending=True).values
    return bool((s[:, keep_n - 1] == s[:, keep_n]).any())


def test_pdrop_scores_equal_eager_attention_on_mrope(images):
    lm = load("tiny-qwen2.5-vl")
    inputs = encode_one(lm, sized("tiny-qwen2.5-vl", images)[:1])
    press = make_press("pdrop", lm.model, target=0.55)
    seen = capture_stages(press)
    with torch.no_grad(), press(lm.model):
        lm.model(**inputs, use_cache=True)
    assert len(seen) == 3
    with torch.no_grad():
        for inp, out in seen:
            ref = _eager_last_row(lm.adapter, inp.layer + 1, inp.hidden, inp.position_embeddings, inp.attention_mask_2d)
            torch.testing.assert_close(out.guidance, ref.gather(1, inp.vision.positions), atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------- batch of 3 = each alone


def _kept_vision(rec, inputs, tiny) -> list[torch.Tensor]:
    """Per row, the kept vision tokens (indices among the row's vision tokens) after the last stage."""
    vision = tiny.adapter.vision_mask(inputs["input_ids"])
    last = rec.kept_index[-1]
    out = []
    for b in range(vision.shape[0]):
        kept = torch.zeros_like(vision[b]).scatter_(0, last[b], True)
        out.append(kept[vision[b]])
    return out


@pytest.mark.parametrize("method", ["dart", "pdrop"])
def test_left_padded_batch_equals_each_row_alone(tiny, images, encode, method):
    batch = encode([images[0], images[1], images[0]], QUESTIONS)
    assert (batch["attention_mask"] == 0).any()
    press = make_press(method, tiny.model, target=0.4)
    out = generate(tiny.model, batch, n=3, press=press)
    kept = _kept_vision(press.last_prefill, batch, tiny)
    S = batch["input_ids"].shape[1]
    for b in range(3):
        alone = encode([images[[0, 1, 0][b]]], [QUESTIONS[b]])
        one = generate(tiny.model, alone, n=3, press=press)
        assert torch.equal(_kept_vision(press.last_prefill, alone, tiny)[0], kept[b])
        assert torch.equal(out.sequences[b, S:], one.sequences[0, alone["input_ids"].shape[1] :])
        for a, c in zip(out.logits, one.logits):
            torch.testing.assert_close(a[b], c[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["dart", "pdrop"])
def test_renumbered_positions_decode_equals_uncached_reference(tiny, images, encode, method):
    """The paper's PyramidDrop positions (renumbered, decode shifted back), and DART's alternative."""
    inputs = encode(images[:1], QUESTIONS[1:2])
    press = make_press(method, tiny.model, target=0.4, positions="renumber")
    out = generate(tiny.model, inputs, n=4, press=press)
    S = inputs["input_ids"].shape[1]
    ids = out.sequences[:, : S + 3]
    with torch.no_grad(), press.replay()(tiny.model):
        full = tiny.model(**full_inputs(inputs, ids), use_cache=False).logits
    for t, step in enumerate(out.logits):
        assert (full[:, -4 + t] - step).abs().max().item() <= 1e-4, t  # the last prompt token, then generated
    keep = generate(tiny.model, inputs, n=4, press=make_press(method, tiny.model, target=0.4))
    assert max((a - b).abs().max().item() for a, b in zip(keep.logits, out.logits)) > 1e-4  # positions matter
