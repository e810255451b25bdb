"""Tests for lightkv_cli.quality: SQuAD normalization, EM/F1, accuracy, first-token KL, summaries."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightkv_cli.quality import (
    InputQuality,
    answer_correct,
    exact_match,
    first_token_kl,
    normalize_answer,
    score_input,
    summarize,
    token_f1,
    top1_agree,
)


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
    assert token_f1("the", "") == 1.0  # both empty after normalization
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


@pytest.mark.parametrize("answer", ["", "  ", "the", "?!"])
def test_answer_correct_empty_answer_raises(answer: str) -> None:
    with pytest.raises(ValueError):
        answer_correct("anything", answer)


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
    assert set(d) == {"exact_match", "token_f1", "top1_agreement", "first_token_kl", "accuracy"}
    assert all(type(v) is float for v in d.values())
    assert json.loads(json.dumps(d)) == d
