"""The methods a sweep can run, by name, and how a (method, schedule or target) becomes a press.

Names are what users type (``--methods lightkv,lightkv-uniform``) and what results files record.
:data:`METHODS` is the only list of methods: ``lightkv methods``, the sweep, profiles and the tests
read it. An entry is data: name, kind, summary, guidance mode, whether it takes explicit schedules, and
``build``, the function that makes its press from a target retention or a schedule. Adding a method is
its own file plus one entry here.

Importable without torch (``lightkv check results.json --profile`` and ``lightkv report`` read the
registry): the ``build`` functions import their method when called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightkv_cli.errors import UserError
from lightkv_cli.methods.schedule import Schedule

if TYPE_CHECKING:
    from torch import nn

#: How a method compresses (shown by ``lightkv methods`` and in reports).
KIND_MERGE, KIND_DROP, KIND_EVICT = "in-prefill merge", "in-prefill drop", "post-prefill eviction"
#: Pre-LLM reduction: fewer vision tokens enter decoder layer 0 (every layer caches the same ``k``).
KIND_PRE = "pre-LLM drop"

#: ``build(model, *, target, schedule, positions) -> press``: exactly one of ``target`` (a retention
#: ``R`` in ``(0, 1]``) and ``schedule`` (a :class:`Schedule`) is given.
Build = Callable[..., Any]


@dataclass(frozen=True)
class MethodInfo:
    """One named method.

    Attributes:
        name: the name users type and results record.
        summary: one line for ``lightkv methods``, ``--help`` and reports.
        kind: :data:`KIND_MERGE`, :data:`KIND_DROP`, :data:`KIND_PRE` or :data:`KIND_EVICT`.
        build: ``build(model, *, target=None, schedule=None, positions="keep")`` → the press, for a
            target ``R`` or an explicit schedule (called by :func:`make_press`, which checks the
            arguments first); it sets ``expected_retention`` where it can be predicted and
            ``schedule_note``.
        guidance: LightKV guidance mode of this entry (None for other methods).
        schedules: whether the method runs explicit LightKV schedules (``--layers/--windows/--ratios``).
        published: the published setting on LLaVA-1.5-7B and the average vision retention ``R`` it actually
            gives (``shared/docs/METHODS.md`` §5.7); empty where no setting is published.
    """

    name: str
    summary: str
    kind: str
    build: Build
    guidance: str | None = None
    schedules: bool = False
    published: str = ""

    @property
    def target(self) -> str:
        """What a sweep's target retention ``R`` means for this method."""
        if self.kind == KIND_EVICT:
            return "KV budget equal to an in-prefill method's at vision retention R (α = 1 − (1 − R)·vision/prompt)"
        return "average vision retention R over layers"


# --- how each method is built (the classes are imported on use: no torch at import time) ----------------


def _windowed(cls, model: nn.Module, target: float | None, schedule: Schedule | None, positions: str, **kwargs):
    """A press on a windowed LightKV schedule: solved for ``target``, or the explicit ``schedule``."""
    if schedule is not None:
        press = cls(
            layers=list(schedule.layers),
            windows=list(schedule.windows),
            ratios=list(schedule.ratios),
            positions=positions,
            **kwargs,
        )
        press.predict(model)
        press.schedule_note = f"explicit schedule {schedule.label()}"
        return press
    return cls.for_retention(target, model, positions=positions, **kwargs)


def _build_lightkv(model, *, target=None, schedule=None, positions="keep", guidance: str = "cross"):
    from lightkv_cli.methods.lightkv import LightKV

    return _windowed(LightKV, model, target, schedule, positions, guidance=guidance)


def _build_random(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.random_drop import RandomDrop

    return _windowed(RandomDrop, model, target, schedule, positions)


def _build_fastv(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.fastv import FastV

    return FastV.for_retention(target, model, positions=positions)


def _build_dart(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.dart import DART

    return DART.for_retention(target, model, positions=positions)


def _build_pdrop(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.pdrop import PyramidDrop

    return PyramidDrop.for_retention(target, model, positions=positions)


def _build_divprune(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.divprune import DivPrune

    return DivPrune.for_retention(target, model, positions=positions)


def _build_downsample(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.downsample import Downsample

    return Downsample.for_retention(target, model, positions=positions)


def _build_visionzip(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.visionzip import VisionZip

    return VisionZip.for_retention(target, model, positions=positions)


def _matched_eviction(cls, target: float):
    """An eviction press whose KV budget matches an in-prefill method's at vision retention ``target``."""
    press = cls(match_retention=target)
    press.schedule_note = f"KV budget matched to vision retention {target:g}"
    return press


def _build_vlcache(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.vlcache import VLCache

    return _matched_eviction(VLCache, target)


def _build_snapkv(model, *, target=None, schedule=None, positions="keep"):
    from lightkv_cli.methods.snapkv import SnapKV

    return _matched_eviction(SnapKV, target)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "lightkv",
            "LightKV (TMLR 2026): prompt-guided vision-token merging in prefill, cross guidance (published)",
            KIND_MERGE,
            functools.partial(_build_lightkv, guidance="cross"),
            guidance="cross",
            schedules=True,
            published="layers 12, 18, 24, windows 4-2-1, ratio 0.5: R = 0.574",
        ),
        MethodInfo(
            "lightkv-prompt",
            "LightKV with guidance from the attention the prompt pays to each vision token",
            KIND_MERGE,
            functools.partial(_build_lightkv, guidance="prompt"),
            guidance="prompt",
            schedules=True,
        ),
        MethodInfo(
            "lightkv-uniform",
            "LightKV without prompt guidance (plain mean merge): the paper's ablation",
            KIND_MERGE,
            functools.partial(_build_lightkv, guidance="uniform"),
            guidance="uniform",
            schedules=True,
        ),
        MethodInfo(
            "vlcache",
            "VL-Cache (ICLR 2025): post-prefill eviction of vision and text, sparsity-aware layer budgets",
            KIND_EVICT,
            _build_vlcache,
        ),
        MethodInfo(
            "fastv",
            "FastV (ECCV 2024): drop the least-attended vision tokens before layer 2",
            KIND_DROP,
            _build_fastv,
            published="K = 2, R = 50%: R = 0.531",
        ),
        MethodInfo(
            "snapkv",
            "SnapKV (NeurIPS 2024): post-prefill eviction by an observation window's attention",
            KIND_EVICT,
            _build_snapkv,
        ),
        MethodInfo(
            "random",
            "Random drop on LightKV's stages (seeded): the floor every method must beat",
            KIND_DROP,
            _build_random,
            schedules=True,
        ),
        MethodInfo(
            "dart",
            "DART (arXiv 2502.11494): after layer 1 keep pivot tokens and the vision tokens least duplicating them",
            KIND_DROP,
            _build_dart,
            published="K = 2, 128 tokens (TOPK 16): R = 0.277",
        ),
        MethodInfo(
            "pdrop",
            "PyramidDrop (arXiv 2410.17247): drop the least-attended vision tokens in 3 stages, keeping λ, λ², λ³",
            KIND_DROP,
            _build_pdrop,
            published="λ = 0.5 at layers 8, 16, 24: R = 0.469",
        ),
        MethodInfo(
            "divprune",
            "DivPrune (arXiv 2503.02175): before layer 0 keep each image's most diverse vision tokens (max-min cosine)",
            KIND_PRE,
            _build_divprune,
            published="SUBSET_RATIO 0.098 (56 tokens): R = 0.097",
        ),
        MethodInfo(
            "visionzip",
            "VisionZip (arXiv 2412.04467): before layer 0 keep the tokens the [CLS] attends most, merge the rest",
            KIND_PRE,
            _build_visionzip,
            published="54 dominant + 10 contextual (64 tokens): R = 0.111",
        ),
        MethodInfo(
            "downsample",
            "Downsampling baseline (ours, after VTC-Bench): average-pool each vision grid before layer 0",
            KIND_PRE,
            _build_downsample,
        ),
    )
}
#: The method name for each LightKV guidance mode (``lightkv profile --guidance``).
METHOD_FOR_GUIDANCE = {m.guidance: m.name for m in METHODS.values() if m.guidance}


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Split ``"lightkv,lightkv-uniform"`` (or a list) into known method names, order kept, no repeats.

    Raises:
        UserError: an unknown name (the message lists the known ones).
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if part not in METHODS:
            raise UserError(f"unknown method '{part}'; known methods: {', '.join(METHODS)}")
        if part not in out:
            out.append(part)
    if not out:
        raise UserError(f"no method given; known methods: {', '.join(METHODS)}")
    return out


def make_press(
    method: str,
    model: nn.Module,
    *,
    target: float | None = None,
    schedule: Schedule | None = None,
    positions: str = "keep",
):
    """The press of ``method`` for a target retention or an explicit schedule (its entry's ``build``).

    Args:
        method: a name in :data:`METHODS`.
        model: the model (schedules are generated for its depth and vision grid).
        target: target ``R`` in ``(0, 1]``: average vision retention for in-prefill methods; for
            eviction methods the KV budget that keeps as many entries as ``R`` does in-prefill
            (see :attr:`MethodInfo.target`). Exclusive with ``schedule``.
        schedule: an explicit LightKV schedule (methods with ``schedules=True`` only).
        positions: ``keep`` or ``renumber`` (in-prefill methods; eviction never moves positions).

    Returns:
        A press (:class:`~lightkv_cli.methods.lightkv.LightKV`, ``RandomDrop``, ``FastV``, ``DART``,
        ``PyramidDrop``, ``DivPrune``, ``VLCache`` or ``SnapKV``) with ``expected_retention`` set where it
        can be predicted.

    Raises:
        UserError: an unknown method, a target the model cannot reach, a schedule given to a method
            that takes none, or a schedule that does not fit the model's depth.
        ValueError: neither or both of ``target`` and ``schedule``.
    """
    info = METHODS.get(method)
    if info is None:
        raise UserError(f"unknown method '{method}'; known methods: {', '.join(METHODS)}")
    if (target is None) == (schedule is None):
        raise ValueError("give exactly one of target and schedule")
    if schedule is not None and not info.schedules:
        raise UserError(
            f"method '{method}' does not take a LightKV schedule (--layers/--windows/--ratios); "
            f"give it target retentions instead (methods with schedules: "
            f"{', '.join(m.name for m in METHODS.values() if m.schedules)})"
        )
    return info.build(model, target=target, schedule=schedule, positions=positions)
