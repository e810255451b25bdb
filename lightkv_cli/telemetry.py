"""Measurement primitives: wall-clock timers, peak memory, analytic FLOPs, environment facts.

* ``Stopwatch`` times a block in milliseconds, synchronizing CUDA around it so the time
  covers the GPU work launched inside.
* ``Spread`` summarizes repeated timings (median and interquartile range).
* ``PeakMemory`` reports the peak memory of one block: the CUDA caching allocator's peak
  on GPU, the process's peak resident set size (RSS) on CPU.
* ``prefill_flops`` and ``kv_bytes_per_token`` are analytic counts from a text-decoder config.
* ``environment_info`` records what the numbers were measured on.

This module measures and returns values; it never prints.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Sequence

import torch

__all__ = [
    "PeakMemory",
    "Spread",
    "Stopwatch",
    "environment_info",
    "kv_bytes_per_token",
    "prefill_flops",
]


def _as_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    return device if isinstance(device, torch.device) else torch.device(device)


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


class Stopwatch:
    """Context manager measuring the wall time of its block, in milliseconds.

    Uses ``time.perf_counter_ns``. When ``device`` is a CUDA device, calls
    ``torch.cuda.synchronize(device)`` on enter and on exit, so the time includes the GPU
    work queued inside the block (and none queued before it).

    Usage::

        with Stopwatch(device) as sw:
            model(**inputs)
        sw.ms  # float, milliseconds

    Attributes:
        device: the device synchronized, or None (no synchronization).
        ms: elapsed wall time in milliseconds; None until the block exits.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = _as_device(device)
        self.ms: float | None = None
        self._start_ns: int | None = None

    def __enter__(self) -> Stopwatch:
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
        self.ms = None
        self._start_ns = time.perf_counter_ns()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
        end_ns = time.perf_counter_ns()
        assert self._start_ns is not None
        self.ms = (end_ns - self._start_ns) / 1e6


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default, ``method="linear"``), q in [0, 1]."""
    position = q * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


@dataclass
class Spread:
    """Distribution of repeated measurements (e.g. latencies in ms; the unit is the input's).

    Attributes:
        median: 50th percentile.
        p25: 25th percentile.
        p75: 75th percentile.
        min: smallest value.
        max: largest value.
        n: number of values.
    """

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Summarize ``values`` with linear-interpolated percentiles (as ``numpy.percentile``).

        Args:
            values: one or more numbers, any order.

        Returns:
            A ``Spread`` in the same unit as ``values``.

        Raises:
            ValueError: if ``values`` is empty.
        """
        ordered = sorted(float(v) for v in values)
        if not ordered:
            raise ValueError("Spread.of needs at least one value")
        return cls(
            median=_percentile(ordered, 0.5),
            p25=_percentile(ordered, 0.25),
            p75=_percentile(ordered, 0.75),
            min=ordered[0],
            max=ordered[-1],
            n=len(ordered),
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain-number dict for JSON output."""
        return asdict(self)


_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"

_KIND_LABELS = {
    "cuda_allocator": "GPU allocator peak",
    "process_rss_peak": "process RSS peak (CPU)",
    "process_rss_lifetime_peak": "process RSS lifetime peak (CPU, not reset per run)",
}


def _read_proc_status_kb(field: str) -> int | None:
    """Value of ``field`` (e.g. "VmHWM") from /proc/self/status in kB, or None if unavailable."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) via /proc/self/clear_refs; True on success."""
    try:
        with open(_PROC_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _read_proc_status_kb("VmHWM") is not None


def _rusage_max_rss_bytes() -> int:
    """Lifetime peak RSS of this process in bytes (ru_maxrss is kB on Linux, bytes on macOS)."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024


class PeakMemory:
    """Context manager reporting the peak memory used during its block, in bytes.

    What is measured depends on the device, and is named by ``.kind``:

    * ``"cuda_allocator"`` (CUDA device): ``torch.cuda.reset_peak_memory_stats(device)`` on
      enter, ``torch.cuda.max_memory_allocated(device)`` on exit: the peak of tensor memory
      held by PyTorch's caching allocator on that GPU (excludes the CUDA context and the
      allocator's cached-but-free blocks).
    * ``"process_rss_peak"`` (CPU, Linux): the process's peak resident set size is reset on
      enter by writing ``"5"`` to ``/proc/self/clear_refs``, and ``VmHWM`` is read from
      ``/proc/self/status`` on exit. This is the whole process's peak RSS during the block,
      so it includes everything already resident on entry (interpreter, libraries, weights).
    * ``"process_rss_lifetime_peak"`` (CPU fallback, when the reset is unavailable: not
      Linux, or no permission): ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` on exit. This
      is the peak over the process's whole lifetime and is **not** reset per run, so it
      never decreases between runs and may reflect an earlier, larger run.

    Attributes:
        device: the device measured (CPU when None was given).
        peak_bytes: peak in bytes; None until the block exits.
        baseline_bytes: memory in use on entry, in bytes (CUDA: allocated bytes; CPU: VmRSS,
            or None when unavailable), so ``peak_bytes - baseline_bytes`` is the block's growth.
        kind: one of the kinds above; set on enter.
        kind_label: human-readable description of ``kind``.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = _as_device(device) or torch.device("cpu")
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None
        self.kind: str | None = None

    @property
    def kind_label(self) -> str:
        """Human-readable text for ``kind`` (e.g. "GPU allocator peak"); "" before enter."""
        return _KIND_LABELS.get(self.kind or "", "")

    def __enter__(self) -> PeakMemory:
        self.peak_bytes = None
        if _is_cuda(self.device):
            self.kind = "cuda_allocator"
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self.kind = "process_rss_peak" if _reset_rss_peak() else "process_rss_lifetime_peak"
        rss_kb = _read_proc_status_kb("VmRSS")
        self.baseline_bytes = None if rss_kb is None else rss_kb * 1024
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.kind == "cuda_allocator":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.kind == "process_rss_peak":
            hwm_kb = _read_proc_status_kb("VmHWM")
            if hwm_kb is not None:
                self.peak_bytes = hwm_kb * 1024
                return
            self.kind = "process_rss_lifetime_peak"
        self.peak_bytes = _rusage_max_rss_bytes()


def _decoder_config(config: Any) -> Any:
    """The text-decoder config: ``config.get_text_config(decoder=True)`` when available, else ``config``."""
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config(decoder=True)
        except TypeError:
            return get_text_config()
    return config


def _attention_dims(text_config: Any) -> tuple[int, int, int, int]:
    """(hidden_size D, num_attention_heads H, num_key_value_heads H_kv, head_dim d)."""
    hidden = int(text_config.hidden_size)
    heads = int(text_config.num_attention_heads)
    kv_heads = getattr(text_config, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else int(kv_heads)
    head_dim = getattr(text_config, "head_dim", None)
    head_dim = hidden // heads if head_dim is None else int(head_dim)
    return hidden, heads, kv_heads, head_dim


def prefill_flops(text_config: Any, seq_lens: Sequence[int], batch_size: int = 1) -> int:
    """Analytic FLOPs of a prefill through the decoder layers (multiply-add = 2 FLOPs).

    Decoder layer ``l`` processes ``seq_lens[l]`` tokens (lets a method that drops tokens
    between layers report its saving). With ``n`` tokens, ``D = hidden_size``,
    ``H = num_attention_heads``, ``H_kv = num_key_value_heads`` (default ``H``),
    ``d = head_dim`` (else ``D // H``), ``I = intermediate_size``, one layer costs:

    * q, k, v, o projections: ``2·n·D·(H·d) + 2·2·n·D·(H_kv·d) + 2·n·(H·d)·D``
    * causal attention, counting only the ``n(n+1)/2`` visible query-key pairs:
      ``2·2·H·d·n(n+1)/2`` (scores QKᵀ and the weighted sum of V)
    * gated MLP (gate, up, down): ``3·2·n·D·I``

    The sum over layers is multiplied by ``batch_size``, and the LM head for the last
    position only is added: ``2·D·vocab_size·batch_size``. Not counted: the vision encoder
    and projector, embeddings, norms, softmax, rotary embeddings, activations, residual adds.

    Args:
        text_config: a text-decoder config (e.g. ``LlamaConfig``); a multimodal config with
            ``get_text_config()`` is also accepted.
        seq_lens: tokens processed by each decoder layer, length ``num_hidden_layers``.
        batch_size: sequences in the batch (each with these lengths), ≥ 1.

    Returns:
        FLOPs as an int.

    Raises:
        ValueError: if ``len(seq_lens) != num_hidden_layers``, a length is negative, or
            ``batch_size < 1``.
    """
    config = _decoder_config(text_config)
    num_layers = int(config.num_hidden_layers)
    if len(seq_lens) != num_layers:
        raise ValueError(f"seq_lens has {len(seq_lens)} entries but the model has {num_layers} decoder layers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    hidden, heads, kv_heads, head_dim = _attention_dims(config)
    intermediate = int(config.intermediate_size)
    vocab = int(config.vocab_size)

    total = 0
    for layer, n in enumerate(seq_lens):
        n = int(n)
        if n < 0:
            raise ValueError(f"seq_lens[{layer}] is negative ({n})")
        projections = (
            2 * n * hidden * (heads * head_dim)
            + 2 * 2 * n * hidden * (kv_heads * head_dim)
            + 2 * n * (heads * head_dim) * hidden
        )
        attention = 2 * 2 * heads * head_dim * (n * (n + 1) // 2)
        mlp = 3 * 2 * n * hidden * intermediate
        total += projections + attention + mlp
    return total * batch_size + 2 * hidden * vocab * batch_size


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Bytes of K and V cached for one token in one decoder layer: ``2·H_kv·d·element_size``.

    Args:
        text_config: a text-decoder config (``num_key_value_heads``, ``head_dim`` or
            ``hidden_size // num_attention_heads``); multimodal configs are unwrapped with
            ``get_text_config()``.
        dtype: the cache's element dtype (e.g. ``torch.float16`` → 2 bytes).

    Returns:
        Bytes per token per layer, as an int.
    """
    _, _, kv_heads, head_dim = _attention_dims(_decoder_config(text_config))
    return 2 * kv_heads * head_dim * dtype.itemsize


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Facts about the software and hardware a measurement ran on.

    Args:
        device: the device the model ran on.

    Returns:
        A JSON-ready dict with keys ``python``, ``torch``, ``transformers`` (version strings;
        ``transformers`` None if not installed), ``platform``, ``device`` (e.g. "cuda:0"),
        ``device_name`` (GPU name on CUDA; CPU model name from /proc/cpuinfo, else
        ``platform.processor()``), ``cpu_count``, ``total_memory_bytes`` (GPU memory on CUDA;
        physical RAM on CPU; None if unknown), and ``cuda`` (bool).
    """
    dev = _as_device(device) or torch.device("cpu")
    cuda = _is_cuda(dev)
    if cuda:
        device_name = torch.cuda.get_device_name(dev)
        total_memory: int | None = int(torch.cuda.get_device_properties(dev).total_memory)
    else:
        device_name = _cpu_model_name()
        total_memory = _cpu_total_memory_bytes()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "total_memory_bytes": total_memory,
        "cuda": cuda,
    }
