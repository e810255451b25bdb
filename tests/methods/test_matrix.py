"""Every registered method × every tiny family: the invariants every method must keep.

Parametrised over :data:`~lightkv_cli.methods.registry.METHODS` (a new entry is covered without
editing this file) and the four tiny families, with presses built by the registry (``make_press``):

(a) nothing removed (target 1: ratio 0, drop ratio 0, budget = every entry) is bit-identical to the
    uncompressed model, in prefill and in every decode step;
(b) cached greedy decoding equals an uncached reference forward over prompt + generated tokens with the
    same tokens removed: in-prefill methods re-run under ``press.replay()`` (the recorded decisions),
    eviction under per-head attention masks that hide the evicted prompt entries from the generated
    tokens;
(c) what the cache holds follows the method's rule: in-prefill, the vision tokens cached per layer are
    what the press predicts for the input's grids (text untouched, layer 0 whole; pre-LLM methods: every
    layer, layer 0 included, holds the predicted ``k``); eviction, every layer
    holds its budget of exactly the recorded entries, the budgets summing to the matched KV budget.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_families import ALL_FAMILIES, encode, evicted_prompt_masks, full_inputs, generate, load, sized

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.methods.hf_compat import output_cache
from lightkv_cli.methods.registry import KIND_EVICT, KIND_PRE, METHODS, make_press
from lightkv_cli.runtime import cache_stats

TARGET = 0.55  # compresses every method on every family (vision retention well below 1)
STEPS = 4  # generated tokens per check (the first from prefill)
TOL = 1e-4  # cached vs. uncached reference, as in test_lightkv / test_comparison
#: families a method is not defined for: attaching it must refuse with this message
UNDEFINED = {
    "visionzip": ({"tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"}, r"defined here for LLaVA-1\.5 only")
}


def _press(case, method, **kw):
    """The method's press for the case; where the method is not defined, check the refusal, then skip."""
    press = make_press(method, case.model, **kw)
    families, message = UNDEFINED.get(method, ((), ""))
    if case.name in families:
        with pytest.raises(UnsupportedInputError, match=message), press(case.model):
            pass
        pytest.skip(f"{method} refuses {case.name} (refusal checked)")
    return press


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def case(request, images):
    """One family's model, a one-image prompt, and its uncompressed prefill logits, cache and decode."""
    name = request.param
    lm = request.getfixturevalue("tiny") if name == "tiny" else load(name)
    inputs = encode(lm, sized(name, images)[:1])
    ids = inputs["input_ids"]
    vision = lm.adapter.vision_mask(ids)[0].cpu()  # (S,) bool
    with torch.no_grad():
        prefill = lm.model(**inputs, use_cache=True)
    return SimpleNamespace(
        name=name,
        lm=lm,
        model=lm.model,
        inputs=inputs,
        S=ids.shape[1],
        n=int(vision.sum()),
        vision=vision,
        prefill_logits=prefill.logits,
        prefill_cache=output_cache(prefill),
        decode=generate(lm.model, inputs, n=STEPS),
    )


# ----------------------------------------------------------------------------------------- (a) identity


@pytest.mark.parametrize("method", list(METHODS))
def test_nothing_removed_is_bit_identical(case, method):
    press = _press(case, method, target=1.0)
    with torch.no_grad(), press(case.model):
        got = case.model(**case.inputs).logits
    assert torch.equal(got, case.prefill_logits)
    out = generate(case.model, case.inputs, n=STEPS, press=press)
    assert len(out.logits) == len(case.decode.logits) == STEPS
    for a, b in zip(case.decode.logits, out.logits):
        assert torch.equal(a, b)
    assert torch.equal(out.sequences, case.decode.sequences)
    assert press.last_prefill.vision_retention == 1.0


# ------------------------------------------------------------------------- (b) uncached reference decode


def _evicted_reference(case, ids: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """Uncached logits over ``ids`` where tokens after the prompt see, per head, only the kept prompt entries."""
    cfg = case.lm.adapter.text_config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    S, T = case.S, ids.shape[1]
    with evicted_prompt_masks(case.lm.adapter.layers, kept, H, Hkv, S, T), torch.no_grad():
        return case.model(**full_inputs(case.inputs, ids), use_cache=False).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_decode_equals_uncached_reference(case, method):
    press = _press(case, method, target=TARGET)
    out = generate(case.model, case.inputs, n=STEPS, press=press)
    rec = press.last_prefill
    L = case.lm.adapter.num_layers
    assert sum(rec.layer_seq_lens) < 0.85 * L * case.S  # KV entries were removed (eviction: text too)
    ids = out.sequences[:, : case.S + STEPS - 1]  # the prompt and every generated token but the last
    if METHODS[method].kind == KIND_EVICT:
        full = _evicted_reference(case, ids, rec.kept_index)
    else:
        with torch.no_grad(), press.replay()(case.model):
            full = case.model(**full_inputs(case.inputs, ids), use_cache=False).logits
    # The last STEPS positions are the last prompt token (never removed) and the generated tokens.
    ref = full[:, -STEPS:]
    for t, step_logits in enumerate(out.logits):
        assert (ref[:, t] - step_logits).abs().max().item() <= TOL, f"step {t}"
    # and compression changed something: the uncompressed model decodes differently
    assert max((a - b).abs().max().item() for a, b in zip(case.decode.logits, out.logits)) > 1e-3


# ------------------------------------------------------------------------------------ (c) token counts


@pytest.mark.parametrize("method", list(METHODS))
def test_cache_holds_what_the_method_rule_says(case, method):
    press = _press(case, method, target=TARGET)
    with torch.no_grad(), press(case.model):
        out = case.model(**case.inputs, use_cache=True)
    rec = press.last_prefill
    cache = output_cache(out)
    stats = cache_stats(cache, case.n, rec)
    S, n, L = case.S, case.n, case.lm.adapter.num_layers
    assert stats.text_tokens == S - n
    if METHODS[method].kind == KIND_EVICT:
        # a matched budget: as many KV entries as an in-prefill method keeping TARGET of the vision tokens
        alpha = 1 - (1 - TARGET) * n / S
        assert rec.details["alpha"] == pytest.approx(alpha)
        assert abs(sum(rec.budgets) - alpha * L * S) <= L
        assert stats.layer_seq_lens == rec.budgets and stats.processed_seq_lens == [S] * L
        Hkv = case.lm.adapter.text_config.num_key_value_heads
        for i, (layer, k, idx) in enumerate(zip(cache.layers, rec.budgets, rec.kept_index)):
            assert tuple(idx.shape) == (1, Hkv, k)
            assert bool((idx.diff(dim=-1) > 0).all())  # ascending, no repeats
            # the cache holds exactly the recorded entries of the (unchanged) prefill
            full = case.prefill_cache.layers[i]
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, full.keys.shape[-1])
            assert torch.equal(layer.keys, full.keys.gather(2, gather))
            assert torch.equal(layer.values, full.values.gather(2, gather))
            assert stats.layer_vision_tokens[i] == pytest.approx(float(case.vision[idx].float().sum(-1).mean()))
    else:
        predicted = press.predict(case.model, grids=rec.grids, special=rec.special_tokens)
        if METHODS[method].kind == KIND_PRE:  # fewer vision tokens entered layer 0: every layer holds k
            assert len(set(predicted)) == 1 and rec.input_removed == n - predicted[0]
        else:
            assert stats.layer_seq_lens[0] == S  # layer 0 is never shortened
        assert stats.layer_vision_tokens == predicted == rec.layer_vision_tokens
        assert stats.layer_seq_lens == rec.layer_seq_lens == [S - n + c for c in predicted]
        assert stats.vision_retention == pytest.approx(sum(predicted) / (L * n), abs=1e-12)
        assert abs(stats.vision_retention - TARGET) < 0.05
