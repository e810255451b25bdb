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
    Observation,
    PromptRows,
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
    ``k`` most recent). Prefill is unchanged. In a left-padded batch each row uses its own real length,
    window and keys (what it gets alone).

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

    def layer_statistics(self, chunks, kv_heads: int, obs: Observation) -> torch.Tensor:
        """``(R, B, H_kv, S)`` float32 pooled mean attention of the window to each key, for ``R`` layers.

        Per row: the mean over its own window's queries, pooled over its own real keys before its window
        (pad keys and window keys neither pooled nor counted), as the row alone."""
        total = None
        for probs, _, _ in chunks:  # probs: (B, R, H, c, S)
            s = probs.sum(dim=3)
            total = s if total is None else total + s
        B, R, H, S = total.shape
        n = obs.size if obs.row_queries is None else obs.row_queries.to(total.dtype).view(B, 1, 1, 1)
        scores = (total / n).view(B, R, kv_heads, H // kv_heads, S).mean(dim=3)  # (B, R, H_kv, S)
        if obs.real is None and obs.row_starts is None:  # one window, no padding
            w = S - obs.start
            scores = torch.cat([avg_pool_1d(scores[..., : S - w], self.kernel), scores[..., S - w :]], dim=-1)
            return scores.transpose(0, 1)
        # each row pools its real keys before its own window: masked sums over masked counts
        starts = obs.row_starts or [obs.start] * B
        first = torch.tensor(starts, dtype=torch.long, device=total.device).view(B, 1)
        region = torch.arange(S, device=total.device) < first  # (B, S)
        if obs.real is not None:
            region = region & obs.real
        weight = region.float().view(B, 1, 1, S)
        pooled = avg_pool_1d(scores * weight, self.kernel) / avg_pool_1d(weight, self.kernel)
        return torch.where(region.view(B, 1, 1, S), pooled, scores).transpose(0, 1)

    def plan(self, stats: list[torch.Tensor], rows: PromptRows) -> EvictionPlan:
        """The same budget in every layer of a row (``round(α·S_b)``): the window plus the top pooled scores
        per KV head."""
        L = sum(s.shape[0] for s in stats)
        alphas, ks = [], []
        for n, v, e in zip(rows.lengths, rows.vision, rows.evicted):
            alpha = keep_budget(self.budget, self.match_retention, n, v)
            alphas.append(alpha)
            ks.append(max(1, min(n, int(round(alpha * n)))) if e else n)
        recent = [min(self.window, k) for k in ks]
        return EvictionPlan(
            scores=stats,
            budgets=[[k] * L for k in ks],
            recent=recent[0] if len(set(recent)) == 1 else [[r] * L for r in recent],
            details={"alpha": alphas[0], "row_alpha": alphas},
        )
