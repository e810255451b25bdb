"""Peak memory of a block (the CUDA caching allocator's peak on GPU, the process's peak resident set
size on CPU), the memory budget of a device, bytes, and what an out-of-memory failure looks like on
either. Measures; never prints.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
from collections.abc import Sequence
from types import TracebackType

import torch

from lightkv_cli.errors import UserError
from lightkv_cli.measure.device import as_device, is_cuda

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
        others: further CUDA devices measured alongside ``device`` (a model placed over several GPUs with
            ``--device-map``); ``peak_bytes`` stays ``device``'s.
        per_device: with ``others``, the allocator peak of every measured device (``"cuda:0"`` → bytes), set
            on exit; empty otherwise.
    """

    def __init__(self, device: torch.device | str | None = None, others: Sequence[torch.device] = ()) -> None:
        self.device = as_device(device) or torch.device("cpu")
        self.others = [d for d in (as_device(o) for o in others) if d is not None and is_cuda(d) and d != self.device]
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None
        self.kind: str | None = None
        self.per_device: dict[str, int] = {}

    @property
    def kind_label(self) -> str:
        """Human-readable text for ``kind`` (e.g. "GPU allocator peak"); "" before enter."""
        return _KIND_LABELS.get(self.kind or "", "")

    def __enter__(self) -> PeakMemory:
        self.peak_bytes = None
        if is_cuda(self.device):
            self.kind = "cuda_allocator"
            for d in self.others:
                torch.cuda.reset_peak_memory_stats(d)
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
            if self.others:
                self.per_device = {str(self.device): self.peak_bytes}
                self.per_device.update({str(d): int(torch.cuda.max_memory_allocated(d)) for d in self.others})
            return
        if self.kind == "process_rss_peak":
            hwm_kb = _read_proc_status_kb("VmHWM")
            if hwm_kb is not None:
                self.peak_bytes = hwm_kb * 1024
                return
            self.kind = "process_rss_lifetime_peak"
        self.peak_bytes = _rusage_max_rss_bytes()


def system_memory_bytes() -> int | None:
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
    dev = as_device(device) or torch.device("cpu")
    if is_cuda(dev):
        props = torch.cuda.get_device_properties(dev)
        return int(props.total_memory), f"detected: {props.name}"
    total = system_memory_bytes()
    if total is None:
        raise UserError("cannot read the size of the system memory; give it with --gpu-memory (e.g. 64GB)")
    return int(total), "system memory (CPU)"


#: What an allocation failure says when it arrives as a plain ``RuntimeError`` (lower case): PyTorch's
#: CPU allocator ("DefaultCPUAllocator: can't allocate memory", "not enough memory: you tried to
#: allocate"), CUDA errors and cuBLAS/cuDNN workspace failures, the MPS backend.
_OOM_PHRASES = ("out of memory", "can't allocate memory", "not enough memory", "alloc_failed", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure on any device: ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``
    (Python), a ``RuntimeError`` from PyTorch's CPU allocator or a CUDA/cuBLAS allocation."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(p in text for p in _OOM_PHRASES)
    return False


def out_of_memory_text(exc: BaseException, limit: int = 200) -> str:
    """``"out of memory: <first line of the error>"``, shortened to about ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    # PyTorch's CPU allocator prefixes "[enforce fail at alloc_cpu.cpp:NN] ."
    text = text.split("] . ", 1)[-1] if text.startswith("[enforce fail") else text
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text if text.lower().startswith("out of memory") else f"out of memory: {text}"


def free_memory(device: torch.device | str | None) -> None:
    """Give back what a failed run left: collect garbage, and on CUDA empty the allocator's cache.
    Call it after the exception is gone (its traceback holds the failed run's tensors)."""
    gc.collect()
    dev = as_device(device) or torch.device("cpu")
    if is_cuda(dev):
        torch.cuda.empty_cache()
