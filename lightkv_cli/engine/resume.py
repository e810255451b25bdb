"""Resuming a sweep (``--resume``): which runs and timing rounds of an interrupted results file a new
:class:`~lightkv_cli.engine.sweep.Sweep` keeps, after checking that file measured the same thing.

:class:`Resume` is a part of :class:`~lightkv_cli.engine.sweep.Sweep` (a mixin over its inputs, results and
timing state) kept in its own module.
"""

from __future__ import annotations

from lightkv_cli.engine.timing_pass import _Timing
from lightkv_cli.errors import UserError
from lightkv_cli.results import check_schema


class Resume:
    """The resume methods of :class:`~lightkv_cli.engine.sweep.Sweep` (module docstring)."""

    def _adopt(self, previous: dict) -> None:
        """Take the finished runs (and timing rounds) of an interrupted sweep, after checking it measured the
        same thing."""
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
        if previous.get("quality_pass"):
            mine["quality_pass"]["notes"] = list(previous["quality_pass"].get("notes") or [])
        self.resumed = [r["id"] for r in kept]
        self._adopt_timings(previous.get("timing_pass") or {}, kept)

    def _adopt_timings(self, timing_pass: dict, kept: list[dict]) -> None:
        """Keep the finished rounds of an interrupted timing pass when every run kept has their samples and
        they were measured on the same timing inputs and batches; else the pass starts again."""
        done = int(timing_pass.get("rounds_done") or 0)
        ok = {r["id"] for r in kept if r.get("status") == "ok"}
        # The timing pass starts once every run has its quality pass: a run still to run means it never did.
        unfinished = any(spec.id not in ok and spec.id not in {r["id"] for r in kept} for spec in self.runs)
        if not done or unfinished or timing_pass.get("inputs") != self.results["timing_pass"]["inputs"]:
            for r in kept:
                r.pop("timing", None)
            return
        ids = {inp.id: i for i, inp in enumerate(self.inputs)}
        timings: dict[str, list[_Timing]] = {}
        for r in kept:
            if r.get("status") != "ok":
                continue
            batches = (r.get("timing") or {}).get("batches") or []
            mine = []
            for b, units in self.units.items():
                old = next((x for x in batches if x.get("batch_size") == b), None)
                if old is None or [[ids.get(u) for u in unit] for unit in old.get("units", [])] != units:
                    return self._adopt_timings({}, kept)
                t = _Timing(b, units, status=old.get("status", "ok"), error=old.get("error"))
                t.samples = {k: [list(x)[:done] for x in v] for k, v in (old.get("samples") or {}).items()}
                t.peak = int(old.get("peak_memory_bytes") or 0)
                t.peak_kind = old.get("peak_memory_kind") or ""
                t.peak_per_device = dict(old.get("peak_memory_per_device") or {})
                t.nvml = old.get("nvml")
                mine.append(t)
            timings[r["id"]] = mine
        self._timings = timings
        self.results["timing_pass"]["rounds_done"] = done
        self.results["timing_pass"]["order"] = list(timing_pass.get("order") or [])[:done]

    def continue_timing(self, runs: list[dict], timing_pass: dict) -> None:
        """Take over the timing pass of another process's results (a distributed sweep's driver: ``runs``,
        every run of the sweep, and its ``timing_pass`` section): the finished rounds' samples are kept as
        a resumed sweep keeps them, so :meth:`timing_rounds` continues with the next round."""
        self.results["runs"] = runs
        self.results["timing_pass"]["rounds_done"] = 0
        self.results["timing_pass"]["order"] = []
        self._timings = {}
        self._adopt_timings(timing_pass, runs)
