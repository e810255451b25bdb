"""VL-Cache: sparsity- and modality-aware post-prefill KV eviction with per-layer budgets.

Implements "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for Vision-Language Model
Inference Acceleration" (Tu, Vashchilenko, Lu, Xu, ICLR 2025, arXiv 2410.23317) from its definition
in ``shared/docs/METHODS.md`` §2 (no official code is public).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_cli.errors import UserError
from lightkv_cli.methods.eviction import EvictionPress, check_fraction, group_mean, keep_budget, select_per_head


def layer_budgets(
    density: Sequence[float], alpha: float, seq_len: int, min_fraction: float = 0.01
) -> tuple[list[int], list[float]]:
    """Sparsity-aware per-layer budgets that sum exactly to the global budget.

    ``β_l = clip(α·L·d_l / Σ d, min_fraction, 1)`` and layer ``l`` keeps ``k_l = β_l·S`` tokens. When
    clipping moves the sum away from ``α·L·S``, the common factor ``α·L / Σ d`` is re-solved so that
    the clipped budgets sum to it again (denser layers still get more); the real-valued budgets are
    then rounded by largest remainder so that ``Σ k_l = round(α·L·S)`` exactly.

    Args:
        density: ``d_l = 1 − γ_l`` per layer (``L`` floats ≥ 0).
        alpha: global keep fraction ``α`` in ``(0, 1]``.
        seq_len: prompt length ``S``.
        min_fraction: smallest ``β_l`` (0.01 in the paper); at least one token is always kept.

    Returns:
        ``(budgets, betas)``: ``k_l`` tokens per layer (ints in ``[⌈min_fraction·S⌉, S]``) and
        ``k_l / S``.

    Raises:
        UserError: ``alpha`` outside ``(0, 1]``.
    """
    check_fraction("budget", alpha)
    L, S = len(density), int(seq_len)
    lo = max(1, math.ceil(min_fraction * S - 1e-9))
    total = min(max(int(round(alpha * L * S)), L * lo), L * S)
    d = torch.tensor([max(0.0, float(x)) for x in density], dtype=torch.float64)
    if float(d.sum()) <= 0:
        d = torch.ones(L, dtype=torch.float64)
    # a layer of density 0 still gets a share once every denser layer is full (keeps the total reachable)
    d = d.clamp(min=1e-9 * float(d.max()))

    def real(c: float) -> torch.Tensor:
        return (c * d * S).clamp(min=lo, max=S)

    c = alpha * L / float(d.sum())  # the paper's factor; exact when nothing is clipped
    if abs(float(real(c).sum()) - total) > 1e-6:
        low, high = 0.0, 1.0
        for _ in range(200):
            if float(real(high).sum()) >= total:
                break
            high *= 2
        for _ in range(200):
            c = (low + high) / 2
            if float(real(c).sum()) < total:
                low = c
            else:
                high = c
        c = high
    k_real = real(c)
    k = torch.floor(k_real + 1e-9).long().clamp(min=lo, max=S)
    frac = k_real - k.double()
    while int(k.sum()) < total:  # largest remainder first, among layers below S
        cand = torch.where(k < S, frac, torch.full_like(frac, -math.inf))
        i = int(torch.argmax(cand))
        k[i] += 1
        frac[i] -= 1
    while int(k.sum()) > total:  # (only after bisection rounding) smallest remainder gives back
        cand = torch.where(k > lo, frac, torch.full_like(frac, math.inf))
        i = int(torch.argmin(cand))
        k[i] -= 1
        frac[i] += 1
    budgets = [int(x) for x in k]
    return budgets, [b / S for b in budgets]


@dataclass
class VLCache(EvictionPress):
    """VL-Cache (ICLR 2025): evict KV entries (vision and text) after prefill, per layer and per KV head.

    During prefill, each layer's *post-vision attention* is observed: queries are the prompt tokens
    after the last vision token (``τ`` of them), keys the whole prompt, ``A = softmax(QKᵀ/√d +
    causal)`` of shape ``(B, H, τ, S)`` — never an ``S×S`` matrix. From it:

    - layer density ``d_l = 1 − γ_l``, with ``γ_l`` the fraction of causally visible entries below
      ``sparsity_threshold ×`` their row maximum, averaged over rows, heads and queries;
    - per-layer budgets ``k_l`` (:func:`layer_budgets`) summing to ``α·L·S``;
    - token scores ``s_j = Σ_q A[q, j]``, averaged over the query heads of each KV head.

    When prefill ends every layer keeps, per KV head, its most recent ``⌊recent_fraction·k_l⌋``
    tokens plus the highest-scoring others, ``k_l`` in all. Prefill compute and peak memory are
    unchanged; the KV cache that decoding reads shrinks to ``α`` of the prompt's.

    Args:
        budget: global keep fraction ``α`` of the prompt's KV entries, in ``(0, 1]``.
        match_retention: instead of ``budget``: keep as many KV entries as an in-prefill method at
            vision retention ``R`` would (``α = 1 − (1 − R)·n/S`` per prompt), for comparisons at
            equal KV bytes.
        sparsity_threshold: ``p`` (0.01).
        recent_fraction: share of each layer's budget given to the most recent tokens (0.1).
        min_layer_fraction: smallest per-layer budget as a fraction of ``S`` (0.01).

    Raises:
        UserError: invalid parameters (exactly one of ``budget`` and ``match_retention``).

    A prompt without vision tokens, or with nothing after the last one, is not evicted.
    """

    budget: float | None = None
    match_retention: float | None = None
    sparsity_threshold: float = 0.01
    recent_fraction: float = 0.1
    min_layer_fraction: float = 0.01

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.match_retention is None):
            raise UserError("VLCache needs exactly one of budget (KV keep fraction) and match_retention")
        check_fraction("budget", self.budget)
        check_fraction("match_retention", self.match_retention)
        if not (0.0 <= self.sparsity_threshold < 1.0):
            raise UserError(f"sparsity_threshold must be in [0, 1), got {self.sparsity_threshold}")
        if not (0.0 <= self.recent_fraction <= 1.0):
            raise UserError(f"recent_fraction must be in [0, 1], got {self.recent_fraction}")
        if not (0.0 < self.min_layer_fraction <= 1.0):
            raise UserError(f"min_layer_fraction must be in (0, 1], got {self.min_layer_fraction}")

    def describe(self) -> dict:
        """Parameters for results files."""
        return {
            "budget": self.budget,
            "match_retention": self.match_retention,
            "sparsity_threshold": self.sparsity_threshold,
            "recent_fraction": self.recent_fraction,
            "min_layer_fraction": self.min_layer_fraction,
            "schedule_note": self.schedule_note,
        }

    def observation(self, seq_len: int, vision: torch.Tensor) -> torch.Tensor | None:
        """The post-vision prompt tokens (after the last vision token)."""
        pos = torch.nonzero(vision).flatten()
        if pos.numel() == 0:
            return None
        return torch.arange(int(pos.max()) + 1, seq_len)

    def layer_statistics(self, layer: int, chunks, kv_heads: int) -> dict:
        """``{"density": d_l, "scores": (B, H_kv, S) float32}`` of one layer."""
        zero_sum, rows, scores = 0.0, 0, None
        for probs, visible in chunks:
            row_max = probs.amax(dim=-1, keepdim=True)
            zeroed = (probs < self.sparsity_threshold * row_max) & visible
            frac = zeroed.sum(-1).float() / visible.sum(-1).float()  # (B, H, c)
            zero_sum += float(frac.sum())
            rows += frac.numel()
            s = probs.sum(dim=2)
            scores = s if scores is None else scores + s
        return {"density": 1.0 - zero_sum / rows, "scores": group_mean(scores, kv_heads)}

    def plan(self, stats: list[dict], seq_len: int, vision_tokens: int) -> tuple[list[torch.Tensor], dict]:
        """Per-layer budgets from the densities, then recent window + top scores per KV head."""
        alpha = keep_budget(self.budget, self.match_retention, seq_len, vision_tokens)
        density = [s["density"] for s in stats]
        budgets, betas = layer_budgets(density, alpha, seq_len, self.min_layer_fraction)
        kept = [
            select_per_head(s["scores"], k, int(math.floor(self.recent_fraction * k + 1e-9)))
            for s, k in zip(stats, budgets)
        ]
        return kept, {"alpha": alpha, "density": density, "beta": betas}
