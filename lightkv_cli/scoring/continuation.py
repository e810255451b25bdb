"""Teacher-forced continuation fidelity: how well a compressed cache carries the uncompressed answer.

After the compressed prefill, the uncompressed run's generated tokens are fed through the compressed
cache in one forward (:func:`lightkv_cli.runtime.greedy_generate` with ``continuation=``), and each
position's next-token distribution is compared with the uncompressed run's at the same position, fed the
same tokens: per-token ``KL(P_ref || P)`` (mean and max), top-1 agreement, and the mean log-likelihood
ratio of the reference tokens. This is EffiVLM-Bench's "loyalty" and the continuation KL of KV-Distill
and KVSculpt; unlike first-token metrics it sees post-prefill eviction, whose prefill is unchanged.

The reference is kept as its top ``K`` tokens per position plus one bin for the rest
(:class:`ReferenceContinuation`), so a sweep of many inputs does not hold ``m × V`` logits per input.
No model code; torch is imported when a function runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


#: Tokens of the reference distribution kept per position for the continuation KL (the rest is one bin).
REFERENCE_TOP_K = 64


@dataclass
class ReferenceContinuation:
    """The uncompressed run's teacher-forced continuation of one input, kept compactly for scoring.

    ``m`` positions: the logits at fed token ``t`` predict ``targets[t]`` (the reference answer's next
    token, or its end-of-sequence token). Per position the reference's ``K`` most likely tokens are kept
    with their log-probabilities; the rest of the vocabulary is one bin (``rest_logp``), so memory is
    ``O(m·K)`` per input instead of ``O(m·V)``.

    Attributes:
        targets: ``m`` reference token ids (what the uncompressed run generated next).
        top_ids: ``(m, K)`` long, the reference's ``K = min(REFERENCE_TOP_K, V)`` most likely tokens.
        top_logp: ``(m, K)`` float64, their log-probabilities (nats).
        rest_logp: ``(m,)`` float64, log of the probability of every other token together (``-inf`` when
            none is left).
        argmax: ``(m,)`` long, the reference's top-1 token per position.
        target_logp: ``(m,)`` float64, ``log P_ref(targets[t])``.
    """

    targets: list[int]
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    rest_logp: torch.Tensor
    argmax: torch.Tensor
    target_logp: torch.Tensor

    @classmethod
    def from_logits(cls, logits: Any, targets: Sequence[int]) -> ReferenceContinuation:
        """From the uncompressed run's ``(m, V)`` teacher-forced logits (vision ids already at ``-inf``)."""
        import torch

        lp = torch.log_softmax(torch.as_tensor(logits).detach().to("cpu", torch.float64), dim=-1)
        k = min(REFERENCE_TOP_K, lp.shape[-1])
        top_logp, top_ids = lp.topk(k, dim=-1)
        tgt = torch.tensor(list(targets), dtype=torch.long).view(-1, 1)
        return cls(
            targets=list(targets),
            top_ids=top_ids,
            top_logp=top_logp,
            rest_logp=_rest(lp, top_ids),
            argmax=lp.argmax(-1),
            target_logp=lp.gather(1, tgt).view(-1) if len(targets) else lp.new_zeros(0),
        )


def _rest(lp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """``(m,)`` log of the probability mass outside ``top_ids`` per row of the log-probabilities ``lp``."""
    import torch

    outside = lp.scatter(1, top_ids, float("-inf"))
    return torch.logsumexp(outside, dim=-1)


@dataclass
class ContinuationScores:
    """Teacher-forced continuation fidelity of one input (:func:`continuation_scores`); nats, fractions."""

    kl_mean: float
    kl_max: float
    agreement: float
    llr: float
    tokens: int


def continuation_scores(reference: ReferenceContinuation, logits: Any) -> ContinuationScores | None:
    """Score a compressed run's teacher-forced logits against the uncompressed run's continuation.

    At each of the ``m`` positions, ``KL(P_ref || P)`` is computed over the reference's ``K`` most likely
    tokens and one bin for all others (a coarse-graining of the full KL, so never above it, and equal to
    it when the reference puts no mass outside its top ``K``); exactly 0 when the logits are the
    reference's. Agreement compares top-1 tokens; the log-likelihood ratio is that of the reference tokens.

    Args:
        reference: the uncompressed run's continuation of this input.
        logits: ``(m, V)`` logits of the compressed run at the same positions (fed the same tokens
            through its compressed cache), vision ids at ``-inf`` as in decoding.

    Returns:
        :class:`ContinuationScores`, or None when there is no position to score (``m = 0``).

    Raises:
        ValueError: the shapes disagree, or the logits contain NaN.
    """
    import torch

    m = len(reference.targets)
    if m == 0:
        return None
    lp = torch.log_softmax(torch.as_tensor(logits).detach().to("cpu", torch.float64), dim=-1)
    if lp.shape[0] != m:
        raise ValueError(f"continuation logits have {lp.shape[0]} positions, the reference {m}")
    mine = lp.gather(1, reference.top_ids)
    p_ref = reference.top_logp.exp()
    terms = torch.where(p_ref > 0, p_ref * (reference.top_logp - mine), torch.zeros_like(p_ref)).sum(-1)
    rest = _rest(lp, reference.top_ids)
    p_rest = reference.rest_logp.exp()
    terms = terms + torch.where(p_rest > 0, p_rest * (reference.rest_logp - rest), torch.zeros_like(p_rest))
    if bool(torch.isnan(terms).any()):
        raise ValueError("continuation KL is NaN; the logits contain NaN")
    kl = terms.clamp_min(0.0)
    tgt = torch.tensor(reference.targets, dtype=torch.long).view(-1, 1)
    llr = lp.gather(1, tgt).view(-1) - reference.target_logp
    return ContinuationScores(
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        agreement=float((lp.argmax(-1) == reference.argmax).double().mean()),
        llr=float(llr.mean()),
        tokens=m,
    )
