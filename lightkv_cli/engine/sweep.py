"""Sweeps and profiles: the uncompressed model and each method at each target retention or explicit
schedule, on the user's inputs, in two passes.

- **Quality pass.** Every run generates every input once (greedy), in left-padded batches of inputs that
  share their vision-token count (:mod:`lightkv_cli.engine.batching`, ``settings.batch_size``). What a run
  keeps, its KV bytes, FLOPs and every answer come from this pass, and every answer is scored against the
  uncompressed run's on the same input (computed once per input). A method that cannot run a batch
  (:class:`~lightkv_cli.errors.UnsupportedInputError` on a batch of more than one row) runs at batch 1,
  and a batch that runs out of memory is split in halves; each is said once (``quality_pass.notes``).
- **Timing pass.** On ``settings.timing_inputs`` inputs (spread over the vision-token groups), after
  ``warmup`` untimed generations per run, ``repeats`` rounds in which every run is visited once in a seeded
  shuffled order, at every ``settings.timing_batches`` batch size. Times of a run are paired with the
  uncompressed run's on the same input (batch) and round: the ratios' median and bootstrap interval
  (:mod:`lightkv_cli.measure.paired`) are what the report compares, so drift on a shared machine hits
  every run alike. Peak allocator memory and NVML samples per run and timing batch come from this pass.

Nothing here prints; the caller passes ``on_phase`` / ``on_progress`` to show progress and
``results_path`` to have the results written to disk (atomically) after every finished run of the quality
pass and every round of the timing pass, so an interrupted sweep loses nothing and can be resumed (a
resumed timing pass continues with its next round).

A run that runs out of memory (on GPU or CPU: :func:`~lightkv_cli.measure.memory.is_out_of_memory`) at
batch 1 is recorded with ``status: "oom"``; when that run is the uncompressed reference, it is recorded and
the sweep stops (:class:`~lightkv_cli.engine.job.SweepFailed`), since nothing can be scored without it. A
timing batch that runs out of memory is recorded as ``oom`` for that run and batch size, and the pass goes on.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightkv_cli import __version__
from lightkv_cli.engine.batching import Batch, collate, pad_token_id, plan_batches, timing_sample, timing_units
from lightkv_cli.engine.job import OOM_ADVICE, SweepFailed
from lightkv_cli.engine.plan import RunSpec, SweepSettings, plan_runs
from lightkv_cli.engine.prepare import ProfileInput, inputs_fingerprint
from lightkv_cli.engine.resume import Resume
from lightkv_cli.engine.summaries import Summaries, _kind
from lightkv_cli.engine.timing_pass import TimingPass, _Timing
from lightkv_cli.engine.token_maps import (
    CHANGED_INPUTS,
    FIRST_INPUTS,
    GridCells,
    PromptFates,
    prompt_fates,
)
from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.files import describe_os_error, os_error_hint
from lightkv_cli.measure.costs import kv_bytes_per_token
from lightkv_cli.measure.environment import environment_info
from lightkv_cli.measure.memory import detect_memory_budget, free_memory, is_out_of_memory, out_of_memory_text
from lightkv_cli.measure.nvml import nvml_environment
from lightkv_cli.models.loader import LoadedModel
from lightkv_cli.results import SCHEMA, write_json_atomic
from lightkv_cli.runtime import OWN, CacheStats, GenerationResult, greedy_generate, reference_continuation
from lightkv_cli.scoring.continuation import ContinuationScores, ReferenceContinuation, continuation_scores
from lightkv_cli.scoring.fidelity import exact_match
from lightkv_cli.scoring.recommend import recommend
from lightkv_cli.scoring.thresholds import Thresholds

#: Quality-pass batch size when ``settings.batch_size`` is None, on a CPU.
CPU_BATCH_SIZE = 8
#: The largest automatic quality-pass batch size on a GPU.
MAX_AUTO_BATCH_SIZE = 32
#: Inputs of a run whose prompt fates are kept for token maps, besides the first ones (bounded memory).
MAX_FATES = FIRST_INPUTS + 16 * CHANGED_INPUTS


@dataclass
class _InputOutcome:
    """What the quality pass measured for one input of one run."""

    answer: str
    tokens: list[int]
    first_logits: object  # (V,) float32 CPU tensor
    cache: CacheStats
    per_image_retention: list[float] | None = None
    #: what the press did to the prompt, for a token map (only inputs that may get one)
    fates: PromptFates | None = None
    #: the uncompressed run only: its teacher-forced continuation and what it feeds
    continuation: ReferenceContinuation | None = None
    fed: list[int] | None = None
    #: a compressed run: its continuation fidelity against the reference's (None: nothing to score)
    scores: ContinuationScores | None = None
    #: the follow-up answer, when the input has a follow-up question
    followup_answer: str | None = None


class Sweep(Summaries, Resume, TimingPass):
    """Runs a sweep (or a profile, a sweep of one method) and builds its results (module docstring).

    The uncompressed reference runs first; its answers and first-token logits are kept in memory
    and every other run of the sweep is scored against them (computed once per input).

    Args:
        loaded: the model (loaded once for the whole sweep).
        inputs: prepared inputs (:func:`prepare_inputs`).
        settings: the grid and measurement knobs.
        command: the command line, recorded in the results.
        skipped: ``{"path", "reason"}`` of inputs that could not be used, recorded in the results.
        results_path: when given, the results are written there after every finished run and round.
        on_progress: called as ``on_progress(phase, run_id, inputs)`` after every batch of ``inputs``
            generations of run ``run_id`` in pass ``phase`` (``"quality"`` or ``"timing"``).
        on_phase: called as ``on_phase(phase, total)`` when a pass starts, ``total`` the generations of
            inputs it will report (warm-up included).
        previous: the results of an interrupted sweep to resume (``--resume``): its runs with status
            ``ok`` or ``oom`` are kept and not run again; runs that ended in ``error``, and an
            uncompressed reference that ran out of memory, run again; its finished timing rounds are kept.

    Raises:
        UserError: ``previous`` was made with another model, other inputs or other decode settings.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        inputs: list[ProfileInput],
        settings: SweepSettings,
        command: str = "",
        skipped: list[dict] | None = None,
        results_path: Path | None = None,
        on_progress: Callable[[str, str, int], None] | None = None,
        previous: dict | None = None,
        on_phase: Callable[[str, int], None] | None = None,
    ):
        self.loaded = loaded
        self.inputs = inputs
        self.settings = settings
        self.results_path = results_path
        self.on_progress = on_progress or (lambda phase, run, n: None)
        self.on_phase = on_phase or (lambda phase, total: None)
        self.runs = plan_runs(loaded, settings)
        budget, source = settings.memory_budget, settings.memory_source
        if budget is None:
            budget, source = detect_memory_budget(loaded.device)
        model_info = loaded.info()
        self.batch_size, batch_source = self._choose_batch_size()
        self.timed = timing_sample(inputs, settings.timing_inputs)
        self.units = {b: timing_units(inputs, self.timed, b) for b in settings.timing_batches}
        self.results = {
            "schema": SCHEMA,
            "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "environment": {
                **environment_info(loaded.device),
                "dtype": str(loaded.dtype).replace("torch.", ""),
                "nvml": nvml_environment(loaded.device),
            },
            "model": model_info,
            "settings": settings.to_dict(),
            "thresholds": settings.thresholds.to_dict(),
            "capacity": {"memory_bytes": budget, "source": source, "weight_bytes": model_info["weight_bytes"]},
            "inputs": [i.to_dict() for i in inputs],
            "inputs_fingerprint": inputs_fingerprint(inputs),
            "skipped": list(skipped or []),
            "quality_pass": {"batch_size": self.batch_size, "batch_size_source": batch_source, "notes": []},
            "timing_pass": {
                "inputs": [inputs[i].id for i in self.timed],
                "batch_sizes": list(settings.timing_batches),
                "rounds": settings.repeats,
                "rounds_done": 0,
                "warmup": settings.warmup,
                "seed": settings.seed,
                "order": [],
            },
            "runs": [],
            "recommendation": None,
            "complete": False,
        }
        self.resumed: list[str] = []
        self._timings: dict[str, list[_Timing]] = {}
        if previous is not None:
            self._adopt(previous)
        done = {r["id"] for r in self.results["runs"]}
        self.pending = [spec for spec in self.runs if spec.id not in done]
        self._reference: dict[str, _InputOutcome] = {}
        self._written_runs: int | None = None  # runs in the results file as of its last write
        self._grids: dict[str, GridCells | None] = {}  # input id -> its first image grid (token maps)
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self._tokenizer = tokenizer
        self._pad_id = pad_token_id(tokenizer, loaded.adapter.vision_token_ids())
        self._said: set[str] = set()
        self._batch1: set[str] = set()  # methods whose quality pass runs at batch 1
        #: called with each note of the quality pass (a method run at batch 1, a batch split for memory)
        self.on_note: Callable[[str], None] = lambda text: None

    def _choose_batch_size(self) -> tuple[int, str]:
        """The quality pass's batch size and how it was chosen (``settings.batch_size``, else per device)."""
        if self.settings.batch_size is not None:
            return self.settings.batch_size, "--batch-size"
        device = self.loaded.device
        if getattr(device, "type", str(device)) != "cuda":
            return CPU_BATCH_SIZE, f"automatic: {CPU_BATCH_SIZE} on a CPU"
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cfg = self.loaded.adapter.text_config
        longest = max(i.prompt_tokens for i in self.inputs) + self.settings.max_new_tokens
        kv = kv_bytes_per_token(cfg, self.loaded.dtype) * self.loaded.adapter.num_layers * longest
        width = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        activations = longest * (width + 4 * cfg.hidden_size) * 4  # float32 upper bound of one layer's
        fits = int(0.5 * free // max(1, kv + activations))
        size = max(1, min(MAX_AUTO_BATCH_SIZE, fits))
        return size, f"automatic: half the free GPU memory ({free / 2**30:.1f} GiB) over one request's cache"

    def _note(self, text: str, key: str | None = None) -> None:
        """Say ``text`` once (per ``key``): recorded in ``quality_pass.notes`` and passed to ``on_note``."""
        key = key or text
        if key in self._said:
            return
        self._said.add(key)
        self.results["quality_pass"]["notes"].append(text)
        self.on_note(text)

    @property
    def total_steps(self) -> int:
        """Generations of inputs the quality pass still has to do (the reference counts when it must be
        recomputed for a resumed sweep), for a progress bar."""
        extra = 1 if self.pending and self.pending[0].press is not None else 0
        return (len(self.pending) + extra) * len(self.inputs)

    def run(self) -> dict:
        """Run the quality pass of every pending run in order, then the timing pass, and return the results
        dictionary.

        Raises:
            SweepFailed: the uncompressed reference ran out of memory at batch 1 (recorded with ``status:
                "oom"`` and written, then the sweep stops: nothing can be compared without it), or the
                results file cannot be written (it keeps what its last write held).
            RuntimeError: the uncompressed reference failed otherwise. Any other run that fails is
                recorded with ``status: "oom"`` or ``"error"`` and the sweep goes on.
            KeyboardInterrupt: propagated after the finished runs (and timing rounds) are on disk.
        """
        self.on_phase("quality", self.total_steps)
        if self.pending and self.pending[0].press is not None:
            self.recompute_reference()
        for spec in self.pending:
            run = self._run_one(spec)
            self.results["runs"].append(run)
            self._finish_run()
            if spec.press is None and run["status"] == "oom":
                raise SweepFailed(self._reference_oom(run["error"]), self.results)
        self._timing_pass()
        self.results["complete"] = True
        self._finish_run()
        return self.results

    def recompute_reference(self) -> None:
        """Recompute the uncompressed reference's answers and logits for a resumed sweep whose reference
        finished (they are not recorded again): every other run is scored against them.

        Raises:
            SweepFailed: the reference ran out of memory.
        """
        oom = None
        try:
            self._reference = self._quality(self.runs[0])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            oom = out_of_memory_text(exc)
        if oom is not None:
            free_memory(self.loaded.device)
            raise SweepFailed(self._reference_oom(oom, recomputed=True), self.results)

    @property
    def reference(self) -> dict[str, _InputOutcome]:
        """The uncompressed reference's outcomes per input id (empty until it ran or was recomputed)."""
        return self._reference

    def use_reference(self, outcomes: dict[str, _InputOutcome]) -> None:
        """Score the runs to come against ``outcomes``, the uncompressed reference measured elsewhere (by
        another worker of a distributed sweep, on the same model and inputs)."""
        self._reference = outcomes

    def run_quality(self, spec: RunSpec) -> dict:
        """The quality pass of ``spec`` as its ``runs[]`` entry, not yet added to the results; a failure is
        recorded with ``status: "oom"`` or ``"error"`` (the reference's outcomes are kept for scoring).

        Raises:
            Exception: what the uncompressed reference raised, other than running out of memory.
        """
        return self._run_one(spec)

    def failed_run(self, spec: RunSpec, error: str) -> dict:
        """The ``runs[]`` entry of ``spec`` recorded with ``status: "error"`` and ``error``, without running it
        (a distributed sweep's run whose workers died)."""
        return self._summarise(spec, {}, "error", error)

    def _reference_oom(self, text: str, recomputed: bool = False) -> str:
        """The line that says the uncompressed reference does not fit, and what to try."""
        recorded = self.results_path if self._written_runs is not None and not recomputed else None
        return reference_oom_text(str(self.loaded.device), text, recorded, recomputed)

    def _finish_run(self) -> None:
        self._written_runs = finish_results(
            self.results, self.settings.thresholds, self.results_path, self._written_runs
        )

    def _generate(self, spec: RunSpec, indices: Sequence[int], scoring: bool = False) -> tuple[GenerationResult, Batch]:
        """One greedy generation of the left-padded batch of ``self.inputs[i]`` for ``i`` in ``indices``; with
        ``scoring`` (the quality pass) also the teacher-forced continuation and the follow-up questions."""
        batch = collate(self.inputs, indices, self._pad_id)
        rows = [self.inputs[i] for i in indices]
        continuation = followup = None
        if scoring:
            own = spec.press is None
            continuation = OWN if own else [self._reference[inp.id].fed or [] for inp in rows]
            if any(inp.followup_ids for inp in rows):
                followup = [list(inp.followup_ids) for inp in rows]
        result = greedy_generate(
            self.loaded.model,
            batch.tensors,
            vision_tokens=self.inputs[indices[0]].vision_tokens,
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_id=self.loaded.model.generation_config.eos_token_id,
            press=spec.press,
            suppress_token_ids=self.loaded.adapter.vision_token_ids(),
            pads=batch.pads,
            continuation=continuation,
            followup=followup,
        )
        return result, batch

    def _quality(self, spec: RunSpec) -> dict[str, _InputOutcome]:
        """The quality pass of one run: every input once, in batches (module docstring).

        Raises:
            Exception: what a batch of one row raised (out of memory included), for :meth:`_run_one` to record.
        """
        alone = spec.method in self._batch1
        size = 1 if alone else self.batch_size
        queue = plan_batches(self.inputs, size)
        outcomes: dict[str, _InputOutcome] = {}
        images = [i for i, inp in enumerate(self.inputs) if _kind(inp) == "image"]
        first = set(images[:FIRST_INPUTS])
        fates_kept = 0
        while queue:
            idx = queue.pop(0)
            failure = None
            try:
                result, batch = self._generate(spec, idx, scoring=True)
            except UnsupportedInputError as exc:
                if len(idx) == 1:
                    raise
                failure = ("unsupported", str(exc))
            except Exception as exc:
                if len(idx) == 1 or not is_out_of_memory(exc):
                    raise
                failure = ("oom", out_of_memory_text(exc))
            if failure is not None:  # after the except block: its traceback held the batch's tensors
                kind, text = failure
                if kind == "oom":
                    free_memory(self.loaded.device)
                    size = max(1, len(idx) // 2)
                    self.batch_size = min(self.batch_size, size)
                    self._note(f"a quality-pass batch of {len(idx)} ran {text}; continuing in batches of {size}")
                else:
                    size = 1
                    self._batch1.add(spec.method)
                    self._note(f"{spec.method} runs its quality pass at batch 1: {text}", key=f"batch1:{spec.method}")
                queue = [b[i : i + size] for b in [idx, *queue] for i in range(0, len(b), size)]
                continue
            record = getattr(spec.press, "last_prefill", None)
            per_image_rows = getattr(record, "per_image_retention_rows", None) if record is not None else None
            for j, i in enumerate(idx):
                inp = self.inputs[i]
                answer = self._tokenizer.decode(result.tokens[j], skip_special_tokens=True).strip()
                fates = None
                if record is not None and _kind(inp) == "image":
                    # Inputs a token map may be drawn for (token_maps.map_inputs): the first image inputs and
                    # those whose answer changed, chosen with the same exact match the scores use.
                    ref = self._reference.get(inp.id)
                    changed = ref is not None and exact_match(answer, ref.answer) == 0
                    if i in first or (changed and fates_kept < MAX_FATES):
                        fates = prompt_fates(record, row=j, pad=batch.pads[j])
                        fates_kept += int(changed)
                if per_image_rows is not None:
                    per_image = list(per_image_rows[j])
                elif len(idx) == 1:
                    per_image = getattr(record, "per_image_retention", None)
                elif len(getattr(record, "per_image_retention", None) or []) == 1:
                    per_image = [result.row_caches[j].vision_retention]  # one visual input: the row's retention
                else:
                    per_image = None  # a record without per-row figures, several visual inputs
                outcome = _InputOutcome(
                    answer=answer,
                    tokens=list(result.tokens[j]),
                    first_logits=result.first_logits[j],
                    cache=result.row_caches[j],
                    per_image_retention=per_image,
                    fates=fates,
                )
                logits = result.continuation_logits[j] if result.continuation_logits is not None else None
                if spec.press is None:
                    outcome.fed, targets = reference_continuation(result.tokens[j], result.stopped[j])
                    outcome.continuation = ReferenceContinuation.from_logits(logits, targets) if targets else None
                elif logits is not None and self._reference[inp.id].continuation is not None:
                    outcome.scores = continuation_scores(self._reference[inp.id].continuation, logits)
                if inp.followup_ids and result.followup_tokens is not None:
                    text = self._tokenizer.decode(result.followup_tokens[j], skip_special_tokens=True)
                    outcome.followup_answer = text.strip()
                outcomes[inp.id] = outcome
            del result
            self.on_progress("quality", spec.id, len(idx))
        return outcomes

    def _run_one(self, spec: RunSpec) -> dict:
        status, error = "ok", None
        outcomes: dict[str, _InputOutcome] = {}
        try:
            outcomes = self._quality(spec)
        except Exception as exc:  # recorded, so that one failing run does not lose the sweep
            if is_out_of_memory(exc):  # torch.OutOfMemoryError, a CPU allocator failure, MemoryError
                status, error = "oom", out_of_memory_text(exc)
            elif spec.press is None:
                raise
            else:
                status, error = "error", f"{type(exc).__name__}: {exc}"
        if status == "oom":  # after the except block: its traceback held the failed run's tensors
            outcomes = {}
            free_memory(self.loaded.device)
        if spec.press is None:
            self._reference = outcomes
        return self._summarise(spec, outcomes, status, error)


def finish_results(results: dict, thresholds: Thresholds, path: Path | None, written: int | None) -> int | None:
    """Bring ``results`` up to date after a run (or timing round) finished: every ``ok`` run's ratios to
    the uncompressed run, the recommendation (:func:`~lightkv_cli.scoring.recommend.recommend` under
    ``thresholds``), and, with ``path``, the atomic write of ``results`` there. No model is needed: a
    distributed sweep's driver keeps its results file with this.

    Args:
        written: the runs the file held after its last write (None: never written), for the message of a
            failed write.

    Returns:
        The runs the file now holds (``written`` when ``path`` is None).

    Raises:
        SweepFailed: the file cannot be written (its message names the path, the errno and the fix).
    """
    runs = results["runs"]
    base = next((r for r in runs if r.get("method") == "uncompressed" and r.get("status") == "ok"), None)
    if base is not None:
        for r in runs:
            if r.get("status") == "ok":
                _add_ratios(r, base)
    results["recommendation"] = recommend(runs, thresholds)
    if path is None:
        return written
    try:
        write_json_atomic(path, results)
    except OSError as exc:
        kept = "nothing was written" if written is None else f"it keeps the {written} run(s) written before"
        hint = os_error_hint(exc)
        fix = f"{hint} and continue with --resume" if hint else "continue with --resume once it can be written"
        raise SweepFailed(f"{describe_os_error(exc, path=path)}; {kept}; {fix}", results) from None
    return len(runs)


def reference_oom_text(device: str, text: str, recorded: Path | None = None, recomputed: bool = False) -> str:
    """The line that says the uncompressed reference does not fit on ``device`` (it ran ``text``: out of
    memory, :func:`~lightkv_cli.measure.memory.out_of_memory_text`), and what to try; ``recorded``: the
    results file that records it; ``recomputed``: it was recomputed to resume."""
    where = f"; recorded in {recorded}" if recorded is not None else ""
    what = "recomputing the uncompressed reference to resume" if recomputed else "the uncompressed reference run"
    return f"{what} on {device} ran {text}; nothing can be compared without it; {OOM_ADVICE}{where}"


def _add_ratios(run: dict, base: dict) -> None:
    """This run's FLOPs, KV and capacity relative to the uncompressed run ``base``."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    run["flops_ratio"] = ratio(run.get("flops_prefill"), base.get("flops_prefill"))
    run["kv_ratio"] = ratio(run.get("kv_bytes"), base.get("kv_bytes"))
    run["kv_vision_ratio"] = ratio(run.get("kv_bytes_vision"), base.get("kv_bytes_vision"))
    cap, base_cap = run.get("capacity") or {}, base.get("capacity") or {}
    if cap:
        cap["ratio_vs_uncompressed"] = ratio(
            cap.get("max_concurrent_requests"), base_cap.get("max_concurrent_requests")
        )
