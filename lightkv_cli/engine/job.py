"""One sweep from request to results, the path ``lightkv profile``, ``lightkv sweep`` and ``lightkv check
--profile`` share: read the inputs → prepare the output folder → load the model → prepare the model
inputs → plan and build the :class:`~lightkv_cli.engine.sweep.Sweep` → run it → the results dictionary.

Nothing here prints: the caller passes :class:`SweepEvents` to hear what happens (inputs read, model
loading, notes, progress). No torch at import time (the command line imports this module at start-up);
the heavy modules are imported when a sweep runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightkv_cli.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.engine.plan import SweepSettings
    from lightkv_cli.engine.sweep import Sweep
    from lightkv_cli.inputs import Inputs
    from lightkv_cli.models.loader import LoadedModel

#: The results file a sweep writes in its output folder, and where a previous one is moved aside.
RESULTS_FILE, RESULTS_BACKUP = "results.json", "results.json.bak"


def check_output_dir(output: Path) -> None:
    """Create the output folder ``output`` if needed.

    Raises:
        UserError: ``output`` is a file, cannot be created, or is not writable.
    """
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' exists and is not a directory; give a directory for results.json")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--output '{output}': cannot create the directory ({exc.strerror or exc}); give a writable directory"
        ) from None
    if not os.access(output, os.W_OK):
        raise UserError(f"--output '{output}' is not writable; give a writable directory")


@dataclass
class SweepRequest:
    """A sweep to run: what (``settings``), with which model, on which inputs, and where it is written.

    Attributes:
        settings: the grid and measurement knobs.
        model: model name, alias or path (:func:`~lightkv_cli.models.loader.load_model`).
        init: ``pretrained`` or ``random`` weights.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto``, ``float16``, ``bfloat16`` or ``float32``.
        images: image files and/or folders (:func:`~lightkv_cli.inputs.gather_inputs`).
        videos: videos (folders of frames or video files).
        prompt: the question asked about every image (exclusive with ``prompts``).
        prompts: a JSON-lines prompts file.
        limit: use at most this many inputs.
        output: folder for ``results.json``, written after every run (None: nothing is written).
        previous: the results of an interrupted sweep to resume (its finished runs are kept).
        backup: when not resuming, move an existing ``results.json`` aside to ``results.json.bak``
            (else it is overwritten).
        command: the command line, recorded in the results.
    """

    settings: SweepSettings
    model: str
    init: str = "pretrained"
    device: str = "auto"
    dtype: str = "auto"
    images: Sequence[Path] = ()
    videos: Sequence[Path] = ()
    prompt: str | None = None
    prompts: Path | None = None
    limit: int | None = None
    output: Path | None = None
    previous: dict | None = None
    backup: bool = True
    command: str = ""

    @property
    def results_path(self) -> Path | None:
        """``output/results.json``, or None when nothing is written."""
        return None if self.output is None else self.output / RESULTS_FILE


class SweepEvents:
    """What :func:`run_sweep` tells its caller, in this order; every hook does nothing by default.

    A hook may raise :class:`~lightkv_cli.errors.UserError` to stop the sweep (e.g. a model that does
    not fit a profile).
    """

    def inputs_read(self, inputs: Inputs) -> None:
        """The inputs were gathered (``inputs.ignored`` and ``inputs.skipped`` say what was left out)."""

    def loading_model(self, name: str) -> AbstractContextManager:
        """Entered while model ``name`` loads."""
        return nullcontext()

    def model_loaded(self, loaded: LoadedModel) -> None:
        """The model is loaded."""

    def note(self, text: str) -> None:
        """A fact the user should know: the model's notes (e.g. random weights), methods that skip the
        explicit schedules."""

    def ready(self, sweep: Sweep, moved_aside: Path | None) -> None:
        """The sweep is planned (``sweep.resumed``: runs kept from ``previous``); ``moved_aside``: where
        the previous results file was moved, if it was."""

    def running(self, total_steps: int) -> AbstractContextManager:
        """Entered while the runs run; ``total_steps`` (run, input) pairs will be reported to :meth:`progress`."""
        return nullcontext()

    def progress(self, run_id: str, input_id: str) -> None:
        """Input ``input_id`` of run ``run_id`` is done."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during the runs; ``results`` holds the runs that finished (already on disk when the
    request has an ``output``)."""

    def __init__(self, results: dict):
        super().__init__()
        self.results = results


def run_sweep(request: SweepRequest, events: SweepEvents | None = None) -> dict:
    """Run ``request`` and return its results dictionary (``docs/results-schema.md``).

    Raises:
        UserError: no usable input, an output folder that cannot be written, an unknown model, a
            method or schedule that does not fit the model, a ``previous`` made with another model or
            other inputs; or raised by a hook of ``events``.
        SweepInterrupted: Ctrl-C during the runs (the finished runs are kept).
        torch.OutOfMemoryError, RuntimeError: the uncompressed reference itself failed.
    """
    from lightkv_cli.engine.prepare import prepare_inputs
    from lightkv_cli.engine.sweep import Sweep
    from lightkv_cli.inputs import IMAGE_EXTENSIONS, gather_inputs
    from lightkv_cli.methods.registry import METHODS
    from lightkv_cli.models import loader

    events = events or SweepEvents()
    settings = request.settings
    got = gather_inputs(
        list(request.images), prompt=request.prompt, prompts=request.prompts, limit=request.limit, videos=request.videos
    )
    if not got.images and not got.skipped:
        where = ", ".join(str(p) for p in request.images) or "the prompts file's images"
        raise UserError(
            f"no image files in {where}"
            + (f" (ignored {len(got.ignored)} non-image file(s))" if got.ignored else "")
            + f"; give a folder with {', '.join(sorted(IMAGE_EXTENSIONS))} images"
        )
    events.inputs_read(got)
    if not got.items:
        raise UserError("nothing could be processed: no readable image among the inputs (see the skipped lines above)")
    if request.output is not None:
        check_output_dir(request.output)
    with events.loading_model(request.model):
        lm = loader.load_model(request.model, init=request.init, device=request.device, dtype=request.dtype)
    events.model_loaded(lm)
    for text in lm.notes:
        events.note(text)
    no_schedule = [m for m in settings.methods if not METHODS[m].schedules]
    if settings.schedules and no_schedule:
        events.note(
            f"{', '.join(no_schedule)} take(s) no LightKV schedule: the explicit --layers/--windows/--ratios "
            "schedules run for the other methods only"
        )
    inputs = prepare_inputs(lm, got.images, got.items)
    results_path = request.results_path
    sweep = Sweep(
        lm,
        inputs,
        settings,
        command=request.command,
        skipped=[{"path": str(s.path), "reason": s.reason} for s in got.skipped],
        results_path=results_path,
        previous=request.previous,
    )
    moved_aside = None
    if results_path is not None and request.previous is None and request.backup and results_path.exists():
        moved_aside = results_path.with_name(RESULTS_BACKUP)
        os.replace(results_path, moved_aside)
    events.ready(sweep, moved_aside)
    sweep.on_progress = events.progress
    with events.running(sweep.total_steps):
        try:
            return sweep.run()
        except KeyboardInterrupt:
            raise SweepInterrupted(sweep.results) from None
