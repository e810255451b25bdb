"""SnapKV: post-prefill eviction by the attention of an observation window (the generic LLM method).

Implements "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., NeurIPS 2024,
arXiv 2404.14469) from its definition in ``shared/docs/METHODS.md`` §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightkv_cli.errors import UserError
from lightkv_cli.methods.eviction import (
    EvictionPlan,
    EvictionPress,
    avg_pool_1d,
    check_fraction,
    keep_budget,
)


@dataclass
class SnapKV(EvictionPress):
    """SnapKV: every layer keeps the same share of the prompt's KV entries, chosen per KV head.

    The last ``window`` prompt tokens are the observation window. Their mean causal attention to
    each earlier key (averaged over the query heads of each KV head), smoothed by a 1-D average
    pooling of width ``kernel``, scores the keys; each layer keeps the window plus the top-scoring
    keys, ``k = round(α·S)`` entries per KV head in all (if ``k`` is smaller than the window, the
    ``k`` most recent). Prefill is unchanged.

    Args:
        budget: keep fraction ``α`` of the prompt's KV entries per layer, in ``(0, 1]``.
        match_retention: instead of ``budget``: the KV entries an in-prefill method at vision
            retention ``R`` keeps (``α = 1 − (1 − R)·n/S`` per prompt).
        window: observation window (32).
        kernel: pooling width (5).

    Raises:
        UserError: invalid parameters.
    """

    budget: float | None = None
    match_retention: float | None = None
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.match_retention is None):
            raise UserError("SnapKV needs exactly one of budget (KV keep fraction) and match_retention")
        check_fraction("budget", self.budget)
        check_fraction("match_retention", self.match_retention)
        if self.window < 1:
            raise UserError(f"window must be ≥ 1, got {self.window}")
        if self.kernel < 1:
            raise UserError(f"kernel must be ≥ 1, got {self.kernel}")

    def describe(self) -> dict:
        """Parameters for results files."""
        return {
            "budget": self.budget,
            "match_retention": self.match_retention,
            "window": self.window,
            "kernel": self.kernel,
            "schedule_note": self.schedule_note,
        }

    def observation_start(self, seq_len: int, last_vision: int) -> int:
        """The last ``window`` prompt positions."""
        return max(0, seq_len - self.window)

    def layer_statistics(self, chunks, kv_heads: int) -> torch.Tensor:
        """``(R, B, H_kv, S)`` float32 pooled mean attention of the window to each key, for ``R`` layers."""
        total, n = None, 0
        for probs, _, _ in chunks:  # probs: (B, R, H, c, S)
            s = probs.sum(dim=3)
            total = s if total is None else total + s
            n += probs.shape[3]
        B, R, H, S = total.shape
        scores = (total / n).view(B, R, kv_heads, H // kv_heads, S).mean(dim=3)  # (B, R, H_kv, S)
        w = min(self.window, S)
        scores = torch.cat([avg_pool_1d(scores[..., : S - w], self.kernel), scores[..., S - w :]], dim=-1)
        return scores.transpose(0, 1)

    def plan(self, stats: list[torch.Tensor], seq_len: int, vision_tokens: int) -> EvictionPlan:
        """The same budget in every layer: the window plus the top pooled scores per KV head."""
        alpha = keep_budget(self.budget, self.match_retention, seq_len, vision_tokens)
        k = max(1, min(seq_len, int(round(alpha * seq_len))))
        return EvictionPlan(
            scores=stats,
            budgets=[k] * sum(s.shape[0] for s in stats),
            recent=min(self.window, k),
            details={"alpha": alpha},
        )
