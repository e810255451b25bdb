"""Tests for lightkv_cli.scoring.fidelity (and statistics): SQuAD normalization, EM/F1, accuracy, first-token KL,
summaries."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightkv_cli.scoring.fidelity import (
    InputQuality,
    QualitySummary,
    answer_correct,
    exact_match,
    first_token_kl,
    normalize_answer,
    score_input,
    summarize,
    token_f1,
    top1_agree,
)
from lightkv_cli.scoring.stats import bootstrap_ci, wilson_interval


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat  sat.", "cat sat"),
        ("  A man, a plan, a canal: Panama! ", "man plan canal panama"),
        ("An apple", "apple"),
        ("theater another", "theater another"),  # articles only as whole words
        ("“Quoted” — text¿", "quoted text"),  # unicode punctuation
        ("x+y=z", "xyz"),  # ASCII string.punctuation symbols too
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match() -> None:
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("a cat", "the dog") == 0.0


def test_token_f1_known_values() -> None:
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8, abs=1e-12)
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3, abs=1e-12)  # multiset overlap is 1
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 0.0  # both empty after normalization: compared as written
    assert token_f1("The.", "the") == 1.0
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes, there is a spoon.", "yes", 1.0),
        ("There are 24 coins", "24", 1.0),
        ("Yes", "yes", 1.0),
        ("It is a red car parked outside.", "red car", 1.0),
        ("not sure", "no", 0.0),
        ("240 coins", "24", 0.0),
        ("car red", "red car", 0.0),  # order matters
        ("", "yes", 0.0),
    ],
)
def test_answer_correct(prediction: str, answer: str, expected: float) -> None:
    assert answer_correct(prediction, answer) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("A", "A", 1.0),  # a multiple-choice letter normalises to nothing: matched as written
        ("a.", "A", 1.0),
        (" (A) ", "A", 1.0),
        ("B", "A", 0.0),
        ("A cat", "A", 0.0),
        ("The", "the", 1.0),
        ("?", "?", 1.0),
        ("!", "?", 0.0),
        ("anything", "", 0.0),
        ("", "  ", 1.0),
    ],
)
def test_answer_correct_answers_that_normalise_to_nothing(prediction: str, answer: str, expected: float) -> None:
    assert answer_correct(prediction, answer) == expected
    # answer match between two such answers compares them as written too
    assert exact_match("A", "B") == 0.0 and exact_match("A", "a") == 1.0


def test_first_token_kl_identical_is_exactly_zero() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert first_token_kl(logits, logits.clone()) == 0.0
    assert first_token_kl(logits, logits[0]) == 0.0  # (1, vocab) and (vocab,) are the same thing


def test_first_token_kl_two_class_hand_computed() -> None:
    # P_ref = softmax([0, 0]) = (1/2, 1/2); P = softmax([ln 3, 0]) = (3/4, 1/4).
    ref = torch.tensor([0.0, 0.0])
    cmp = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert first_token_kl(ref, cmp) == pytest.approx(expected, abs=1e-12)
    # The other order is a different number: KL is not symmetric.
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert first_token_kl(cmp, ref) == pytest.approx(reverse, abs=1e-12)
    assert abs(expected - reverse) > 1e-3


def test_first_token_kl_nonnegative_on_random_pairs() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = torch.randn(2, 50, generator=gen)
        assert first_token_kl(a, b) > 0.0


def test_first_token_kl_zero_probability_tokens() -> None:
    ref = torch.tensor([0.0, float("-inf"), 1.0])
    same_support = torch.tensor([1.0, float("-inf"), 0.0])
    assert math.isfinite(first_token_kl(ref, same_support))
    assert first_token_kl(torch.tensor([0.0, 0.0]), torch.tensor([0.0, float("-inf")])) == math.inf


@pytest.mark.parametrize(
    ("ref_shape", "cmp_shape"),
    [((10,), (11,)), ((1, 10), (1, 11)), ((2, 10), (2, 10)), ((10, 1), (10, 1)), ((1, 1, 10), (10,))],
)
def test_logit_shape_mismatch_raises(ref_shape: tuple[int, ...], cmp_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        first_token_kl(torch.zeros(ref_shape), torch.zeros(cmp_shape))
    with pytest.raises(ValueError):
        top1_agree(torch.zeros(ref_shape), torch.zeros(cmp_shape))


def test_top1_agree() -> None:
    assert top1_agree(torch.tensor([0.1, 2.0, 0.3]), torch.tensor([[0.0, 5.0, 4.9]])) == 1.0
    assert top1_agree(torch.tensor([0.1, 2.0, 0.3]), torch.tensor([0.0, 1.0, 4.9])) == 0.0


def test_score_input() -> None:
    ref_logits = torch.tensor([0.0, 2.0, 1.0])
    item = score_input("The cat sat", "a cat sat down", ref_logits, torch.tensor([0.0, 1.0, 2.0]), "sat down")
    assert item.exact_match == 0.0
    assert item.token_f1 == pytest.approx(0.8)
    assert item.top1_agreement == 0.0
    assert item.first_token_kl > 0.0
    assert item.accuracy == 1.0
    no_answer = score_input("yes", "Yes.", ref_logits, ref_logits, None)
    assert no_answer.accuracy is None
    assert (no_answer.exact_match, no_answer.top1_agreement, no_answer.first_token_kl) == (1.0, 1.0, 0.0)


def test_summarize_means() -> None:
    items = [
        InputQuality(exact_match=1.0, token_f1=1.0, top1_agreement=1.0, first_token_kl=0.0, accuracy=1.0),
        InputQuality(exact_match=0.0, token_f1=0.5, top1_agreement=1.0, first_token_kl=0.3, accuracy=None),
        InputQuality(exact_match=0.0, token_f1=0.0, top1_agreement=0.0, first_token_kl=0.9, accuracy=0.0),
        InputQuality(exact_match=1.0, token_f1=0.9, top1_agreement=1.0, first_token_kl=0.1, accuracy=1.0),
    ]
    s = summarize(items)
    assert s.answer_match == pytest.approx(0.5)
    assert s.token_f1 == pytest.approx(0.6)
    assert s.top1_agreement == pytest.approx(0.75)
    assert s.first_token_kl_mean == pytest.approx(0.325)
    assert s.first_token_kl_max == pytest.approx(0.9)
    assert s.accuracy == pytest.approx(2 / 3)  # over the 3 inputs that have an answer, not 4
    assert (s.n_inputs, s.n_with_answers) == (4, 3)
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["n_inputs"] == 4 and d["accuracy"] == pytest.approx(2 / 3)


def test_summarize_accuracy_none_without_answers() -> None:
    items = [InputQuality(1.0, 1.0, 1.0, 0.0, None), InputQuality(0.0, 0.2, 0.0, 0.5, None)]
    s = summarize(items)
    assert s.accuracy is None
    assert s.n_with_answers == 0
    assert s.to_dict()["accuracy"] is None


def test_summarize_empty_raises() -> None:
    with pytest.raises(ValueError):
        summarize([])


def test_input_quality_to_dict_is_plain_json() -> None:
    item = score_input("a", "b", torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), "b")
    d = item.to_dict()
    scored = {"exact_match", "token_f1", "top1_agreement", "first_token_kl", "accuracy"}
    continuation = {"continuation_kl", "continuation_kl_max", "token_agreement", "continuation_llr"}
    assert set(d) == scored | continuation | {"continuation_tokens", "followup_match", "followup_accuracy"}
    assert all(type(d[k]) is float for k in scored)
    assert all(d[k] is None for k in set(d) - scored)  # no continuation or follow-up given
    assert json.loads(json.dumps(d)) == d


def test_bootstrap_ci_all_equal_is_zero_width() -> None:
    assert bootstrap_ci([0.7] * 20) == (0.7, 0.7)
    assert bootstrap_ci([3.5]) == (3.5, 3.5)
    assert bootstrap_ci([1]) == (1.0, 1.0) and isinstance(bootstrap_ci([1])[0], float)


def test_bootstrap_ci_of_a_fair_coin() -> None:
    # 100 values, mean 0.5, standard error 0.05: the 95% interval is about 0.5 ± 0.098.
    low, high = bootstrap_ci([0.0, 1.0] * 50)
    assert 0.35 <= low <= 0.45
    assert 0.55 <= high <= 0.65
    narrow_low, narrow_high = bootstrap_ci([0.0, 1.0] * 50, level=0.5)
    assert low < narrow_low < 0.5 < narrow_high < high


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 1.0, 0.4]
    mean = sum(values) / len(values)
    low, high = bootstrap_ci(values, seed=3)
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert (low, high) != bootstrap_ci(values, seed=4)
    assert 0.0 <= low < mean < high <= 1.0
    single = bootstrap_ci(values, resamples=1)
    assert single[0] == single[1]  # one resample: both percentiles are its mean


def test_bootstrap_ci_with_infinite_values() -> None:
    low, high = bootstrap_ci([0.0, 1.0, math.inf])
    assert high == math.inf
    assert not math.isnan(low) and low < math.inf  # some resamples miss the inf
    assert bootstrap_ci([math.inf, math.inf]) == (math.inf, math.inf)
    assert all(math.isnan(b) for b in bootstrap_ci([0.0, math.nan]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"values": []},
        {"values": [1.0], "level": 0.0},
        {"values": [1.0], "level": 1.0},
        {"values": [1.0], "resamples": 0},
    ],
)
def test_bootstrap_ci_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(**kwargs)


def test_summarize_confidence_intervals() -> None:
    items = [
        InputQuality(exact_match=1.0, token_f1=1.0, top1_agreement=1.0, first_token_kl=0.0, accuracy=1.0),
        InputQuality(exact_match=0.0, token_f1=0.5, top1_agreement=1.0, first_token_kl=0.3, accuracy=None),
        InputQuality(exact_match=0.0, token_f1=0.0, top1_agreement=1.0, first_token_kl=0.9, accuracy=0.0),
        InputQuality(exact_match=1.0, token_f1=0.9, top1_agreement=1.0, first_token_kl=0.1, accuracy=1.0),
    ]
    s = summarize(items)
    assert set(s.ci) >= {"answer_match", "token_f1", "top1_agreement", "first_token_kl_mean", "accuracy"}
    # no continuation or follow-up measured: their intervals are None, not zero-width
    assert all(s.ci[k] is None for k in ("token_agreement", "continuation_kl_mean", "followup_match"))
    assert s.token_agreement is None and s.continuation_tokens == 0 and not s.prefill_unchanged
    # 0/1 metrics get Wilson score intervals: every input agrees, 4 of 4 → [n/(n + z²), 1] with
    # z = 1.959964, z² = 3.841459: 4/7.841459 = 0.5101 (a bootstrap would say [1, 1]).
    assert s.ci["top1_agreement"][0] == pytest.approx(0.5101, abs=1e-4) and s.ci["top1_agreement"][1] == 1.0
    assert s.ci["answer_match"] == wilson_interval(2, 4)
    assert s.ci["accuracy"] == wilson_interval(2, 3)  # only the inputs with an answer
    # Continuous metrics keep the bootstrap.
    assert s.ci["token_f1"] == bootstrap_ci([1.0, 0.5, 0.0, 0.9])
    assert s.ci["first_token_kl_mean"] == bootstrap_ci([0.0, 0.3, 0.9, 0.1])
    for metric in ("answer_match", "token_f1", "first_token_kl_mean", "accuracy"):
        low, high = s.ci[metric]
        assert low <= getattr(s, metric) <= high and low < high
    d = s.to_dict()
    assert d["ci"]["top1_agreement"] == list(s.ci["top1_agreement"])
    assert d["ci"]["accuracy"] == list(s.ci["accuracy"])
    assert json.loads(json.dumps(d)) == d


def test_summarize_ci_without_answers_and_with_infinite_kl() -> None:
    items = [InputQuality(1.0, 1.0, 1.0, 0.0, None), InputQuality(0.0, 0.2, 0.0, math.inf, None)]
    s = summarize(items)
    assert s.ci["accuracy"] is None
    assert s.to_dict()["ci"]["accuracy"] is None
    assert s.first_token_kl_mean == math.inf
    assert s.ci["first_token_kl_mean"][1] == math.inf


def test_quality_summary_built_by_hand_has_empty_ci() -> None:
    s = QualitySummary(1.0, 1.0, 1.0, 0.0, 0.0, None, 1, 0)
    assert s.ci == {}
    assert s.to_dict()["ci"] == {}
    assert list(s.to_dict())[:8] == [
        "answer_match", "token_f1", "top1_agreement", "first_token_kl_mean",
        "first_token_kl_max", "accuracy", "n_inputs", "n_with_answers",
    ]  # fmt: skip
