"""Wall-clock timing of a block in milliseconds, synchronising CUDA around it so the time covers
the GPU work launched inside. Measures; never prints.
"""

from __future__ import annotations

import time
from types import TracebackType

import torch

from lightkv_cli.measure.device import as_device, is_cuda


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
