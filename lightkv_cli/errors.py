"""Errors the command line turns into one clear line instead of a traceback."""

from __future__ import annotations


class LightKVError(Exception):
    """Base class for every error lightkv raises on purpose."""


class UserError(LightKVError, ValueError):
    """A mistake in what the user asked for (bad path, unknown model, invalid option value).

    The CLI prints ``str(error)`` as one red line (the message should name the problem and the fix)
    and exits with status 2. Library callers get an ordinary exception.
    """


class UnsupportedInputError(LightKVError):
    """A model input that a compression method cannot handle (e.g. chunked prefill splitting an image).

    The message names the limit and what to do instead.
    """
