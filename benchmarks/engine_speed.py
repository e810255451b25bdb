"""The measurement engine's speed-up (issue 17): the README's demo sweep with the new defaults (batched
quality pass, timing pass on 8 inputs) against the same sweep with ``--batch-size 1 --timing-inputs all``
(every input generated alone, and timed on every input, as before the two passes existed).

Runs both sweeps one after the other in subprocesses (``lightkv profile``), then prints:

- the wall time of each and the speed-up;
- per run: accuracy and answer match of each sweep, and how many of the answers differ between them
  (batched left-padded float32 against batch 1: expected none, or near-ties);
- per run of the new defaults: paired prefill, time-to-first-token and decode ratios to uncompressed with
  their 95% bootstrap intervals;
- the per-generation cost of each pass, and the extrapolated time of a sweep of 1,000 inputs with the same
  runs on this machine.

Usage::

    python benchmarks/engine_speed.py [--limit N] [--out DIR] [--skip-slow]

``--skip-slow`` reuses the slow sweep's results in ``DIR/slow`` (and its wall time from ``DIR/slow.time``).
CPU only here; the numbers are this machine's (recorded in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEMO = ["--methods", "lightkv,lightkv-prompt,lightkv-uniform,random", "--retentions", "1.0,0.9,0.75,0.55,0.4,0.3"]


def run_sweep(out: Path, extra: list[str], limit: int | None) -> float:
    """Run ``lightkv profile`` with the demo settings into ``out``; return its wall time in seconds."""
    cmd = [
        sys.executable,
        "-c",
        "from lightkv_cli.cli import main; main()",
        "profile",
        *DEMO,
        "--output",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    if limit:
        cmd += ["--limit", str(limit)]
    print("$ lightkv", " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _ratio(ratios: dict, key: str) -> str:
    x = ratios.get(key)
    return f"{x['median']:.3f} [{x['low']:.3f}, {x['high']:.3f}]" if x else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use the first N demo questions (default: all 200)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/lightkv-engine-speed"))
    ap.add_argument("--skip-slow", action="store_true", help="reuse DIR/slow from an earlier run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fast_dir, slow_dir = args.out / "fast", args.out / "slow"
    if args.skip_slow:
        slow_s = float((args.out / "slow.time").read_text())
    else:
        slow_s = run_sweep(slow_dir, ["--batch-size", "1", "--timing-inputs", "all"], args.limit)
        (args.out / "slow.time").write_text(f"{slow_s:.3f}")
    fast_s = run_sweep(fast_dir, [], args.limit)
    fast = json.loads((fast_dir / "results.json").read_text())
    slow = json.loads((slow_dir / "results.json").read_text())
    n = len(fast["inputs"])
    runs = len(fast["runs"])
    print()
    print(
        f"inputs {n}, runs {runs}; CPU: {fast['environment'].get('device_name') or fast['environment'].get('platform')}"
    )
    print(f"quality-pass batch size (new defaults): {fast['quality_pass']['batch_size']}")
    print(f"--batch-size 1 --timing-inputs all: {slow_s:7.1f} s")
    print(f"new defaults:                       {fast_s:7.1f} s")
    print(f"speed-up: {slow_s / fast_s:.2f}x")
    print()
    print(f"{'run':24} {'acc b1':>7} {'acc new':>7} {'match b1':>8} {'match new':>9} {'answers differ':>14}")
    differ_total = 0
    for a, b in zip(slow["runs"], fast["runs"]):
        qa, qb = a.get("quality") or {}, b.get("quality") or {}
        diff = [
            (pa["input"], pa["answer"], pb["answer"])
            for pa, pb in zip(a.get("per_input") or [], b.get("per_input") or [])
            if pa["answer"] != pb["answer"]
        ]
        differ_total += len(diff)
        print(
            f"{a['id']:24} {qa.get('accuracy', float('nan')):7.3f} {qb.get('accuracy', float('nan')):7.3f} "
            f"{qa.get('answer_match', float('nan')):8.3f} {qb.get('answer_match', float('nan')):9.3f} {len(diff):14d}"
        )
        for inp, x, y in diff[:3]:
            print(f"    {inp}: batch 1 {x!r} / batched {y!r}")
    print(f"answers that differ, all runs: {differ_total} of {n * runs}")
    print()
    print("paired ratios to uncompressed (new defaults; median [95% bootstrap interval] over input × round pairs)")
    for r in fast["runs"]:
        tr = r.get("timing_ratio") or {}

        print(
            f"  {r['id']:24} prefill {_ratio(tr, 'prefill'):22} TTFT {_ratio(tr, 'time_to_first_token'):22} "
            f"decode {_ratio(tr, 'decode_ms_per_token')}"
        )
    print()
    timed = len(fast["timing_pass"]["inputs"])
    rounds = fast["timing_pass"]["rounds"]
    # The new defaults' time splits into a per-input quality part and a fixed timing part; the slow sweep's
    # per-input cost (one quality + `rounds` timed generations, all at batch 1) is measured too.
    per_gen_slow = slow_s / (runs * n * (1 + rounds))
    timing_part = runs * timed * (rounds + 1) * per_gen_slow  # rounds + warm-up, at batch 1
    quality_per_input = max(0.0, fast_s - timing_part) / n
    print(f"slow sweep: {per_gen_slow * 1000:.1f} ms per generation at batch 1 (all runs)")
    print(
        f"new defaults: about {quality_per_input * 1000:.1f} ms per input for all {runs} runs' quality pass, "
        f"plus about {timing_part:.0f} s of timing pass"
    )
    est = 1000 * quality_per_input + timing_part
    est_slow = 1000 * runs * (1 + rounds) * per_gen_slow
    print(
        f"extrapolated to 1,000 inputs, {runs} runs, this CPU: new defaults ~{est / 60:.1f} min; "
        f"--batch-size 1 --timing-inputs all ~{est_slow / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
