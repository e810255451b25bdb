"""NVML: the GPU as the driver sees it (name, driver version) and a background sampler of device
memory and utilisation over time (the whole device, not only this process). No NVML (CPU, no driver,
no nvidia-ml-py) is a note, never an error. Measures; never prints.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch

from lightkv_cli.measure.device import as_device, is_cuda

_NVML_CPU_NOTE = "NVML not sampled: the model runs on CPU"


_NVML_JOIN_TIMEOUT_S = 2.0


class _NvmlUnavailable(Exception):
    """NVML cannot be used; ``str(error)`` is the note to record."""


def _describe_error(exc: BaseException) -> str:
    """``str(exc)``, or the class name when that is empty or fails (``pynvml.NVMLError.__str__`` can raise)."""
    try:
        text = str(exc).strip()
    except Exception:
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
        except Exception:
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
    dev = as_device(device)
    if not is_cuda(dev):
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
    except Exception as exc:
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
        self.device = as_device(device)
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
            except Exception as exc:
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
            except Exception as exc:
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
        if not is_cuda(self.device):
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
        except Exception as exc:
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
            except Exception as sample_exc:
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
