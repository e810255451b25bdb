"""The timing pass of a sweep (see :mod:`lightkv_cli.engine.sweep`): warm-up, then rounds in which every run
is visited once in a seeded shuffled order, at every timing batch size; each time paired with the uncompressed
run's on the same input (batch) and round (:mod:`lightkv_cli.measure.paired`), and written into the runs'
results after every round.

:class:`TimingPass` is a part of :class:`~lightkv_cli.engine.sweep.Sweep` (a mixin: it uses the sweep's
inputs, settings, runs, results and generation) kept in its own module so each stays readable.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

from lightkv_cli.engine.plan import RunSpec
from lightkv_cli.measure.memory import free_memory, is_out_of_memory, out_of_memory_text
from lightkv_cli.measure.nvml import NvmlSampler
from lightkv_cli.measure.paired import paired_ratio
from lightkv_cli.scoring.stats import Spread

#: Time metrics of the timing pass: results key → key of its paired ratio.
TIME_METRICS = {
    "prefill_ms": "prefill",
    "time_to_first_token_ms": "time_to_first_token",
    "decode_ms_per_token": "decode_ms_per_token",
}


@dataclass
class _Timing:
    """The timing pass's samples of one run at one timing batch size: ``[unit][round]`` lists."""

    batch_size: int
    units: list[list[int]]
    samples: dict = field(default_factory=dict)  # metric -> [unit][round]
    status: str = "ok"
    error: str | None = None
    peak: int = 0
    peak_kind: str = ""
    peak_per_device: dict = field(default_factory=dict)
    nvml: dict | None = None


class TimingPass:
    """The timing-pass methods of :class:`~lightkv_cli.engine.sweep.Sweep` (module docstring)."""

    def _timing_pass(self) -> None:
        """Warm-up, then the remaining rounds of the timing pass (module docstring); the results are
        written after every round."""
        for _ in self.timing_rounds():
            pass

    def timing_rounds(self) -> Iterator[int]:
        """The timing pass one round at a time: warm-up before the first round, then each remaining round,
        after which the results are brought up to date (written when the sweep has a results file) and the
        rounds done so far are yielded. Yields nothing when no round is left or no run can be timed."""
        tp = self.results["timing_pass"]
        by_id = {r["id"]: r for r in self.results["runs"]}
        specs = [s for s in self.runs if by_id.get(s.id, {}).get("status") == "ok"]
        left = self.settings.repeats - tp["rounds_done"]
        if left <= 0 or not specs or not self.timed:
            return
        for spec in specs:
            if spec.id not in self._timings:
                self._timings[spec.id] = [_Timing(b, units) for b, units in self.units.items()]
        per_round = sum(len(units) * b for b, units in self.units.items())
        warm = self.settings.warmup * sum(b for b in self.units)
        self.on_phase("timing", len(specs) * (warm + left * per_round))
        for spec in specs:
            for t in self._timings[spec.id]:
                for _ in range(self.settings.warmup):
                    if t.status == "ok":
                        self._timed(spec, t, 0, keep=False)
                if self.settings.warmup:
                    self.on_progress("timing", spec.id, self.settings.warmup * t.batch_size)
        for r in range(tp["rounds_done"], self.settings.repeats):
            order = list(specs)
            random.Random(self.settings.seed * 1_000_003 + r).shuffle(order)
            tp["order"].append([s.id for s in order])
            last = r == self.settings.repeats - 1
            for spec in order:
                for t in self._timings[spec.id]:
                    sampler = (
                        NvmlSampler(self.loaded.device, interval_ms=self.settings.nvml_interval_ms) if last else None
                    )
                    with sampler or nullcontext():
                        for u in range(len(t.units)):
                            if t.status == "ok":
                                self._timed(spec, t, u)
                            self.on_progress("timing", spec.id, t.batch_size)
                    if sampler is not None and t.status == "ok":
                        t.nvml = sampler.to_dict()
            tp["rounds_done"] = r + 1
            self._apply_timings()
            self._finish_run()
            yield r + 1

    def _timed(self, spec: RunSpec, t: _Timing, u: int, keep: bool = True) -> None:
        """One timed generation of unit ``u`` (``t.units[u]``) for run ``spec``, its times appended to
        ``t.samples`` (unless ``keep`` is False: a warm-up); an out-of-memory or a failure marks ``t`` (the pass
        goes on)."""
        failure = None
        unit = t.units[u]
        try:
            result, _ = self._generate(spec, unit)
        except Exception as exc:
            if is_out_of_memory(exc):
                failure = ("oom", out_of_memory_text(exc))
            else:
                failure = ("error", f"{type(exc).__name__}: {exc}")
        if failure is not None:
            t.status, t.error = failure
            free_memory(self.loaded.device)
            return
        t.peak = max(t.peak, int(result.peak_memory_bytes))
        t.peak_kind = result.peak_memory_kind
        for dev, b in result.peak_memory_per_device.items():
            t.peak_per_device[dev] = max(t.peak_per_device.get(dev, 0), int(b))
        if not keep:
            return
        pre = sum(self.inputs[i].preprocess_ms for i in unit)
        decode = Spread.of(result.decode_ms).median if result.decode_ms else None
        for key, value in (
            ("prefill_ms", result.prefill_ms),
            ("time_to_first_token_ms", pre + result.prefill_ms),
            ("decode_ms_per_token", decode),
        ):
            rows = t.samples.setdefault(key, [[] for _ in t.units])
            rows[u].append(value)

    def _apply_timings(self) -> None:
        """Write the timing pass's samples, spreads and paired ratios into every timed run's results."""
        by_id = {r["id"]: r for r in self.results["runs"]}
        base = self._timings.get(self.runs[0].id)
        for run_id, timings in self._timings.items():
            run = by_id.get(run_id)
            if run is None:
                continue
            batches = []
            for j, t in enumerate(timings):
                ref = base[j] if base is not None and base[j].status == "ok" else None
                batches.append(self._timing_entry(t, ref, run_id == self.runs[0].id))
            run["timing"] = {"batches": batches}
            self._top_level_timing(run, batches[0] if batches else None, timings[0] if timings else None)

    def _timing_entry(self, t: _Timing, ref: _Timing | None, is_reference: bool) -> dict:
        """One ``runs[].timing.batches[]`` entry (``docs/results-schema.md``)."""
        names = [[self.inputs[i].id for i in unit] for unit in t.units]
        entry: dict = {"batch_size": t.batch_size, "status": t.status, "units": names}
        if t.error:
            entry["error"] = t.error
        entry["samples"] = t.samples
        for key in TIME_METRICS:
            values = [v for row in t.samples.get(key, []) for v in row if v is not None]
            entry[key] = Spread.of(values).to_dict() if values else None
        dec = entry.get("decode_ms_per_token")
        entry["tokens_per_s"] = 1000.0 * t.batch_size / dec["median"] if dec and dec["median"] > 0 else None
        entry["peak_memory_bytes"] = t.peak or None
        entry["peak_memory_kind"] = t.peak_kind or None
        if t.peak_per_device:
            entry["peak_memory_per_device"] = dict(t.peak_per_device)
        entry["nvml"] = t.nvml
        ratios = {}
        if t.status == "ok" and ref is not None and not is_reference:
            for key, ratio_key in TIME_METRICS.items():
                got = paired_ratio(t.samples.get(key, []), ref.samples.get(key, []), seed=self.settings.seed)
                ratios[ratio_key] = got.to_dict() if got is not None else None
        entry["ratio"] = ratios or None
        return entry

    def _top_level_timing(self, run: dict, entry: dict | None, t: _Timing | None) -> None:
        """The run's headline times (its first timing batch size), per-input medians at batch 1, and the
        capacity with the measured activation reserve."""
        if entry is None or t is None:
            return
        for key in TIME_METRICS:
            run[key] = entry.get(key)
        run["tokens_per_s"] = entry.get("tokens_per_s") / t.batch_size if entry.get("tokens_per_s") else None
        run["timing_ratio"] = entry.get("ratio")
        run["timing_batch_size"] = t.batch_size
        run["peak_memory_bytes"] = entry.get("peak_memory_bytes")
        run["peak_memory_kind"] = entry.get("peak_memory_kind")
        if entry.get("peak_memory_per_device"):
            run["peak_memory_per_device"] = entry["peak_memory_per_device"]
        run["nvml"] = entry.get("nvml")
        if t.peak and run.get("kv_bytes") is not None:
            run["capacity"] = self._capacity(run["kv_bytes"], t.peak, t.peak_kind, t.batch_size)
        if t.batch_size != 1:
            return
        position = {inp.id: k for k, inp in enumerate(self.inputs)}
        per_input = run.get("per_input") or []
        for unit, prefill, decode in zip(
            t.units, t.samples.get("prefill_ms", []), t.samples.get("decode_ms_per_token", [])
        ):
            k = position.get(self.inputs[unit[0]].id)
            if k is None or k >= len(per_input):
                continue
            decode = [d for d in decode if d is not None]
            per_input[k]["prefill_ms"] = Spread.of(prefill).median if prefill else None
            per_input[k]["decode_ms_per_token"] = Spread.of(decode).median if decode else None
