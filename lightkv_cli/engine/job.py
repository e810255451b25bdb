"""One sweep from request to results, the path ``lightkv profile``, ``lightkv sweep`` and ``lightkv check
--profile`` share: read the inputs → prepare the output folder → load the model → prepare the model
inputs → plan and build the :class:`~lightkv_cli.engine.sweep.Sweep` → run it → the results dictionary.

The output folder is locked (:class:`~lightkv_cli.files.OutputLock`) while the sweep writes it, and a
sweep that does not resume first moves the folder's earlier ``results.json`` and reports to numbered
backups (``results.json.N.bak``, ``report.html.N.bak``, ``report.md.N.bak``), so no earlier result is
ever overwritten.

Nothing here prints: the caller passes :class:`SweepEvents` to hear what happens (inputs read, model
loading, notes, progress). No torch at import time (the command line imports this module at start-up);
the heavy modules are imported when a sweep runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lightkv_cli.errors import LightKVError, UserError
from lightkv_cli.files import OutputLock, describe_os_error, move_aside_numbered, remove_stale_temp_files

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.engine.distributed import RayOptions
    from lightkv_cli.engine.plan import SweepSettings
    from lightkv_cli.engine.sweep import Sweep
    from lightkv_cli.inputs import Inputs
    from lightkv_cli.models.loader import LoadedModel

#: The results file a sweep writes in its output folder.
RESULTS_FILE = "results.json"


#: Everything a sweep writes in its output folder: moved to numbered backups together when a new
#: (not resumed) sweep starts there, and their stale temporary files removed.
OUTPUT_FILES = (RESULTS_FILE, "report.html", "report.md")


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
        revision: branch, tag or commit of a Hub id (``--revision``).
        offline: download nothing (``--offline``, or ``HF_HUB_OFFLINE=1``).
        device_map: accelerate's placement over the available devices (``--device-map``), or None.
        images: image files and/or folders (:func:`~lightkv_cli.inputs.gather_inputs`).
        videos: videos (folders of frames or video files).
        prompt: the question asked about every image (exclusive with ``prompts``).
        prompts: a JSON-lines prompts file.
        limit: use at most this many inputs.
        output: folder for ``results.json``, written after every run (None: nothing is written).
        previous: the results of an interrupted sweep to resume (its finished runs are kept).
        backup: when not resuming, move an existing ``results.json``, ``report.html`` and ``report.md``
            aside to numbered backups (``results.json.N.bak``, N one more than any backup there);
            else they are overwritten.
        command: the command line, recorded in the results.
        lock: the output folder's lock, when the caller holds it for longer than the sweep (to write
            the reports under it): :func:`run_sweep` acquires it and leaves releasing it to the caller.
            None: :func:`run_sweep` locks ``output`` itself for the duration of the sweep.
        ray: spread the runs over the workers of a Ray cluster (:mod:`lightkv_cli.engine.distributed`);
            None: run them here, one after the other.
    """

    settings: SweepSettings
    model: str
    init: str = "pretrained"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    offline: bool = False
    device_map: str | None = None
    images: Sequence[Path] = ()
    videos: Sequence[Path] = ()
    prompt: str | None = None
    prompts: Path | None = None
    limit: int | None = None
    output: Path | None = None
    previous: dict | None = None
    backup: bool = True
    command: str = ""
    lock: OutputLock | None = None
    ray: RayOptions | None = None

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
        """The sweep is planned (``sweep.resumed``: runs kept from ``previous``); ``moved_aside``: the
        numbered backup the previous results file was moved to (or, with no results file, the first
        report moved), if any."""

    def running(self) -> AbstractContextManager:
        """Entered while the runs run (both passes); :meth:`phase` and :meth:`progress` are called inside."""
        return nullcontext()

    def phase(self, name: str, total: int) -> None:
        """Pass ``name`` starts (``"quality"``: every run generates every input once, in batches;
        ``"timing"``: the interleaved timing rounds); ``total`` generations of inputs will be reported to
        :meth:`progress` for it (warm-up included)."""

    def progress(self, phase: str, run_id: str, inputs: int) -> None:
        """Run ``run_id`` generated ``inputs`` more inputs (one batch) in pass ``phase``."""

    def input_skipped(self, reason: str) -> None:
        """An input was left out once the model was loaded (it does not fit the model), with the reason."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a signal the caller turns into ``KeyboardInterrupt``, with its number as ``signum``)
    during the sweep.

    Attributes:
        results: the runs that finished (already on disk when the request has an ``output``); None
            when the sweep was interrupted before it was planned (while the model loaded).
        signum: the signal (2, SIGINT, for Ctrl-C).
        moved_aside: the backups made of the folder's earlier files (:meth:`SweepEvents.ready`).
    """

    def __init__(self, results: dict | None, signum: int = 2, moved_aside: Sequence[Path] = ()):
        super().__init__()
        self.results = results
        self.signum = signum
        self.moved_aside = list(moved_aside)


class SweepFailed(LightKVError):
    """The sweep cannot go on, and says why in one line: the uncompressed reference ran out of memory
    (recorded in the results with ``status: "oom"``), the results file cannot be written (its message
    names the path and the errno), the model could not be loaded for lack of memory or space.

    Attributes:
        results: what was measured (None when nothing was); ``results.json`` holds it as of the last
            successful write.
    """

    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results


#: What to try when the uncompressed reference does not fit (it is measured one input at a time).
OOM_ADVICE = (
    "try fewer or smaller inputs (--limit, smaller images, a lower --max-new-tokens), --dtype float16 or "
    "bfloat16, or a device with more memory (plan one with --init random before downloading weights)"
)


def run_sweep(request: SweepRequest, events: SweepEvents | None = None) -> dict:
    """Run ``request`` and return its results dictionary (``docs/results-schema.md``).

    Raises:
        UserError: no usable input, an output folder that cannot be written or that another sweep
            holds (its lock), an unknown model, a method or schedule that does not fit the model, a
            ``previous`` made with another model or other inputs; or raised by a hook of ``events``.
        SweepInterrupted: Ctrl-C (or a signal raised as ``KeyboardInterrupt``) during the sweep (the
            finished runs are kept).
        SweepFailed: the uncompressed reference ran out of memory (recorded), the results file cannot
            be written, the model does not fit or its cache cannot be written; with ``request.ray``, every
            Ray worker died (the finished runs are kept).
        RuntimeError: the uncompressed reference failed otherwise (a bug: its traceback says where).

    With ``request.ray`` the runs are spread over Ray workers (:mod:`lightkv_cli.engine.distributed`):
    ``events`` hear the same as from a serial sweep, except :meth:`SweepEvents.model_loaded` (the model is
    loaded on the workers, not here), and progress comes once per finished run or timing round.
    """
    if request.lock is None and request.output is not None:
        with OutputLock(request.output, command=request.command) as own:
            return _run_sweep(replace(request, lock=own), events or SweepEvents())
    return _run_sweep(request, events or SweepEvents())


def _run_sweep(request: SweepRequest, events: SweepEvents) -> dict:
    from lightkv_cli.engine.sweep import Sweep

    settings = request.settings
    if request.previous is not None:  # before anything loads: settings that would mix runs
        from lightkv_cli.results import check_resume

        check_resume(request.previous, settings.to_dict(), request.results_path)
    got = read_inputs(request, events)
    if request.output is not None:
        check_output_dir(request.output)
        note = request.lock.acquire() if request.lock is not None else None
        if note:
            events.note(note)
        remove_stale_temp_files(request.output, OUTPUT_FILES)
    if request.ray is not None:
        from lightkv_cli.engine.distributed import run_distributed

        return run_distributed(request, got, events)
    prepared = load_prepared(request, got, events)
    results_path = request.results_path
    sweep = Sweep(
        prepared.loaded,
        prepared.inputs,
        settings,
        command=request.command,
        skipped=prepared.skipped,
        results_path=results_path,
        previous=request.previous,
    )
    moved = move_aside_earlier(request)
    events.ready(sweep, moved[0] if moved else None)
    sweep.on_progress = events.progress
    sweep.on_phase = events.phase
    sweep.on_note = events.note
    try:
        with events.running():
            return sweep.run()
    except KeyboardInterrupt as exc:
        raise SweepInterrupted(sweep.results, getattr(exc, "signum", 2), moved) from None


def read_inputs(request: SweepRequest, events: SweepEvents) -> Inputs:
    """Gather the inputs of ``request`` (:func:`~lightkv_cli.inputs.gather_inputs`) and tell ``events``.

    Raises:
        UserError: no image among them, or none could be read.
    """
    from lightkv_cli.inputs import IMAGE_EXTENSIONS, gather_inputs

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
    return got


@dataclass
class Prepared:
    """The model a sweep runs on and its model inputs (:func:`load_prepared`).

    Attributes:
        loaded: the model.
        inputs: the prepared inputs that fit the model (:class:`~lightkv_cli.engine.prepare.ProfileInput`).
        skipped: ``{"path", "reason"}`` of the inputs left out (unreadable, or too long for the model).
    """

    loaded: LoadedModel
    inputs: list
    skipped: list[dict]


def load_prepared(request: SweepRequest, got: Inputs, events: SweepEvents) -> Prepared:
    """Load the model of ``request`` and prepare ``got`` for it (the follow-up question, the system prompt,
    the inputs that fit, the words out of the tokenizer's vocabulary), telling ``events``: what the serial
    sweep and every worker of a distributed one (:mod:`lightkv_cli.engine.distributed`) do first.

    Raises:
        SweepInterrupted: Ctrl-C while the model loads or the inputs are prepared (nothing was run).
        SweepFailed: the model or the inputs do not fit in memory, its cache cannot be written.
        UserError: an unknown model (:func:`~lightkv_cli.models.loader.load_model`).
    """
    from lightkv_cli.engine.prepare import fit_inputs, prepare_inputs
    from lightkv_cli.methods.registry import METHODS
    from lightkv_cli.models import loader

    settings = request.settings
    try:
        with events.loading_model(request.model):
            lm = _load_model(loader, request)
    except KeyboardInterrupt as exc:
        raise SweepInterrupted(None, getattr(exc, "signum", 2)) from None
    events.model_loaded(lm)
    for text in lm.notes:
        events.note(text)
    no_schedule = [m for m in settings.methods if not METHODS[m].schedules]
    if settings.schedules and no_schedule:
        events.note(
            f"{', '.join(no_schedule)} take(s) no LightKV schedule: the explicit --layers/--windows/--ratios "
            "schedules run for the other methods only"
        )
    try:
        items = got.items
        if settings.followup is not None:
            items = [it if it.followup is not None else replace(it, followup=settings.followup) for it in items]
        prepared = prepare_inputs(lm, got.images, items, settings.system_prompt)
        inputs, unfit = fit_inputs(lm, prepared, settings.max_new_tokens)
    except KeyboardInterrupt as exc:
        raise SweepInterrupted(None, getattr(exc, "signum", 2)) from None
    except Exception as exc:
        _raise_if_out_of_memory(exc, f"preparing the inputs for model '{request.model}' on {lm.device}")
        raise
    for s in unfit:
        events.input_skipped(f"skipped {s.path.name}: {s.reason}")
    _flag_out_of_vocabulary(lm, inputs, events)
    skipped = [{"path": str(s.path), "reason": s.reason} for s in [*got.skipped, *unfit]]
    return Prepared(lm, inputs, skipped)


def move_aside_earlier(request: SweepRequest) -> list[Path]:
    """When ``request`` starts a new sweep (no ``previous``) with ``backup``, move the output folder's earlier
    results and reports to numbered backups; return where they went.

    Raises:
        SweepFailed: they cannot be moved (nothing was run).
    """
    path = request.results_path
    if path is None or request.previous is not None or not request.backup:
        return []
    try:
        return move_aside_numbered(path.parent, OUTPUT_FILES)
    except OSError as exc:
        raise SweepFailed(
            f"{describe_os_error(exc, 'move aside the earlier results')}; nothing was run "
            "(give another --output, or --resume to continue the earlier sweep)"
        ) from None


def _flag_out_of_vocabulary(lm: LoadedModel, inputs: list, events: SweepEvents) -> None:
    """Record on each input the words of its question the tokenizer maps to its unknown token
    (``oov_words``), and say once how many questions have any (their answers are not meaningful)."""
    from lightkv_cli.inputs.vocabulary import describe_out_of_vocabulary, scan_out_of_vocabulary

    found = scan_out_of_vocabulary(lm.processor, [inp.question for inp in inputs])
    for inp, words in zip(inputs, found):
        inp.oov_words = tuple(words)
    text = describe_out_of_vocabulary(found)
    if text:
        events.note(text)


def _load_model(loader, request: SweepRequest) -> LoadedModel:
    """``loader.load_model`` for ``request``, with running out of memory or of disk (the tiny models are
    built into lightkv's cache) turned into one line."""
    try:
        kw: dict = {}  # only what was given (test doubles of the loader take the plain signature)
        if request.revision is not None:
            kw["revision"] = request.revision
        if request.offline:
            kw["offline"] = True
        if request.device_map is not None:
            kw["device_map"] = request.device_map
        return loader.load_model(request.model, init=request.init, device=request.device, dtype=request.dtype, **kw)
    except OSError as exc:
        if exc.errno is None:  # transformers' own OSErrors (a missing file in a checkpoint) say enough
            raise
        tiny = request.model.startswith("tiny")
        raise SweepFailed(
            f"loading model '{request.model}': {describe_os_error(exc, 'write' if tiny else 'read')}"
            + ("; set LIGHTKV_CACHE to a writable folder with free space (tiny models are built there)" if tiny else "")
        ) from None
    except Exception as exc:
        _raise_if_out_of_memory(exc, f"loading model '{request.model}' on {request.device}")
        raise


def _raise_if_out_of_memory(exc: BaseException, what: str) -> None:
    """Raise :class:`SweepFailed` (one line with what to try) when ``exc`` is an allocation failure."""
    from lightkv_cli.measure.memory import is_out_of_memory, out_of_memory_text

    if is_out_of_memory(exc):
        raise SweepFailed(f"{what} ran {out_of_memory_text(exc)}; nothing was run; {OOM_ADVICE}") from None
