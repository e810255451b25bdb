"""The paired test of ``lightkv check --max-drop`` (scoring/paired.py) on constructed runs."""

from __future__ import annotations

import pytest

from lightkv_cli.scoring.paired import paired_tests
from lightkv_cli.scoring.stats import bootstrap_ci


def _run(ident, method, exact, acc=None, top1=None, kl=None, order=None):
    n = len(exact)
    top1 = top1 or [1.0] * n
    kl = kl or [0.0] * n
    acc = acc or [None] * n
    per_input = [
        {
            "input": f"in{i}",
            "quality": {
                "exact_match": exact[i],
                "top1_agreement": top1[i],
                "first_token_kl": kl[i],
                "accuracy": acc[i],
            },
        }
        for i in range(n)
    ]
    if order is not None:
        per_input = [per_input[i] for i in order]
    return {"id": ident, "method": method, "status": "ok", "per_input": per_input}


def test_answer_match_is_a_one_sample_exact_test_and_accuracy_a_paired_one():
    n = 20
    ref = _run("uncompressed", "uncompressed", [1.0] * n, acc=[1.0] * 19 + [0.0])
    # 7 answers changed; accuracy: 6 right only uncompressed (b), 1 right only compressed (c).
    acc = [0.0] * 6 + [1.0] * 13 + [1.0]
    run = _run("lightkv@0.5", "lightkv", [0.0] * 7 + [1.0] * 13, acc=acc, kl=[0.5] * 7 + [0.0] * 13)
    by = {p.metric: p for p in paired_tests(run, ref, margin=0.02)}
    assert list(by) == ["exact_match", "top1_agreement", "accuracy", "first_token_kl"]
    m = by["exact_match"]
    # Changed 7 of 20: p = P(X ≥ 7 | 20, 0.02) = Σ_{i≥7} C(20,i) 0.02^i 0.98^(20−i)
    # = 77520 · 1.28e-12 · 0.769150 + 125970 · 2.56e-14 · 0.784847 + ... = 7.632e-8 + 0.253e-8 + ... = 7.89e-8.
    assert m.test == "exact binomial" and m.discordant == (7, 0) and m.drop == pytest.approx(0.35)
    assert m.p_value == pytest.approx(7.89e-8, rel=0.01) and not m.passed and m.mcnemar_p is None
    a = by["accuracy"]
    # Drop (6 − 1)/20 = 0.25; Tango at margin 0.02: Z = 1.7622, p = 0.0390 (tests/scoring/test_stats.py);
    # exact McNemar p = 2 · (1 + 7)/128 = 0.125: "no difference" is not rejected, but the margin test is.
    assert a.test == "Tango score" and a.discordant == (6, 1) and a.drop == pytest.approx(0.25)
    assert a.p_value == pytest.approx(0.0390, abs=2e-4) and a.mcnemar_p == pytest.approx(0.125)
    assert not a.passed and a.lower > 0.02
    text = a.describe()
    assert "accuracy drop 0.250 (95% lower bound 0.038 > 0.02; p = 0.039, Tango score; McNemar p = 0.125" in text
    k = by["first_token_kl"]
    assert k.test == "paired bootstrap" and not k.gated and k.passed and k.drop == pytest.approx(0.175)
    assert k.lower == pytest.approx(bootstrap_ci([0.5] * 7 + [0.0] * 13, level=0.9)[0])
    assert by["top1_agreement"].drop == 0.0 and by["top1_agreement"].passed
    # A wider margin passes the accuracy drop: p(0.05) > 0.05.
    assert {p.metric: p for p in paired_tests(run, ref, margin=0.05)}["accuracy"].passed


def test_inputs_are_paired_by_id_not_position():
    ref = _run("uncompressed", "uncompressed", [1.0] * 4, acc=[1.0, 0.0, 1.0, 0.0])
    run = _run("x", "lightkv", [1.0] * 4, acc=[1.0, 0.0, 1.0, 0.0], order=[1, 0, 3, 2])
    a = {p.metric: p for p in paired_tests(run, ref, margin=0.0)}["accuracy"]
    assert a.discordant == (0, 0) and a.drop == 0.0 and a.passed


def test_one_changed_answer_of_twenty_is_not_a_significant_drop():
    # P(X ≥ 1 | 20, 0.02) = 1 − 0.98^20 = 1 − 0.667608 = 0.332392 ≥ 0.05: passes.
    ref = _run("uncompressed", "uncompressed", [1.0] * 20)
    run = _run("x", "lightkv", [0.0] + [1.0] * 19)
    m = paired_tests(run, ref, margin=0.02)[0]
    assert m.p_value == pytest.approx(0.332392, abs=1e-6) and m.passed
    # With no margin any change is significant: P(X ≥ 1 | 20, 0) = 0.
    assert not paired_tests(run, ref, margin=0.0)[0].passed


def test_non_binary_values_use_the_bootstrap_and_missing_metrics_are_left_out():
    ref = _run("uncompressed", "uncompressed", [1.0] * 5)
    run = _run("x", "lightkv", [1.0] * 5, top1=[0.5, 1.0, 0.75, 1.0, 1.0])
    for p in run["per_input"]:
        p["quality"].pop("accuracy")
    by = {p.metric: p for p in paired_tests(run, ref, margin=0.02)}
    assert "accuracy" not in by
    t = by["top1_agreement"]
    assert t.test == "paired bootstrap" and t.p_value is None
    assert t.lower == pytest.approx(bootstrap_ci([0.5, 0.0, 0.25, 0.0, 0.0], level=0.9)[0])
    with pytest.raises(ValueError):
        paired_tests(run, ref, margin=1.0)
