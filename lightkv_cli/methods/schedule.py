"""Windowed stage schedules: what LightKV (merging) and RandomDrop (dropping) both run.

A schedule is a list of stages; stage ``k`` runs after decoder layer ``layers[k]``, splits every
image's token grid into ``windows[k] × windows[k]`` windows and removes
``r_w = min(⌊ratios[k]·n_w⌋, ⌊n_w/2⌋)`` tokens from each window of ``n_w`` tokens (METHODS.md §1).
Both methods keep ``layers``, ``windows``, ``ratios`` and ``positions`` as their own dataclass fields and
use this module for everything about them (composition: neither method inherits from the other):

- :class:`Schedule`, an explicit schedule as users give it (``--layers/--windows/--ratios``, profiles);
- :func:`check_stages` (values), :func:`validate` (against a model), :func:`stage_layers`;
- :func:`predict_layer_counts` / :func:`predict`: vision tokens cached per layer, from the schedule alone;
- :func:`for_retention`: the schedule whose average vision retention is closest to a target.

Importable without torch (profiles and ``lightkv check results.json`` read :class:`Schedule`): the
functions that need a model import what they use when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from lightkv_cli.errors import UnsupportedInputError, UserError

if TYPE_CHECKING:
    from torch import nn

    from lightkv_cli.models.adapters import FamilyAdapter

#: Default stage depths as fractions of the decoder depth (12, 18, 24 of 32 for LLaVA-1.5-7B).
DEFAULT_FRACTIONS = (3 / 8, 9 / 16, 3 / 4)
DEFAULT_WINDOWS = (4, 2, 1)
#: A fourth stage, used only when a target cannot be reached with three.
EXTRA_FRACTION, EXTRA_WINDOWS = 7 / 8, 1


@dataclass(frozen=True)
class Schedule:
    """An explicit LightKV schedule: stages after ``layers`` with ``windows`` per axis and ``ratios``.

    Attributes:
        layers: decoder layers after which a stage runs (strictly increasing).
        windows: windows per grid axis at each stage.
        ratios: fraction of each window's tokens merged away at each stage.
    """

    layers: tuple[int, ...]
    windows: tuple[int, ...]
    ratios: tuple[float, ...]

    def label(self) -> str:
        """Compact, stable text used in run ids: ``L12-18-24/W4-2-1/r0.5-0.5-0.5``."""
        return (
            f"L{'-'.join(map(str, self.layers))}/W{'-'.join(map(str, self.windows))}"
            f"/r{'-'.join(f'{r:g}' for r in self.ratios)}"
        )

    def to_dict(self) -> dict:
        """``{"layers", "windows", "ratios"}`` as lists."""
        return {"layers": list(self.layers), "windows": list(self.windows), "ratios": list(self.ratios)}

    @classmethod
    def build(cls, layers: Sequence[int], windows: Sequence[int], ratios: Sequence[float]) -> Schedule:
        """A schedule with single windows/ratios values broadcast to every stage.

        Raises:
            UserError: lengths that do not match the number of layers, or invalid values
                (:func:`check_stages`).
        """
        layers = [int(x) for x in layers]
        windows = [int(x) for x in windows] * (len(layers) if len(windows) == 1 else 1)
        ratios = [float(x) for x in ratios] * (len(layers) if len(ratios) == 1 else 1)
        if not layers:
            raise UserError("a schedule needs at least one stage layer, e.g. --layers 12,18,24")
        if len(windows) != len(layers) or len(ratios) != len(layers):
            raise UserError(
                f"schedule with layers {layers}: give one window count and one ratio per layer "
                f"(or a single value for all), got windows {windows} and ratios {ratios}"
            )
        check_stages(layers, windows, ratios)
        return cls(tuple(layers), tuple(windows), tuple(ratios))


def check_stages(
    layers: Sequence[int], windows: Sequence[int], ratios: Sequence[float]
) -> tuple[list[int], list[int], list[float]]:
    """The stages as ``int`` / ``int`` / ``float`` lists, checked.

    Args:
        layers: decoder layers after which a stage runs, non-negative and strictly increasing.
        windows: windows per grid axis at each stage, ``≥ 1``.
        ratios: fraction of each window's tokens removed at each stage, in ``[0, 1]``.

    Raises:
        UserError: lengths differ, or a value out of range (the message says which).
    """
    layers = [int(x) for x in layers]
    windows = [int(x) for x in windows]
    ratios = [float(x) for x in ratios]
    if not (len(layers) == len(windows) == len(ratios)):
        raise UserError(
            f"layers, windows and ratios must have the same length (got {len(layers)}, "
            f"{len(windows)}, {len(ratios)}); give one window count and one ratio per stage"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])) or any(x < 0 for x in layers):
        raise UserError(f"layers must be non-negative and strictly increasing, got {layers}")
    if any(w < 1 for w in windows):
        raise UserError(f"windows must be ≥ 1, got {windows}")
    if any(not (0.0 <= r <= 1.0) or math.isnan(r) for r in ratios):
        raise UserError(f"ratios must be in [0, 1], got {ratios}")
    return layers, windows, ratios


def stage_layers(layers: Sequence[int], ratios: Sequence[float]) -> list[int]:
    """The stage layers whose ratio is non-zero (a zero-ratio stage changes nothing)."""
    return [lay for lay, r in zip(layers, ratios) if r > 0]


def validate(adapter: FamilyAdapter, layers: Sequence[int], positions: str) -> None:
    """Check a schedule against a model.

    Raises:
        UserError: a stage after the last-but-one decoder layer (it would leave no layer to compress).
        UnsupportedInputError: ``positions="renumber"`` for a family with multi-axis (M-RoPE) positions.
    """
    if positions == "renumber" and not adapter.supports_renumber:
        raise UnsupportedInputError(
            f"positions='renumber' needs 1-D RoPE; the {adapter.family} family uses M-RoPE (t, h, w) positions, "
            "for which renumbering is not defined: use positions='keep'"
        )
    L = adapter.num_layers
    bad = [lay for lay in layers if lay > L - 2]
    if bad:
        raise UserError(
            f"stage layers {bad} leave no later layer to compress: this model has {L} decoder layers, "
            f"so stages must be after layers 0..{L - 2}"
        )


def predict_layer_counts(
    adapter: FamilyAdapter,
    layers: Sequence[int],
    windows: Sequence[int],
    ratios: Sequence[float],
    grids: Sequence[tuple[int, int]] | None = None,
    special: int = 0,
) -> list[int]:
    """Vision tokens cached by each decoder layer under a schedule, from the schedule alone.

    Args:
        adapter: the model's family adapter (depth ``L``; its representative grids when ``grids`` is None).
        layers, windows, ratios: the stages.
        grids: ``(rows, cols)`` of each grid of an input, each windowed on its own; default: one
            representative image of the family (``adapter.prediction_grids()``, special tokens included).
        special: never-merged vision tokens besides ``grids`` (newlines, CLS), with ``grids``.

    Returns:
        ``L`` ints. Exact when the windows of later stages nest in those of earlier ones (4-2-1 on an
        even grid); otherwise the real counts can differ by a few tokens (see ``merging.simulate_counts``).
    """
    from lightkv_cli.methods.merging import simulate_counts

    L = adapter.num_layers
    if grids is None:
        grids, special = adapter.prediction_grids()
    per_image = sum(r * c for r, c in grids) + special
    stages = [(w, r) for w, r in zip(windows, ratios)]
    after = [special] * len(stages)
    for grid in grids:
        for k, c in enumerate(simulate_counts(tuple(grid), stages)):
            after[k] += c
    counts = [per_image] * L
    for lay, c in zip(layers, after):
        for j in range(lay + 1, L):
            counts[j] = c
    return counts


def mean_retention(counts: Sequence[int]) -> float:
    """Average vision retention of per-layer counts: ``Σ counts / (L · counts[0])`` (layer 0 keeps all)."""
    return sum(counts) / (len(counts) * counts[0])


class WindowedPress(Protocol):
    """What :func:`predict` and :func:`for_retention` need of a press that runs a windowed schedule."""

    layers: list[int]
    windows: list[int]
    ratios: list[float]
    expected_retention: float | None
    schedule_note: str

    def validate(self, adapter: FamilyAdapter) -> None: ...


P = TypeVar("P", bound=WindowedPress)


def predict(
    press: WindowedPress, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0
) -> list[int]:
    """Predicted vision tokens cached by each decoder layer under ``press``'s schedule (length ``L``).

    Validates the press against ``model`` (``press.validate``) and sets ``press.expected_retention``.
    ``grids`` and ``special`` as :func:`predict_layer_counts`.

    Raises:
        UserError, UnsupportedInputError: the schedule does not fit the model (:func:`validate`).
    """
    from lightkv_cli.models.adapters import adapter_for

    adapter = adapter_for(model)
    press.validate(adapter)
    counts = predict_layer_counts(adapter, press.layers, press.windows, press.ratios, grids, special)
    press.expected_retention = mean_retention(counts)
    return counts


def for_retention(factory: Callable[..., P], retention: float, model: nn.Module, **kwargs) -> P:
    """The press whose schedule's average vision retention is as close as possible to ``retention``.

    Rules (METHODS.md §1): stages at 3/8, 9/16 and 3/4 of the decoder depth with 4, 2, 1 windows,
    and one common ratio solved for the target. When the target cannot be reached with ratio ≤ 0.5
    at those depths, the stages move earlier (all depths scaled down together); if that is still not
    enough, a fourth stage (1 window, at 7/8 of the depth) is added. Target 1 gives ratio 0.

    Args:
        factory: builds the press from ``(layers, windows, ratios, **kwargs)`` (a press class).
        retention: target average vision retention ``R`` in ``(0, 1]``.
        model: the model (its depth and vision grid decide the schedule).
        kwargs: passed to ``factory`` (``positions``, method parameters).

    Returns:
        The press, validated against ``model``, with ``expected_retention`` (predicted) and
        ``schedule_note`` (how the schedule was chosen) set.

    Raises:
        UserError: ``retention`` outside ``(0, 1]``, a model with fewer than 5 decoder layers, or a
            target below the lowest retention reachable.
        UnsupportedInputError: from ``press.validate`` (e.g. ``positions="renumber"`` with M-RoPE).
    """
    from lightkv_cli.models.adapters import adapter_for

    if not (0.0 < retention <= 1.0) or math.isnan(retention):
        raise UserError(f"retention must be in (0, 1], got {retention}")
    adapter = adapter_for(model)
    L = adapter.num_layers
    if L < 5:
        raise UserError(f"LightKV.for_retention needs at least 5 decoder layers; this model has {L}")

    def build(layers, windows, ratio, note):
        press = factory(layers, windows, [ratio] * len(layers), **kwargs)
        press.validate(adapter)
        press.expected_retention = mean_retention(
            predict_layer_counts(adapter, press.layers, press.windows, press.ratios)
        )
        press.schedule_note = note
        return press

    def retention_of(layers, windows, ratio):
        return mean_retention(predict_layer_counts(adapter, layers, windows, [ratio] * len(layers)))

    default_layers = _layers_at(DEFAULT_FRACTIONS, L, 1.0) or _layers_at(DEFAULT_FRACTIONS, L, 0.05)
    if retention >= 1.0:
        return build(default_layers, list(DEFAULT_WINDOWS), 0.0, "target 1.0: ratio 0, nothing is merged")
    for fractions, windows in (
        (DEFAULT_FRACTIONS, DEFAULT_WINDOWS),
        (DEFAULT_FRACTIONS + (EXTRA_FRACTION,), DEFAULT_WINDOWS + (EXTRA_WINDOWS,)),
    ):
        for step in range(20):
            scale = 1.0 - step * 0.05
            layers = _layers_at(fractions, L, scale)
            if layers is None:
                continue
            if retention_of(layers, windows, 0.5) > retention + 1e-9:
                continue
            ratio = _solve_ratio(lambda r, ls=layers, ws=windows: retention_of(ls, ws, r), retention)
            where = "default depths" if step == 0 else f"depths scaled by {scale:.2f} (moved earlier)"
            extra = "" if len(fractions) == 3 else ", with a fourth stage"
            note = (
                f"layers {layers} of {L} ({where}{extra}), windows {list(windows)}, "
                f"common ratio {ratio:.4f} solved for target {retention:g}"
            )
            return build(layers, list(windows), ratio, note)
    floor_fractions, floor_windows = DEFAULT_FRACTIONS + (EXTRA_FRACTION,), DEFAULT_WINDOWS + (EXTRA_WINDOWS,)
    floor_layers = _layers_at(floor_fractions, L, 0.05)
    if floor_layers is None:  # too shallow for four stages
        floor_layers, floor_windows = _layers_at(DEFAULT_FRACTIONS, L, 0.05), DEFAULT_WINDOWS
    lowest = retention_of(floor_layers, floor_windows, 0.5)
    raise UserError(
        f"target retention {retention:g} is below the lowest this model reaches with LightKV "
        f"(about {lowest:.3f} with stages after layers {floor_layers}); choose a larger target"
    )


def _layers_at(fractions: Sequence[float], num_layers: int, scale: float) -> list[int] | None:
    """Stage layers at ``fraction · L · scale`` (rounded), strictly increasing, in ``[1, L-2]``."""
    layers = []
    for f in fractions:
        lay = max(1, int(math.floor(f * num_layers * scale + 0.5)))
        if layers and lay <= layers[-1]:
            lay = layers[-1] + 1
        layers.append(lay)
    if layers[-1] > num_layers - 2:
        return None
    return layers


def _solve_ratio(retention_of, target: float) -> float:
    """Common ratio in ``[0, 0.5]`` whose retention is closest to ``target`` (retention falls with ratio)."""
    lo, hi = 0.0, 0.5
    for _ in range(40):
        mid = (lo + hi) / 2
        if retention_of(mid) > target:
            lo = mid
        else:
            hi = mid
    # hi: smallest ratio reaching ≤ target; lo: just above target. Round outward to 4 decimals.
    r_hi = math.ceil(hi * 1e4) / 1e4
    r_lo = math.floor(lo * 1e4) / 1e4
    best = min((abs(retention_of(r) - target), r) for r in (r_hi, r_lo))
    return min(best[1], 0.5)
