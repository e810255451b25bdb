"""Wall-clock timing of a block in milliseconds, synchronising CUDA around it so the time covers
the GPU work launched inside; named profiler ranges that cost nothing when no profiler records.
Measures; never prints.
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType

import torch

from lightkv_cli.measure.device import as_device, is_cuda


def profile_range(name: str) -> contextlib.AbstractContextManager:
    """A ``torch.profiler`` range named ``name`` while a profiler records, else a no-op context.

    ``torch.profiler.record_function`` dispatches two profiler ops even when nothing records
    (about 10-100 µs of CPU per range inside a model's forward, measured on CPU): a method's own
    cost must not include it. The check is one C++ call (< 0.1 µs).
    """
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


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
        self.device = as_device(device)
        self.ms: float | None = None
        self._start_ns: int | None = None

    def __enter__(self) -> Stopwatch:
        if is_cuda(self.device):
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
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
        end_ns = time.perf_counter_ns()
        assert self._start_ns is not None
        self.ms = (end_ns - self._start_ns) / 1e6
