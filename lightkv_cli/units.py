"""Memory sizes as people write them (``80GB``, ``200MiB``), parsed to bytes and formatted back.
No torch: the command line and the report read it.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from lightkv_cli.errors import UserError

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
