"""Windowed bipartite token merging on the true token grid (LightKV, METHODS.md §1 steps 1-4).

Pure functions on one prompt row; no model, no hooks. ``n`` is the number of mergeable vision
tokens of the row, in sequence order (row-major on each image's grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# floor(ρ·n) is taken with this tolerance so that e.g. ρ=0.29, n=100 gives 29, not 28.
_FLOOR_EPS = 1e-9


def bands(index: torch.Tensor, size: torch.Tensor | int, num_bands: int) -> torch.Tensor:
    """Band of each row (or column) index when ``size`` rows are split into ``num_bands`` bands.

    Bands have near-equal sizes: the first ``size mod W`` bands get one more. When ``size < W`` the
    first ``size`` bands have one row each and the rest are empty.

    Args:
        index: ``(n,)`` long row (or column) indices in ``[0, size)``.
        size: grid height (or width), an int or an ``(n,)`` tensor (per token, for several images).
        num_bands: ``W ≥ 1``.

    Returns:
        ``(n,)`` long band indices in ``[0, W)``.
    """
    size = torch.as_tensor(size, device=index.device)
    small = torch.div(size, num_bands, rounding_mode="floor")
    extra = size - small * num_bands
    # The first `extra` bands have `small + 1` rows, the rest `small`: band = max(i // (small + 1),
    # (i − extra) // small), which equals the piecewise form (i < extra·(small+1) ? i // (small+1) :
    # extra + (i − extra·(small+1)) // small) for every i, and gives i when small = 0 (size < W).
    return torch.maximum(
        torch.div(index, small + 1, rounding_mode="floor"),
        torch.div(index - extra, small.clamp(min=1), rounding_mode="floor"),
    )


def window_ids(coords: torch.Tensor, image: torch.Tensor, grids: list[tuple[int, int]], windows: int) -> torch.Tensor:
    """Window of every token: images never share a window; each image has ``W × W`` windows.

    Args:
        coords: ``(n, 2)`` long (row, col) of each token on its image's grid.
        image: ``(n,)`` long image index of each token.
        grids: ``(rows, cols)`` of each image.
        windows: ``W``, bands per axis.

    Returns:
        ``(n,)`` long window ids ``image·W² + band_row·W + band_col``.
    """
    dims = torch.tensor(grids, dtype=torch.long, device=coords.device).view(-1, 2)[image]
    br = bands(coords[:, 0], dims[:, 0], windows)
    bc = bands(coords[:, 1], dims[:, 1], windows)
    return image * windows * windows + br * windows + bc


def merges_per_window(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """``r_w = min(floor(ρ·n_w), floor(n_w / 2))`` for window sizes ``n_w`` (``(W,)`` long)."""
    r = torch.floor(sizes.double() * ratio + _FLOOR_EPS).long()
    return torch.minimum(r, torch.div(sizes, 2, rounding_mode="floor"))


@dataclass
class MergePlan:
    """Which tokens merge into which, for one row.

    Attributes:
        src: ``(m,)`` long, the merged A tokens (indices into the row's ``n`` tokens).
        dst: ``(m,)`` long, the B token each merges into.
        score: ``(m,)`` float32, the cosine similarity of each pair.
    """

    src: torch.Tensor
    dst: torch.Tensor
    score: torch.Tensor

    def __len__(self) -> int:
        return int(self.src.numel())

    def top(self, m: int) -> MergePlan:
        """Keep the ``m`` most similar pairs (used to equalise counts across batch rows)."""
        if m >= len(self):
            return self
        order = torch.argsort(self.score, descending=True, stable=True)[:m]
        order = order.sort().values
        return MergePlan(self.src[order], self.dst[order], self.score[order])


def _window_slots(wid: torch.Tensor, num_windows: int):
    order = torch.argsort(wid, stable=True)
    sizes = torch.bincount(wid, minlength=num_windows)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(wid)
    rank[order] = torch.arange(wid.numel(), device=wid.device) - starts[wid[order]]
    return sizes, rank


def bipartite_plan(features: torch.Tensor, wid: torch.Tensor, num_windows: int, ratio: float) -> MergePlan:
    """Plan one stage's merges for one row.

    Inside each window, tokens in sequence order alternate A (even) / B (odd). Every A token picks
    the B token of its window with the highest cosine similarity of ``features``; A tokens are ranked
    by that best score and the top ``r_w`` merge (several A may pick the same B).

    Args:
        features: ``(n, D)`` hidden states of the mergeable vision tokens (any float dtype; compared
            in float32).
        wid: ``(n,)`` long window id of each token (see :func:`window_ids`).
        num_windows: number of window ids.
        ratio: ``ρ``, the fraction of each window's tokens to remove (capped at one half).

    Returns:
        A :class:`MergePlan`. Memory: ``W·⌈n_max/2⌉·⌊n_max/2⌋`` similarities in float32.
    """
    device = features.device
    empty = MergePlan(
        torch.empty(0, dtype=torch.long, device=device),
        torch.empty(0, dtype=torch.long, device=device),
        torch.empty(0, dtype=torch.float32, device=device),
    )
    n = wid.numel()
    if n < 2 or ratio <= 0:
        return empty
    sizes, rank = _window_slots(wid, num_windows)
    r_w = merges_per_window(sizes, ratio)
    if int(r_w.sum()) == 0:
        return empty
    max_size = int(sizes.max())
    max_a, max_b = math.ceil(max_size / 2), max_size // 2
    is_a = rank % 2 == 0
    slot = torch.div(rank, 2, rounding_mode="floor")
    tok = torch.arange(n, device=device)
    a_tok = torch.full((num_windows, max_a), -1, dtype=torch.long, device=device)
    b_tok = torch.full((num_windows, max_b), -1, dtype=torch.long, device=device)
    a_tok[wid[is_a], slot[is_a]] = tok[is_a]
    b_tok[wid[~is_a], slot[~is_a]] = tok[~is_a]
    f = F.normalize(features.float(), dim=-1)
    fa = f[a_tok.clamp(min=0)]  # (Wn, max_a, D)
    fb = f[b_tok.clamp(min=0)]  # (Wn, max_b, D)
    sim = torch.bmm(fa, fb.transpose(1, 2))
    sim.masked_fill_((b_tok < 0).unsqueeze(1), float("-inf"))
    best, best_k = sim.max(dim=-1)  # (Wn, max_a)
    best = best.masked_fill(a_tok < 0, float("-inf"))
    order = torch.argsort(best, dim=-1, descending=True, stable=True)
    a_rank = torch.empty_like(order)
    a_rank.scatter_(1, order, torch.arange(max_a, device=device).expand(num_windows, -1))
    merge = (a_rank < r_w.unsqueeze(1)) & (a_tok >= 0)
    src = a_tok[merge]
    dst = b_tok.gather(1, best_k)[merge]
    score = best[merge]
    order = torch.argsort(src)
    return MergePlan(src[order], dst[order], score[order])


def simulate_counts(grid: tuple[int, int], stages: list[tuple[int, float]], special: int = 0) -> list[int]:
    """Vision tokens of one image left after each stage, predicted from the schedule alone.

    Merges the first ``r_w`` A tokens of each window (any choice gives the same counts when the
    windows of later stages nest in those of earlier ones, as 4-2-1 on an even grid does; otherwise
    the real count can differ by a few tokens because survivors keep their B token's coordinates).

    Args:
        grid: ``(rows, cols)`` of the image.
        stages: ``(windows, ratio)`` per stage, in order.
        special: vision tokens of the image that are never merged (e.g. a CLS token).

    Returns:
        Token counts after each stage (``len(stages)`` ints), special tokens included.
    """
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    coords = torch.stack([r, c], 1)
    counts = []
    for windows, ratio in stages:
        image = torch.zeros(coords.shape[0], dtype=torch.long)
        wid = window_ids(coords, image, [grid], windows)
        sizes, rank = _window_slots(wid, windows * windows)
        r_w = merges_per_window(sizes, ratio)
        drop = (rank % 2 == 0) & (torch.div(rank, 2, rounding_mode="floor") < r_w[wid])
        coords = coords[~drop]
        counts.append(int(coords.shape[0]) + special)
    return counts


@dataclass
class BatchPlan:
    """One stage's merge candidates for every row at once (:func:`batched_plan`).

    Indices are into each row's ``n`` current vision tokens (``VisionTokens`` order).

    Attributes:
        merge: ``(B, n)`` bool, the A tokens chosen to merge (the top ``r_w`` of their window).
        dst: ``(B, n)`` long, the B token each A token picked (meaningful only where ``merge``; 0
            elsewhere).
        score: ``(B, n)`` float32, the cosine similarity of that pick; ``-inf`` where not ``merge``.
    """

    merge: torch.Tensor
    dst: torch.Tensor
    score: torch.Tensor

    def counts(self) -> torch.Tensor:
        """``(B,)`` long, merges planned per row (on the device)."""
        return self.merge.sum(dim=1)

    def top(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``m`` most similar pairs of every row, ``(src, dst)`` each ``(B, m)`` long, ``src`` ascending.

        The same choice as :meth:`MergePlan.top` per row: highest similarity first, ties to the
        earlier token. ``m`` must not exceed any row's :meth:`counts`.
        """
        order = torch.sort(self.score, dim=1, descending=True, stable=True).indices[:, :m]
        src = order.sort(dim=1).values
        return src, self.dst.gather(1, src)


def batch_window_ranks(wid: torch.Tensor, num_windows: int, draws: torch.Tensor | None = None):
    """Windows of a whole batch as one flat problem, and every token's rank inside its window.

    Window ``w`` of row ``b`` becomes ``b·num_windows + w``; tokens with ``wid < 0`` go to one spare
    window, ``B·num_windows``. Inside a window tokens are ranked in sequence order, or by ``draws``
    (values in ``[0, 1)``) when given.

    Args:
        wid: ``(B, n)`` long window of each token in its row, ``-1`` for tokens that take no part.
        num_windows: window ids per row.
        draws: optional ``(B, n)`` float64 keys that order tokens inside a window.

    Returns:
        ``(gw, sizes, order, sorted_gw, rank)``: ``(B·n,)`` flat window ids; ``(B·num_windows + 1,)``
        tokens per window (the spare last); ``(B·n,)`` the tokens sorted by window (then key), their
        windows ``gw[order]``, and the rank of ``order[i]`` in its window.
    """
    B, n = wid.shape
    nw = B * num_windows
    row_base = torch.arange(0, nw, num_windows, device=wid.device).unsqueeze(1)
    gw = (wid + row_base).masked_fill_(wid < 0, nw).flatten()
    # inside a window: sequence order (rows are in order), or the draws
    if draws is None:
        sorted_gw, order = torch.sort(gw, stable=True)
    else:
        order = torch.argsort(gw.double() + draws.flatten())
        sorted_gw = gw.gather(0, order)
    sizes = torch.zeros(nw + 1, dtype=torch.long, device=wid.device).index_add_(0, gw, torch.ones_like(gw))
    starts = sizes.cumsum(0) - sizes
    rank = torch.arange(B * n, device=wid.device) - starts.gather(0, sorted_gw)
    return gw, sizes, order, sorted_gw, rank


def batched_plan(features: torch.Tensor, wid: torch.Tensor, num_windows: int, max_size: int, ratio: float) -> BatchPlan:
    """:func:`bipartite_plan` for every row of a batch at once, with no host synchronisation.

    Rows never share a window: window ``w`` of row ``b`` becomes window ``b·num_windows + w`` of one
    flat problem; tokens with ``wid < 0`` (special tokens) take part in nothing. Each window's tokens,
    in sequence order, fill one row of a ``(windows, max_size)`` table whose even columns are its A
    tokens and odd columns its B tokens.

    Args:
        features: ``(B, n, D)`` hidden states of the rows' vision tokens (compared in float32).
        wid: ``(B, n)`` long window of each token in its row, ``-1`` for tokens never merged.
        num_windows: window ids per row.
        max_size: an upper bound on the tokens of one window (sizes the table; a host int, so no
            tensor is read back to size it).
        ratio: ``ρ``, the fraction of each window's tokens to remove (capped at one half).

    Returns:
        A :class:`BatchPlan`. Memory: ``B·W·⌈max_size/2⌉·⌊max_size/2⌋`` similarities in float32.
    """
    B, n, _ = features.shape
    device = features.device
    nw = B * num_windows
    N = B * n
    _, sizes, order, sorted_gw, rank = batch_window_ranks(wid, num_windows)
    width = 2 * math.ceil(max_size / 2)
    table = torch.full(((nw + 1) * width,), N, dtype=torch.long, device=device)  # N: empty slot
    # a real window never holds more than max_size ≤ width tokens; the spare window's tokens pile up
    # on its last slot, which is never read
    slot = sorted_gw * width + rank.clamp(max=width - 1)
    table.scatter_(0, slot, order)
    table = table[: nw * width].view(nw, width // 2, 2)
    a_tok, b_tok = table[..., 0], table[..., 1]  # (nw, max_a): flat token or N
    a_empty, b_empty = a_tok == N, b_tok == N
    f = F.normalize(features.reshape(N, -1).float(), dim=-1)
    # empty slots read token N−1; their similarities are masked right after
    sim = torch.bmm(f[a_tok.clamp(max=N - 1)], f[b_tok.clamp(max=N - 1)].transpose(1, 2))  # (nw, max_a, max_b)
    sim.masked_fill_(b_empty.unsqueeze(1), float("-inf"))
    best, best_k = sim.amax(dim=-1), sim.argmax(dim=-1)  # (nw, max_a); argmax: the first maximum, as max()
    best.masked_fill_(a_empty, float("-inf"))
    a_order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    a_rank = torch.sort(a_order, dim=-1).indices  # inverse permutation
    r_w = merges_per_window(sizes[:nw], ratio)
    chosen = (a_rank < r_w.unsqueeze(1)) & ~a_empty  # (nw, max_a)
    # back to tokens (flat index N is a spare slot for empty table entries)
    at = torch.where(chosen, a_tok, N).flatten()
    score = torch.full((N + 1,), float("-inf"), device=device).scatter_(0, at, best.flatten())[:N].view(B, n)
    dst_flat = torch.zeros(N + 1, dtype=torch.long, device=device).scatter_(0, at, b_tok.gather(1, best_k).flatten())
    dst = dst_flat[:N].view(B, n) % n  # flat index b·n + j → j (rows never share a window)
    return BatchPlan(merge=score > torch.scalar_tensor(float("-inf")), dst=dst, score=score)
