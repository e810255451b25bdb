"""Downsampling baseline: fewer, pooled vision tokens enter the decoder (ours, after VTC-Bench).

VTC-Bench (arXiv 2510.07143) found plain image downsampling hard to beat: Qwen2-VL given the image resized
by ``1/r`` sees about ``1/r²`` of the vision tokens. lightkv prepares every input once for all the methods
of a sweep, so it cannot hand one method a smaller image; the analogue here, labelled as ours in
``shared/docs/METHODS.md`` §5.6, pools the projector outputs instead, for every family alike: each grid
of ``rows × cols`` vision tokens becomes a ``g_r × g_c`` grid of area averages
(``adaptive_avg_pool2d``, exactly stride-``s`` average pooling when ``s`` divides the grid, as in
LLaVA-OneVision's 2-D pooling). Each pooled token takes the sequence slot (and position, Qwen's (t, h, w)
included) of the original token at its cell's centre, so the kept tokens stay in raster order. What it
does not do: shrink the image before the vision tower (the tower's compute is unchanged, and Qwen's
native positions of a smaller grid are approximated by the centre tokens').
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightkv_cli.methods.prellm import InputPress, InputSlot, check_share
from lightkv_cli.models.adapters import adapter_for


def pooled_shape(rows: int, cols: int, retention: float) -> tuple[int, int]:
    """The ``(g_r, g_c)`` pooled grid of a ``rows × cols`` grid keeping about ``retention`` of its tokens.

    Of the grids with ``1 ≤ g_r ≤ rows``, ``g_c = round(R·rows·cols / g_r)`` clamped to ``[1, cols]``, and an
    aspect ratio within a factor 2 of the original's, the one whose ``g_r·g_c`` is closest to
    ``R·rows·cols`` (ties: the closer aspect ratio, then the smaller ``g_r``), so that a pooled run holds
    about as many KV bytes as the other methods at the same target (24×24 at R = 0.55, 0.25, 0.15: 15×21,
    12×12, 8×11; 16×16 at 0.3: 7×11).
    """
    if retention >= 1.0:
        return rows, cols
    want = retention * rows * cols
    best = None
    for gr in range(1, rows + 1):
        gc = min(cols, max(1, round(want / gr)))
        skew = abs(math.log((gc / gr) / (cols / rows)))
        if skew > math.log(2) + 1e-9:
            continue
        key = (abs(gr * gc - want), skew, gr)
        if best is None or key < best[0]:
            best = (key, (gr, gc))
    if best is None:  # a grid too thin for the factor-2 bound: keep its aspect as closely as rounding allows
        gr = min(rows, max(1, round(rows * math.sqrt(retention))))
        return gr, min(cols, max(1, round(want / gr)))
    return best[1]


@dataclass
class Downsample(InputPress):
    """Pool each grid of vision tokens to about ``R`` of its tokens before decoder layer 0 (module docstring).

    Args:
        ratio: ``R``, the share of each grid's tokens kept, in ``(0, 1]`` (1 keeps everything, bit-identical).
        positions: ``"keep"`` (default: pooled tokens take their centre token's position, Qwen's M-RoPE ids)
            or ``"renumber"`` (contiguous positions; 1-D RoPE families only).

    Attributes:
        expected_retention: predicted average vision retention (:meth:`predict`, :meth:`for_retention`).
        schedule_note: how :meth:`for_retention` chose the grid.

    Raises:
        UserError: ``ratio`` outside ``(0, 1]`` or an unknown ``positions``.
    """

    ratio: float = 0.25
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.ratio = self._checked(self.ratio, "downsample ratio")

    def describe(self) -> dict:
        """Parameters for results files."""
        return {"ratio": round(self.ratio, 6), "positions": self.positions, "schedule_note": self.schedule_note}

    def grid_ratio(self, m: int, special: int = 0) -> float:
        """The share of each grid's ``m`` tokens pooled into, so that the input keeps ``R`` of all its vision
        tokens, the ``special`` never-pooled ones (LLaVA-NeXT's newlines) counted as kept:
        ``(R·(m + s) − s)/m``, at least ``1/m``."""
        if m <= 0 or self.ratio >= 1.0:
            return 1.0
        return min(1.0, max(1.0 / m, (self.ratio * (m + special) - special) / m))

    def kept_count(self, m: int, grids: Sequence[tuple[int, int]] = (), special: int = 0) -> int:
        """``Σ g_r·g_c`` over the input's grids (:func:`pooled_shape` at :meth:`grid_ratio`); ``m`` when
        ``R = 1``."""
        if m <= 0 or self.ratio >= 1.0:
            return max(m, 0)
        share = self.grid_ratio(m, special)
        return min(m, sum(gr * gc for gr, gc in (pooled_shape(r, c, share) for r, c in grids)))

    def choose(self, features: torch.Tensor, k: int, slot: InputSlot) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool every grid of the input; grids of one shape (video frames, equal images) in one call.

        Returns:
            ``(B, k)`` centre tokens' indices into ``m`` (ascending) and ``(B, k, D)`` pooled embeddings
            (float32 averages cast to ``features``' dtype). The index tables are built on the host from the
            layout; no host read of device data.

        Raises:
            ValueError: a grid's tokens do not fill it (a layout bug).
        """
        B, _, D = features.shape
        device = features.device
        picks, values = [], []
        by_shape: dict[tuple[int, int], list[int]] = {}
        for g, shape in enumerate(slot.grids):
            by_shape.setdefault(tuple(shape), []).append(g)
        share = self.grid_ratio(slot.index.numel(), slot.special)
        for (r, c), gids in by_shape.items():
            gr, gc = pooled_shape(r, c, share)
            if len(by_shape) == 1:  # every token is on a grid of this shape (the usual case): no search
                on = torch.arange(slot.grid.numel())
            else:
                on = torch.nonzero(torch.isin(slot.grid, torch.tensor(gids)), as_tuple=False).flatten()
            if on.numel() != len(gids) * r * c:
                raise ValueError(f"a {r}×{c} grid of the layout is not filled by its tokens")
            rank = torch.full((len(slot.grids),), -1, dtype=torch.long)
            rank[gids] = torch.arange(len(gids))
            yx = slot.coords.index_select(0, on)
            table = torch.empty(len(gids), r * c, dtype=torch.long)  # (G, r·c) token index into m
            table[rank[slot.grid.index_select(0, on)], yx[:, 0] * c + yx[:, 1]] = on
            x = features[:, table.flatten().to(device)].view(B * len(gids), r, c, D).permute(0, 3, 1, 2)
            pooled = F.adaptive_avg_pool2d(x.float(), (gr, gc))  # (B·G, D, gr, gc)
            values.append(pooled.permute(0, 2, 3, 1).reshape(B, len(gids) * gr * gc, D))
            ri = ((torch.arange(gr) + 0.5) * r / gr).floor().long().clamp(max=r - 1)
            ci = ((torch.arange(gc) + 0.5) * c / gc).floor().long().clamp(max=c - 1)
            picks.append(table[:, (ri[:, None] * c + ci[None, :]).flatten()].flatten())
        chosen = torch.cat(picks)
        order = torch.argsort(chosen)
        out = torch.cat(values, dim=1)[:, order.to(device)].to(features.dtype)
        return chosen[order].to(device).expand(B, -1).clone(), out

    @classmethod
    def for_retention(cls, retention: float, model: nn.Module, positions: str = "keep") -> Downsample:
        """The pooling that keeps about ``retention`` of each grid (``ratio = R``; the measured ``R`` differs
        by the rounding of :func:`pooled_shape`).

        Raises:
            UserError: ``retention`` outside ``(0, 1]``.
        """
        check_share(retention, "retention")
        press = cls(ratio=round(retention, 9), positions=positions)
        press.predict(model)
        grids, special = adapter_for(model).prediction_grids()
        m = sum(r * c for r, c in grids)
        share = press.grid_ratio(m, special)
        shapes = ", ".join(f"{r}×{c}→{'×'.join(map(str, pooled_shape(r, c, share)))}" for r, c in grids)
        press.schedule_note = f"average-pool each grid before layer 0 ({shapes}), for target {retention:g}"
        kept, exact = press.kept_count(m, grids, special), share * m
        if abs(kept - exact) >= 0.5:
            press.schedule_note += (
                f"; a pooled grid holds g_r·g_c tokens with an aspect within 2× of the grid's, so {kept} is the "
                f"nearest to the {exact:.1f} the target asks"
            )
        return press
