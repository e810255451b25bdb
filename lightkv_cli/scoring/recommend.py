"""The recommendation: the cheapest run (lowest KV bytes per request; at equal bytes the better
quality, then the lower prefill time) that meets every threshold that is set; when none does, it
names the run that came closest and, for each threshold it missed, the required and measured values
and the shortfall. Whether a quality threshold is met is decided on the lower 95% bound of the metric
or on its mean, as ``thresholds.decide_on`` says (:func:`~lightkv_cli.scoring.thresholds.evaluate`). No torch.
"""

from __future__ import annotations

import math

from lightkv_cli.scoring.thresholds import CheckResult, Thresholds, evaluate


def _cost_key(run: dict) -> tuple[float, float]:
    prefill = run.get("prefill_ms")
    prefill_ms = prefill.get("median", math.inf) if isinstance(prefill, dict) else (prefill or math.inf)
    return (float(run.get("kv_bytes", math.inf)), float(prefill_ms))


def _choice_key(run: dict) -> tuple[float, float, float, float]:
    """Order of the runs that meet every threshold: fewest KV bytes; among equal bytes (methods at the
    same retention) the better quality (task accuracy when measured, then answer match); then the
    lower median prefill time."""
    q = run.get("quality") or {}

    def score(name: str) -> float:
        v = q.get(name)
        return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else -math.inf

    kv, prefill = _cost_key(run)
    return (kv, -score("accuracy"), -score("answer_match"), prefill)


def _severity(checks: list[CheckResult]) -> tuple[int, float]:
    failed = [c for c in checks if not c.passed]
    relative = sum(min(c.short_by / c.required, 1e6) if c.required else c.short_by for c in failed)
    return (len(failed), relative)


def recommend(runs: list[dict], thresholds: Thresholds) -> dict:
    """The operating point: the cheapest finished run that meets every threshold.

    Cheapest = lowest ``kv_bytes`` (K+V held after prefill per request); among runs with equal
    bytes (different methods at the same retention) the higher task accuracy, then answer match;
    then the lowest median prefill time. The uncompressed run is a candidate like any other, so without cost
    thresholds a recommendation exists whenever the reference finished; it is then "keep the full cache".
    "Meets" compares each quality threshold with the lower 95% bound of its metric (a ceiling: the upper
    bound) when ``thresholds.decide_on`` is ``lower-bound``, with the mean when it is ``mean`` or not recorded.

    Returns:
        ``{"run", "method", "reason", "failures", "vision_retention", "kv_bytes", "kv_bytes_vision",
        "target_retention"}``. ``run`` is ``None`` when no run meets every threshold; ``failures``
        then lists what the closest run missed (``{"run", "threshold", "required", "measured",
        "short_by", "text", "basis", "estimate"}``: ``measured`` is the value compared, ``basis`` which
        value that is (``lower-bound``, ``upper-bound``, ``mean``, ``measured``), ``estimate`` the mean).
        When the recommendation is the uncompressed run, ``failures`` lists what the closest compressed
        run missed.
    """
    ok = [r for r in runs if r.get("status") == "ok" and isinstance(r.get("quality"), dict)]
    if not ok:
        return {"run": None, "reason": "no run finished", "failures": []}
    checked = [(r, evaluate(r, thresholds)) for r in ok]
    good = [r for r, checks in checked if all(c.passed for c in checks)]

    def failures_of(run: dict, checks: list[CheckResult]) -> list[dict]:
        return [
            {
                "run": run["id"],
                "threshold": c.threshold,
                "required": c.required,
                "measured": c.measured,
                "short_by": c.short_by,
                "text": c.describe(),
                "basis": c.basis,
                "estimate": c.estimate,
            }
            for c in checks
            if not c.passed
        ]

    if not good:
        run, checks = min(checked, key=lambda rc: (_severity(rc[1]), _cost_key(rc[0])))
        failed = failures_of(run, checks)
        return {
            "run": None,
            "method": None,
            "reason": f"no run meets every threshold; closest: {run['id']}: " + "; ".join(f["text"] for f in failed),
            "failures": failed,
        }
    best = min(good, key=_choice_key)
    rec = {
        "run": best["id"],
        "method": best.get("method"),
        "target_retention": best.get("target_retention"),
        "vision_retention": best.get("vision_retention"),
        "kv_bytes": best.get("kv_bytes"),
        "kv_bytes_vision": best.get("kv_bytes_vision"),
        "failures": [],
    }
    met = [c.describe() for c in evaluate(best, thresholds)]
    if best.get("method") == "uncompressed":
        compressed = [(r, c) for r, c in checked if r.get("method") != "uncompressed"]
        if compressed:
            run, checks = min(compressed, key=lambda rc: (_severity(rc[1]), _cost_key(rc[0])))
            rec["failures"] = failures_of(run, checks)
            rec["reason"] = (
                f"no compressed run meets every threshold; closest: {run['id']}: "
                + "; ".join(f["text"] for f in rec["failures"])
                + "; keep the full cache"
            )
        else:
            rec["reason"] = "only the uncompressed run finished"
    else:
        rec["reason"] = "fewest KV bytes among runs meeting every threshold" + (f" ({'; '.join(met)})" if met else "")
    return rec
