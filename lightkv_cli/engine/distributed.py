"""Sweeps on a Ray cluster (``lightkv sweep --ray``): the runs of one sweep spread over Ray actors that each
load the model once, on their own GPU (or a CPU), while this process, the driver, keeps the results file.

- **Workers.** :class:`~lightkv_cli.engine.ray_worker.SweepWorker` actors (``--workers``; default one per
  GPU of the cluster, or :data:`DEFAULT_CPU_WORKERS` CPU workers when it has none), each loading the model
  and preparing the inputs as a serial sweep does (:func:`~lightkv_cli.engine.job.load_prepared`) into its
  own :class:`~lightkv_cli.engine.sweep.Sweep`, which writes no file.
- **The reference once.** The first worker runs the uncompressed reference (resuming: recomputes its
  outcomes, as a serial resume does); its per-input outcomes, on the CPU, go through the Ray object store to
  every other worker before they start a run, so every run is scored against the same reference.
- **Quality runs** go one at a time to the idle workers, in plan order. Each finished run comes back as its
  ``runs[]`` entry; the driver puts it in plan order and writes ``results.json`` atomically, with the ratios
  and the recommendation of a serial sweep (:func:`~lightkv_cli.engine.sweep.finish_results`). A run that
  runs out of memory is recorded with ``status: "oom"`` by its worker, and the sweep goes on.
- **The timing pass** runs on one worker only, after every quality run, so no neighbour perturbs its
  timings; the driver asks for one round at a time and writes the results after each.
- **A worker that dies** (actor killed, node lost): the runs it finished are kept; its unfinished run is
  given to another live worker once (when that one dies too, the run is recorded with ``status: "error"``);
  the timing pass goes on from its last finished round on another worker; with no worker left the sweep
  stops (:class:`~lightkv_cli.engine.job.SweepFailed`) and ``--resume`` continues it.
- **Ctrl-C** on the driver raises :class:`~lightkv_cli.engine.job.SweepInterrupted` with the finished runs
  (on disk); the actors are killed, and a local cluster started here is shut down.

Nothing here imports ray or torch at import time; the model is never loaded on the driver.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightkv_cli.engine.job import SweepEvents, SweepFailed, SweepInterrupted, SweepRequest, move_aside_earlier
from lightkv_cli.engine.ray_worker import SweepWorker
from lightkv_cli.errors import LightKVError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.inputs import Inputs

#: CPU workers of a cluster without GPUs, when ``--workers`` is not given.
DEFAULT_CPU_WORKERS = 2

#: How to install Ray with lightkv.
INSTALL_HINT = 'pip install "lightkv[ray]"'


@dataclass(frozen=True)
class RayOptions:
    """Where a distributed sweep runs (``--ray``, ``--ray-address``, ``--workers``).

    Attributes:
        address: the cluster, for ``ray.init(address=...)``; None: start a local cluster in this process
            (no dashboard, as many CPUs as workers).
        workers: actors to start; None: one per GPU of the cluster, or :data:`DEFAULT_CPU_WORKERS` when it
            has none.

    Raises:
        UserError: ``workers`` below 1.
    """

    address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")


def import_ray():
    """The ``ray`` module.

    Raises:
        UserError: Ray is not installed (the message says how to install it).
    """
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class _Died(Exception):
    """A worker's actor died (killed, its node lost) before it answered."""


@dataclass
class _Worker:
    """A worker as the driver sees it: its number, its actor handle, whether it is still alive."""

    index: int
    actor: Any
    alive: bool = True


def run_distributed(request: SweepRequest, got: Inputs, events: SweepEvents) -> dict:
    """Run ``request`` (``request.ray`` set) on a Ray cluster and return its results dictionary, the same
    as a serial sweep's (module docstring). The inputs are read and the output folder prepared (and
    locked) by the caller, :func:`~lightkv_cli.engine.job.run_sweep`.

    Raises:
        UserError: Ray is not installed, more workers than the cluster has GPUs (or CPUs), or as a
            serial sweep (an unknown model, a method that does not fit it).
        SweepInterrupted: Ctrl-C on the driver (the finished runs are kept).
        SweepFailed: as a serial sweep, or no worker is left (the finished runs are kept).
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        options = request.ray
        kw: dict = {"address": options.address}
        if options.address is None:
            kw.update(num_cpus=options.workers or DEFAULT_CPU_WORKERS, include_dashboard=False)
        ray.init(**kw, log_to_driver=False, logging_level=logging.ERROR)
        started = True
    driver = RaySweep(ray, request, events)
    try:
        return driver.run(got)
    finally:
        driver.close()
        if started:
            ray.shutdown()


class RaySweep:
    """The driver of a distributed sweep (module docstring): starts the workers, hands out the runs, keeps
    the results. What :meth:`SweepEvents.ready` gets: ``results``, ``resumed``, ``pending`` (run ids) and
    ``results_path`` as a :class:`~lightkv_cli.engine.sweep.Sweep` has them, and ``workers``.

    Attributes:
        on_dispatch: called as ``on_dispatch(worker, run_id)`` after a quality run is given to a worker
            (``worker.actor`` is its actor handle), e.g. by a test that kills it.
    """

    def __init__(self, ray, request: SweepRequest, events: SweepEvents):
        self.ray = ray
        self.request = request
        self.events = events
        self.results_path: Path | None = request.results_path
        self.results: dict | None = None
        self.resumed: list[str] = []
        self.pending: list[str] = []
        self.workers: list[_Worker] = []
        self.on_dispatch: Callable[[_Worker, str], None] = lambda worker, run_id: None
        self._order: dict[str, int] = {}
        self._kept = 0
        self._written: int | None = None
        self._device = ""
        self._last_death = ""

    def run(self, got: Inputs) -> dict:
        """Start the workers, run the sweep on them, return the results.

        Raises:
            As :func:`run_distributed`.
        """
        try:
            with self.events.loading_model(self.request.model):
                setup = self._start(got)
        except KeyboardInterrupt as exc:
            raise SweepInterrupted(None, getattr(exc, "signum", 2)) from None
        self.results = setup["results"]
        self.resumed, self.pending = setup["resumed"], setup["pending"]
        self._order = {s: i for i, s in enumerate(setup["runs"])}
        self._kept = len(self.results["runs"])
        self._device = setup["device"]
        self._replay(setup["events"])
        moved = move_aside_earlier(self.request)
        self.events.ready(self, moved[0] if moved else None)
        try:
            with self.events.running():
                self.events.phase("quality", setup["total_steps"])
                if self.pending:
                    self._quality_pass()
                self._timing_pass()
                self.results["complete"] = True
                self._write()
        except KeyboardInterrupt as exc:
            raise SweepInterrupted(self.results, getattr(exc, "signum", 2), moved) from None
        return self.results

    def close(self) -> None:
        """Kill the workers' actors (those still alive)."""
        for w in self.workers:
            with suppress(Exception):  # already gone, or the cluster is shutting down
                self.ray.kill(w.actor)
            w.alive = False

    def _start(self, got: Inputs) -> dict:
        """Start the actors and load the model on each; return the first live worker's setup
        (:meth:`~lightkv_cli.engine.ray_worker.SweepWorker.setup`).

        Raises:
            UserError: more workers than the cluster has GPUs (or CPUs), or what a worker's setup raised.
            SweepFailed: every worker died while loading, or they prepared different model inputs.
        """
        ray = self.ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        use_gpu = gpus > 0 and self.request.device != "cpu"
        n = self.request.ray.workers or (gpus if use_gpu else DEFAULT_CPU_WORKERS)
        have, kind = (gpus, "GPU") if use_gpu else (cpus, "CPU")
        if n > have:
            raise UserError(
                f"--workers {n}: the Ray cluster has {have} {kind}(s) for its workers; give --workers {max(1, have)} "
                "or fewer"
            )
        actor_class = ray.remote(SweepWorker).options(
            **({"num_gpus": 1, "num_cpus": 0} if use_gpu else {"num_cpus": 1}), max_restarts=0
        )
        self.workers = [_Worker(i, actor_class.remote()) for i in range(n)]
        request = replace(self.request, lock=None, ray=None)
        got_ref = ray.put(got)
        calls = {w.index: w.actor.setup.remote(request, got_ref) for w in self.workers}
        setups = {}
        for w in self.workers:
            try:
                setups[w.index] = self._get(calls[w.index])
            except _Died as exc:
                self._died(w, exc)
        if not setups:
            raise SweepFailed(f"every Ray worker died while loading the model ({self._last_death}); nothing was run")
        fingerprints = {s["results"]["inputs_fingerprint"] for s in setups.values()}
        if len(fingerprints) > 1:
            raise SweepFailed(
                "the Ray workers prepared different model inputs from the same images; install the same lightkv, "
                "transformers and model on every node"
            )
        return setups[min(setups)]

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def _get(self, ref):
        """``ray.get(ref)``; a lightkv error raised in the worker is raised again here as itself.

        Raises:
            _Died: the worker's actor died.
        """
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayActorError as exc:
            raise _Died(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LightKVError):
                raise cause from None
            raise

    def _died(self, worker: _Worker, exc: _Died) -> None:
        worker.alive = False
        self._last_death = f"worker {worker.index}: {exc}"

    def _no_worker_left(self) -> SweepFailed:
        done = len(self.results["runs"]) if self.results else 0
        where = f"are in {self.results_path}" if self.results_path is not None else "are kept"
        return SweepFailed(
            f"every Ray worker died (last: {self._last_death}); the {done} finished run(s) {where}; continue with "
            "the same command and --resume",
            self.results,
        )

    def _replay(self, events: list[tuple]) -> None:
        """Tell the driver's events what a worker reported; the quality pass's notes also go into the results'
        ``quality_pass.notes``, once."""
        for kind, *args in events:
            if kind == "note":
                self.events.note(args[0])
            elif kind == "pass_note":
                notes = self.results["quality_pass"]["notes"]
                if args[0] in notes:
                    continue
                notes.append(args[0])
                self.events.note(args[0])
            elif kind == "skipped":
                self.events.input_skipped(args[0])
            elif kind == "phase":
                self.events.phase(*args)
            elif kind == "progress":
                self.events.progress(*args)

    def _record(self, report: dict) -> None:
        """Put a finished run in the results (the runs kept from a resumed sweep first, then the new ones in
        plan order) and write them."""
        self._replay(report["events"])
        runs = self.results["runs"]
        new = sorted([*runs[self._kept :], report["run"]], key=lambda r: self._order.get(r["id"], len(self._order)))
        self.results["runs"] = runs[: self._kept] + new
        self._write()

    def _write(self) -> None:
        from lightkv_cli.engine.sweep import finish_results

        self._written = finish_results(self.results, self.request.settings.thresholds, self.results_path, self._written)

    def _quality_pass(self) -> None:
        """The reference on one worker, its outcomes to the others, then the other pending runs."""
        from lightkv_cli.engine.sweep import reference_oom_text

        reference_id = next(iter(self._order))
        outcomes = None
        for _attempt in range(2):  # the reference is given to another worker once
            alive = self._alive()
            if not alive:
                break
            holder = alive[0]
            report_ref, outcomes = holder.actor.reference.options(num_returns=2).remote()
            try:
                report = self._get(report_ref)
            except _Died as exc:
                self._died(holder, exc)
                outcomes = None
                continue
            break
        if outcomes is None:
            raise self._no_worker_left()
        if report["run"] is not None:
            self._record(report)
            if report["run"]["status"] == "oom":
                recorded = self.results_path if self._written is not None else None
                raise SweepFailed(reference_oom_text(self._device, report["run"]["error"], recorded), self.results)
        else:
            self._replay(report["events"])
        self._share_reference(holder, outcomes)
        self._runs([rid for rid in self.pending if rid != reference_id])

    def _share_reference(self, holder: _Worker, outcomes) -> None:
        """Give the reference's outcomes (an object in Ray's store) to every live worker but ``holder``, and
        wait until each has them.

        Raises:
            SweepFailed: they were lost (the node that held them died) before a worker got them.
        """
        from ray.exceptions import RayError

        calls = [(w, w.actor.use_reference.remote(outcomes)) for w in self._alive() if w is not holder]
        for w, ref in calls:
            try:
                self._get(ref)
            except _Died as exc:
                self._died(w, exc)
            except RayError as exc:
                raise SweepFailed(
                    f"the uncompressed reference's outcomes were lost before worker {w.index} got them "
                    f"({type(exc).__name__}); the {len(self.results['runs'])} finished run(s) are kept; continue "
                    "with the same command and --resume",
                    self.results,
                ) from None

    def _runs(self, run_ids: list[str]) -> None:
        """Hand ``run_ids`` out to the idle workers, one at a time; record each as it finishes."""
        queue = deque(run_ids)
        attempts: dict[str, int] = {}
        idle = self._alive()
        busy: dict = {}  # object ref -> (worker, run id)
        while queue or busy:
            while queue and idle:
                worker, rid = idle.pop(0), queue.popleft()
                attempts[rid] = attempts.get(rid, 0) + 1
                busy[worker.actor.run.remote(rid)] = (worker, rid)
                self.on_dispatch(worker, rid)
            if not busy:
                raise self._no_worker_left()
            (ref,), _ = self.ray.wait(list(busy), num_returns=1)
            worker, rid = busy.pop(ref)
            try:
                report = self._get(ref)
            except _Died as exc:
                self._died(worker, exc)
                if attempts[rid] < 2:
                    queue.appendleft(rid)
                else:
                    self._lost_twice(rid, idle, busy)
                continue
            self._record(report)
            idle.append(worker)

    def _lost_twice(self, run_id: str, idle: list[_Worker], busy: dict) -> None:
        """Record run ``run_id``, whose second worker died too, as an error (by a live worker)."""
        error = f"the two Ray workers that ran it died ({self._last_death}); it runs again with --resume"
        for worker in [*idle, *(w for w, _ in busy.values())]:
            try:
                run = self._get(worker.actor.failed.remote(run_id, error))
            except _Died as exc:
                self._died(worker, exc)
                if worker in idle:
                    idle.remove(worker)
                continue
            self._record({"run": run, "events": []})
            return
        raise self._no_worker_left()

    def _timing_pass(self) -> None:
        """The timing pass on one live worker, a round at a time; another takes over if it dies."""
        while True:
            alive = self._alive()
            if not alive:
                raise self._no_worker_left()
            worker = alive[0]
            try:
                self._get(worker.actor.start_timing.remote(self.results["runs"], self.results["timing_pass"]))
                while True:
                    step = self._get(worker.actor.next_round.remote())
                    if step is None:
                        return
                    self._replay(step["events"])
                    self.results["runs"], self.results["timing_pass"] = step["runs"], step["timing_pass"]
                    self._write()
            except _Died as exc:
                self._died(worker, exc)
