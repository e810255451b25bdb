"""Scores and selections of post-prefill eviction, as pure tensor functions (VL-Cache, SnapKV).

What :class:`~lightkv_cli.methods.eviction.EvictionPress` computes between the hooks: the global keep
fraction (:func:`keep_budget`), the observation queries' attention to every prompt key
(:func:`observation_attention`), per-head selection of the kept entries for every layer at once
(:func:`select_kept`, with :func:`select_per_head` as its plain per-layer reference), and small helpers
the methods share. No hooks, no model state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightkv_cli.errors import UserError
from lightkv_cli.methods import attention


def keep_budget(alpha: float | None, match_retention: float | None, seq_len: int, vision_tokens: int) -> float:
    """The global keep fraction ``α`` of the prompt's KV entries.

    Either ``alpha`` is given, or ``match_retention = R``: then ``α = 1 − (1 − R)·n/S``, which keeps
    exactly as many KV entries as an in-prefill method that keeps a fraction ``R`` of the ``n`` vision
    tokens and all text (equal KV bytes, the comparison a sweep makes).

    Raises:
        ValueError: neither or both given.
    """
    if (alpha is None) == (match_retention is None):
        raise ValueError("give exactly one of budget and match_retention")
    if alpha is not None:
        return float(alpha)
    if seq_len == 0:
        return 1.0
    return 1.0 - (1.0 - float(match_retention)) * vision_tokens / seq_len


def select_per_head(scores: torch.Tensor, keep: int, recent: int) -> torch.Tensor:
    """Indices to keep per KV head: the ``recent`` last positions, then the highest scores.

    The plain one-layer rule (a reference; presses use the batched :func:`select_kept`, which keeps the
    same indices).

    Args:
        scores: ``(B, H_kv, S)`` float32 importance of every prompt position.
        keep: entries kept per head, ``1 ≤ keep ≤ S`` (clamped).
        recent: most recent positions always kept (capped at ``keep``).

    Returns:
        ``(B, H_kv, keep)`` long indices, ascending along the last axis. Ties go to the earlier position.
    """
    B, H, S = scores.shape
    keep = max(1, min(keep, S))
    recent = max(0, min(recent, keep))
    tail = torch.arange(S - recent, S, device=scores.device).expand(B, H, recent)
    rest = keep - recent
    if rest > 0:
        head = scores[..., : S - recent]
        # stable descending sort: equal scores keep the earlier position first
        pick = torch.sort(head, dim=-1, descending=True, stable=True).indices[..., :rest]
        idx = torch.cat([pick, tail], dim=-1)
    else:
        idx = tail
    return idx.sort(dim=-1).values


def _per_layer(x: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | int:
    """A per-layer count as something that broadcasts against ``(G, B, H_kv, S)``: ints stay ints."""
    return x if isinstance(x, int) else x.to(like.device).view(-1, 1, 1, 1)


def select_kept(scores: torch.Tensor, keep: torch.Tensor | int, recent: torch.Tensor | int) -> torch.Tensor:
    """:func:`select_per_head` for several layers at once, with per-layer counts that may live on the device.

    The ``recent`` last positions of a layer are ranked above every score, the rest by score (a stable
    descending sort: ties go to the earlier position), the first ``keep`` are kept and sorted back into
    prompt order. No host synchronisation.

    Args:
        scores: ``(G, B, H_kv, S)`` float32 scores of ``G`` layers (finite).
        keep: ``(G,)`` long kept entries per head of each layer, in ``[1, S]`` (or one int for all).
        recent: ``(G,)`` long most recent positions always kept, in ``[0, keep]`` (or one int).

    Returns:
        ``(G, B, H_kv, S)`` long: along the last axis, layer ``g``'s ``keep[g]`` kept indices ascending,
        then ``S`` (a sentinel) in the remaining columns; ``[g, ..., :keep[g]]`` is what
        :func:`select_per_head` returns for layer ``g``.
    """
    S = scores.shape[-1]
    pos = torch.arange(S, device=scores.device)
    ranked = scores.masked_fill(pos >= S - _per_layer(recent, scores), math.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    order.masked_fill_(pos >= _per_layer(keep, scores), S)
    return order.sort(dim=-1).values


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, ...)`` per query head → ``(B, H_kv, ...)``: mean over each KV head's query group."""
    B, H = x.shape[:2]
    return x.view(B, kv_heads, H // kv_heads, *x.shape[2:]).mean(dim=2)


@dataclass
class Observation:
    """The observation queries of one prefill: positions ``[start, S)``, and their causal visibility.

    Built once per prefill (per device the layers run on) and shared by every layer.

    Attributes:
        start: first observation position ``t₀``; ``τ = S − t₀`` queries.
        seq_len: prompt length ``S``.
        visible: ``(τ, S)`` bool, key ``j`` visible from query ``i`` (``j ≤ t₀ + i``).
        hidden: ``(τ, S)`` bool, ``~visible``.
        counts: ``(τ,)`` float32 visible keys per query (``t₀ + i + 1``).
    """

    start: int
    seq_len: int
    visible: torch.Tensor
    hidden: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def build(cls, start: int, seq_len: int, device: torch.device) -> Observation:
        """The observation of positions ``[start, seq_len)`` on ``device``."""
        qpos = torch.arange(start, seq_len, device=device)
        visible = torch.arange(seq_len, device=device) <= qpos.view(-1, 1)
        return cls(start, seq_len, visible, ~visible, (qpos + 1).float())

    @property
    def size(self) -> int:
        """``τ``, the number of observation queries."""
        return self.seq_len - self.start


def observation_attention(
    q: torch.Tensor, keys: torch.Tensor, obs: Observation, scale: float, max_chunk_bytes: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Causal attention probabilities of the observation queries over every prompt key, for several
    layers at once, in chunks of queries.

    ``A[b, r, h, i, j] = softmax_j(q_i·k_j·scale)`` over the keys ``j ≤ t₀ + i`` (float32) for each of
    ``R`` layers; grouped-query heads are computed against their KV head without repeating the keys
    (one batched matmul per chunk). One chunk unless ``B·R·H·τ·S`` float32 probabilities exceed
    ``max_chunk_bytes``.

    Args:
        q: ``(B, R·H, τ, d)`` float32 post-RoPE queries at the observation positions (layer-major heads).
        keys: ``(B, R, H_kv, S, d)`` post-RoPE keys of the whole prompt (any float dtype).
        obs: the observation (``τ`` and ``S`` must match).
        scale: logit scale (``1/√d``).
        max_chunk_bytes: memory bound of one chunk of probabilities (default
            :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES`).

    Yields:
        ``(probs, visible, counts)``: ``(B, R, H, c, S)`` float32 probabilities (0 where not visible), and
        the chunk's ``(c, S)`` bool visibility and ``(c,)`` float32 visible-key counts.
    """
    B, R, Hkv, S, d = keys.shape
    H = q.shape[1] // R
    tau = q.shape[2]
    G = H // Hkv
    kt = keys.float().view(B * R * Hkv, S, d).transpose(1, 2)  # (B·R·H_kv, d, S)
    limit = attention.MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    chunk = max(1, int(limit // (4 * B * R * H * S)))
    for i0 in range(0, tau, chunk):
        if chunk >= tau:
            qc, vis, hid, cnt = q, obs.visible, obs.hidden, obs.counts
        else:
            qc = q[:, :, i0 : i0 + chunk]
            vis, hid, cnt = obs.visible[i0 : i0 + chunk], obs.hidden[i0 : i0 + chunk], obs.counts[i0 : i0 + chunk]
        c = qc.shape[2]
        logits = torch.bmm(qc.reshape(B * R * Hkv, G * c, d), kt).view(B, R, H, c, S)
        logits.mul_(scale).masked_fill_(hid, float("-inf"))
        yield torch.softmax(logits, dim=-1), vis, cnt


def check_fraction(name: str, value: float | None) -> None:
    """Raise ``UserError`` unless ``value`` is in ``(0, 1]`` (None passes)."""
    if value is None:
        return
    if math.isnan(value) or not (0.0 < value <= 1.0):
        raise UserError(f"{name} must be in (0, 1], got {value}")


def avg_pool_1d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last axis, stride 1, same length (edges average what exists)."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled[..., : shape[-1]].reshape(shape)
