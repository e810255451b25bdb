"""Answer quality of a compressed run: fidelity to the uncompressed run, and task accuracy.

Two kinds of score are computed per input:

* **Fidelity** compares the compressed run with the uncompressed (reference) run of the same
  model on the same input: SQuAD-style exact match and token F1 between the two generated
  answers, agreement of the first generated token (top-1 of the prefill logits), and the
  KL divergence ``KL(P_ref || P)`` of the first-token distributions, in nats.
* **Continuation fidelity** (teacher-forced; EffiVLM-Bench's "loyalty", the KL over continuations of
  KV-Distill and KVSculpt): the uncompressed run's answer is fed through the compressed cache in one
  forward, and at every position the compressed run's next-token distribution is compared with the
  uncompressed run's at the same position (:mod:`lightkv_cli.scoring.continuation`): per-token
  ``KL(P_ref || P)`` (mean and max), top-1 agreement, and the mean log-likelihood ratio of the reference
  tokens. It sees every method, post-prefill eviction included, whose prefill (and so first token) is
  the uncompressed model's by construction: for those the first-token metrics are not applicable
  (``None``, shown "n/a").
* **Accuracy** compares the compressed run's answer with a ground-truth answer, when the
  input has one (``answer_correct``: normalized match or contiguous word containment).

``summarize`` aggregates the per-input scores into means and gives each mean a 95% confidence
interval over inputs (``mean_interval``): a Wilson score interval (Wilson, 1927) for the 0/1
metrics (answer match, top-1 agreement, accuracy), so 8 agreeing inputs of 8 give [0.68, 1], not
[1, 1]; a percentile bootstrap (``bootstrap_ci``; Efron & Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13) for the continuous ones (token F1, KL).

Text normalization follows the SQuAD v1.1 evaluation script (lowercase, drop punctuation,
drop the articles a/an/the, collapse whitespace), extended to Unicode punctuation.

Nothing here prints; the functions return numbers and the CLI decides how to show them.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lightkv_cli.scoring.stats import bootstrap_ci, mean_interval

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lightkv_cli.scoring.continuation import ContinuationScores


_ASCII_PUNCTUATION = frozenset(string.punctuation)


_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Normalize an answer the way the SQuAD evaluation script does.

    Steps, in order: lowercase; delete every punctuation character (``string.punctuation``
    plus any Unicode character whose category starts with ``"P"``, e.g. curly quotes,
    em dashes, ``¿``); remove the English articles ``a``, ``an``, ``the`` as whole words;
    collapse runs of whitespace to one space; strip.

    Args:
        text: any string.

    Returns:
        The normalized string (possibly empty).
    """
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if not _is_punctuation(ch))
    no_articles = _ARTICLES.sub(" ", no_punct)
    return " ".join(no_articles.split())


def _literal(text: str) -> str:
    """An answer as written, for answers that normalise to nothing (``"A"``, ``"the"``, ``"?"``):
    case-folded, surrounding whitespace removed, and surrounding punctuation too unless nothing else is
    left (so ``"A."`` is ``"a"`` and ``"?"`` stays ``"?"``)."""
    folded = text.strip().casefold()
    bare = folded.strip("".join(_ASCII_PUNCTUATION) + " ")
    return bare or folded


def exact_match(prediction: str, reference: str) -> float:
    """SQuAD exact match: 1.0 if the normalized strings are equal, else 0.0.

    When both answers normalise to nothing (``"A"``, ``"the"``, ``"?"``, ``""``), they are compared as
    written instead (case-insensitive, stripped; see :func:`_literal`), so multiple-choice letters
    ``"A"`` and ``"B"`` do not count as a match.

    Args:
        prediction: the answer being scored.
        reference: the answer it is compared with.

    Returns:
        1.0 or 0.0.
    """
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred and not ref:  # "A" and "B" both normalise to nothing: compare them as written
        return 1.0 if _literal(prediction) == _literal(reference) else 0.0
    return 1.0 if pred == ref else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between two answers.

    Both answers are normalized and split on whitespace; the overlap is the multiset
    intersection of the two word lists. Precision = overlap / len(prediction words),
    recall = overlap / len(reference words), F1 = 2·P·R / (P + R).

    Args:
        prediction: the answer being scored.
        reference: the answer it is compared with.

    Returns:
        F1 in [0, 1]. Both normalized answers empty → 1.0 when they are equal as written (:func:`_literal`),
        else 0.0; exactly one empty → 0.0.
    """
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens and not ref_tokens:  # both normalise to nothing: compare them as written
        return 1.0 if _literal(prediction) == _literal(reference) else 0.0
    if not pred_tokens or not ref_tokens:
        return 0.0
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2.0 * precision * recall / (precision + recall)


def answer_correct(prediction: str, answer: str) -> float:
    """Whether a free-form prediction contains the ground-truth answer.

    Correct when the normalized answer equals the normalized prediction, or when the
    answer's normalized word sequence occurs as a contiguous run of whole words in the
    prediction's. So ``"yes"`` is correct for ``"Yes, there is a spoon."`` and ``"24"`` for
    ``"There are 24 coins"``, but ``"24"`` is not correct for ``"240 coins"`` and ``"no"``
    is not correct for ``"not sure"``.

    Args:
        prediction: the model's answer.
        answer: the ground-truth answer.

    Returns:
        1.0 or 0.0.

    An answer that normalises to nothing (a multiple-choice letter ``"A"``, ``"the"``, ``"?"``) is matched
    as written instead: the prediction is correct when it equals the answer case-insensitively, after
    stripping whitespace and surrounding punctuation (``"a."`` is correct for ``"A"``, ``"A cat"`` is not;
    :func:`_literal`). Never raises for any pair of strings.
    """
    answer_norm = normalize_answer(answer)
    if not answer_norm:
        return 1.0 if _literal(prediction) == _literal(answer) else 0.0
    prediction_norm = normalize_answer(prediction)
    if prediction_norm == answer_norm:
        return 1.0
    answer_words = answer_norm.split()
    prediction_words = prediction_norm.split()
    width = len(answer_words)
    for start in range(len(prediction_words) - width + 1):
        if prediction_words[start : start + width] == answer_words:
            return 1.0
    return 0.0


def _as_vocab_vector(logits: Any, name: str) -> torch.Tensor:
    """Return logits as a float64 CPU vector of shape (vocab,), from shape (vocab,) or (1, vocab)."""
    import torch

    tensor = torch.as_tensor(logits).detach()
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or tensor.shape[0] == 0:
        raise ValueError(f"{name} must have shape (vocab,) or (1, vocab); got {tuple(tensor.shape)}")
    return tensor.to(device="cpu", dtype=torch.float64)


def _pair(reference_logits: Any, logits: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ref = _as_vocab_vector(reference_logits, "reference_logits")
    cmp = _as_vocab_vector(logits, "logits")
    if ref.shape != cmp.shape:
        raise ValueError(
            f"logits shape mismatch: reference has vocab {ref.shape[0]}, compared run has vocab {cmp.shape[0]}"
        )
    return ref, cmp


def first_token_kl(reference_logits: Any, logits: Any) -> float:
    """KL divergence ``KL(P_ref || P)`` of the first-token distributions, in nats.

    ``P_ref = softmax(reference_logits)`` (uncompressed run) and ``P = softmax(logits)``
    (compressed run), both over the vocabulary, computed in float64 on the CPU.

    Args:
        reference_logits: tensor (or array-like) of shape (vocab,) or (1, vocab).
        logits: same shape contract as ``reference_logits``, same vocab size.

    Returns:
        KL in nats, ≥ 0; exactly 0.0 for identical inputs; ``inf`` if the compressed run
        gives zero probability (a ``-inf`` logit) to a token the reference does not.

    Raises:
        ValueError: if either input is not (vocab,) / (1, vocab) or the vocab sizes differ.
    """
    import torch

    ref, cmp = _pair(reference_logits, logits)
    if torch.equal(ref, cmp):
        return 0.0
    log_p_ref = torch.log_softmax(ref, dim=-1)
    log_p = torch.log_softmax(cmp, dim=-1)
    p_ref = log_p_ref.exp()
    # Terms with P_ref = 0 contribute 0 (avoids 0 * (-inf - -inf) = nan).
    terms = torch.where(p_ref > 0, p_ref * (log_p_ref - log_p), torch.zeros_like(p_ref))
    kl = float(terms.sum().item())
    if math.isnan(kl):
        raise ValueError("KL divergence is NaN; the logits contain NaN")
    return max(kl, 0.0)


def top1_agree(reference_logits: Any, logits: Any) -> float:
    """Whether the two runs would pick the same first token (greedy).

    Args:
        reference_logits: tensor (or array-like) of shape (vocab,) or (1, vocab).
        logits: same shape contract, same vocab size.

    Returns:
        1.0 when ``argmax(reference_logits) == argmax(logits)``, else 0.0.

    Raises:
        ValueError: if either input is not (vocab,) / (1, vocab) or the vocab sizes differ.
    """
    ref, cmp = _pair(reference_logits, logits)
    return 1.0 if int(ref.argmax().item()) == int(cmp.argmax().item()) else 0.0


@dataclass
class InputQuality:
    """Quality scores of one input's compressed run.

    Attributes:
        exact_match: SQuAD exact match of the compressed answer vs the uncompressed answer.
        token_f1: SQuAD token F1 of the compressed answer vs the uncompressed answer.
        top1_agreement: 1.0 if both runs' first-token argmax agree; None (n/a) for a method that leaves
            prefill unchanged.
        first_token_kl: ``KL(P_ref || P)`` of the first-token distributions, nats; None (n/a) likewise.
        accuracy: ``answer_correct`` of the compressed answer vs the ground-truth answer;
            None when the input has no ground-truth answer.
        continuation_kl: mean per-token ``KL(P_ref || P)`` over the reference continuation, nats
            (:func:`~lightkv_cli.scoring.continuation.continuation_scores`); None when the reference
            continuation has no token to score.
        continuation_kl_max: the worst token's KL of that continuation, nats.
        token_agreement: fraction of the continuation's positions whose top-1 tokens agree.
        continuation_llr: mean ``log P(y_t) − log P_ref(y_t)`` of the reference tokens, nats per token
            (negative: the compressed run finds the reference answer less likely).
        continuation_tokens: positions scored (the reference answer's tokens after the first, and its
            end-of-sequence token when it stopped on one).
        followup_match: exact match of the follow-up answer vs the uncompressed run's follow-up answer,
            None without a follow-up question.
        followup_accuracy: ``answer_correct`` of the follow-up answer vs the given ``followup_answer``,
            None without one.
    """

    exact_match: float
    token_f1: float
    top1_agreement: float | None
    first_token_kl: float | None
    accuracy: float | None
    continuation_kl: float | None = None
    continuation_kl_max: float | None = None
    token_agreement: float | None = None
    continuation_llr: float | None = None
    continuation_tokens: int | None = None
    followup_match: float | None = None
    followup_accuracy: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain-number dict for JSON output (``continuation_tokens`` an int)."""
        return {
            k: (None if v is None else int(v) if k == "continuation_tokens" else float(v))
            for k, v in asdict(self).items()
        }


def score_input(
    reference_answer: str,
    answer: str,
    reference_logits: Any,
    logits: Any,
    expected: str | None,
    *,
    prefill_changed: bool = True,
    continuation: ContinuationScores | None = None,
    followup: tuple[str, str, str | None] | None = None,
) -> InputQuality:
    """Score one input's compressed run against its uncompressed run (and the truth, if known).

    Args:
        reference_answer: generated answer of the uncompressed run.
        answer: generated answer of the compressed run.
        reference_logits: first-token logits of the uncompressed run, (vocab,) or (1, vocab).
        logits: first-token logits of the compressed run, same shape.
        expected: ground-truth answer, or None when the input has none.
        prefill_changed: False for a method that leaves prefill unchanged (post-prefill eviction): its
            first token is the uncompressed model's by construction, so the first-token metrics are
            recorded as not applicable (None), not as a perfect measurement.
        continuation: the teacher-forced continuation scores
            (:func:`~lightkv_cli.scoring.continuation.continuation_scores`), or None.
        followup: ``(reference follow-up answer, follow-up answer, given follow-up answer or None)``
            when the input has a follow-up question.

    Returns:
        An ``InputQuality``.

    Raises:
        ValueError: on a logits shape mismatch.
    """
    c = continuation
    return InputQuality(
        exact_match=exact_match(answer, reference_answer),
        token_f1=token_f1(answer, reference_answer),
        top1_agreement=top1_agree(reference_logits, logits) if prefill_changed else None,
        first_token_kl=first_token_kl(reference_logits, logits) if prefill_changed else None,
        accuracy=None if expected is None else answer_correct(answer, expected),
        continuation_kl=None if c is None else c.kl_mean,
        continuation_kl_max=None if c is None else c.kl_max,
        token_agreement=None if c is None else c.agreement,
        continuation_llr=None if c is None else c.llr,
        continuation_tokens=None if c is None else c.tokens,
        followup_match=None if followup is None else exact_match(followup[1], followup[0]),
        followup_accuracy=None if followup is None or followup[2] is None else answer_correct(followup[1], followup[2]),
    )


@dataclass
class QualitySummary:
    """Quality of one compression setting, aggregated over inputs.

    Attributes:
        answer_match: mean exact match vs the uncompressed answers (fraction in [0, 1]).
        token_f1: mean token F1 vs the uncompressed answers.
        top1_agreement: fraction of inputs whose first token agrees with the uncompressed run; None (n/a)
            for a method that leaves prefill unchanged.
        first_token_kl_mean: mean first-token KL, nats; None likewise.
        first_token_kl_max: worst first-token KL, nats; None likewise.
        accuracy: mean accuracy over the inputs that have a ground-truth answer; None if none do.
        n_inputs: number of inputs summarized.
        n_with_answers: number of those with a ground-truth answer.
        ci: 95% intervals over inputs, ``metric → (low, high)``, for ``answer_match``,
            ``token_f1``, ``top1_agreement``, ``first_token_kl_mean``, ``accuracy``,
            ``token_agreement``, ``continuation_kl_mean``, ``continuation_llr``, ``followup_match`` and
            ``followup_accuracy`` (None when not measured); same units as the metric: Wilson score
            intervals for metrics whose per-input values are all 0 or 1, percentile bootstrap otherwise
            (:func:`~lightkv_cli.scoring.stats.mean_interval`). Empty when built by hand.
        prefill_unchanged: True when the first-token metrics are not applicable (post-prefill eviction).
        token_agreement: mean over inputs of the continuation's top-1 agreement (fraction).
        continuation_kl_mean: mean over inputs of the continuation's mean per-token KL, nats.
        continuation_kl_max: the worst token's continuation KL over every input, nats.
        continuation_llr: mean over inputs of the continuation's mean log-likelihood ratio, nats/token.
        continuation_tokens: positions scored over every input.
        followup_match: fraction of follow-up answers equal to the uncompressed run's; None without
            follow-up questions.
        followup_accuracy: follow-up accuracy against the given follow-up answers; None without any.
        n_followups: inputs with a follow-up question.
    """

    answer_match: float
    token_f1: float
    top1_agreement: float | None
    first_token_kl_mean: float | None
    first_token_kl_max: float | None
    accuracy: float | None
    n_inputs: int
    n_with_answers: int
    ci: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    prefill_unchanged: bool = False
    token_agreement: float | None = None
    continuation_kl_mean: float | None = None
    continuation_kl_max: float | None = None
    continuation_llr: float | None = None
    continuation_tokens: int = 0
    followup_match: float | None = None
    followup_accuracy: float | None = None
    n_followups: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-number dict for JSON output.

        Floats for the metrics, ints for the counts, None for what was not measured or does not apply,
        and ``"ci"`` as ``{metric: [low, high] or None}``. Non-finite floats (an ``inf`` KL) are kept; the
        results writer turns them into null.
        """
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "ci":
                out[key] = {
                    metric: None if bounds is None else [float(bounds[0]), float(bounds[1])]
                    for metric, bounds in self.ci.items()
                }
            elif value is None:
                out[key] = None
            elif key in ("n_inputs", "n_with_answers", "continuation_tokens", "n_followups"):
                out[key] = int(value)
            elif key == "prefill_unchanged":
                out[key] = bool(value)
            else:
                out[key] = float(value)
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _present(items: Sequence[InputQuality], key: str) -> list[float]:
    return [float(getattr(i, key)) for i in items if getattr(i, key) is not None]


def summarize(items: Sequence[InputQuality]) -> QualitySummary:
    """Aggregate per-input scores into means (and the max KL), with 95% intervals.

    Args:
        items: per-input scores, at least one.

    Returns:
        A ``QualitySummary``. A metric some inputs do not have (accuracy without an answer, the
        continuation of an input whose reference answer has no token to score, a follow-up) is the mean
        over the inputs that have it, None when none does; first-token metrics are None (n/a) when no
        input has them (``prefill_unchanged``). ``ci`` holds the 95% interval of each mean
        (:func:`~lightkv_cli.scoring.stats.mean_interval`: Wilson score for 0/1 values, else the
        percentile bootstrap with its default resamples and seed, so it is deterministic).

    Raises:
        ValueError: if ``items`` is empty.
    """
    if len(items) == 0:
        raise ValueError("cannot summarize quality over zero inputs")
    n = len(items)
    matches = [float(item.exact_match) for item in items]
    f1s = [float(item.token_f1) for item in items]
    agreements = _present(items, "top1_agreement")
    kls = _present(items, "first_token_kl")
    answered = _present(items, "accuracy")
    tok = _present(items, "token_agreement")
    ckl = _present(items, "continuation_kl")
    ckl_max = _present(items, "continuation_kl_max")
    llr = _present(items, "continuation_llr")
    fu = _present(items, "followup_match")
    fu_acc = _present(items, "followup_accuracy")

    def mean_or_none(values: list[float]) -> float | None:
        return _mean(values) if values else None

    return QualitySummary(
        answer_match=_mean(matches),
        token_f1=_mean(f1s),
        top1_agreement=mean_or_none(agreements),
        first_token_kl_mean=mean_or_none(kls),
        first_token_kl_max=max(kls) if kls else None,
        accuracy=mean_or_none(answered),
        n_inputs=n,
        n_with_answers=len(answered),
        ci={
            "answer_match": mean_interval(matches),
            "token_f1": bootstrap_ci(f1s),
            "top1_agreement": mean_interval(agreements) if agreements else None,
            "first_token_kl_mean": bootstrap_ci(kls) if kls else None,
            "accuracy": mean_interval(answered) if answered else None,
            "token_agreement": mean_interval(tok) if tok else None,
            "continuation_kl_mean": bootstrap_ci(ckl) if ckl else None,
            "continuation_llr": bootstrap_ci(llr) if llr else None,
            "followup_match": mean_interval(fu) if fu else None,
            "followup_accuracy": mean_interval(fu_acc) if fu_acc else None,
        },
        prefill_unchanged=not agreements,
        token_agreement=mean_or_none(tok),
        continuation_kl_mean=mean_or_none(ckl),
        continuation_kl_max=max(ckl_max) if ckl_max else None,
        continuation_llr=mean_or_none(llr),
        continuation_tokens=sum(int(i.continuation_tokens or 0) for i in items),
        followup_match=mean_or_none(fu),
        followup_accuracy=mean_or_none(fu_acc),
        n_followups=len(fu),
    )
