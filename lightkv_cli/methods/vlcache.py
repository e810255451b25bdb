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
from lightkv_cli.methods.eviction import (
    EvictionPlan,
    EvictionPress,
    Observation,
    PromptRows,
    check_fraction,
    keep_budget,
)


def layer_budgets(
    density: Sequence[float], alpha: float, seq_len: int, min_fraction: float = 0.01
) -> tuple[list[int], list[float]]:
    """Sparsity-aware per-layer budgets that sum exactly to the global budget (host values).

    :func:`layer_budget_tensor` on a list of densities: see there for the rule.

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
    d = torch.tensor([max(0.0, float(x)) for x in density], dtype=torch.float64)
    budgets = [int(k) for k in layer_budget_tensor(d, alpha, seq_len, min_fraction).tolist()]
    return budgets, [b / int(seq_len) for b in budgets]


def layer_budget_tensor(
    density: torch.Tensor,
    alpha: float | Sequence[float],
    seq_len: int | Sequence[int],
    min_fraction: float = 0.01,
) -> torch.Tensor:
    """Sparsity-aware per-layer budgets that sum exactly to the global budget, on the densities' device.

    ``β_l = clip(α·L·d_l / Σ d, min_fraction, 1)`` and layer ``l`` keeps ``k_l = β_l·S`` tokens. When
    clipping moves the sum away from ``α·L·S``, the common factor ``c`` of ``k_l = clip(c·d_l·S, lo, S)``
    is re-solved so that the clipped budgets sum to it again (denser layers still get more): the sum is
    piecewise linear in ``c`` with breakpoints where a layer reaches ``lo`` or ``S``, so ``c`` is found in
    closed form on the segment that contains the total. The real-valued budgets are then rounded by
    largest remainder (ties to the lower layer index) so that ``Σ k_l = round(α·L·S)`` exactly. A fixed
    number of tensor ops, no host read.

    Batched: with ``(B, L)`` densities every row is allocated on its own (its own ``α_b`` and ``S_b``
    when ``alpha`` / ``seq_len`` are sequences of ``B`` values), exactly as that row alone would be.

    Args:
        density: ``(L,)`` or ``(B, L)`` float densities ``d_l = 1 − γ_l`` (negative values count as 0; a
            row of zeros: equal shares).
        alpha: global keep fraction ``α`` in ``(0, 1]``, or one per row.
        seq_len: prompt length ``S``, or one per row (the row's real, unpadded length).
        min_fraction: smallest ``β_l`` (0.01 in the paper); at least one token is always kept.

    Returns:
        ``(L,)`` or ``(B, L)`` long ``k_l`` on ``density``'s device, in ``[lo, S]`` with
        ``lo = max(1, ⌈min_fraction·S⌉)``, each row summing to ``min(max(round(α·L·S), L·lo), L·S)``.

    Raises:
        UserError: an ``alpha`` outside ``(0, 1]``.
    """
    batched = density.ndim == 2
    L = density.shape[-1]
    rows = density.shape[0] if batched else 1
    alphas = [float(a) for a in alpha] if isinstance(alpha, Sequence) else [float(alpha)] * rows
    lens = [int(x) for x in seq_len] if isinstance(seq_len, Sequence) else [int(seq_len)] * rows
    if len(alphas) != rows or len(lens) != rows:
        raise ValueError(f"expected {rows} values of alpha and seq_len, got {len(alphas)} and {len(lens)}")
    for a in alphas:
        check_fraction("budget", a)
    los = [max(1, math.ceil(min_fraction * n - 1e-9)) for n in lens]
    totals = [min(max(int(round(a * L * n)), L * lo), L * n) for a, n, lo in zip(alphas, lens, los)]
    d = density.reshape(rows, L) if batched else density.reshape(-1)
    d = d.to(torch.float64).clamp(min=0.0)
    if batched and (len(set(lens)) > 1 or len(set(alphas)) > 1):

        def col(values):  # (B, 1) float64 on the device
            return torch.tensor(values, dtype=torch.float64, device=d.device).view(rows, 1)

        S, lo, total, alpha_ = col(lens), col(los), col(totals), col(alphas)
    else:
        S, lo, total, alpha_ = lens[0], los[0], totals[0], alphas[0]
    keep = dict(dim=-1, keepdim=True) if batched else dict(dim=-1)
    dsum = d.sum(**keep)
    d = torch.where(dsum > 0, d, torch.ones_like(d))
    # a layer of density 0 still gets a share once every denser layer is full (keeps the total reachable)
    d = torch.maximum(d, 1e-9 * d.amax(**keep))

    def clip(x: torch.Tensor, low, high) -> torch.Tensor:
        if isinstance(low, torch.Tensor):
            return torch.minimum(torch.maximum(x, low), high)
        return x.clamp(min=low, max=high)

    def real(c: torch.Tensor) -> torch.Tensor:  # factors -> real budgets, (..., L)
        return clip(c * d * S, lo, S)

    c0 = alpha_ * L / d.sum(**keep)  # the paper's factor; exact when nothing is clipped
    # Σ_l real(c) is continuous, non-decreasing, linear between the breakpoints lo/(d·S) and 1/d
    bp = torch.cat([lo / (d * S), 1.0 / d], dim=-1)  # (..., 2L)
    if batched:  # (B, 2L, L): every breakpoint of a row against every layer of the row
        S3, lo3 = (S.unsqueeze(-1), lo.unsqueeze(-1)) if isinstance(S, torch.Tensor) else (S, lo)
        f = clip(bp.unsqueeze(-1) * d.unsqueeze(-2) * S3, lo3, S3).sum(-1)
    else:
        f = real(bp.unsqueeze(-1)).sum(-1)
    low = torch.where(f <= total, bp, torch.zeros_like(bp)).amax(**keep)  # f(0) = L·lo ≤ total
    above = f > total
    high = torch.where(above, bp, torch.full_like(bp, math.inf)).amin(**keep)
    mid = torch.where(above.any(**keep), (low + high) / 2, 2 * low + 1)
    x = mid * d * S
    at_lo, at_hi = x <= lo, x >= S
    free = ~(at_lo | at_hi)
    den = (d * free).sum(**keep) * S
    num = total - lo * at_lo.sum(**keep) - S * at_hi.sum(**keep)
    c_solved = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), low)
    c = torch.where((real(c0).sum(**keep) - total).abs() <= 1e-6, c0, c_solved)
    k_real = real(c)
    k = clip(torch.floor(k_real + 1e-9), lo, S).long()
    frac = k_real - k.double()
    short = total - k.sum(**keep)  # > 0: give to the largest remainders (below S); < 0: take from the smallest
    ranks = torch.arange(L, device=d.device)
    give = torch.where(k < S, frac, torch.full_like(frac, -math.inf))
    order = torch.sort(give, dim=-1, descending=True, stable=True).indices
    up = torch.zeros_like(k).scatter_(-1, order, (ranks < short).long())
    take = torch.where(k > lo, frac, torch.full_like(frac, math.inf))
    order = torch.sort(take, dim=-1, stable=True).indices
    down = torch.zeros_like(k).scatter_(-1, order, (ranks < -short).long())
    return k + up - down


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

    A prompt without vision tokens, or with nothing after the last one, is not evicted. In a left-padded
    batch every row is allocated from its own densities at its own real length (what it gets alone);
    ``last_prefill.row_budgets`` holds each row's budgets.
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

    def observation_start(self, seq_len: int, last_vision: int) -> int | None:
        """The post-vision prompt tokens: from the one after the last vision token (None without vision)."""
        return None if last_vision < 0 else last_vision + 1

    def layer_statistics(self, chunks, kv_heads: int, obs: Observation) -> dict:
        """``{"density": (R, B) float64 d_l of each row, "scores": (R, B, H_kv, S) float32}`` of ``R``
        layers, on the device. A row's density averages over its own heads and observation queries, its
        causally visible real keys only (what the row alone would measure)."""
        zero_sum, scores = None, None
        for probs, visible, counts in chunks:  # probs: (B, R, H, c, S)
            B, R, H = probs.shape[:3]
            row_max = probs.amax(dim=-1, keepdim=True)
            zeroed = (probs < self.sparsity_threshold * row_max) & visible
            frac = zeroed.sum(-1).float() / counts  # (B, R, H, c)
            z = frac.sum(dim=(2, 3))  # (B, R): per row and layer, over heads and queries
            zero_sum = z if zero_sum is None else zero_sum + z
            s = probs.sum(dim=3)
            scores = s if scores is None else scores + s
        queries = obs.size if obs.row_queries is None else obs.row_queries  # (B, 1) when rows differ
        density = 1.0 - zero_sum.double() / (queries * H)
        scores = scores.view(B, R, kv_heads, -1, scores.shape[-1]).mean(dim=3)  # (B, R, H_kv, S)
        return {"density": density.T, "scores": scores.transpose(0, 1)}

    def plan(self, stats: list[dict], rows: PromptRows) -> EvictionPlan:
        """Per-layer budgets of every row from its own densities (:func:`layer_budget_tensor` at its real
        length), then recent window + top scores per KV head (on the device)."""
        lengths = rows.lengths
        alphas = [keep_budget(self.budget, self.match_retention, n, v) for n, v in zip(lengths, rows.vision)]
        density = torch.cat([s["density"] for s in stats]) if len(stats) > 1 else stats[0]["density"]  # (L, B)
        if rows.batch == 1:
            budgets = layer_budget_tensor(density[:, 0], alphas[0], lengths[0], self.min_layer_fraction)[None]
        else:
            budgets = layer_budget_tensor(density.T, alphas, lengths, self.min_layer_fraction)  # (B, L)
        if not all(rows.evicted):  # a row that is not evicted keeps its whole prompt
            full = [n if e else 0 for n, e in zip(lengths, rows.evicted)]
            full = torch.tensor(full, dtype=torch.long, device=budgets.device).view(-1, 1)
            budgets = torch.where(full > 0, full, budgets)
        recent = torch.floor(self.recent_fraction * budgets.double() + 1e-9).long()
        sizes = torch.tensor(lengths, dtype=torch.float64, device=budgets.device).view(-1, 1)
        return EvictionPlan(
            scores=[s["scores"] for s in stats],
            budgets=budgets,
            recent=recent,
            details={"alpha": alphas[0], "row_alpha": alphas, "row_density": density.T, "row_beta": budgets / sizes},
        )
