"""Teacher-forced continuation fidelity and follow-up questions from the same compressed cache (issue 18).

- Nothing removed: every method's continuation KL is exactly 0, agreement exactly 1 (bit-identical logits).
- Post-prefill eviction at a budget of 0.3: continuation KL > 0 while its first-token metrics are n/a.
- A follow-up answered from the compressed cache equals an uncached forward of prompt + answer + follow-up
  under the same compression (LightKV, VL-Cache, FastV), and a left-padded batch whose rows end their answers at
  different steps gives each row what it gets alone.
- Thresholds: first-token floors are n/a for eviction, ``max_kl`` reads the continuation.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import evicted_prompt_masks, full_inputs

from lightkv_cli.methods.registry import METHODS, make_press
from lightkv_cli.runtime import OWN, greedy_generate, reference_continuation
from lightkv_cli.scoring.continuation import ReferenceContinuation, continuation_scores
from lightkv_cli.scoring.fidelity import score_input
from lightkv_cli.scoring.thresholds import Thresholds, evaluate, measured_value

N = 6  # greedy tokens per answer
TOL = 1e-4


@pytest.fixture(scope="module")
def one(tiny, encode, images):
    return encode(images[:1], ["What is in the image?"])


def _n_vis(tiny, inputs) -> int:
    return int(tiny.adapter.vision_mask(inputs["input_ids"])[0].sum())


def _gen(tiny, inputs, press=None, **kw):
    return greedy_generate(
        tiny.model,
        inputs,
        _n_vis(tiny, inputs),
        kw.pop("max_new_tokens", N),
        eos_token_id=kw.pop("eos_token_id", None),
        press=press,
        suppress_token_ids=tiny.adapter.vision_token_ids(),
        **kw,
    )


@pytest.fixture(scope="module")
def reference(tiny, one):
    ref = _gen(tiny, one, continuation=OWN)
    fed, targets = reference_continuation(ref.tokens[0], ref.stopped[0])
    return fed, ReferenceContinuation.from_logits(ref.continuation_logits[0], targets), ref


def test_reference_continuation_feeds_and_predicts():
    assert reference_continuation([5, 6, 7], None) == ([5, 6], [6, 7])
    assert reference_continuation([5, 6, 7], 2) == ([5, 6, 7], [6, 7, 2])
    assert reference_continuation([], 2) == ([], [])


@pytest.mark.parametrize("method", list(METHODS))
def test_nothing_removed_gives_exact_continuation(tiny, one, reference, method):
    fed, rc, _ = reference
    press = make_press(method, tiny.model, target=1.0)
    got = _gen(tiny, one, press=press, continuation=[fed])
    assert got.continuation_logits[0].shape[0] == len(fed) == N - 1
    sc = continuation_scores(rc, got.continuation_logits[0])
    assert (sc.kl_mean, sc.kl_max, sc.agreement, sc.llr, sc.tokens) == (0.0, 0.0, 1.0, 0.0, N - 1)


@pytest.mark.parametrize("method", ["vlcache", "snapkv"])
def test_eviction_continuation_sees_what_first_token_cannot(tiny, one, reference, method):
    fed, rc, ref = reference
    press = make_press(method, tiny.model, target=0.3)
    got = _gen(tiny, one, press=press, continuation=[fed])
    assert torch.equal(got.first_logits, ref.first_logits)  # prefill unchanged: the first token cannot tell
    sc = continuation_scores(rc, got.continuation_logits[0])
    assert sc.kl_mean > 0 and sc.kl_max >= sc.kl_mean
    assert press.changes_prefill is False
    q = score_input("a", "a", ref.first_logits[0], got.first_logits[0], None, prefill_changed=False, continuation=sc)
    assert q.top1_agreement is None and q.first_token_kl is None
    assert q.continuation_kl == sc.kl_mean and q.token_agreement == sc.agreement


def test_binned_kl_equals_full_kl_when_the_vocabulary_fits_the_top_k():
    torch.manual_seed(0)
    ref, cmp = torch.randn(3, 40), torch.randn(3, 40)
    rc = ReferenceContinuation.from_logits(ref, [1, 2, 3])  # V = 40 ≤ K: every token is kept
    sc = continuation_scores(rc, cmp)
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(cmp.double(), -1)
    full = (lp.exp() * (lp - lq)).sum(-1)
    assert sc.kl_mean == pytest.approx(float(full.mean()), abs=1e-12)
    assert sc.kl_max == pytest.approx(float(full.max()), abs=1e-12)
    llr = lq[torch.arange(3), torch.tensor([1, 2, 3])] - lp[torch.arange(3), torch.tensor([1, 2, 3])]
    assert sc.llr == pytest.approx(float(llr.mean()), abs=1e-12)


def _turn(tiny, question: str) -> list[int]:
    text = tiny.adapter.format_followup(question)
    return tiny.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("method", ["lightkv", "vlcache", "fastv"])
def test_followup_equals_uncached_reference(tiny, one, method):
    turn = _turn(tiny, "And what colour is it?")
    press = make_press(method, tiny.model, target=0.55)
    got = _gen(tiny, one, press=press, followup=[turn])
    answer, follow = got.tokens[0], got.followup_tokens[0]
    assert len(answer) == N and len(follow) == N
    S = one["input_ids"].shape[1]
    ids = torch.tensor([one["input_ids"][0].tolist() + answer + turn + follow[:-1]])
    rec = press.last_prefill
    if METHODS[method].kind == "post-prefill eviction":
        cfg = tiny.adapter.text_config
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        with evicted_prompt_masks(tiny.adapter.layers, rec.kept_index, H, Hkv, S, ids.shape[1]), torch.no_grad():
            full = tiny.model(**full_inputs(one, ids), use_cache=False).logits
    else:
        with torch.no_grad(), press.replay()(tiny.model):
            full = tiny.model(**full_inputs(one, ids), use_cache=False).logits
    # the last N positions: the last turn token (it predicts the follow-up's first token), then the follow-up
    ref = full[0, -N:]
    assert (ref - got.followup_logits[:, 0]).abs().max().item() <= TOL
    # and compression mattered: the uncompressed follow-up differs
    base = _gen(tiny, one, followup=[turn])
    assert (base.followup_logits - got.followup_logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", ["lightkv", "vlcache", "fastv"])
def test_followup_in_a_padded_batch_is_each_row_alone(tiny, encode, images, method):
    questions = ["What is in the image?", "Why?", "Is there anything in the picture at all, and where?"]
    follow_qs = ["Colour?", "And then what is next to it?", "Where?"]
    turns = [_turn(tiny, q) for q in follow_qs]
    imgs = [images[0], images[1], images[0]]
    batch = encode(imgs, questions)
    pads = (batch["attention_mask"] == 0).sum(-1).tolist()
    assert len(set(pads)) > 1
    # an end-of-sequence token the first row emits early, so rows end their answers at different steps
    probe = _gen(tiny, encode(images[:1], questions[:1]), press=make_press(method, tiny.model, target=0.55))
    eos = probe.tokens[0][1]
    press = make_press(method, tiny.model, target=0.55)
    got = _gen(tiny, batch, press=press, followup=turns, eos_token_id=eos, pads=pads, max_new_tokens=8)
    assert len({len(t) for t in got.tokens}) > 1 or got.stopped[0] is not None
    for b in range(3):
        alone_in = encode(imgs[b : b + 1], questions[b : b + 1])
        alone = _gen(
            tiny,
            alone_in,
            press=make_press(method, tiny.model, target=0.55),
            followup=[turns[b]],
            eos_token_id=eos,
            max_new_tokens=8,
        )
        assert got.tokens[b] == alone.tokens[0]
        assert got.followup_tokens[b] == alone.followup_tokens[0]
        n = len(alone.followup_tokens[0]) + 1 if len(alone.followup_tokens[0]) < 8 else 8
        n = min(n, alone.followup_logits.shape[0])
        diff = (got.followup_logits[:n, b] - alone.followup_logits[:n, 0]).abs().max().item()
        assert diff <= TOL


def _run(**quality) -> dict:
    return {"id": "vlcache@0.3", "method": "vlcache", "status": "ok", "quality": quality, "per_input": []}


def test_first_token_floor_is_not_applicable_to_eviction():
    run = _run(
        answer_match=1.0, top1_agreement=None, prefill_unchanged=True, token_agreement=0.5, continuation_kl_max=0.2
    )
    res = {r.threshold: r for r in evaluate(run, Thresholds(decide_on="mean"))}
    assert res["min_top1_agreement"].passed and res["min_top1_agreement"].basis == "n/a"
    assert "n/a" in res["min_top1_agreement"].describe()
    assert not res["min_token_agreement"].passed  # 0.5 < 0.95
    assert measured_value(run, "max_kl") == 0.2
    assert not {r.threshold: r for r in evaluate(run, Thresholds(max_kl=0.1))}["max_kl"].passed


def test_files_without_continuation_keep_their_meaning():
    run = _run(answer_match=1.0, top1_agreement=1.0, first_token_kl_max=0.05)
    assert measured_value(run, "max_kl") == 0.05  # read from the first token, as when it was written
    res = {r.threshold: r for r in evaluate(run, Thresholds())}
    assert res["min_token_agreement"].passed and res["min_token_agreement"].basis == "n/a"
