"""Performance benchmark: LightKV against the uncompressed model, in one process, on the current device.

For an architecture built with random weights (weights change neither memory nor time), every
(batch size, images per prompt) cell runs the uncompressed model, LightKV at the published schedule
and LightKV at other target retentions, and measures:

* time to first token / prefill time and decode ms/token over ``new_tokens`` greedy tokens with EOS
  disabled (medians over repeats after warm-up); the methods of one (batch, images) combination run
  interleaved, round by round, and their ratios to the uncompressed run are medians of per-round
  paired ratios with bootstrap intervals;
* KV bytes after prefill for the whole batch (total and vision) and the measured vision retention;
* the analytic prefill FLOPs of the decoder (:func:`~lightkv_cli.measure.costs.prefill_flops`, from
  the tokens each layer processed), so that the prefill time ratio can be read beside the FLOPs ratio;
* the allocator peak (``torch.cuda.max_memory_allocated``, reset per generation) and the NVML peak;
* the largest batch that fits in device memory, found by doubling then bisection with
  ``torch.OutOfMemoryError`` caught (GPU only: a CPU has no device-memory limit to find);
* where the compression step's time goes, from ``torch.profiler`` ranges ``lightkv::*``.

Synthetic inputs (random pixels, a fixed text prompt around the image tokens) are used: the numbers
depend on the sequence lengths, not on the content. This module measures and returns dictionaries;
the ``lightkv bench`` command prints and writes them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightkv_cli.errors import UserError
from lightkv_cli.measure.nvml import NvmlSampler
from lightkv_cli.methods.lightkv import LightKV
from lightkv_cli.runtime import greedy_generate
from lightkv_cli.scoring.stats import Spread

#: Architectures the benchmark can build, name → (loader alias or None for built in code, description).
ARCHITECTURES = {
    "llava-1.5-7b": "LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config, random weights; 32 layers, 576 vision tokens)",
    "cpu-small": "LLaVA architecture at CPU scale: the tiny CLIP tower (576 vision tokens) and a 32-layer, 256-wide "
    "Llama decoder",
}
#: The published LightKV schedule for 32-layer LLaVA models (METHODS.md).
PUBLISHED = dict(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
PROMPT_TOKENS = 48  # text tokens around the images (a typical short question)


@dataclass
class BenchModel:
    """A model ready to benchmark: the module, its device and dtype, and its image token id."""

    name: str
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    image_token_id: int
    vision_tokens_per_image: int
    image_size: int
    vocab_size: int
    weight_bytes: int


def build_model(arch: str, device: str = "auto", dtype: str = "auto") -> BenchModel:
    """Build ``arch`` (see :data:`ARCHITECTURES`) with random weights on ``device`` in ``dtype``.

    Raises:
        UserError: an unknown architecture, or not enough memory (from the loader).
    """
    from lightkv_cli.models.loader import load_model, resolve_device, resolve_dtype

    if arch == "llava-1.5-7b":
        lm = load_model("llava", init="random", device=device, dtype=dtype)
        model, dev, dt = lm.model, lm.device, lm.dtype
    elif arch == "cpu-small":
        from transformers import LlavaForConditionalGeneration

        from lightkv_cli.models.tiny import build_config, build_tokenizer

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        config = build_config(build_tokenizer())
        config.text_config.num_hidden_layers = 32
        config.text_config.layer_types = None
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(device=dev, dtype=dt).eval()
    else:
        raise UserError(f"unknown architecture '{arch}'; known: {', '.join(ARCHITECTURES)}")
    cfg = model.config
    vision = cfg.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    return BenchModel(
        name=arch,
        model=model,
        device=dev,
        dtype=dt,
        image_token_id=cfg.image_token_id,
        vision_tokens_per_image=per_image,
        image_size=vision.image_size,
        vocab_size=cfg.get_text_config().vocab_size,
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )


def synthetic_inputs(bm: BenchModel, batch: int, images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` prompts with ``images`` images each: random pixels, fixed text tokens.

    Returns:
        ``input_ids`` ``(batch, S)``, ``attention_mask`` ``(batch, S)`` and ``pixel_values``
        ``(batch·images, 3, H, W)`` on the model's device, where
        ``S = PROMPT_TOKENS + images·vision_tokens_per_image``.
    """
    g = torch.Generator().manual_seed(seed)
    low = 5  # above the special tokens
    text = torch.randint(low, bm.vocab_size, (PROMPT_TOKENS,), generator=g)
    text[text == bm.image_token_id] = low
    head, tail = text[: PROMPT_TOKENS // 4], text[PROMPT_TOKENS // 4 :]
    parts = [head]
    for _ in range(images):
        parts.append(torch.full((bm.vision_tokens_per_image,), bm.image_token_id))
        parts.append(tail[:2])
    parts.append(tail[2:])
    row = torch.cat(parts)[: PROMPT_TOKENS + images * bm.vision_tokens_per_image]
    ids = row.unsqueeze(0).expand(batch, -1).contiguous()
    pixels = torch.randn(batch * images, 3, bm.image_size, bm.image_size, generator=g)
    return {
        "input_ids": ids.to(bm.device),
        "attention_mask": torch.ones_like(ids).to(bm.device),
        "pixel_values": pixels.to(device=bm.device, dtype=bm.dtype),
    }


def method_grid(bm: BenchModel, retentions: Sequence[float]) -> list[tuple[str, LightKV | None]]:
    """``[("uncompressed", None), ("lightkv-published", press), ("lightkv@R", press), ...]``."""
    L = bm.model.config.get_text_config().num_hidden_layers
    out: list[tuple[str, LightKV | None]] = [("uncompressed", None)]
    if L == 32:
        press = LightKV(**PUBLISHED)
        press.predict(bm.model)
        out.append(("lightkv-published", press))
    for r in retentions:
        out.append((f"lightkv@{r:g}", LightKV.for_retention(r, bm.model)))
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_interleaved(
    bm: BenchModel,
    presses: Sequence[LightKV | None],
    batch: int,
    images: int,
    new_tokens: int,
    repeats: int,
    warmup: int,
    nvml_interval_ms: float = 20.0,
) -> list[dict]:
    """Time and size every press's (method, batch, images) cell, interleaved (DESIGN.md, "Measuring honestly").

    ``warmup`` runs of each press, then ``repeats`` rounds in which every press runs once, in an order
    rotated by one each round, on the same inputs: round ``r`` of two presses saw the same machine, so
    their per-round ratio is a paired one (a machine whose load drifts moves both).

    Returns:
        One dict per press: ``{"status": "ok", "prefill_ms", "decode_ms_per_token" (Spreads),
        "prefill_rounds", "decode_rounds" (ms per round, for paired ratios), "kv_bytes",
        "kv_bytes_vision" (whole batch, after prefill), "vision_retention", "flops_prefill" (analytic
        decoder FLOPs of the whole batch's prefill), "peak_memory_bytes", "peak_memory_kind",
        "nvml_peak_used_bytes"}``, or ``{"status": "oom" | "error", "error"}`` (the others go on).
    """
    from lightkv_cli.measure.costs import prefill_flops

    inputs = synthetic_inputs(bm, batch, images)
    n_vis = images * bm.vision_tokens_per_image
    n = len(presses)
    runs: list[dict] = [{"prefill": [], "decode": [], "peaks": [], "nvml": [], "res": None} for _ in presses]
    failed: list[dict | None] = [None] * n

    def once(i: int, timed: bool) -> None:
        try:
            with NvmlSampler(bm.device, interval_ms=nvml_interval_ms) as sampler:
                res = greedy_generate(
                    bm.model, inputs, n_vis, new_tokens, None, press=presses[i], suppress_token_ids=[bm.image_token_id]
                )
        except torch.OutOfMemoryError as exc:
            failed[i] = {"status": "oom", "error": str(exc).splitlines()[0] if str(exc) else "out of memory"}
            _free(bm.device)
            return
        except Exception as exc:  # recorded, so that one failing cell does not lose the benchmark
            failed[i] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            _free(bm.device)
            return
        if timed:
            r = runs[i]
            r["prefill"].append(res.prefill_ms)
            r["decode"].append(res.decode_ms)
            r["peaks"].append(res.peak_memory_bytes)
            r["nvml"].append(sampler.to_dict())
            r["res"] = res

    for i in range(n):
        for _ in range(warmup):
            if failed[i] is None:
                once(i, timed=False)
    for rnd in range(repeats):
        for i in [*range(rnd % n, n), *range(rnd % n)]:
            if failed[i] is None:
                once(i, timed=True)
    out = []
    for i, r in enumerate(runs):
        if failed[i] is not None or r["res"] is None:
            out.append(failed[i] or {"status": "error", "error": "no timed run (repeats = 0)"})
            continue
        c, decode = r["res"].cache, [t for step in r["decode"] for t in step]
        nv = [x for x in r["nvml"] if x.get("available")]
        out.append(
            {
                "status": "ok",
                "prefill_ms": Spread.of(r["prefill"]).to_dict(),
                "decode_ms_per_token": Spread.of(decode).to_dict() if decode else None,
                "prefill_rounds": list(r["prefill"]),
                "decode_rounds": [sum(step) / len(step) if step else None for step in r["decode"]],
                "kv_bytes": c.total_bytes * batch,
                "kv_bytes_vision": c.vision_bytes * batch,
                "vision_retention": c.vision_retention,
                "layer_seq_lens": list(c.layer_seq_lens),
                "flops_prefill": prefill_flops(bm.model.config, c.processed_seq_lens or c.layer_seq_lens, batch),
                "peak_memory_bytes": max(r["peaks"]),
                "peak_memory_kind": r["res"].peak_memory_kind,
                "nvml_peak_used_bytes": max(x["peak_used_bytes"] for x in nv) if nv else None,
                "nvml_note": r["nvml"][-1].get("note"),
            }
        )
    _free(bm.device)
    return out


def largest_batch(fits: Callable[[int], bool], limit: int = 4096) -> tuple[int, list[int]]:
    """The largest batch ``b ≤ limit`` with ``fits(b)``, assuming fitting is monotone in ``b``.

    Doubles from 1 until a batch does not fit, then bisects between the last fit and the first
    failure.

    Returns:
        ``(largest, probes)``; ``largest`` is 0 when even batch 1 does not fit.
    """
    probes: list[int] = []

    def probe(b: int) -> bool:
        probes.append(b)
        return fits(b)

    if not probe(1):
        return 0, probes
    good, bad = 1, None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good, probes
        if probe(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, probes


def compression_profile(bm: BenchModel, press: LightKV, batch: int, images: int) -> dict:
    """Where the compression step's time goes in one prefill, from ``torch.profiler`` ranges.

    Returns:
        ``{"ranges": {name: {"cpu_ms", "device_ms", "calls"}}, "stage_ms": total of lightkv::stage +
        lightkv::mask (device time on GPU, CPU time otherwise)}``.
    """
    from torch.profiler import ProfilerActivity, profile

    inputs = synthetic_inputs(bm, batch, images)
    n_vis = images * bm.vision_tokens_per_image
    greedy_generate(bm.model, inputs, n_vis, 1, None, press=press, suppress_token_ids=[bm.image_token_id])  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bm.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        greedy_generate(bm.model, inputs, n_vis, 1, None, press=press, suppress_token_ids=[bm.image_token_id])
    ranges = {}
    for evt in prof.key_averages():
        if evt.key.startswith("lightkv::"):
            device_us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0) or 0
            ranges[evt.key] = {
                "cpu_ms": evt.cpu_time_total / 1000.0,
                "device_ms": device_us / 1000.0,
                "calls": evt.count,
            }
    use_device = bm.device.type == "cuda"
    stage = sum(
        (r["device_ms"] if use_device else r["cpu_ms"])
        for k, r in ranges.items()
        if k in ("lightkv::stage", "lightkv::mask")
    )
    del inputs
    _free(bm.device)
    return {"ranges": ranges, "stage_ms": stage, "clock": "device" if use_device else "cpu"}


def run_benchmark(
    bm: BenchModel,
    batches: Sequence[int],
    images_per_prompt: Sequence[int],
    retentions: Sequence[float],
    new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    search_batch: bool | None = None,
    profile_batch: int | None = 8,
    on_progress: Callable[[str], None] | None = None,
    results_path=None,
) -> dict:
    """The whole benchmark (see module docstring) as a JSON-ready dictionary.

    Args:
        search_batch: search the largest batch that fits (default: on CUDA only).
        profile_batch: batch size of the ``torch.profiler`` breakdown (the largest configured batch
            up to it); None skips the breakdown.
        on_progress: called with a short description before each measurement.
        results_path: when given, the results are written there (atomically) after every cell, so
            an interrupted benchmark keeps what it measured.
    """
    from lightkv_cli.measure.environment import environment_info
    from lightkv_cli.results import write_json_atomic

    note = on_progress or (lambda msg: None)
    methods = method_grid(bm, retentions)
    search = bm.device.type == "cuda" if search_batch is None else search_batch
    cells: list[dict] = []
    out = {
        "schema": "lightkv.bench/1",
        "architecture": bm.name,
        "description": ARCHITECTURES[bm.name],
        "environment": {**environment_info(bm.device), "dtype": str(bm.dtype).replace("torch.", "")},
        "weight_bytes": bm.weight_bytes,
        "settings": {
            "batches": list(batches),
            "images_per_prompt": list(images_per_prompt),
            "retentions": list(retentions),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "prompt_tokens": PROMPT_TOKENS,
        },
        "cells": cells,
        "largest_batch": [] if search else None,
        "largest_batch_note": None if search else "not searched: on CPU there is no device-memory limit to find",
        "compression_breakdown": None,
        "complete": False,
    }

    def save() -> None:
        if results_path is not None:
            write_json_atomic(results_path, out)

    from lightkv_cli.measure.paired import paired_ratio

    for images in images_per_prompt:
        for batch in batches:
            note(f"{len(methods)} methods interleaved · batch {batch} · {images} image(s)")
            measured = measure_interleaved(bm, [p for _, p in methods], batch, images, new_tokens, repeats, warmup)
            base = measured[0] if measured[0]["status"] == "ok" else None
            for (name, press), m in zip(methods, measured):
                row = {
                    "method": name,
                    "batch": batch,
                    "images": images,
                    "schedule": None
                    if press is None
                    else {
                        "layers": press.layers,
                        "windows": press.windows,
                        "ratios": [round(r, 6) for r in press.ratios],
                    },
                    "expected_retention": 1.0 if press is None else press.expected_retention,
                    **m,
                }
                if base is not None and m["status"] == "ok":
                    # paired per round (the same machine state), median with a bootstrap interval
                    for key, rounds in (("prefill", "prefill_rounds"), ("decode", "decode_rounds")):
                        pr = paired_ratio([m[rounds]], [base[rounds]])
                        row[f"{key}_ratio"] = pr.median if pr else None
                        row[f"{key}_ratio_interval"] = [pr.low, pr.high] if pr else None
                    row["flops_ratio"] = m["flops_prefill"] / base["flops_prefill"]
                    row["kv_ratio"] = m["kv_bytes"] / base["kv_bytes"]
                    row["kv_vision_ratio"] = m["kv_bytes_vision"] / base["kv_bytes_vision"]
                    row["peak_ratio"] = (
                        m["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] else None
                    )
                cells.append(row)
            save()
    if search:
        for images in images_per_prompt:
            for name, press in methods[:2]:
                note(f"largest batch · {name} · {images} image(s)")

                def fits(b: int, press=press, images=images) -> bool:
                    return measure_interleaved(bm, [press], b, images, new_tokens, 1, 0)[0]["status"] == "ok"

                largest, probes = largest_batch(fits)
                out["largest_batch"].append(
                    {"method": name, "images": images, "largest_batch": largest, "probes": probes}
                )
                save()
    if profile_batch and len(methods) > 1:
        b = max([x for x in batches if x <= profile_batch] or [min(batches)])
        note(f"torch.profiler breakdown · batch {b}")
        breakdown = compression_profile(bm, methods[1][1], b, images_per_prompt[0])
        base = next(
            (
                c
                for c in cells
                if c["method"] == "uncompressed"
                and c["batch"] == b
                and c["images"] == images_per_prompt[0]
                and c["status"] == "ok"
            ),
            None,
        )
        breakdown.update(
            {
                "method": methods[1][0],
                "batch": b,
                "images": images_per_prompt[0],
                "uncompressed_prefill_ms": base["prefill_ms"]["median"] if base else None,
            }
        )
        if base:
            breakdown["share_of_uncompressed_prefill"] = breakdown["stage_ms"] / base["prefill_ms"]["median"]
        out["compression_breakdown"] = breakdown
    out["complete"] = True
    save()
    return out


def time_vs_flops(bench: dict, method: str = "lightkv-published") -> list[dict]:
    """Prefill time ratio beside prefill FLOPs ratio (both against uncompressed) of ``method``, per cell.

    The issue-16 check: on a device where the compression step costs what it should, the prefill time
    ratio is close to the FLOPs ratio. Time includes the vision encoder, which no method shortens and
    the decoder FLOPs estimate leaves out, so it sits slightly above the FLOPs ratio even for a free
    compression step.

    Args:
        bench: a :func:`run_benchmark` result (or its JSON).
        method: the cells' method name.

    Returns:
        One ``{"batch", "images", "prefill_ratio", "interval" (its 95% bootstrap interval, or None),
        "flops_ratio", "difference"}`` per finished cell of
        ``method`` (``difference`` = time ratio − FLOPs ratio), in the result's order.
    """
    rows = []
    for c in bench.get("cells", []):
        if (
            c.get("method") != method
            or c.get("status") != "ok"
            or c.get("flops_ratio") is None
            or c.get("prefill_ratio") is None
        ):
            continue
        rows.append(
            {
                "batch": c["batch"],
                "images": c["images"],
                "prefill_ratio": c["prefill_ratio"],
                "interval": c.get("prefill_ratio_interval"),
                "flops_ratio": c["flops_ratio"],
                "difference": c["prefill_ratio"] - c["flops_ratio"],
            }
        )
    return rows


__all__ = [
    "ARCHITECTURES",
    "BenchModel",
    "build_model",
    "compression_profile",
    "largest_batch",
    "measure_interleaved",
    "method_grid",
    "run_benchmark",
    "synthetic_inputs",
    "time_vs_flops",
]
