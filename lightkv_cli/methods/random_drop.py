"""RandomDrop: LightKV's stages with the removed vision tokens chosen at random and dropped.

The floor every method must beat (``shared/docs/METHODS.md`` §3): same windows, same number of
tokens removed per window as LightKV's merge (``r_w = min(⌊ρ·n_w⌋, ⌊n_w/2⌋)``), but which tokens go
is drawn uniformly at random from a seeded generator, and they are dropped, not merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.methods import schedule
from lightkv_cli.methods.base import POSITION_MODES, SequencePress, StageInput, StageOutput
from lightkv_cli.methods.merging import batch_window_ranks, merges_per_window
from lightkv_cli.models.adapters import FamilyAdapter


@dataclass
class RandomDrop(SequencePress):
    """Random dropping on a LightKV schedule (same ``layers``, ``windows``, ``ratios``).

    Inside each window, ``r_w`` uniformly random vision tokens are removed (special tokens never).
    The draw depends only on ``seed`` and the stage (every row of a batch gets the same draws, one per
    vision token), so the same prompt always loses the same tokens, alone or in any batch.
    Layer counts, retention and schedules (:meth:`for_retention`) are exactly
    LightKV's: both run :mod:`lightkv_cli.methods.schedule`.

    Args:
        layers: decoder layers after which a stage runs, strictly increasing, each in ``[0, L-2]``.
        windows: windows per grid axis at each stage (``W ≥ 1``).
        ratios: fraction of each window's tokens removed at each stage, in ``[0, 1]`` (capped at half a
            window).
        positions: ``"keep"`` (default) or ``"renumber"`` (1-D RoPE families only), as LightKV's.
        seed: seed of the draws (0).

    Attributes:
        expected_retention: the predicted average vision retention (:meth:`for_retention`, :meth:`predict`).
        schedule_note: how :meth:`for_retention` chose the schedule.

    Raises:
        UserError: inconsistent or out-of-range schedule, unknown positions mode.
    """

    layers: Sequence[int]
    windows: Sequence[int]
    ratios: Sequence[float]
    positions: str = "keep"
    seed: int = 0
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)

    #: random choices need no attention
    needs_qk = False

    def __post_init__(self) -> None:
        self.layers, self.windows, self.ratios = schedule.check_stages(self.layers, self.windows, self.ratios)
        if self.positions not in POSITION_MODES:
            raise UserError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")

    def describe(self) -> dict:
        """Parameters for results files: schedule, positions, how the schedule was chosen, seed."""
        return {
            "layers": list(self.layers),
            "windows": list(self.windows),
            "ratios": [round(r, 6) for r in self.ratios],
            "positions": self.positions,
            "schedule_note": self.schedule_note,
            "seed": self.seed,
        }

    def stage_layers(self, num_layers: int) -> list[int]:
        """The schedule's layers whose ratio is non-zero."""
        return schedule.stage_layers(self.layers, self.ratios)

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise when the schedule does not fit the model (:func:`~lightkv_cli.methods.schedule.validate`)."""
        schedule.validate(adapter, self.layers, self.positions)

    def predict(self, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0) -> list[int]:
        """Predicted vision tokens cached by each decoder layer (LightKV's counts); sets :attr:`expected_retention`."""
        return schedule.predict(self, model, grids, special)

    @classmethod
    def for_retention(cls, retention: float, model: nn.Module, positions: str = "keep", seed: int = 0) -> RandomDrop:
        """The schedule LightKV chooses for ``retention`` (:func:`~lightkv_cli.methods.schedule.for_retention`).

        Raises:
            UserError: ``retention`` outside ``(0, 1]``, or below the lowest retention reachable.
        """
        return schedule.for_retention(cls, retention, model, positions=positions, seed=seed)

    def reduce(self, inp: StageInput) -> StageOutput | None:
        """Drop ``r_w`` random tokens per window, every row at once (rows equalised to the smallest total).

        Every row takes the same ``n`` numbers of one generator seeded by ``seed`` and the stage (on the
        host, so draws are the same on every device), one per current vision token: a prompt's draws do not
        depend on the batch it is in.
        Reading the smallest row's total is the stage's one host synchronisation.
        """
        k = self.layers.index(inp.layer)
        windows, ratio = self.windows[k], self.ratios[k]
        B, S, _ = inp.hidden.shape
        vis = inp.vision
        n = vis.count
        device = inp.hidden.device
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k * 7919)
        r = torch.rand(1, n, generator=gen, dtype=torch.float64).to(device).expand(B, n)
        gw, sizes, order, _, sorted_rank = batch_window_ranks(vis.window_ids(windows), vis.num_windows(windows), r)
        rank = torch.empty_like(gw).scatter_(0, order, sorted_rank)  # by window, then by the random draw
        r_w = merges_per_window(sizes, ratio)
        r_w[-1] = 0  # special tokens
        drop = (rank < r_w[gw]).view(B, n)
        m = int(drop.sum(dim=1).min())  # the stage's host synchronisation: sizes the shorter sequence
        if m == 0:
            return None
        # rows must lose the same number: each drops its m candidates with the smallest draws
        chosen = torch.sort(torch.where(drop, r, float("inf")), dim=1, stable=True).indices[:, :m]
        keep = torch.ones(B, S, dtype=torch.bool, device=device)
        keep.scatter_(1, vis.positions.gather(1, chosen), False)
        return StageOutput(keep=keep, removed=m, hidden=inp.hidden)
