"""Helpers for tests that read the command line's output (shared by the CLI and demo-model tests)."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _plain(text: str | None) -> str:
    """Text without ANSI codes."""
    return _ANSI.sub("", text or "")


def _flat(text: str | None) -> str:
    """Text without ANSI codes and with all whitespace runs (incl. rich's line wraps) collapsed to one space."""
    return " ".join(_plain(text).split())


def _all_text(result) -> str:
    """stdout and stderr together, robust to Click versions that do or do not mix them into ``output``."""
    out = _plain(result.output)
    try:
        err = _plain(result.stderr)
    except (ValueError, AttributeError):  # older Click without separate stderr
        err = ""
    if err and err not in out:
        out += "\n" + err
    return out


def _stderr(result) -> str:
    try:
        return _plain(result.stderr)
    except (ValueError, AttributeError):  # pragma: no cover - older Click: stderr mixed into output
        return _plain(result.output)


def _assert_user_error(result, *fragments: str) -> str:
    """Exit status 2, exactly one ``error:`` line naming the problem, no traceback. Returns the flat text."""
    text = _all_text(result)
    assert result.exit_code == 2, f"exit {result.exit_code}, exception {result.exception!r}\n{text}"
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [ln for ln in _stderr(result).splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1, f"expected one 'error:' line on stderr, got:\n{text}"
    flat = _flat(text)
    for frag in fragments:
        assert frag in flat, f"{frag!r} not in output:\n{text}"
    return flat
