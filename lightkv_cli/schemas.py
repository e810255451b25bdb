"""Shared by the pydantic models of lightkv's file formats (results, profiles, sweep configurations):
a validation error as one line that names the field, the closest valid name and the fix. No torch.
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel, ValidationError

from lightkv_cli.errors import UserError


def _nested_models(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through ``X | None``, ``list[X]``, ``Annotated[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at ``loc`` (a pydantic error location) of ``model``, for "did you mean".

    Returns:
        The names, or an empty list when ``loc`` does not lead to a model.
    """
    cls: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        info = cls.model_fields.get(str(part))
        nested = _nested_models(info.annotation) if info is not None else []
        cls = nested[0] if nested else None
    return list(cls.model_fields) if cls else []


def explain(exc: ValidationError, model: type[BaseModel], where: str, fix: str) -> UserError:
    """One line for the first validation error of ``exc``: which key, what is wrong, how to fix it.

    Args:
        exc: what ``model.model_validate`` raised.
        model: the model that was validated (to list the valid field names of an unknown key).
        where: the file, e.g. ``profile 'profiles/x.toml'``; starts the line.
        fix: what to do, ends the line for a missing or wrong value.

    Returns:
        The :class:`UserError` to raise (``unknown field 'a.b'; did you mean ...``, ``missing field``,
        or ``field 'a.b': <what is wrong> (got <value>)``).
    """
    # A misspelt key shows up both as unknown and as missing: name the unknown one, it is the cause.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = fields_at(model, loc)
        near = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        return UserError(f"{where}: unknown field '{key}'; {hint}valid fields here: {', '.join(known)}")
    if err["type"] == "missing":
        return UserError(f"{where}: missing field '{key}'; {fix}")
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "value_error" and isinstance(value, (dict, list)):  # a whole section: the message says it
        return UserError(f"{where}: field '{key}': {msg}; {fix}")
    got = repr(value)
    got = got if len(got) <= 80 else got[:79] + "…"
    return UserError(f"{where}: field '{key}': {msg} (got {got}); {fix}")
