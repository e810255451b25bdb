"""Run ids: the names results files, reports and ``lightkv check --run`` give the runs of a sweep.

No torch: ``lightkv check results.json`` uses these without loading a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.methods.schedule import Schedule

#: Method name and run id of the uncompressed reference.
UNCOMPRESSED = "uncompressed"


def run_id(method: str, target: float | None = None, schedule: Schedule | None = None) -> str:
    """The stable id of a run: ``uncompressed``, ``lightkv@0.55`` (a method at a target retention) or
    ``lightkv[L12-18-24/W4-2-1/r0.5-0.5-0.5]`` (a method with an explicit schedule, see
    :meth:`~lightkv_cli.methods.registry.Schedule.label`).

    Raises:
        ValueError: a compressed method with neither or both of ``target`` and ``schedule``.
    """
    if method == UNCOMPRESSED:
        return UNCOMPRESSED
    if (target is None) == (schedule is None):
        raise ValueError(f"run id of '{method}': give exactly one of target and schedule")
    if schedule is not None:
        return f"{method}[{schedule.label()}]"
    return f"{method}@{float(target):g}"
