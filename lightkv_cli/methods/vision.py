"""The vision tokens of a whole batch, on the model's device, as in-prefill stages see and shorten them.

Adapters find the vision tokens of each prompt row once per prefill
(:meth:`~lightkv_cli.models.adapters.FamilyAdapter.vision_layouts`, one
:class:`~lightkv_cli.models.adapters.VisionLayout` per row, on the host). Stages then work on
:class:`VisionTokens`: the same facts stacked into ``(B, n)`` tensors on the model's device, so that a
stage is a fixed number of batched tensor ops whatever the batch size, the number of images or the
number of windows, and never reads a tensor back to the host except the one count it must know to
size the shorter sequence (DESIGN.md, "Measuring honestly": a method's cost is part of what is
measured).

Every row holds the same number ``n`` of vision tokens (the presses refuse batches that do not), and
every stage removes the same number of tokens from every row, so ``n`` stays a host integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightkv_cli.models.adapters import VisionLayout


def compact(mask: torch.Tensor, count: int, rank: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the True entries of every row, ascending, when every row has exactly ``count``.

    Equivalent to ``torch.nonzero(mask)[:, 1].view(B, count)`` without the host synchronisation
    ``nonzero`` needs to size its output (the caller knows ``count``).

    Args:
        mask: ``(B, N)`` bool.
        count: True entries per row (a host int; rows with fewer leave the tail of their row
            undefined, rows with more are cut: callers guarantee exactly ``count``).
        rank: ``mask.cumsum(1) − 1`` when the caller has it already.

    Returns:
        ``(B, count)`` long.
    """
    B, N = mask.shape
    if rank is None:
        rank = mask.cumsum(1) - 1
    slot = torch.where(mask, rank, count)  # rank among the row's True entries; the rest to a spare slot
    out = torch.zeros(B, count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(1, slot, torch.arange(N, device=mask.device).expand(B, -1))
    return out[:, :count]


@dataclass
class VisionTokens:
    """The current vision tokens of every batch row, stacked (``B`` rows, ``n`` tokens each).

    Attributes:
        positions: ``(B, n)`` long, index of each vision token in the current sequence, ascending.
        coords: ``(B, n, 2)`` long (row, col) on its grid, ``-1`` for special tokens.
        grid: ``(B, n)`` long, index of the token's grid in its row (``VisionLayout.image``).
        mergeable: ``(B, n)`` bool, False for special tokens (never removed).
        grid_dims: ``(B, G, 2)`` long ``(rows, cols)`` of every grid of every row (zeros where a row
            has fewer than ``G`` grids).
        count: ``n`` (host int).
        mergeable_counts: mergeable tokens of each row (host ints; every stage removes the same
            number from every row, so these stay known on the host).
        layouts: the rows' original :class:`VisionLayout` (host; grids and owners for records).
        after_last: the most tokens any row has after its last vision token (host int; stages remove
            vision tokens only, so this never changes).
        text_positions: ``(B, S − n)`` long, the positions of every other token (text and padding),
            ascending.

    All tensors live on the model's device.
    """

    positions: torch.Tensor
    coords: torch.Tensor
    grid: torch.Tensor
    mergeable: torch.Tensor
    grid_dims: torch.Tensor
    count: int
    mergeable_counts: list[int]
    layouts: list[VisionLayout]
    after_last: int = 0
    text_positions: torch.Tensor | None = None

    @classmethod
    def from_layouts(cls, layouts: list[VisionLayout], device: torch.device, seq_len: int) -> VisionTokens:
        """Stack per-row layouts (all with the same ``count``, ``≥ 1``) of a ``seq_len`` prompt onto ``device``.

        The prompt's last token (position ``seq_len − 1``) is never mergeable: it predicts the first
        answer token. Host work is a fixed number of ops for the batch, plus one ``tolist`` read of
        host tensors.

        Raises:
            ValueError: rows with different vision-token counts.
        """
        n = layouts[0].count
        if any(lay.count != n for lay in layouts):
            raise ValueError("internal error: rows with different vision-token counts")
        B = len(layouts)
        G = max(1, max(len(lay.grids) for lay in layouts))
        dims = torch.tensor(
            [[list(g) for g in lay.grids] + [[0, 0]] * (G - len(lay.grids)) for lay in layouts], dtype=torch.long
        )

        def stack(name: str) -> torch.Tensor:
            return torch.stack([getattr(lay, name) for lay in layouts]).cpu()

        positions = stack("positions")
        mergeable = stack("mergeable") & (positions != seq_len - 1)
        merge_counts, last = torch.stack([mergeable.sum(dim=1), positions.amax(dim=1)]).tolist()
        text = torch.ones(B, seq_len, dtype=torch.bool).scatter_(1, positions, False)
        return cls(
            text_positions=compact(text, seq_len - n).to(device),
            positions=positions.to(device),
            coords=stack("coords").to(device),
            grid=stack("image").to(device),
            mergeable=mergeable.to(device),
            grid_dims=dims.to(device),
            count=n,
            mergeable_counts=merge_counts,
            layouts=layouts,
            after_last=seq_len - 1 - min(last),
        )

    @property
    def batch(self) -> int:
        """Rows ``B``."""
        return int(self.positions.shape[0])

    def num_windows(self, windows: int) -> int:
        """Window ids per row at ``windows`` bands per axis: ``G·W²`` (host int)."""
        return int(self.grid_dims.shape[1]) * windows * windows

    def max_window_size(self, windows: int) -> int:
        """Upper bound on the tokens of one window (host int, from the grids alone).

        The largest band of a grid axis of size ``s`` is ``⌈s/W⌉``; tokens only ever leave a window
        (survivors keep their coordinates), so the bound holds at every stage.
        """
        best = 1
        for lay in self.layouts:
            for r, c in lay.grids:
                best = max(best, math.ceil(r / windows) * math.ceil(c / windows))
        return best

    def window_ids(self, windows: int) -> torch.Tensor:
        """``(B, n)`` long window of every token in its row (``grid·W² + band_row·W + band_col``);
        ``-1`` for tokens that are not mergeable."""
        from lightkv_cli.methods.merging import bands

        if windows == 1:  # one window per grid
            return self.grid.masked_fill(~self.mergeable, -1)
        dims = self.grid_dims.gather(1, self.grid.clamp(min=0).unsqueeze(-1).expand(-1, -1, 2))  # (B, n, 2)
        br = bands(self.coords[..., 0].clamp(min=0), dims[..., 0], windows)
        bc = bands(self.coords[..., 1].clamp(min=0), dims[..., 1], windows)
        wid = self.grid * windows * windows + br * windows + bc
        return torch.where(self.mergeable, wid, -1)

    def vision_mask(self, seq_len: int) -> torch.Tensor:
        """``(B, seq_len)`` bool, True at the vision tokens' positions."""
        mask = torch.zeros(self.batch, seq_len, dtype=torch.bool, device=self.positions.device)
        return mask.scatter_(1, self.positions, True)

    def select(self, keep: torch.Tensor, removed: int, new_pos_of_old: torch.Tensor) -> VisionTokens:
        """The vision tokens that survive a stage, at their positions in the shorter sequence.

        Args:
            keep: ``(B, S)`` bool over the current sequence; every row removes ``removed`` vision
                tokens (only mergeable ones) and no text.
            removed: tokens removed per row (host int).
            new_pos_of_old: ``keep.cumsum(1) − 1``, ``(B, S)`` long: a survivor's new position.

        Returns:
            The new :class:`VisionTokens`.
        """
        kept = keep.gather(1, self.positions)  # (B, n)
        new_n = self.count - removed
        idx = compact(kept, new_n)  # (B, n')
        old_positions = self.positions.gather(1, idx)
        return VisionTokens(
            positions=new_pos_of_old.gather(1, old_positions),
            coords=self.coords.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2)),
            grid=self.grid.gather(1, idx),
            mergeable=self.mergeable.gather(1, idx),
            grid_dims=self.grid_dims,
            count=new_n,
            mergeable_counts=[c - removed for c in self.mergeable_counts],
            layouts=self.layouts,
            after_last=self.after_last,
            text_positions=None if self.text_positions is None else new_pos_of_old.gather(1, self.text_positions),
        )
