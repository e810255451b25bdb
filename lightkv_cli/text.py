"""User text as lightkv shows and writes it: file names that are not valid UTF-8, lone surrogates and
rich markup characters never stop a report or a console line. No torch, no rich.

Python decodes a file name that is not valid UTF-8 with ``surrogateescape`` (byte ``0xe9`` becomes the
lone surrogate ``"\\udce9"``), which cannot be encoded as UTF-8: printed or written as is, it raises
``UnicodeEncodeError``. :func:`printable` shows such bytes escaped (``caf\\xe9.png``).
"""

from __future__ import annotations

import os


def printable(text: object) -> str:
    """``text`` (a string or a path) as a string that encodes as UTF-8: every ``surrogateescape`` byte as
    ``\\xNN``, every other lone surrogate as ``\\uNNNN``; valid text unchanged."""
    s = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    out = []
    for ch in s:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, escaped by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def first_bad_unicode(text: str) -> int | None:
    """The index of the first character of ``text`` that is not valid Unicode text (a lone surrogate,
    as ``"\\ud800"`` in a JSON string gives), or None when it encodes as UTF-8."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start
