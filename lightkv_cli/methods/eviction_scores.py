"""Scores and selections of post-prefill eviction, as pure tensor functions (VL-Cache, SnapKV).

What :class:`~lightkv_cli.methods.eviction.EvictionPress` computes between the hooks: the global keep
fraction (:func:`keep_budget`), the observation queries' attention to every prompt key
(:func:`observation_attention`), per-head selection of the kept entries for every layer at once
(:func:`select_kept`, with :func:`select_per_head` as its plain per-layer reference), and small helpers
the methods share, and the press's bookkeeping helpers: ranges of layers whose probabilities fit memory
(:func:`layer_chunks`), per-row budgets of a group of layers (:func:`group_counts`) and the one
device → host read of budgets and statistics at the end of prefill (:func:`read_host`). No hooks, no
model state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightkv_cli.errors import UserError
from lightkv_cli.measure.timing import profile_range
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
    """A per-layer (``(G,)``) or per-layer-and-row (``(G, B)``) count as something that broadcasts against
    ``(G, B, H_kv, S)``: ints stay ints."""
    if isinstance(x, int):
        return x
    x = x.to(like.device)
    return x.view(-1, 1, 1, 1) if x.ndim == 1 else x.view(*x.shape, 1, 1)


def select_kept(
    scores: torch.Tensor,
    keep: torch.Tensor | int,
    recent: torch.Tensor | int,
    valid: torch.Tensor | None = None,
    fillers_first: bool = False,
) -> torch.Tensor:
    """:func:`select_per_head` for several layers (and rows) at once, with counts that may live on the device.

    The ``recent`` last positions of a layer are ranked above every score, the rest by score (a stable
    descending sort: ties go to the earlier position), positions that are not ``valid`` (left padding)
    below every score; the first ``keep`` are kept and sorted back into prompt order. No host
    synchronisation.

    Args:
        scores: ``(G, B, H_kv, S)`` float32 scores of ``G`` layers (finite).
        keep: kept entries per head: ``(G,)`` long (each layer, every row), ``(G, B)`` long (each layer and
            row) or one int, in ``[1, S_b]`` where ``S_b`` is the row's number of valid positions.
        recent: most recent positions always kept, in ``[0, keep]``: same forms as ``keep``.
        valid: ``(B, S)`` bool, the positions that may be kept (a row's real, non-pad prompt tokens; left
            padding keeps the most recent positions valid); None: every position.
        fillers_first: put the unused columns first (holding −1) instead of last (holding ``S``).

    Returns:
        ``(G, B, H_kv, S)`` long: along the last axis, the ``keep[g, b]`` kept indices of layer ``g`` and
        row ``b`` ascending, then ``S`` (a sentinel) in the remaining columns; ``[g, ..., :keep[g]]`` is
        what :func:`select_per_head` returns for layer ``g`` (without padding). With ``fillers_first``:
        −1 in the first ``S − keep[g, b]`` columns, then the kept indices ascending.
    """
    S = scores.shape[-1]
    pos = torch.arange(S, device=scores.device)
    ranked = scores.masked_fill(pos >= S - _per_layer(recent, scores), math.inf)
    if valid is not None:
        ranked.masked_fill_(~valid.to(scores.device).unsqueeze(1), -math.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    order.masked_fill_(pos >= _per_layer(keep, scores), -1 if fillers_first else S)
    return order.sort(dim=-1).values


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, ...)`` per query head → ``(B, H_kv, ...)``: mean over each KV head's query group."""
    B, H = x.shape[:2]
    return x.view(B, kv_heads, H // kv_heads, *x.shape[2:]).mean(dim=2)


@dataclass
class Observation:
    """The observation queries of one prefill: positions ``[start, S)``, and what each of them sees.

    Built once per prefill (per device the layers run on) and shared by every layer. Without padding and
    with the same window in every row, the masks are ``(τ, S)`` (one causal pattern for the batch);
    with left padding or rows whose windows start at different positions they are per row,
    ``(B, 1, 1, τ, S)``: a query sees the causally visible *real* keys of its row, and a query before its
    row's own window sees nothing (its probabilities are zeroed: it counts for no statistic).

    Attributes:
        start: first observation position ``t₀`` (the earliest row's); ``τ = S − t₀`` queries.
        seq_len: prompt length ``S`` (padding included).
        visible: ``(τ, S)`` or ``(B, 1, 1, τ, S)`` bool, key ``j`` visible from query ``i`` (``j ≤ t₀ + i``,
            ``j`` a real token, query ``i`` in its row's window).
        hidden: same shape, the logits masked out before the softmax (``~visible``, except for queries
            outside their row's window, which hide nothing so that their softmax stays finite).
        counts: ``(τ,)`` or ``(B, 1, 1, τ)`` float32 visible keys per query (at least 1).
        query_valid: ``(B, 1, 1, τ, 1)`` bool, query ``i`` in its row's window; None when every query of
            every row is.
        row_queries: ``(B, 1)`` float64 queries in each row's window (``τ_b``); None when every row has
            ``τ``.
        row_starts: per row, its first observation position (host ints, padded frame); None: ``start``.
        real: ``(B, S)`` bool real (non-pad) tokens; None without padding.
    """

    start: int
    seq_len: int
    visible: torch.Tensor
    hidden: torch.Tensor
    counts: torch.Tensor
    query_valid: torch.Tensor | None = None
    row_queries: torch.Tensor | None = None
    row_starts: list[int] | None = None
    real: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        start: int,
        seq_len: int,
        device: torch.device,
        real: torch.Tensor | None = None,
        row_starts: list[int] | None = None,
    ) -> Observation:
        """The observation of positions ``[start, seq_len)`` on ``device``.

        Args:
            start: first observed position of any row.
            seq_len: prompt length ``S``.
            device: where the masks live.
            real: ``(B, S)`` bool real (non-pad) tokens, for left-padded batches (None: no padding).
            row_starts: first observed position of each row (``≥ start``; None: ``start`` in every row).
        """
        qpos = torch.arange(start, seq_len, device=device)
        causal = torch.arange(seq_len, device=device) <= qpos.view(-1, 1)  # (τ, S)
        ragged = row_starts is not None and any(r != start for r in row_starts)
        if real is None and not ragged:
            return cls(start, seq_len, causal, ~causal, (qpos + 1).float())
        tau = seq_len - start
        valid = None
        rows = None
        if ragged:
            first = torch.tensor(row_starts, dtype=torch.long, device=device).view(-1, 1)  # (B, 1)
            valid = qpos >= first  # (B, τ)
            rows = torch.tensor([float(seq_len - r) for r in row_starts], dtype=torch.float64, device=device)
            rows = rows.view(-1, 1)
        if real is None:
            real = torch.ones(len(row_starts), seq_len, dtype=torch.bool, device=device)
        real = real.to(device)
        seen = causal & real.unsqueeze(1)  # (B, τ, S)
        if valid is not None:
            hidden = ~seen & valid.unsqueeze(-1)
            seen = seen & valid.unsqueeze(-1)
        else:
            hidden = ~seen
        B = real.shape[0]
        counts = seen.sum(-1).clamp(min=1).float().view(B, 1, 1, tau)
        shape = (B, 1, 1, tau, seq_len)
        return cls(
            start,
            seq_len,
            seen.view(shape),
            hidden.view(shape),
            counts,
            query_valid=None if valid is None else valid.view(B, 1, 1, tau, 1),
            row_queries=rows,
            row_starts=list(row_starts) if ragged else None,
            real=real,
        )

    @property
    def size(self) -> int:
        """``τ``, the number of observation queries."""
        return self.seq_len - self.start


def observation_attention(
    q: torch.Tensor, keys: torch.Tensor, obs: Observation, scale: float, max_chunk_bytes: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Causal attention probabilities of the observation queries over every prompt key, for several
    layers at once, in chunks of queries.

    ``A[b, r, h, i, j] = softmax_j(q_i·k_j·scale)`` over the keys ``j`` visible from query ``i``
    (:class:`Observation`: ``j ≤ t₀ + i`` and, with left padding, ``j`` a real token) (float32) for
    each of ``R`` layers; a query outside its row's window has probabilities 0. Grouped-query heads are
    computed against their KV head without repeating the keys (one batched matmul per chunk). One
    chunk unless ``B·R·H·τ·S`` float32 probabilities exceed ``max_chunk_bytes``.

    Args:
        q: ``(B, R·H, τ, d)`` float32 post-RoPE queries at the observation positions (layer-major heads).
        keys: ``(B, R, H_kv, S, d)`` post-RoPE keys of the whole prompt (any float dtype).
        obs: the observation (``τ`` and ``S`` must match).
        scale: logit scale (``1/√d``).
        max_chunk_bytes: memory bound of one chunk of probabilities (default
            :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES`).

    Yields:
        ``(probs, visible, counts)``: ``(B, R, H, c, S)`` float32 probabilities (0 where not visible), and
        the chunk's visibility (``(c, S)`` or ``(B, 1, 1, c, S)`` bool) and visible-key counts (``(c,)`` or
        ``(B, 1, 1, c)`` float32).
    """
    B, R, Hkv, S, d = keys.shape
    H = q.shape[1] // R
    tau = q.shape[2]
    G = H // Hkv
    kt = keys.float().view(B * R * Hkv, S, d).transpose(1, 2)  # (B·R·H_kv, d, S)
    limit = attention.MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    chunk = max(1, int(limit // (4 * B * R * H * S)))
    for i0 in range(0, tau, chunk):
        qv = obs.query_valid
        if chunk >= tau:
            qc, vis, hid, cnt = q, obs.visible, obs.hidden, obs.counts
        else:
            i1 = i0 + chunk
            qc = q[:, :, i0:i1]
            vis, hid, cnt = obs.visible[..., i0:i1, :], obs.hidden[..., i0:i1, :], obs.counts[..., i0:i1]
            qv = None if qv is None else qv[..., i0:i1, :]
        c = qc.shape[2]
        logits = torch.bmm(qc.reshape(B * R * Hkv, G * c, d), kt).view(B, R, H, c, S)
        logits.mul_(scale).masked_fill_(hid, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if qv is not None:
            probs.masked_fill_(~qv, 0.0)
        yield probs, vis, cnt


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


def layer_chunks(n: int, bytes_each: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` ranges covering ``range(n)`` of at most ``MAX_CHUNK_BYTES // bytes_each`` items (at least one)."""
    step = max(1, attention.MAX_CHUNK_BYTES // max(1, bytes_each))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def int_or_tensor(values: Sequence[int], like: torch.Tensor) -> torch.Tensor | int:
    """Host ints for a group of layers: one int when all are equal, else a ``(G,)`` long tensor on ``like``'s device."""
    values = [int(v) for v in values]
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=torch.long, device=like.device)


def group_counts(
    counts: torch.Tensor | list[list[int]] | int, g0: int, g1: int, like: torch.Tensor
) -> torch.Tensor | int:
    """Per-row, per-layer counts (``(B, L)`` device tensor, ``B × L`` host ints or one int) of layers
    ``[g0, g1)`` in a form :func:`select_kept` takes: an int, ``(G,)`` (every row alike) or ``(G, B)``."""
    if isinstance(counts, int):
        return counts
    if isinstance(counts, torch.Tensor):
        return counts[:, g0:g1].T
    sub = [[int(v) for v in row[g0:g1]] for row in counts]
    if all(row == sub[0] for row in sub):
        return int_or_tensor(sub[0], like)
    return torch.tensor(list(zip(*sub)), dtype=torch.long, device=like.device)


def read_host(budgets: torch.Tensor | Sequence[Sequence[int]], details: dict) -> tuple[list[list[int]], dict]:
    """Budgets as ``B × L`` ints and the details' tensors as (nested) lists, in one device → host read (none
    when nothing is a tensor)."""
    tensors = {k: v for k, v in details.items() if isinstance(v, torch.Tensor)}
    parts = ([budgets] if isinstance(budgets, torch.Tensor) else []) + list(tensors.values())
    out = dict(details)
    if not parts:
        return [[int(b) for b in row] for row in budgets], out
    device = parts[0].device
    with profile_range("lightkv::host_read"):
        flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in parts]).tolist()

    def take(i: int, shape: torch.Size) -> list:
        n = math.prod(shape)
        vals = flat[i : i + n]
        if len(shape) == 2:
            return [vals[r * shape[1] : (r + 1) * shape[1]] for r in range(shape[0])]
        return vals

    i = 0
    if isinstance(budgets, torch.Tensor):
        budgets, i = [[int(b) for b in row] for row in take(0, budgets.shape)], budgets.numel()
    else:
        budgets = [[int(b) for b in row] for row in budgets]
    for key, t in tensors.items():
        out[key] = take(i, t.shape)
        i += t.numel()
    return budgets, out
