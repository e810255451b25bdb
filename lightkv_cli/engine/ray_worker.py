"""The worker of a distributed sweep (:mod:`lightkv_cli.engine.distributed`): :class:`SweepWorker`, run as a Ray
actor, loads the model once and runs the quality runs and the timing rounds the driver gives it, with its own
:class:`~lightkv_cli.engine.sweep.Sweep` (which writes no file).

Nothing here imports ray or torch at import time (the class is made a Ray actor by the driver).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightkv_cli.engine.job import SweepEvents

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.engine.job import SweepRequest
    from lightkv_cli.inputs import Inputs


class _Recorder(SweepEvents):
    """The events of a worker's model loading and sweep, kept as tuples for the driver to replay."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def note(self, text: str) -> None:
        self.events.append(("note", text))

    def pass_note(self, text: str) -> None:
        """A note of the quality pass (recorded in the results' ``quality_pass.notes``)."""
        self.events.append(("pass_note", text))

    def input_skipped(self, reason: str) -> None:
        self.events.append(("skipped", reason))

    def phase(self, name: str, total: int) -> None:
        self.events.append(("phase", name, total))

    def progress(self, phase: str, run_id: str, inputs: int) -> None:
        self.events.append(("progress", phase, run_id, inputs))

    def drain(self) -> list[tuple]:
        got, self.events = self.events, []
        return got


class SweepWorker:
    """One worker of a distributed sweep, run as a Ray actor (module docstring): the model loaded once, its
    own :class:`~lightkv_cli.engine.sweep.Sweep` without a results file. Every call returns, besides its
    result, the events (notes, phases, progress) the sweep reported meanwhile, for the driver to replay."""

    def __init__(self) -> None:
        self.sweep = None
        self._events = _Recorder()
        self._rounds = None

    def setup(self, request: SweepRequest, got: Inputs) -> dict:
        """Load the model, prepare ``got`` and plan the sweep of ``request`` (its ``previous`` adopted).

        Returns:
            ``results`` (the sweep's results so far: what the driver writes), ``runs`` (every run id, in plan
            order), ``pending`` (those to run),
            ``resumed``, ``total_steps`` (of the quality pass), ``device`` and ``events``.

        Raises:
            UserError, SweepFailed: as :func:`~lightkv_cli.engine.job.load_prepared` and the
                :class:`~lightkv_cli.engine.sweep.Sweep` do.
        """
        from lightkv_cli.engine.job import load_prepared
        from lightkv_cli.engine.sweep import Sweep

        prepared = load_prepared(request, got, self._events)
        sweep = Sweep(
            prepared.loaded,
            prepared.inputs,
            request.settings,
            command=request.command,
            skipped=prepared.skipped,
            previous=request.previous,
        )
        sweep.on_progress = self._events.progress
        sweep.on_phase = self._events.phase
        sweep.on_note = self._events.pass_note
        self.sweep = sweep
        return {
            "results": sweep.results,
            "runs": [s.id for s in sweep.runs],
            "pending": [s.id for s in sweep.pending],
            "resumed": list(sweep.resumed),
            "total_steps": sweep.total_steps,
            "device": str(prepared.loaded.device),
            "events": self._events.drain(),
        }

    def reference(self) -> tuple[dict, dict]:
        """Run the uncompressed reference, or recompute its outcomes when it is no longer pending (resuming).

        Returns:
            ``{"run": its runs[] entry (None when recomputed), "events"}`` and its outcomes per input id,
            on the CPU (for :meth:`use_reference` of the other workers).

        Raises:
            SweepFailed: the recomputed reference ran out of memory.
        """
        sweep = self.sweep
        first = sweep.runs[0]
        run = None
        if any(s.id == first.id for s in sweep.pending):
            run = sweep.run_quality(first)
        else:
            sweep.recompute_reference()
        return {"run": run, "events": self._events.drain()}, _on_cpu(sweep.reference)

    def use_reference(self, outcomes: dict) -> None:
        """Score the runs to come against ``outcomes`` (another worker's :meth:`reference`)."""
        self.sweep.use_reference(outcomes)

    def run(self, run_id: str) -> dict:
        """The quality pass of run ``run_id``: ``{"run": its runs[] entry, "events"}`` (a run that runs out
        of memory or fails is recorded as such)."""
        spec = next(s for s in self.sweep.runs if s.id == run_id)
        return {"run": self.sweep.run_quality(spec), "events": self._events.drain()}

    def failed(self, run_id: str, error: str) -> dict:
        """The ``runs[]`` entry of run ``run_id`` recorded with ``status: "error"`` and ``error``."""
        spec = next(s for s in self.sweep.runs if s.id == run_id)
        return self.sweep.failed_run(spec, error)

    def start_timing(self, runs: list[dict], timing_pass: dict) -> None:
        """Take over the timing pass from the driver's ``runs`` and ``timing_pass`` (its finished rounds kept)."""
        self.sweep.continue_timing(runs, timing_pass)
        self._rounds = self.sweep.timing_rounds()

    def next_round(self) -> dict | None:
        """The next round of the timing pass (warm-up first): ``{"runs", "timing_pass", "events"}`` after it,
        or None when no round is left."""
        if next(self._rounds, None) is None:
            return None
        results = self.sweep.results
        return {"runs": results["runs"], "timing_pass": results["timing_pass"], "events": self._events.drain()}


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dataclasses, dicts, lists, tuples) moved to the CPU."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _on_cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value
