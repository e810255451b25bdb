"""Measurement primitives: wall-clock timers, peak memory, analytic FLOPs, environment facts.

* ``Stopwatch`` times a block in milliseconds, synchronizing CUDA around it so the time
  covers the GPU work launched inside.
* ``Spread`` summarizes repeated timings (median and interquartile range).
* ``PeakMemory`` reports the peak memory of one block: the CUDA caching allocator's peak
  on GPU, the process's peak resident set size (RSS) on CPU.
* ``prefill_flops`` and ``kv_bytes_per_token`` are analytic counts from a text-decoder config.
* ``environment_info`` records what the numbers were measured on; ``nvml_environment`` adds
  the NVML view of the GPU (name, driver).
* ``NvmlSampler`` samples device memory and utilization through NVML in a background
  thread while a block runs (the whole device, not only this process).
* ``parse_memory_size``, ``detect_memory_budget`` and ``max_concurrent_requests`` turn a
  memory budget and per-request KV bytes into a capacity estimate.

This module measures and returns values; it never prints.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from types import TracebackType
from typing import Any, Sequence

import torch

from lightkv_cli.errors import UserError

__all__ = [
    "NvmlSampler",
    "PeakMemory",
    "Spread",
    "Stopwatch",
    "detect_memory_budget",
    "environment_info",
    "kv_bytes_per_token",
    "max_concurrent_requests",
    "nvml_environment",
    "parse_memory_size",
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


# --------------------------------------------------------------------------------------------
# NVML: device memory and utilization, as the driver sees them
# --------------------------------------------------------------------------------------------

_NVML_CPU_NOTE = "NVML not sampled: the model runs on CPU"
_NVML_JOIN_TIMEOUT_S = 2.0


class _NvmlUnavailable(Exception):
    """NVML cannot be used; ``str(error)`` is the note to record."""


def _describe_error(exc: BaseException) -> str:
    """``str(exc)``, or the class name when that is empty or fails (``pynvml.NVMLError.__str__`` can raise)."""
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - describing an error must not raise another
        text = ""
    return text or type(exc).__name__


def _as_text(value: Any) -> str:
    """NVML strings are ``bytes`` in old pynvml releases and ``str`` in new ones."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _pci_bus_id(device: torch.device) -> str:
    """NVML PCI bus id ("00000000:3B:00.0") of a CUDA device, from torch's device properties."""
    props = torch.cuda.get_device_properties(device)
    return f"{int(props.pci_domain_id):08X}:{int(props.pci_bus_id):02X}:{int(props.pci_device_id):02X}.0"


def _open_nvml(device: torch.device) -> tuple[Any, Any]:
    """Initialize NVML and return ``(pynvml module, device handle)`` for a CUDA ``device``.

    The handle is looked up by PCI bus id (``CUDA_VISIBLE_DEVICES`` can make torch's device
    index differ from NVML's), falling back to ``nvmlDeviceGetHandleByIndex(device.index or 0)``.
    On success the caller owns one ``nvmlInit`` and must call ``nvmlShutdown``.

    Raises:
        _NvmlUnavailable: pynvml is not installed, ``nvmlInit`` failed (no driver) or no handle
            could be obtained; NVML is shut down again before raising.
    """
    try:
        import pynvml
    except ImportError as exc:
        raise _NvmlUnavailable(
            f"NVML not available: the nvidia-ml-py package is not installed ({_describe_error(exc)})"
        ) from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError, OSError from a broken driver, ...
        raise _NvmlUnavailable(f"NVML not available: {_describe_error(exc)}") from exc
    try:
        try:
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(_pci_bus_id(device))
        except Exception:  # noqa: BLE001 - any failure: fall back to the index
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception as exc:
        _nvml_shutdown(pynvml)
        raise _NvmlUnavailable(f"NVML not available: no handle for {device} ({_describe_error(exc)})") from exc
    except BaseException:
        _nvml_shutdown(pynvml)
        raise
    return pynvml, handle


def _nvml_shutdown(pynvml: Any) -> None:
    """``pynvml.nvmlShutdown()``, ignoring its errors (nothing useful can be done about them)."""
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()


def nvml_environment(device: torch.device | str | None) -> dict[str, Any]:
    """What NVML reports about the GPU the model runs on, for the results' ``environment.nvml``.

    Initializes NVML, reads the device name and the driver version, and shuts NVML down.
    ``pynvml`` is imported only when ``device`` is a CUDA device.

    Args:
        device: the device the model runs on (None or a CPU device: NVML is not queried).

    Returns:
        ``{"available": bool, "note": str | None, "device_name": str | None,
        "driver": str | None}``. Unavailable (CPU device, pynvml missing, no driver, no handle):
        ``available`` False, ``note`` says why, name and driver None. Never raises for an
        NVML failure.
    """
    out: dict[str, Any] = {"available": False, "note": None, "device_name": None, "driver": None}
    dev = _as_device(device)
    if not _is_cuda(dev):
        out["note"] = _NVML_CPU_NOTE
        return out
    assert dev is not None
    try:
        pynvml, handle = _open_nvml(dev)
    except _NvmlUnavailable as exc:
        out["note"] = str(exc)
        return out
    try:
        out["device_name"] = _as_text(pynvml.nvmlDeviceGetName(handle))
        out["driver"] = _as_text(pynvml.nvmlSystemGetDriverVersion())
        out["available"] = True
    except Exception as exc:  # noqa: BLE001
        out["device_name"] = out["driver"] = None
        out["note"] = f"NVML not available: {_describe_error(exc)}"
    finally:
        _nvml_shutdown(pynvml)
    return out


# One NVML sample: (t_ms since the sampler started, device memory used in bytes, GPU utilization in %).
NvmlSample = tuple[float, int, int | None]


def _max_or_none(values: Sequence[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _downsample(samples: Sequence[NvmlSample], max_points: int) -> list[NvmlSample]:
    """Shrink a timeline to at most ``max_points`` points, keeping every peak.

    The samples are split, in order, into ``min(len(samples), max_points)`` buckets of equal
    count (sizes differ by at most one; bucket ``i`` holds indices ``[i·n//k, (i+1)·n//k)``).
    Each bucket becomes one point: its first timestamp, its largest memory use and its largest
    utilization (None when no sample of the bucket has one). So the maximum of the timeline is
    always kept. A timeline already short enough is returned unchanged (as a new list).

    Args:
        samples: ``(t_ms, used_bytes, utilization_pct)`` tuples in time order.
        max_points: the most points to return, ≥ 1.

    Returns:
        The downsampled list of ``(t_ms, used_bytes, utilization_pct)``.

    Raises:
        ValueError: if ``max_points < 1``.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be ≥ 1, got {max_points}")
    n = len(samples)
    if n <= max_points:
        return list(samples)
    out: list[NvmlSample] = []
    for i in range(max_points):
        bucket = samples[i * n // max_points : (i + 1) * n // max_points]
        out.append((bucket[0][0], max(s[1] for s in bucket), _max_or_none([s[2] for s in bucket])))
    return out


class NvmlSampler:
    """Context manager sampling a GPU's memory use and utilization through NVML while its block runs.

    A background daemon thread reads, every ``interval_ms``,
    ``nvmlDeviceGetMemoryInfo(handle).used`` (bytes of device memory in use by *every*
    process on the GPU, CUDA context included, so it is larger than the allocator peak of
    ``PeakMemory``) and ``nvmlDeviceGetUtilizationRates(handle).gpu`` (percent of the last
    sample period in which a kernel ran). One sample is also taken synchronously on enter and
    one on exit, so even a very short block has at least two. Timestamps are milliseconds
    since enter (``time.perf_counter``).

    The device handle is found by the PCI bus id of the torch device (indices can differ
    between torch and NVML under ``CUDA_VISIBLE_DEVICES``), else by ``device.index``.

    Never raises for NVML problems: on a CPU device, without pynvml, without a driver, or when
    the first sample fails, ``available`` is False and ``note`` says why. If a sample fails in
    the thread, sampling stops, the samples so far are kept and ``note`` says what happened.
    On exit (any exit, including an exception or ``KeyboardInterrupt`` in the block) the thread
    is stopped and joined (up to 2 s) and NVML is shut down; the block's exception propagates.
    If the thread is stuck in an NVML call and does not stop in time, NVML is left initialized
    (shutting it down under a running call is unsafe) and ``note`` says so.

    Usage::

        with NvmlSampler(device, interval_ms=20) as nvml:
            model.generate(**inputs)
        run["nvml"] = nvml.to_dict()

    Args:
        device: the device the model runs on; None or a CPU device → not sampled.
        interval_ms: sampling period in milliseconds, > 0.
        max_points: the most timeline points ``to_dict`` returns, ≥ 1.

    Attributes:
        available: True when NVML sampled the device; set on enter.
        note: why NVML was not available, or what went wrong while sampling; else None.
        samples: list of ``(t_ms, used_bytes, utilization_pct)`` tuples in time order;
            ``utilization_pct`` is None on devices that do not report utilization (e.g. MIG).

    Raises:
        ValueError: (constructor) if ``interval_ms ≤ 0`` or ``max_points < 1``.
    """

    def __init__(
        self,
        device: torch.device | str | None,
        interval_ms: float = 20.0,
        max_points: int = 2000,
    ) -> None:
        if not interval_ms > 0 or not math.isfinite(interval_ms):
            raise ValueError(f"interval_ms must be a positive number of milliseconds, got {interval_ms}")
        if max_points < 1:
            raise ValueError(f"max_points must be ≥ 1, got {max_points}")
        self.device = _as_device(device)
        self.interval_ms = float(interval_ms)
        self.max_points = int(max_points)
        self.available = False
        self.note: str | None = None
        self.samples: list[NvmlSample] = []
        self._pynvml: Any = None
        self._handle: Any = None
        self._utilization_supported = True
        self._sampling_failed = False
        self._start = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        """Read one (t_ms, used_bytes, utilization_pct) sample and append it; NVML errors propagate."""
        used = int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        utilization: int | None = None
        if self._utilization_supported:
            try:
                utilization = int(self._pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception as exc:  # noqa: BLE001 - e.g. NVMLError_NotSupported on MIG
                self._utilization_supported = False
                self._add_note(f"GPU utilization not reported by NVML: {_describe_error(exc)}")
        t_ms = (time.perf_counter() - self._start) * 1000.0
        with self._lock:
            self.samples.append((t_ms, used, utilization))

    def _add_note(self, text: str) -> None:
        with self._lock:
            self.note = text if self.note is None else f"{self.note}; {text}"

    def _run(self) -> None:
        interval_s = self.interval_ms / 1000.0
        while not self._stop.wait(interval_s):
            try:
                self._sample()
            except Exception as exc:  # noqa: BLE001 - the sampler must never take the program down
                self._sampling_failed = True
                self._add_note(f"NVML sampling stopped early: {_describe_error(exc)}")
                return

    def __enter__(self) -> NvmlSampler:
        self.available = False
        self.note = None
        self.samples = []
        self._utilization_supported = True
        self._sampling_failed = False
        self._stop.clear()
        self._thread = None
        if not _is_cuda(self.device):
            self.note = _NVML_CPU_NOTE
            return self
        assert self.device is not None
        try:
            self._pynvml, self._handle = _open_nvml(self.device)
        except _NvmlUnavailable as exc:
            self.note = str(exc)
            return self
        try:
            self._start = time.perf_counter()
            self._sample()
            self._thread = threading.Thread(target=self._run, name="lightkv-nvml-sampler", daemon=True)
            self._thread.start()
        except Exception as exc:  # noqa: BLE001 - first sample failed: not available
            _nvml_shutdown(self._pynvml)
            self._pynvml = self._handle = None
            self.samples = []
            self.note = f"NVML not available: {_describe_error(exc)}"
            return self
        except BaseException:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=_NVML_JOIN_TIMEOUT_S)
            _nvml_shutdown(self._pynvml)
            self._pynvml = self._handle = None
            raise
        self.available = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._pynvml is None:
            return False
        self._stop.set()
        try:
            stuck = False
            if self._thread is not None:
                self._thread.join(timeout=_NVML_JOIN_TIMEOUT_S)
                stuck = self._thread.is_alive()
            if stuck:
                self._add_note(f"NVML sampler thread did not stop within {_NVML_JOIN_TIMEOUT_S:g} s")
                return False
            try:
                self._sample()
            except Exception as sample_exc:  # noqa: BLE001
                if not self._sampling_failed:
                    self._sampling_failed = True
                    self._add_note(f"NVML sampling stopped early: {_describe_error(sample_exc)}")
            _nvml_shutdown(self._pynvml)
        finally:
            self._pynvml = self._handle = None
        return False

    def to_dict(self) -> dict[str, Any]:
        """The ``run.nvml`` object of the results file (docs/results-schema.md, "NVML").

        Returns:
            Unavailable: ``{"available": False, "note": str}``. Available: ``{"available": True,
            "interval_ms", "samples" (count), "peak_used_bytes", "baseline_used_bytes" (first
            sample), "peak_utilization_pct", "mean_utilization_pct", "timeline": {"t_ms",
            "used_bytes", "utilization_pct"}}``, plus ``"note"`` only when sampling stopped early
            or utilization was not reported. Bytes are ints, percentages numbers (None when the
            device does not report utilization), ``t_ms`` rounded to 0.1 ms; the timeline has at
            most ``max_points`` points and keeps every peak (see ``_downsample``).
        """
        with self._lock:
            samples = list(self.samples)
            note = self.note
        if not self.available or not samples:
            return {"available": False, "note": note}
        used = [s[1] for s in samples]
        utilization = [s[2] for s in samples if s[2] is not None]
        timeline = _downsample(samples, self.max_points)
        out: dict[str, Any] = {
            "available": True,
            "interval_ms": self.interval_ms,
            "samples": len(samples),
            "peak_used_bytes": max(used),
            "baseline_used_bytes": used[0],
            "peak_utilization_pct": max(utilization) if utilization else None,
            "mean_utilization_pct": sum(utilization) / len(utilization) if utilization else None,
            "timeline": {
                "t_ms": [round(p[0], 1) for p in timeline],
                "used_bytes": [p[1] for p in timeline],
                "utilization_pct": [p[2] for p in timeline],
            },
        }
        if note is not None:
            out["note"] = note
        return out


# --------------------------------------------------------------------------------------------
# Capacity planning: how many requests' KV caches fit beside the weights
# --------------------------------------------------------------------------------------------

_MEMORY_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", flags=re.IGNORECASE)
_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_memory_size(text: str, option: str = "--gpu-memory") -> int:
    """Parse a memory size such as ``"80GB"``, ``"79.6 GiB"``, ``"81920MiB"`` or ``"123456789"``.

    Units are case-insensitive and binary: K/KB/KiB = 2**10, M/MB/MiB = 2**20,
    G/GB/GiB = 2**30, T/TB/TiB = 2**40 bytes; B or no unit = bytes. GB means GiB on purpose:
    GPU memory is quoted in binary units (an "80GB" H100 has 80 GiB). Fractions are allowed
    and the result is rounded down to whole bytes.

    Args:
        text: the size as the user wrote it.
        option: the command-line option it came from, named in the error message
            (e.g. ``"--max-kv-bytes"``).

    Returns:
        The size in bytes, ≥ 1.

    Raises:
        UserError: if ``text`` is not a number with an optional known unit, or is zero or
            negative (the message names ``option`` and gives examples).
    """
    hint = "give e.g. 80GB, 24GiB or 81920MiB"
    match = _MEMORY_SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise UserError(f"{option}: {text!r} is not a memory size; {hint}")
    size = math.floor(Fraction(match.group(1)) * _MEMORY_UNITS[unit])
    if size < 1:
        raise UserError(f"{option}: {text!r} is not a positive memory size; {hint}")
    return size


def detect_memory_budget(device: torch.device | str | None) -> tuple[int, str]:
    """The memory a model on ``device`` can use, and where that number came from.

    Args:
        device: the device the model runs on (None = CPU).

    Returns:
        ``(memory_bytes, source)``: on CUDA the GPU's total memory
        (``torch.cuda.get_device_properties(device).total_memory``) and ``"detected: <GPU
        name>"``; on CPU the physical RAM (``/proc/meminfo`` MemTotal, else sysconf) and
        ``"system memory (CPU)"``.

    Raises:
        UserError: on CPU when the physical memory cannot be read (give ``--gpu-memory``).
    """
    dev = _as_device(device) or torch.device("cpu")
    if _is_cuda(dev):
        props = torch.cuda.get_device_properties(dev)
        return int(props.total_memory), f"detected: {props.name}"
    total = _cpu_total_memory_bytes()
    if total is None:
        raise UserError("cannot read the size of the system memory; give it with --gpu-memory (e.g. 64GB)")
    return int(total), "system memory (CPU)"


def max_concurrent_requests(
    memory_bytes: int,
    weight_bytes: int,
    kv_bytes_per_request: float,
    reserve_bytes: int = 0,
) -> int:
    """How many requests' KV caches fit in the memory left beside the weights.

    ``floor((memory_bytes − weight_bytes − reserve_bytes) / kv_bytes_per_request)``, or 0 when
    the weights and reserve alone do not fit. This is an upper bound: it ignores allocator
    fragmentation, the CUDA context, and per-request buffers other than the KV cache.

    Args:
        memory_bytes: the memory budget (e.g. the GPU's total memory), bytes, ≥ 0.
        weight_bytes: bytes held by the model weights, ≥ 0.
        kv_bytes_per_request: K+V bytes one request holds (prefill plus generated tokens), > 0.
        reserve_bytes: bytes kept free for other work, e.g. the activation memory of a
            prefill, ≥ 0.

    Returns:
        The number of requests, an int ≥ 0.

    Raises:
        ValueError: if ``kv_bytes_per_request`` is not a finite number > 0, or a byte count
            is negative.
    """
    if not math.isfinite(kv_bytes_per_request) or kv_bytes_per_request <= 0:
        raise ValueError(f"kv_bytes_per_request must be a finite number > 0, got {kv_bytes_per_request}")
    for name, value in (("memory_bytes", memory_bytes), ("weight_bytes", weight_bytes), ("reserve_bytes", reserve_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be ≥ 0, got {value}")
    free = int(memory_bytes) - int(weight_bytes) - int(reserve_bytes)
    if free <= 0:
        return 0
    # Exact division of the number as written (repr: 0.1 is 1/10, not the binary float just
    # above it), so floor(3 / 0.1) is 30, and float rounding can never add a request.
    kv = Fraction(repr(float(kv_bytes_per_request)))
    return math.floor(Fraction(free) / kv)
