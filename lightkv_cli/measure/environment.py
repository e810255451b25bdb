"""What the numbers were measured on: device, CPU, memory, library versions."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from lightkv_cli.measure.device import as_device, is_cuda
from lightkv_cli.measure.memory import system_memory_bytes


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
    dev = as_device(device) or torch.device("cpu")
    cuda = is_cuda(dev)
    if cuda:
        device_name = torch.cuda.get_device_name(dev)
        total_memory: int | None = int(torch.cuda.get_device_properties(dev).total_memory)
    else:
        device_name = _cpu_model_name()
        total_memory = system_memory_bytes()
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
