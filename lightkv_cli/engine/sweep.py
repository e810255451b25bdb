"""Sweeps and profiles: the uncompressed model and each method at each target retention or explicit
schedule, on the user's inputs.

Data flows one way: prepared inputs → one measured greedy generation per (run, input, repeat), with
an NVML sampler running beside each run → per-run aggregates (retention, bytes, times, FLOPs,
capacity, quality against the uncompressed run) → a results dictionary following
``docs/results-schema.md``. Nothing here prints; the caller passes ``on_progress`` to show progress
and ``results_path`` to have every finished run written to disk at once (atomically), so an
interrupted sweep loses nothing and can be resumed.

A run that runs out of memory (on GPU or CPU: :func:`~lightkv_cli.measure.memory.is_out_of_memory`)
is recorded with ``status: "oom"``; when that run is the uncompressed reference, it is recorded and the
sweep stops (:class:`~lightkv_cli.engine.job.SweepFailed`), since nothing can be scored without it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightkv_cli import __version__
from lightkv_cli.engine.job import OOM_ADVICE, SweepFailed
from lightkv_cli.engine.plan import RunSpec, SweepSettings, plan_runs
from lightkv_cli.engine.prepare import ProfileInput, inputs_fingerprint
from lightkv_cli.engine.token_maps import (
    CHANGED_INPUTS,
    FIRST_INPUTS,
    GridCells,
    PromptFates,
    first_grid,
    map_inputs,
    prompt_fates,
    token_map,
)
from lightkv_cli.errors import UserError
from lightkv_cli.files import describe_os_error, os_error_hint
from lightkv_cli.inputs import VideoInput
from lightkv_cli.measure.costs import kv_bytes_per_token, max_concurrent_requests, prefill_flops
from lightkv_cli.measure.environment import environment_info
from lightkv_cli.measure.memory import detect_memory_budget, free_memory, is_out_of_memory, out_of_memory_text
from lightkv_cli.measure.nvml import NvmlSampler, nvml_environment
from lightkv_cli.models.loader import LoadedModel
from lightkv_cli.results import SCHEMA, check_schema, write_json_atomic
from lightkv_cli.runtime import GenerationResult, greedy_generate
from lightkv_cli.scoring.fidelity import InputQuality, exact_match, score_input, summarize
from lightkv_cli.scoring.recommend import recommend
from lightkv_cli.scoring.stats import Spread


@dataclass
class _InputOutcome:
    answer: str
    result: GenerationResult
    prefill_ms: list[float]
    decode_ms: list[float]
    peak: int
    per_image_retention: list[float] | None = None
    #: what the press did to the prompt, for a token map (only inputs that may get one)
    fates: PromptFates | None = None


class Sweep:
    """Runs a sweep (or a profile, a sweep of one method) and builds its results (module docstring).

    The uncompressed reference runs first; its answers and first-token logits are kept in memory
    and every other run of the sweep is scored against them (computed once per input).

    Args:
        loaded: the model (loaded once for the whole sweep).
        inputs: prepared inputs (:func:`prepare_inputs`).
        settings: the grid and measurement knobs.
        command: the command line, recorded in the results.
        skipped: ``{"path", "reason"}`` of inputs that could not be used, recorded in the results.
        results_path: when given, the results are written there after every finished run.
        on_progress: called as ``on_progress(run_id, input_id)`` after every (run, input).
        previous: the results of an interrupted sweep to resume (``--resume``): its runs with status
            ``ok`` or ``oom`` are kept and not run again; runs that ended in ``error``, and an
            uncompressed reference that ran out of memory, run again.

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
        on_progress: Callable[[str, str], None] | None = None,
        previous: dict | None = None,
    ):
        self.loaded = loaded
        self.inputs = inputs
        self.settings = settings
        self.results_path = results_path
        self.on_progress = on_progress or (lambda run, inp: None)
        self.runs = plan_runs(loaded, settings)
        budget, source = settings.memory_budget, settings.memory_source
        if budget is None:
            budget, source = detect_memory_budget(loaded.device)
        model_info = loaded.info()
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
            "runs": [],
            "recommendation": None,
            "complete": False,
        }
        self.resumed: list[str] = []
        if previous is not None:
            self._adopt(previous)
        done = {r["id"] for r in self.results["runs"]}
        self.pending = [spec for spec in self.runs if spec.id not in done]
        self._reference: dict[str, _InputOutcome] = {}
        self._written_runs: int | None = None  # runs in the results file as of its last write
        self._grids: dict[str, GridCells | None] = {}  # input id -> its first image grid (token maps)

    def _adopt(self, previous: dict) -> None:
        """Take the finished runs of an interrupted sweep, after checking it measured the same thing."""
        check_schema(previous, "the results file to resume")
        mine = self.results
        problems = []
        if (
            previous.get("model", {}).get("name") != mine["model"]["name"]
            or previous.get("model", {}).get("init") != mine["model"]["init"]
        ):
            problems.append(
                f"model {previous.get('model', {}).get('name')!r} ({previous.get('model', {}).get('init')})"
            )
        if previous.get("inputs_fingerprint") != mine["inputs_fingerprint"]:
            problems.append("other images or prompts")
        for key in ("max_new_tokens", "positions"):
            if previous.get("settings", {}).get(key) != mine["settings"][key]:
                problems.append(f"{key} = {previous.get('settings', {}).get(key)!r}")
        if (
            previous.get("model", {}).get("dtype") != mine["model"]["dtype"]
            or previous.get("model", {}).get("device") != mine["model"]["device"]
        ):
            problems.append(f"{previous.get('model', {}).get('dtype')} on {previous.get('model', {}).get('device')}")
        if problems:
            raise UserError(
                "cannot resume: the results file was made with "
                + ", ".join(problems)
                + "; run without --resume (the old files are kept as numbered backups, results.json.N.bak) or "
                "use another --output"
            )
        # An uncompressed reference that ran out of memory runs again (the sweep stopped there).
        kept = [
            r
            for r in previous["runs"]
            if r.get("status") == "ok" or (r.get("status") == "oom" and r.get("method") != "uncompressed")
        ]
        mine["runs"] = kept
        mine["created"] = previous.get("created", mine["created"])
        self.resumed = [r["id"] for r in kept]

    @property
    def total_steps(self) -> int:
        """(run, input) pairs still to process, for a progress bar (the reference counts when it
        must be recomputed for a resumed sweep)."""
        extra = 1 if self.pending and self.pending[0].press is not None else 0
        return (len(self.pending) + extra) * len(self.inputs)

    def run(self) -> dict:
        """Run every pending run in order and return the results dictionary.

        Raises:
            SweepFailed: the uncompressed reference ran out of memory (recorded with ``status:
                "oom"`` and written, then the sweep stops: nothing can be compared without it), or
                the results file cannot be written (it keeps what its last write held).
            RuntimeError: the uncompressed reference failed otherwise. Any other run that fails is
                recorded with ``status: "oom"`` or ``"error"`` and the sweep goes on.
            KeyboardInterrupt: propagated after the finished runs are on disk.
        """
        if self.pending and self.pending[0].press is not None:
            # Resumed after the reference finished: recompute its answers and logits (not recorded again).
            oom = None
            try:
                self._reference = self._measure(self.runs[0], repeats=1, warmup=0)[0]
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                oom = out_of_memory_text(exc)
            if oom is not None:
                free_memory(self.loaded.device)
                raise SweepFailed(self._reference_oom(oom, recomputed=True), self.results)
        for spec in self.pending:
            run = self._run_one(spec)
            self.results["runs"].append(run)
            self._finish_run()
            if spec.press is None and run["status"] == "oom":
                raise SweepFailed(self._reference_oom(run["error"]), self.results)
        self.results["complete"] = True
        self._finish_run()
        return self.results

    def _reference_oom(self, text: str, recomputed: bool = False) -> str:
        """The line that says the uncompressed reference does not fit, and what to try."""
        where = str(self.loaded.device)
        recorded = (
            f"; recorded in {self.results_path}"
            if self.results_path is not None and self._written_runs is not None and not recomputed
            else ""
        )
        what = "recomputing the uncompressed reference to resume" if recomputed else "the uncompressed reference run"
        return f"{what} on {where} ran {text}; nothing can be compared without it; {OOM_ADVICE}{recorded}"

    def _finish_run(self) -> None:
        runs = self.results["runs"]
        base = next((r for r in runs if r.get("method") == "uncompressed" and r.get("status") == "ok"), None)
        if base is not None:
            for r in runs:
                if r.get("status") == "ok":
                    _add_ratios(r, base)
        self.results["recommendation"] = recommend(runs, self.settings.thresholds)
        if self.results_path is None:
            return
        try:
            write_json_atomic(self.results_path, self.results)
        except OSError as exc:
            if self._written_runs is None:
                kept = "nothing was written"
            else:
                kept = f"it keeps the {self._written_runs} run(s) written before"
            hint = os_error_hint(exc)
            fix = f"{hint} and continue with --resume" if hint else "continue with --resume once it can be written"
            raise SweepFailed(
                f"{describe_os_error(exc, path=self.results_path)}; {kept}; {fix}", self.results
            ) from None
        self._written_runs = len(runs)

    def _generate(self, spec: RunSpec, inp: ProfileInput) -> GenerationResult:
        return greedy_generate(
            self.loaded.model,
            inp.tensors,
            vision_tokens=inp.vision_tokens,
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_id=self.loaded.model.generation_config.eos_token_id,
            press=spec.press,
            suppress_token_ids=self.loaded.adapter.vision_token_ids(),
        )

    def _measure(self, spec: RunSpec, repeats: int, warmup: int) -> tuple[dict[str, _InputOutcome], dict]:
        tokenizer = getattr(self.loaded.processor, "tokenizer", self.loaded.processor)
        outcomes: dict[str, _InputOutcome] = {}
        with NvmlSampler(self.loaded.device, interval_ms=self.settings.nvml_interval_ms) as sampler:
            for _ in range(warmup):
                self._generate(spec, self.inputs[0])
            images_seen = changed_kept = 0
            for inp in self.inputs:
                results = [self._generate(spec, inp)]
                record = getattr(spec.press, "last_prefill", None)  # of the first generation
                results += [self._generate(spec, inp) for _ in range(max(1, repeats) - 1)]
                first = results[0]
                answer = tokenizer.decode(first.tokens[0], skip_special_tokens=True).strip()
                fates = None
                if record is not None and _kind(inp) == "image":
                    # The inputs token maps may be drawn for (see token_maps.map_inputs), chosen with the
                    # same exact match the scores use; reduced on the host, outside the timed generations.
                    images_seen += 1
                    ref = self._reference.get(inp.id)
                    changed = ref is not None and exact_match(answer, ref.answer) == 0
                    if images_seen <= FIRST_INPUTS:
                        fates = prompt_fates(record)
                    elif changed and changed_kept < CHANGED_INPUTS:
                        changed_kept += 1
                        fates = prompt_fates(record)
                outcomes[inp.id] = _InputOutcome(
                    answer=answer,
                    result=first,
                    prefill_ms=[r.prefill_ms for r in results],
                    decode_ms=[ms for r in results for ms in r.decode_ms],
                    peak=max(r.peak_memory_bytes for r in results),
                    per_image_retention=getattr(record, "per_image_retention", None),
                    fates=fates,
                )
                self.on_progress(spec.id, inp.id)
        return outcomes, sampler.to_dict()

    def _run_one(self, spec: RunSpec) -> dict:
        status, error, nvml = "ok", None, None
        outcomes: dict[str, _InputOutcome] = {}
        try:
            outcomes, nvml = self._measure(spec, self.settings.repeats, self.settings.warmup)
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
        return self._summarise(spec, outcomes, status, error, nvml)

    def _summarise(
        self, spec: RunSpec, outcomes: dict[str, _InputOutcome], status: str, error: str | None, nvml: dict | None
    ) -> dict:
        run = {
            "id": spec.id,
            "method": spec.method,
            "params": spec.params(),
            "target_retention": spec.target_retention,
            "expected_retention": 1.0 if spec.press is None else spec.press.expected_retention,
            "status": status,
        }
        if error:
            run["error"] = error
        if status != "ok" or not outcomes:
            return run
        text_config = self.loaded.adapter.text_config
        per_input, qualities = [], []
        prefill_all, ttft_all, decode_all, flops, peaks = [], [], [], [], []
        n_layers = self.loaded.adapter.num_layers
        n = len(self.inputs)
        layer_bytes = [0.0] * n_layers
        layer_vis = [0.0] * n_layers
        layer_seq = [0.0] * n_layers
        for inp in self.inputs:
            o = outcomes[inp.id]
            ref = self._reference[inp.id]
            q: InputQuality = score_input(
                ref.answer, o.answer, ref.result.first_logits[0], o.result.first_logits[0], inp.answer
            )
            qualities.append(q)
            c = o.result.cache
            f = prefill_flops(text_config, c.processed_seq_lens)
            flops.append(f)
            prefill_all += o.prefill_ms
            ttft_all += [inp.preprocess_ms + ms for ms in o.prefill_ms]
            decode_all += o.decode_ms
            peaks.append(o.peak)
            for i in range(n_layers):
                layer_bytes[i] += c.layer_bytes[i] / n
                layer_vis[i] += c.layer_vision_tokens[i] / n
                layer_seq[i] += c.layer_seq_lens[i] / n
            per_input.append(
                {
                    "input": inp.id,
                    "answer": o.answer,
                    "generated_tokens": len(o.result.tokens[0]),
                    "vision_retention": c.vision_retention,
                    "kv_bytes": c.total_bytes,
                    "kv_bytes_vision": c.vision_bytes,
                    "prefill_ms": Spread.of(o.prefill_ms).median,
                    "decode_ms_per_token": Spread.of(o.decode_ms).median if o.decode_ms else None,
                    "flops_prefill": f,
                    "quality": q.to_dict(),
                }
            )
            if o.per_image_retention is not None:
                per_input[-1]["per_image_retention"] = o.per_image_retention
        self._add_token_maps(outcomes, per_input, qualities)
        kv_total = sum(p["kv_bytes"] for p in per_input) / n
        decode = Spread.of(decode_all) if decode_all else None
        peak_kind = outcomes[self.inputs[0].id].result.peak_memory_kind
        run.update(
            {
                "vision_retention": sum(p["vision_retention"] for p in per_input) / n,
                "kv_bytes": kv_total,
                "kv_bytes_vision": sum(p["kv_bytes_vision"] for p in per_input) / n,
                "kv_bytes_per_layer": layer_bytes,
                "cached_tokens_per_layer": layer_seq,
                "vision_tokens_per_layer": layer_vis,
                "prefill_ms": Spread.of(prefill_all).to_dict(),
                "time_to_first_token_ms": Spread.of(ttft_all).to_dict(),
                "decode_ms_per_token": decode.to_dict() if decode else None,
                "tokens_per_s": (1000.0 / decode.median) if decode and decode.median > 0 else None,
                "peak_memory_bytes": max(peaks),
                "peak_memory_kind": peak_kind,
                "nvml": nvml,
                "flops_prefill": sum(flops) / n,
                "capacity": self._capacity(kv_total, max(peaks), peak_kind),
                "quality": summarize(qualities).to_dict(),
                "per_input": per_input,
            }
        )
        return run

    def _add_token_maps(
        self, outcomes: dict[str, _InputOutcome], per_input: list[dict], qualities: list[InputQuality]
    ) -> None:
        """Add ``token_map`` to the ``per_input`` entries chosen by :func:`~lightkv_cli.engine.token_maps.map_inputs`
        (at most 8 per run) whose press left a record the map can be built from; others get none."""
        chosen = map_inputs([_kind(i) for i in self.inputs], [q.exact_match for q in qualities])
        for j in chosen:
            inp = self.inputs[j]
            fates = outcomes[inp.id].fates
            if fates is None:
                continue
            try:
                if inp.id not in self._grids:
                    self._grids[inp.id] = first_grid(self.loaded.adapter, self.loaded.model, inp.tensors)
                grid = self._grids[inp.id]
                tmap = token_map(fates, grid) if grid is not None else None
            except Exception:  # a map is an illustration: never lose a run over it
                self._grids.setdefault(inp.id, None)
                tmap = None
            if tmap is not None:
                per_input[j]["token_map"] = tmap

    def _capacity(self, kv_prefill: float, peak: int, peak_kind: str) -> dict:
        """Concurrent requests fitting in the memory budget next to the weights (see ``capacity``)."""
        cap = self.results["capacity"]
        per_token = (
            kv_bytes_per_token(self.loaded.adapter.text_config, self.loaded.dtype) * self.loaded.adapter.num_layers
        )
        per_request = kv_prefill + self.settings.max_new_tokens * per_token
        # On GPU the allocator peak of one request minus weights and its cache is the activation
        # memory prefill needs once; on CPU the process RSS says nothing about it.
        reserve = max(0, peak - cap["weight_bytes"] - int(per_request)) if peak_kind == "cuda_allocator" else 0
        fits = (
            max_concurrent_requests(cap["memory_bytes"], cap["weight_bytes"], per_request, reserve)
            if cap["memory_bytes"]
            else None
        )
        return {
            "kv_bytes_per_request": per_request,
            "activation_reserve_bytes": reserve,
            "max_concurrent_requests": fits,
            "ratio_vs_uncompressed": None,
        }


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


def _kind(inp: ProfileInput) -> str:
    """``"image"`` or ``"video"``, as the results' ``inputs[].kind``."""
    return "video" if isinstance(inp.image, VideoInput) else "image"
