"""Aten ops and host-synchronising ops that each method adds to one prefill and one decode step.

Counts (not times) from ``torch.profiler`` on CPU, so they do not depend on machine load; on a GPU each
aten op is a kernel launch and each sync a pipeline drain (DESIGN.md, "Measuring honestly"). Runs the
``cpu-small`` architecture (576 vision tokens, 32-layer decoder) with random weights, one image per prompt,
every registered method at target retention 0.55 against no press.

Usage: ``python benchmarks/op_counts.py [--batches 1,4]``
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::unique", "aten::_unique2", "aten::masked_select")


def _count(fn) -> tuple[int, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(events), sum(1 for e in events if e.name in SYNC_OPS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    try:  # this layout
        from lightkv_cli.engine.bench import build_model, synthetic_inputs
        from lightkv_cli.methods.hf_compat import cache_kwarg
    except ImportError:  # the layout before issue 15, for a before/after comparison
        from lightkv_cli.bench import build_model, synthetic_inputs
        from lightkv_cli.methods.base import cache_kwarg
    from lightkv_cli.methods.registry import METHODS, make_press

    torch.set_num_threads(2)
    bm = build_model("cpu-small", device="cpu", dtype="float32")
    model = bm.model
    print(
        "| method | batch | prefill aten ops (+ vs none) | prefill syncs (+) | decode-step ops (+) | decode syncs (+) |"
    )
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = synthetic_inputs(bm, batch, 1)
        rows = {}
        for name in [None, *METHODS]:
            press = None if name is None else make_press(name, model, target=0.55)
            rows[name] = _measure(model, inputs, press, cache_kwarg)
        base = rows[None]
        for name, (po, ps, do, ds) in rows.items():
            print(
                f"| {name or 'uncompressed'} | {batch} | {po} ({po - base[0]:+d}) | {ps} ({ps - base[1]:+d}) "
                f"| {do} ({do - base[2]:+d}) | {ds} ({ds - base[3]:+d}) |"
            )


def _measure(model, inputs, press, cache_kwarg) -> tuple[int, int, int, int]:
    """(prefill ops, prefill syncs, decode-step ops, decode syncs), prefill and decode under one press context."""
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        model(**inputs, use_cache=True)  # warm-up
        holder = {}
        p_ops, p_sync = _count(lambda: holder.setdefault("out", model(**inputs, use_cache=True)))
        out = holder["out"]
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        kw = cache_kwarg(model.forward, out.past_key_values)
        d_ops, d_sync = _count(lambda: model(input_ids=nxt, attention_mask=mask, use_cache=True, **kw))
    return p_ops, p_sync, d_ops, d_sync


if __name__ == "__main__":
    main()
