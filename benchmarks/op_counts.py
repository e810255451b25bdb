"""What each method adds to one prefill and one decode step: aten ops, host syncs, CPU time (issue 16).

Counts (not times) from ``torch.profiler``, so they do not depend on machine load; on a GPU each aten op
is a kernel launch (or a host-side dispatch) and each sync a pipeline drain (DESIGN.md, "Measuring
honestly"). Runs the ``cpu-small`` architecture (576 vision tokens, 32-layer decoder) with random
weights, one image per prompt, every registered method at target retention 0.55 against no press, at
each batch size. Also prints:

- the CPU time of the compression step: the ``lightkv::*`` profiler ranges that are not nested in
  another one (LightKV/FastV/RandomDrop stages, eviction statistics and the eviction itself), as a share
  of the uncompressed prefill's CPU time in the same profile;
- with ``--timing-repeats N``: interleaved timings of a press that removes nothing (LightKV with the
  published layers at a ratio too small to merge anything: every hook runs, every stage plans and finds
  nothing to merge) against no press: ``N`` rounds, each timing one prefill with and two without the press
  (order rotated; the second uncompressed prefill gives an A/A ratio, the comparison's noise floor) and
  then ``--decode-steps`` pairs of adjacent decode steps on the uncompressed prefill's cache, one step
  with the press attached and one without (ABBA order); paired ratios with 95% bootstrap intervals.
  Pairing adjacent steps keeps the machine's load out of the decode ratio (rounds of a prefill and 8
  steps at batch 8 moved by ±5% on a shared 2-core machine).

Usage: ``python benchmarks/op_counts.py [--batches 1,8] [--device cpu|cuda] [--timing-repeats 10]``.
On a GPU, ``--sync-debug`` sets ``torch.cuda.set_sync_debug_mode("warn")`` while the presses run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::unique", "aten::_unique2", "aten::masked_select")


_READS = ("tolist", "item", "cpu", "__bool__", "__int__", "__float__", "numpy")


@contextlib.contextmanager
def _host_reads(counter: list[int]):
    """Count calls of the tensor methods that read a tensor on the host (``.tolist()``, ``.item()``,
    ``.cpu()``, ``bool()``/``int()``/``float()``, ``.numpy()``): on a GPU each one on a device tensor is a
    synchronisation, and ``.tolist()``/``.cpu()`` do not show as an aten sync op. On CPU host tensors are
    counted too, so this is an upper bound."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(fn):
        def inner(self, *a, **k):
            counter[0] += 1
            return fn(self, *a, **k)

        return inner

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _count(fn) -> tuple[int, int, float, float, int]:
    """(aten ops, sync ops, CPU ms of top-level lightkv ranges, CPU ms of everything, host reads) of ``fn()``."""
    reads = [0]
    with profile(activities=[ProfilerActivity.CPU]) as prof, _host_reads(reads):
        t0 = time.perf_counter()
        fn()
        total_ms = (time.perf_counter() - t0) * 1e3
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    ranges = [e for e in events if e.name.startswith("lightkv::") and not _inside_lightkv(e)]
    step_ms = sum(e.cpu_time_total for e in ranges) / 1e3
    return len(aten), sum(1 for e in aten if e.name in SYNC_OPS), step_ms, total_ms, reads[0]


def _inside_lightkv(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("lightkv::"):
            return True
        p = p.cpu_parent
    return False


def _out_cache(out):
    """The KV cache of a model output: ``cache`` (transformers >= 5.24; ``past_key_values`` is its deprecated
    alias there) or ``past_key_values`` (earlier)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _measure(model, inputs, press, cache_kwarg):
    """Prefill (ops, syncs, step ms, total ms) and decode-step (ops, syncs) under one press context."""
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        model(**inputs, use_cache=True)  # warm-up
        holder = {}
        prefill = _count(lambda: holder.setdefault("out", model(**inputs, use_cache=True)))
        out = holder["out"]
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        kw = cache_kwarg(model.forward, _out_cache(out))
        decode = _count(lambda: model(input_ids=nxt, attention_mask=mask, use_cache=True, **kw))
    return prefill, decode


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_prefill(model, inputs, press, device):
    """(ms of one prefill under ``press``, its output) with the last position's logits only."""
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        _sync(device)
        t0 = time.perf_counter()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _decode_pairs(model, inputs, out, press, cache_kwarg, steps: int, device) -> list[tuple[float, float]]:
    """``steps`` pairs of adjacent greedy decode steps on one cache, one with ``press`` attached, one without.

    Valid for a press that removed nothing: its decode hooks then do the same work whether or not its own
    prefill filled the cache. Adjacent steps see the same load; the order alternates (ABBA) so the one-token
    growth of the cache between the two steps of a pair cancels. Returns (ms without, ms with) per pair.
    """
    nxt = out.logits[:, -1:].argmax(-1)
    mask = inputs["attention_mask"]
    kw = cache_kwarg(model.forward, _out_cache(out))
    pairs = []
    with torch.no_grad():
        for i in range(steps):
            ms = {}
            for attached in (False, True) if i % 2 == 0 else (True, False):
                with press(model) if attached else contextlib.nullcontext():
                    mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                    _sync(device)
                    t0 = time.perf_counter()
                    step = model(input_ids=nxt, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
                    nxt = step.logits[:, -1:].argmax(-1)
                    _sync(device)
                    ms[attached] = (time.perf_counter() - t0) * 1e3
            pairs.append((ms[False], ms[True]))
    return pairs


def _ratio_ci(ratios: list[float], resamples: int = 2000) -> str:
    """Median of paired ratios with a percentile-bootstrap 95% interval of the median (seeded)."""
    import random

    from lightkv_cli.scoring.stats import percentile

    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return f"{statistics.median(ratios):.3f} [{percentile(meds, 0.025):.3f}, {percentile(meds, 0.975):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="cpu-small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="", help="comma-separated subset of the registry (default: all)")
    ap.add_argument("--timing-repeats", type=int, default=0)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--sync-debug", action="store_true")
    args = ap.parse_args()
    from lightkv_cli import LightKV
    from lightkv_cli.engine.bench import build_model, synthetic_inputs
    from lightkv_cli.methods.hf_compat import cache_kwarg
    from lightkv_cli.methods.registry import METHODS, make_press

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(2)
    bm = build_model(args.arch, device=args.device, dtype=args.dtype)
    model = bm.model
    device = torch.device(args.device)
    names = [m for m in args.methods.split(",") if m] or list(METHODS)
    if args.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    print(f"{args.arch}, {args.dtype}, {args.device}; every method at target 0.55; counts from torch.profiler\n")
    print(
        "| method | batch | prefill aten ops (+ vs none, % of none) | prefill sync ops (+) | prefill host reads (+) "
        "| decode-step ops (+, % of none) | decode sync ops (+) | decode host reads (+) "
        "| compression step CPU ms (% of prefill) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = synthetic_inputs(bm, batch, 1)
        rows = {}
        for name in [None, *names]:
            press = None if name is None else make_press(name, model, target=0.55)
            rows[name] = _measure(model, inputs, press, cache_kwarg)
        (bpo, bps, _, bpt, bpr), (bdo, bds, _, _, bdr) = rows[None]
        for name, ((po, ps, step, _, pr), (do, ds, _, _, dr)) in rows.items():
            print(
                f"| {name or 'uncompressed'} | {batch} | {po} ({po - bpo:+d}, {100 * (po - bpo) / bpo:+.1f}%) "
                f"| {ps} ({ps - bps:+d}) | {pr} ({pr - bpr:+d}) "
                f"| {do} ({do - bdo:+d}, {100 * (do - bdo) / bdo:+.1f}%) | {ds} ({ds - bds:+d}) | {dr} ({dr - bdr:+d}) "
                f"| {step:.1f} ({100 * step / bpt:.1f}%) |"
            )
    if args.timing_repeats:
        print(
            f"\nA press that removes nothing (LightKV, published layers, ratio 1e-9) vs no press, interleaved, "
            f"{args.timing_repeats} rounds of one prefill each and {args.decode_steps} adjacent decode-step pairs; "
            "median paired ratio [95% CI]:\n"
        )
        print(
            "| batch | prefill ratio | A/A prefill ratio (none / none) | decode ratio | prefill ms none / press "
            "| decode ms/step none / press |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        from lightkv_cli.models.adapters import adapter_for

        L = adapter_for(model).num_layers
        layers = [round(L * 3 / 8), round(L * 9 / 16), round(L * 3 / 4)]
        idle = LightKV(layers=layers, windows=[4, 2, 1], ratios=[1e-9] * 3)
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = synthetic_inputs(bm, batch, 1)
            for p in (None, idle):
                _time_prefill(model, inputs, p, device)  # warm-up
            # A third condition, the uncompressed prefill again ("A/A"), gives the comparison's noise floor.
            pre, dec, conds = {None: [], "idle": [], "again": []}, [], [None, "idle", "again"]
            for i in range(args.timing_repeats):
                for c in conds[i % 3 :] + conds[: i % 3]:
                    ms, out = _time_prefill(model, inputs, idle if c == "idle" else None, device)
                    pre[c].append(ms)
                    if c is None:  # decode pairs at once: no cache but the running one is alive in a prefill
                        dec += _decode_pairs(model, inputs, out, idle, cache_kwarg, args.decode_steps, device)
                    del out
            med = statistics.median
            print(
                f"| {batch} | {_ratio_ci([b / a for a, b in zip(pre[None], pre['idle'])])} "
                f"| {_ratio_ci([b / a for a, b in zip(pre[None], pre['again'])])} "
                f"| {_ratio_ci([b / a for a, b in dec])} | {med(pre[None]):.1f} / {med(pre['idle']):.1f} "
                f"| {med(a for a, _ in dec):.2f} / {med(b for _, b in dec):.2f} |"
            )


if __name__ == "__main__":
    main()
