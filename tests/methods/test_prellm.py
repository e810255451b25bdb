"""Pre-LLM reduction (DivPrune; the padded-batch check also for Downsample and VisionZip): the selection
against a brute-force reference, the counts the rule gives, cached decoding (``generate()`` and
:func:`~lightkv_cli.runtime.greedy_generate`) against an uncached reference, left-padded batches against
each row alone, identity at R = 1, and the refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_families import SIZES, encode_rows, full_inputs, load

from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.methods.divprune import DivPrune, max_min_select
from lightkv_cli.methods.downsample import Downsample
from lightkv_cli.methods.hf_compat import output_cache
from lightkv_cli.methods.registry import KIND_PRE, METHODS, make_press
from lightkv_cli.methods.visionzip import VisionZip
from lightkv_cli.runtime import cache_stats, greedy_generate

QUESTIONS = ["Describe this image.", "What animal is in this picture, and what colour is its fur?", "Any cup?"]
STEPS = 4
TOL = 1e-4


def _brute_force(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune on one row ``(m, D)``: the full distance matrix, then the greedy rule in plain loops."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    d = (1.0 - xn @ xn.T).tolist()
    m = len(d)
    first = [min(d[i][j] for i in range(m) if i != j) for j in range(m)]
    chosen = [max(range(m), key=lambda j: (first[j], -j))]
    while len(chosen) < k:
        best = max((j for j in range(m) if j not in chosen), key=lambda j: (min(d[i][j] for i in chosen), -j))
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize("m,k", [(40, 1), (40, 7), (40, 39), (97, 20)])
def test_max_min_selection_equals_brute_force(m, k):
    g = torch.Generator().manual_seed(m * 100 + k)
    x = torch.randn(3, m, 16, generator=g)
    got = max_min_select(x, k)
    assert got.shape == (3, k)
    for b in range(3):
        assert got[b].tolist() == _brute_force(x[b], k), b
    assert torch.equal(max_min_select(x, m), torch.arange(m).expand(3, -1))


def test_max_min_selection_ties_and_duplicates_keep_exactly_k():
    # 12 tokens, 4 distinct one-hot features (each three times): distances are exactly 0 or 1, so after the 4
    # distinct ones every candidate ties at 0 and the lowest index must win; exactly k per row either way.
    basis = torch.eye(16)[:4]
    x = torch.stack([basis[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]], basis[[3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]]])
    for k in (3, 4, 6, 11):
        got = max_min_select(x, k)
        assert got.shape == (2, k)
        for b in range(2):
            assert got[b].tolist() == _brute_force(x[b], k), (b, k)


@pytest.mark.parametrize("m,k", [(40, 7), (97, 20)])
def test_streaming_selection_equals_the_full_matrix_one(monkeypatch, m, k):
    import lightkv_cli.methods.divprune as dp

    x = torch.randn(3, m, 16, generator=torch.Generator().manual_seed(m + k))
    whole = max_min_select(x, k)  # the distance matrix once
    monkeypatch.setattr(dp, "_FULL_ELEMENTS", 0)  # one row per step
    assert torch.equal(max_min_select(x, k), whole)
    monkeypatch.setattr(dp, "_CHUNK_ELEMENTS", 3 * m * 7)  # and the first step 7 columns at a time
    assert torch.equal(max_min_select(x, k), whole)
    for b in range(3):
        assert whole[b].tolist() == _brute_force(x[b], k), b


def _generate(model, inputs, press=None):
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True)
    with torch.no_grad():
        if press is None:
            return model.generate(**inputs, **kwargs, return_dict_in_generate=True)
        with press(model):
            return model.generate(**inputs, **kwargs, return_dict_in_generate=True)


def test_registry_entry_and_published_setting(tiny):
    assert METHODS["divprune"].kind == KIND_PRE
    press = DivPrune()  # SUBSET_RATIO 0.098: 56 of 576
    assert press.predict(tiny.model) == [56] * tiny.adapter.num_layers
    assert press.expected_retention == pytest.approx(56 / 576)
    built = make_press("divprune", tiny.model, target=0.5)
    assert isinstance(built, DivPrune) and built.subset_ratio == 0.5 and built.expected_retention == 0.5
    with pytest.raises(UserError):
        DivPrune(subset_ratio=0.0)


@pytest.mark.parametrize("ratio,kept", [(0.098, 56), (0.3, 173), (0.55, 317)])
def test_cache_holds_round_r_n_in_every_layer(tiny, images, ratio, kept):
    inputs = encode_rows(tiny, images[:1], QUESTIONS[:1])
    S, n, L = inputs["input_ids"].shape[1], 576, tiny.adapter.num_layers
    assert int(tiny.adapter.vision_mask(inputs["input_ids"]).sum()) == n and kept == round(ratio * n)
    press = DivPrune(subset_ratio=ratio)
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**inputs, use_cache=True)
    rec = press.last_prefill
    stats = cache_stats(output_cache(out), n, rec)
    assert stats.layer_seq_lens == rec.layer_seq_lens == [S - n + kept] * L
    assert stats.layer_vision_tokens == rec.layer_vision_tokens == [kept] * L
    assert stats.text_tokens == S - n and rec.input_removed == n - kept
    assert stats.vision_retention == rec.vision_retention == pytest.approx(kept / n)
    assert out.logits.shape[1] == S - n + kept
    # the record's kept tokens are the selection on the projector outputs the decoder would have seen
    with torch.no_grad():
        feats = tiny.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    x = torch.cat(feats.pooler_output, dim=0).view(1, n, -1)
    vis = torch.nonzero(tiny.adapter.vision_mask(inputs["input_ids"])[0]).flatten()
    expect = vis[max_min_select(x, kept)[0]]
    kept_idx = rec.kept_index[0][0]
    assert torch.equal(kept_idx[torch.isin(kept_idx, vis)], expect)
    assert rec.stages[0].layer == -1 and rec.per_image_retention == [pytest.approx(kept / n)]


@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_cached_decode_equals_uncached_reference(tiny, images, positions):
    inputs = encode_rows(tiny, images[:1], QUESTIONS[:1])
    S = inputs["input_ids"].shape[1]
    press = DivPrune(subset_ratio=0.3, positions=positions)
    out = _generate(tiny.model, inputs, press)
    ids = out.sequences[:, : S + STEPS - 1]
    with torch.no_grad(), press.replay()(tiny.model):
        ref = tiny.model(**full_inputs(inputs, ids), use_cache=False).logits[:, -STEPS:]
    for t, step in enumerate(out.logits):
        assert (ref[:, t] - step).abs().max().item() <= TOL, t
    # greedy_generate (the profiler's measured path) decodes the same tokens from the same cache
    vision = int(tiny.adapter.vision_mask(inputs["input_ids"]).sum())
    res = greedy_generate(tiny.model, inputs, vision, STEPS, None, press=press, continuation="own")
    assert res.tokens[0] == out.sequences[0, S:].tolist()
    assert (res.first_logits - out.logits[0].float()).abs().max().item() <= TOL
    fed = res.continuation_logits[0]
    for t in range(fed.shape[0]):  # the teacher-forced continuation through the shortened cache
        assert (fed[t] - out.logits[t + 1][0]).abs().max().item() <= TOL
    # and compression changed something
    plain = _generate(tiny.model, inputs)
    assert max((a - b).abs().max().item() for a, b in zip(plain.logits, out.logits)) > 1e-3


def test_ratio_one_is_bit_identical(tiny, images):
    inputs = encode_rows(tiny, images[:1], QUESTIONS[:1])
    plain = _generate(tiny.model, inputs)
    press = make_press("divprune", tiny.model, target=1.0)
    out = _generate(tiny.model, inputs, press)
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits))
    assert press.last_prefill.vision_retention == 1.0 and press.last_prefill.stages == []


PRESSES = {
    "divprune": lambda: DivPrune(subset_ratio=0.3),
    "downsample": lambda: Downsample(ratio=0.3),
    "visionzip": lambda: VisionZip(ratio=0.3),
}


@pytest.mark.parametrize(
    "name,method",
    [("tiny", "divprune"), ("tiny-qwen2-vl", "divprune"), ("tiny", "downsample"), ("tiny-qwen2.5-vl", "downsample")]
    + [("tiny-llava-next", "downsample"), ("tiny", "visionzip")],
)
def test_left_padded_batch_equals_each_row_alone(request, images, name, method):
    lm = request.getfixturevalue("tiny") if name == "tiny" else load(name)
    size = SIZES[name][0]
    imgs = [im if size is None else im.resize(size) for im in images]
    imgs = [imgs[i % 2] for i in range(len(QUESTIONS))]
    batch = encode_rows(lm, imgs, QUESTIONS)
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    assert len(set(pads)) == len(QUESTIONS)
    press = PRESSES[method]()
    out = _generate(lm.model, batch, press)
    rec = press.last_prefill
    S = batch["input_ids"].shape[1]
    for b, (img, q) in enumerate(zip(imgs, QUESTIONS)):
        one = encode_rows(lm, [img], [q])
        alone_press = PRESSES[method]()
        alone = _generate(lm.model, one, alone_press)
        assert torch.equal(rec.kept_index[0][b][: pads[b]], torch.arange(pads[b])), b  # padding stays
        assert torch.equal(rec.kept_index[0][b][pads[b] :] - pads[b], alone_press.last_prefill.kept_index[0][0]), b
        assert out.sequences[b, S:].tolist() == alone.sequences[0, one["input_ids"].shape[1] :].tolist(), b
        for t in range(STEPS):
            assert (out.logits[t][b] - alone.logits[t][0]).abs().max().item() <= TOL, (b, t)
        assert rec.layer_vision_tokens == alone_press.last_prefill.layer_vision_tokens


def test_refusals(tiny, images):
    tok = tiny.processor.tokenizer
    texts = [tiny.adapter.format_prompt("One?", num_images=1), tiny.adapter.format_prompt("Two?", num_images=2)]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tiny.processor(images=[images[0], images[0], images[1]], text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    mixed = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(UnsupportedInputError, match="vision"), torch.no_grad(), DivPrune(0.3)(tiny.model):
        tiny.model(**mixed)
    qwen = load("tiny-qwen2-vl")
    with pytest.raises(UnsupportedInputError, match="renumber"), DivPrune(0.3, positions="renumber")(qwen.model):
        pass
