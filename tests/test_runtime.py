"""The measured greedy loop matches transformers' generate(), with and without compression."""

from __future__ import annotations

import torch

from lightkv_cli import LightKV
from lightkv_cli.measure.costs import prefill_flops
from lightkv_cli.runtime import greedy_generate

QUESTION = "Describe this image in one sentence."


def _hf_tokens(model, inputs, n, press=None):
    kwargs = dict(max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if press is None:
            out = model.generate(**inputs, **kwargs)
        else:
            with press(model):
                out = model.generate(**inputs, **kwargs)
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), out.logits[0][0]


def test_greedy_generate_matches_hf_generate(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    n_vis = tiny.adapter.vision_tokens_per_image()
    for press in (None, LightKV(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])):
        want, want_first = _hf_tokens(tiny.model, inputs, 8, press)
        got = greedy_generate(tiny.model, inputs, n_vis, 8, eos_token_id=None, press=press)
        assert got.tokens[0] == want
        assert torch.allclose(got.first_logits[0], want_first.float(), atol=1e-5)
        assert len(got.decode_ms) == 7  # 8 tokens: 1 from prefill + 7 decode steps
        assert got.prefill_ms > 0 and all(ms > 0 for ms in got.decode_ms)
        assert got.peak_memory_bytes > 0 and got.peak_memory_kind == "process_rss_peak"


def test_greedy_generate_stops_at_eos(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    n_vis = tiny.adapter.vision_tokens_per_image()
    first = greedy_generate(tiny.model, inputs, n_vis, 4, eos_token_id=None)
    stop = first.tokens[0][1]
    again = greedy_generate(tiny.model, inputs, n_vis, 4, eos_token_id=stop)
    assert again.tokens[0] == first.tokens[0][: first.tokens[0].index(stop)]


def test_cache_stats_and_flops_follow_the_schedule(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    n_vis = tiny.adapter.vision_tokens_per_image()
    S = inputs["input_ids"].shape[1]
    base = greedy_generate(tiny.model, inputs, n_vis, 2, eos_token_id=None)
    press = LightKV(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
    comp = greedy_generate(tiny.model, inputs, n_vis, 2, eos_token_id=None, press=press)
    L = tiny.adapter.num_layers
    assert base.cache.layer_seq_lens == [S] * L
    assert base.cache.layer_seq_lens == [S] * L
    assert comp.cache.layer_seq_lens == press.last_prefill.layer_seq_lens
    assert comp.cache.layer_vision_tokens == press.predict(tiny.model)
    assert comp.cache.text_tokens == base.cache.text_tokens == S - n_vis
    cfg = tiny.adapter.text_config
    f_base = prefill_flops(cfg, base.cache.layer_seq_lens)
    f_comp = prefill_flops(cfg, comp.cache.layer_seq_lens)
    assert f_comp < f_base
    assert f_comp == prefill_flops(cfg, press.last_prefill.layer_seq_lens)


def test_suppressed_tokens_are_never_generated(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    n_vis = tiny.adapter.vision_tokens_per_image()
    first = greedy_generate(tiny.model, inputs, n_vis, 4, eos_token_id=None)
    banned = sorted(set(first.tokens[0]))
    again = greedy_generate(tiny.model, inputs, n_vis, 4, eos_token_id=None, suppress_token_ids=banned)
    assert not set(again.tokens[0]) & set(banned) and len(again.tokens[0]) == 4
    # The first token is the best one outside the banned set; recorded logits are unsuppressed.
    logits = first.first_logits[0].clone()
    assert torch.equal(again.first_logits[0], logits)
    logits[banned] = float("-inf")
    assert again.tokens[0][0] == int(logits.argmax())
