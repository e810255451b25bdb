"""What compression changed, input by input: the answers of the recommended run and its neighbours on
the quality/cost frontier that differ from the uncompressed run's, and quality broken down by the
prompts file's ``type`` and ``tags``. Reads a results dictionary (schema ``lightkv.results/1``,
docs/results-schema.md) only; no torch, nothing printed.

Two answers differ when their SQuAD-normalised forms differ
(:func:`lightkv_cli.scoring.fidelity.normalize_answer`, the normalisation of answer match).
"""

from __future__ import annotations

import math

from lightkv_cli.report.facts import as_number, runs_of, uncompressed_run
from lightkv_cli.scoring.fidelity import answer_correct, exact_match

#: Per-input KL keys of ``per_input[].quality``, most informative first (nats).
_KL_KEYS = ("continuation_kl", "first_token_kl")


def _ok_compressed(results: dict) -> list[dict]:
    return [r for r in runs_of(results) if r.get("status") == "ok" and r.get("method") != "uncompressed"]


def quality_metric(results: dict) -> str:
    """``"accuracy"`` when any ok compressed run measured it, else ``"answer_match"`` (the frontier's quality)."""
    for run in _ok_compressed(results):
        if as_number((run.get("quality") or {}).get("accuracy")) is not None:
            return "accuracy"
    return "answer_match"


def frontier(results: dict) -> list[dict]:
    """The Pareto frontier of (quality, KV bytes): ok compressed runs that no other such run dominates.

    A run is dominated when another has ``kv_bytes`` no larger and quality (:func:`quality_metric`) no
    lower, one of them strictly. Runs without a number for either are left out.

    Returns:
        The frontier runs, fewest KV bytes (per request, bytes) first.
    """
    metric = quality_metric(results)
    points = []
    for run in _ok_compressed(results):
        kv = as_number(run.get("kv_bytes"))
        q = as_number((run.get("quality") or {}).get(metric))
        if kv is not None and q is not None:
            points.append((kv, q, run))
    front = [
        (kv, q, run)
        for kv, q, run in points
        if not any(k2 <= kv and q2 >= q and (k2 < kv or q2 > q) for k2, q2, _ in points)
    ]
    return [run for _, _, run in sorted(front, key=lambda p: (p[0], -p[1]))]


def _runs_to_show(results: dict) -> list[dict]:
    """The recommended run and the frontier runs just cheaper and just dearer; the frontier without one."""
    front = frontier(results)
    rec_id = (results.get("recommendation") or {}).get("run")
    rec = next((r for r in runs_of(results) if rec_id and r.get("id") == rec_id and r.get("status") == "ok"), None)
    if rec is None:
        return front
    kv = as_number(rec.get("kv_bytes"))
    others = [r for r in front if r.get("id") != rec_id]
    shown = [rec]
    if kv is not None:
        cheaper = [r for r in others if as_number(r.get("kv_bytes")) < kv]
        dearer = [r for r in others if as_number(r.get("kv_bytes")) > kv]
        shown += cheaper[-1:] + dearer[:1]
    return shown


def _inputs_by_id(results: dict) -> tuple[dict, list[dict]]:
    inputs = [i for i in results.get("inputs") or [] if isinstance(i, dict)]
    return {i.get("id"): i for i in inputs if i.get("id") is not None}, inputs


def _paired(per_input: list, other: list) -> list[tuple[int, dict, dict | None]]:
    """``(index, entry, matching entry of other)``: matched by ``input`` id when every id is known and unique,
    else by position."""
    a = [p if isinstance(p, dict) else {} for p in per_input or []]
    b = [p if isinstance(p, dict) else {} for p in other or []]
    ids_b = [p.get("input") for p in b]
    if None not in ids_b and len(set(ids_b)) == len(ids_b):
        by_id = dict(zip(ids_b, b))
        return [(i, p, by_id.get(p.get("input"))) for i, p in enumerate(a)]
    return [(i, p, b[i] if i < len(b) else None) for i, p in enumerate(a)]


def _input_record(by_id: dict, inputs: list[dict], entry: dict, index: int) -> dict:
    rec = by_id.get(entry.get("input"))
    if rec is None and entry.get("input") is None and index < len(inputs):
        rec = inputs[index]
    return rec or {}


def _correct(entry: dict | None, expected) -> bool | None:
    """Whether an answer is right: the stored per-input accuracy, else scored against ``expected``."""
    if entry is None:
        return None
    acc = as_number((entry.get("quality") or {}).get("accuracy"))
    if acc is not None:
        return acc >= 0.5
    answer = entry.get("answer")
    if isinstance(expected, str) and isinstance(answer, str) and expected.strip():
        return answer_correct(answer, expected) == 1.0
    return None


def _kl(quality: dict) -> float | None:
    for key in _KL_KEYS:
        v = as_number(quality.get(key))
        if v is not None:
            return v
    return None


def _order(entry: dict) -> tuple:
    broke = entry["correct_before"] is True and entry["correct_after"] is False
    kl, f1 = entry["kl"], entry["_token_f1"]
    return (not broke, kl is None, -(kl or 0.0), f1 is None, f1 if f1 is not None else 0.0)


def changed_inputs(results: dict, cap: int = 24) -> dict:
    """The inputs whose answer compression changed, for the recommended run and its frontier neighbours.

    The runs shown are the recommended run (``recommendation.run``) and the frontier runs (:func:`frontier`)
    just cheaper and just dearer in KV bytes; with no recommendation, every frontier run. An input is
    changed when its normalised answer differs from the uncompressed run's.

    Args:
        results: a results dictionary.
        cap: at most this many entries (≥ 0).

    Returns:
        ``{"entries": [...], "more": int}``, ``more`` = changed inputs beyond ``cap``. Each entry is
        ``{"run", "method", "input", "image" (path from ``inputs``), "question", "uncompressed_answer",
        "answer", "expected" (ground truth or None), "kl" (nats: per-input continuation KL when recorded,
        else first-token KL, else None), "correct_before", "correct_after" (bool or None when unknown)}``.
        Order: answers that went from correct to wrong first, then KL descending, then token F1 (vs.
        uncompressed) ascending; ties keep run then input order. No uncompressed run → no entries.

    Raises:
        ValueError: ``cap`` is negative.
    """
    if cap < 0:
        raise ValueError(f"cap must be ≥ 0, got {cap}")
    base = uncompressed_run(results)
    if base is None:
        return {"entries": [], "more": 0}
    by_id, inputs = _inputs_by_id(results)
    entries = []
    for run in _runs_to_show(results):
        for index, entry, ref in _paired(run.get("per_input"), base.get("per_input")):
            answer, ref_answer = entry.get("answer"), (ref or {}).get("answer")
            if not isinstance(answer, str) or not isinstance(ref_answer, str):
                continue
            if exact_match(answer, ref_answer) == 1.0:
                continue
            record = _input_record(by_id, inputs, entry, index)
            expected = record.get("answer")
            quality = entry.get("quality") or {}
            entries.append(
                {
                    "run": run.get("id"),
                    "method": run.get("method"),
                    "input": entry.get("input", record.get("id")),
                    "image": record.get("image"),
                    "question": record.get("question"),
                    "uncompressed_answer": ref_answer,
                    "answer": answer,
                    "expected": expected if isinstance(expected, str) else None,
                    "kl": _kl(quality),
                    "correct_before": _correct(ref, expected),
                    "correct_after": _correct(entry, expected),
                    "_token_f1": as_number(quality.get("token_f1")),
                }
            )
    entries.sort(key=_order)
    for e in entries:
        del e["_token_f1"]
    return {"entries": entries[:cap], "more": max(0, len(entries) - cap)}


def _groups(inputs: list[dict]) -> list[tuple[str, str, set]]:
    """``(group, value, input ids)`` for every ``type`` then every tag, values sorted."""
    types: dict[str, set] = {}
    tags: dict[str, set] = {}
    for index, rec in enumerate(inputs):
        key = rec.get("id", index)
        if isinstance(rec.get("type"), str):
            types.setdefault(rec["type"], set()).add(key)
        for tag in rec.get("tags") or []:
            if isinstance(tag, str):
                tags.setdefault(tag, set()).add(key)
    return [("type", v, types[v]) for v in sorted(types)] + [("tag", v, tags[v]) for v in sorted(tags)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def breakdowns(results: dict) -> list[dict]:
    """Quality per kind of input, from the ``type`` (str) and ``tags`` (list of str) of the ``inputs``.

    Returns:
        One ``{"group": "type" | "tag", "value", "rows": [{"run", "n", "accuracy", "answer_match"}]}`` per type
        value, then per tag (each sorted by value), with one row per ok run in run order: ``n`` = inputs
        of the group the run has per-input results for, ``accuracy`` = mean per-input accuracy where known,
        ``answer_match`` = mean per-input exact match vs. the uncompressed run (fractions; None when no
        input of the group has one). Empty when no input has a type or tags.
    """
    _, inputs = _inputs_by_id(results)
    groups = _groups(inputs)
    if not groups:
        return []
    ids = [rec.get("id", index) for index, rec in enumerate(inputs)]
    out = []
    for group, value, members in groups:
        rows = []
        for run in runs_of(results):
            if run.get("status") != "ok":
                continue
            acc, am, n = [], [], 0
            for index, entry in enumerate(p for p in run.get("per_input") or [] if isinstance(p, dict)):
                key = entry.get("input", ids[index] if index < len(ids) else None)
                if key not in members:
                    continue
                n += 1
                quality = entry.get("quality") or {}
                for bucket, name in ((acc, "accuracy"), (am, "exact_match")):
                    v = as_number(quality.get(name))
                    if v is not None and math.isfinite(v):
                        bucket.append(v)
            rows.append({"run": run.get("id"), "n": n, "accuracy": _mean(acc), "answer_match": _mean(am)})
        out.append({"group": group, "value": value, "rows": rows})
    return out
