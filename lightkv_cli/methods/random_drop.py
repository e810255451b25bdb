"""RandomDrop: LightKV's stages with the removed vision tokens chosen at random and dropped.

The floor every method must beat (``shared/docs/METHODS.md`` §3): same windows, same number of
tokens removed per window as LightKV's merge (``r_w = min(⌊ρ·n_w⌋, ⌊n_w/2⌋)``), but which tokens go
is drawn uniformly at random from a seeded generator, and they are dropped, not merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightkv_cli.methods.base import StageInput, StageOutput
from lightkv_cli.methods.lightkv import LightKV
from lightkv_cli.methods.merging import merges_per_window, window_ids


@dataclass
class RandomDrop(LightKV):
    """Random dropping on LightKV's schedule (same ``layers``, ``windows``, ``ratios``).

    Inside each window, ``r_w`` uniformly random vision tokens are removed (special tokens never).
    The draw depends only on ``seed``, the stage and the batch row, so the same prompt always loses
    the same tokens. Layer counts, retention and schedules (:meth:`LightKV.for_retention`) are
    exactly LightKV's.

    Args:
        seed: seed of the draws (0).
        (others as :class:`~lightkv_cli.methods.lightkv.LightKV`; ``guidance`` is unused.)
    """

    guidance: str = "uniform"
    seed: int = 0

    @property
    def needs_qk(self) -> bool:  # type: ignore[override]
        """Random choices need no attention."""
        return False

    def describe(self) -> dict:
        """Parameters for results files."""
        out = super().describe()
        out.pop("guidance", None)
        out["seed"] = self.seed
        return out

    def reduce(self, inp: StageInput) -> StageOutput | None:
        """Drop ``r_w`` random tokens per window (rows equalised to the smallest total)."""
        k = self.layers.index(inp.layer)
        windows, ratio = self.windows[k], self.ratios[k]
        B, S, _ = inp.hidden.shape
        drops, draws = [], []
        for b, lay in enumerate(inp.layouts):
            idx = torch.nonzero(lay.mergeable).flatten()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k * 7919 + b)
            r = torch.rand(idx.numel(), generator=gen, dtype=torch.float64)
            if idx.numel() == 0:
                drops.append(idx)
                draws.append(r)
                continue
            wid = window_ids(lay.coords[idx], lay.image[idx], lay.grids, windows)
            num_windows = len(lay.grids) * windows * windows
            sizes = torch.bincount(wid, minlength=num_windows)
            order = torch.argsort(wid.double() + r)  # by window, then by the random draw
            starts = torch.cumsum(sizes, 0) - sizes
            rank = torch.empty_like(wid)
            rank[order] = torch.arange(idx.numel()) - starts[wid[order]]
            drop = rank < merges_per_window(sizes, ratio)[wid]
            drops.append(idx[drop])
            draws.append(r[drop])
        m = min(d.numel() for d in drops)
        if m == 0:
            return None
        keep = torch.ones(B, S, dtype=torch.bool, device=inp.hidden.device)
        for b, lay in enumerate(inp.layouts):
            d = drops[b]
            if d.numel() > m:  # rows must lose the same number: drop the m with the smallest draws
                d = d[torch.argsort(draws[b])[:m]]
            keep[b, lay.positions[d].to(keep.device)] = False
        return StageOutput(keep=keep, hidden=inp.hidden)
