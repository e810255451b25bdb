"""The prompts file: one JSON object per line (``image``, ``question``, optional ``answer``, ``type`` and
``tags``), validated with ``file:line`` in every message. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lightkv_cli.errors import UserError
from lightkv_cli.inputs.images import resolved_path
from lightkv_cli.text import first_bad_unicode, printable

#: The question asked about each image when the user gives no prompts file.
DEFAULT_PROMPT = "Describe this image in one sentence."


#: The question asked about each video when the user gives no prompt.
DEFAULT_VIDEO_PROMPT = "Describe this video in one sentence."


_PROMPT_KEYS = ("image", "question", "answer", "type", "tags", "followup", "followup_answer")


#: The longest question a prompts line (or ``--prompt``) may ask, in characters. Longer text is almost
#: surely a mistake (a whole document pasted in); what fits the model is checked once it is loaded.
MAX_QUESTION_CHARS = 16_000


@dataclass(frozen=True)
class PromptItem:
    """One line of a prompts file: an image, the question to ask about it and an optional reference answer.

    ``image`` is the resolved path (it exists, but has not been decoded yet); ``line`` is the 1-based line
    number in the prompts file, or 0 when the item was not read from a file. ``type`` (one group, e.g.
    ``"counting"``) and ``tags`` (any number of labels, in file order, duplicates dropped) let a report break
    quality down by kind of question; None and ``()`` when the line gives none. ``followup`` is a second
    question about the same image, asked after the model's answer from the same (compressed) cache, with
    an optional expected ``followup_answer``; None when the line gives none.
    """

    image: Path
    question: str
    answer: str | None
    line: int
    type: str | None = None
    tags: tuple[str, ...] = ()
    followup: str | None = None
    followup_answer: str | None = None


_EXAMPLE_LINE = '{"image": "cat.png", "question": "What animal is this?", "answer": "cat"}'


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_text(value: str, what: str, where: str) -> str:
    """``value`` if it is valid Unicode text (and, for a question, not longer than
    :data:`MAX_QUESTION_CHARS`).

    Args:
        value: the text.
        what: names it in the message, e.g. ``'"question"'`` or ``"--prompt"``.
        where: starts the message (``"file.jsonl:3"``; empty for an option).

    Raises:
        UserError: a lone surrogate (e.g. ``"\\ud800"`` in a JSON string), or a question that is too long.
    """
    head = f"{where}: " if where else ""
    bad = first_bad_unicode(value)
    if bad is not None:
        raise UserError(
            f"{head}{what} is not valid Unicode text: character {bad + 1} is a lone surrogate "
            f"({printable(value[bad])}); remove it or write the character itself, saved as UTF-8"
        )
    if "\x00" in value:
        raise UserError(f"{head}{what} holds a NUL character (\\u0000); remove it")
    if what in ('"question"', "--prompt") and len(value) > MAX_QUESTION_CHARS:
        raise UserError(
            f"{head}{what} is {len(value):,} characters long; lightkv takes questions of at most "
            f"{MAX_QUESTION_CHARS:,} characters: shorten it"
        )
    return value


def _exists(path: Path, value: str, where: str) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"{where}: image '{printable(value)}' is not a usable path ({reason}); fix the path") from None


def _resolve_image(value: str, prompts_path: Path, image_root: Path | None, where: str) -> Path:
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        if _exists(candidate, value, where):
            return candidate
        raise UserError(f"{where}: image '{value}' not found (looked in {candidate.parent}); fix the path")
    bases: list[Path] = [prompts_path.parent]
    if image_root is not None:
        bases.append(image_root)
    bases.append(Path("."))
    looked: list[Path] = []
    seen: set[Path] = set()
    for base in bases:
        key = resolved_path(base)
        if key in seen:
            continue
        seen.add(key)
        looked.append(base)
        path = base / candidate
        if _exists(path, value, where):
            return path
    places = ", ".join(f"'{resolved_path(b)}'" for b in looked)
    raise UserError(
        f"{where}: image '{value}' not found (looked in {places}); fix the path or give an image root folder"
    )


def _type_and_tags(obj: dict, where: str) -> tuple[str | None, tuple[str, ...]]:
    """The optional ``"type"`` (a non-empty string or null) and ``"tags"`` (an array of non-empty strings or
    null) of one prompts line; duplicate tags are dropped, first occurrence kept.

    Raises:
        UserError: a value of the wrong type, or an empty string (message starts with ``where``).
    """
    kind = obj.get("type")
    if kind is not None:
        if not isinstance(kind, str):
            raise UserError(
                f'{where}: "type" must be a string, got {_type_name(kind)}; give one group name like "type": "counting"'
            )
        if not kind.strip():
            raise UserError(f'{where}: "type" is empty; give a group name like "counting" or leave "type" out')
        check_text(kind, '"type"', where)
    raw = obj.get("tags")
    if raw is None:
        return kind, ()
    if not isinstance(raw, list):
        raise UserError(
            f'{where}: "tags" must be an array of strings, got {_type_name(raw)}; '
            'write it like "tags": ["ocr", "small"]'
        )
    tags: list[str] = []
    for i, tag in enumerate(raw):
        if not isinstance(tag, str):
            raise UserError(f'{where}: "tags"[{i}] must be a string, got {_type_name(tag)}; put it in quotes')
        if not tag.strip():
            raise UserError(f'{where}: "tags"[{i}] is empty; give a non-empty label or remove it')
        check_text(tag, f'"tags"[{i}]', where)
        if tag not in tags:
            tags.append(tag)
    return kind, tuple(tags)


def text_line(path: Path, offset: int) -> int:
    """The 1-based line of byte ``offset`` of the file ``path`` (for a message about a decoding error)."""
    try:
        with open(path, "rb") as f:
            return f.read(offset).count(b"\n") + 1
    except OSError:
        return 1


def load_prompts(path: str | Path, image_root: Path | None = None) -> list[PromptItem]:
    """Read a JSON-lines prompts file.

    Each non-blank line that does not start with ``#`` must be an object
    ``{"image": str, "question": str, "answer": str (optional), "type": str (optional), "tags": [str, ...]
    (optional)}``. ``answer`` may also be a number (converted with ``str``) or ``null`` (no answer); ``type``
    and ``tags`` may be ``null`` (none). A relative ``image`` is looked up next to the
    prompts file, then under ``image_root`` (a folder, or a file whose folder is used), then in the
    current directory; the first existing path wins. Images are only checked for existence, not
    decoded — use :func:`load_image` for that.

    Raises:
        UserError: the file does not exist, cannot be read, is not UTF-8, has no items, or a line is
            invalid (message starts with ``"<path>:<line>:"`` and says how to fix it).
    """
    prompts_path = Path(path).expanduser()
    if not prompts_path.exists():
        raise UserError(f"prompts file '{path}' does not exist")
    if prompts_path.is_dir():
        raise UserError(f"prompts file '{path}' is a directory; give a .jsonl file with one JSON object per line")
    try:
        text = prompts_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = text_line(prompts_path, exc.start)
        raise UserError(
            f"prompts file '{printable(path)}' is not UTF-8 text (line {line}: {exc.reason}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read prompts file '{path}' ({exc.strerror or exc})") from exc

    root: Path | None = None
    if image_root is not None:
        root = Path(image_root).expanduser()
        if root.is_file():
            root = root.parent

    items: list[PromptItem] = []
    # split on "\n" only: JSON strings may legally contain other Unicode line separators.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                f"each line must be one JSON object like {_EXAMPLE_LINE}"
            ) from None
        except RecursionError:
            raise UserError(
                f"{where}: invalid JSON (nested too deeply); write one flat object like {_EXAMPLE_LINE}"
            ) from None
        if not isinstance(obj, dict):
            raise UserError(
                f"{where}: expected a JSON object, got {_type_name(obj)}; write one object per line like "
                f"{_EXAMPLE_LINE}"
            )
        unknown = [k for k in obj if k not in _PROMPT_KEYS]
        if unknown:
            names = ", ".join(f"'{printable(k)}'" for k in unknown)
            allowed = ", ".join(f"'{k}'" for k in _PROMPT_KEYS)
            raise UserError(f"{where}: unknown key(s) {names}; allowed keys are {allowed}")

        values: dict[str, str] = {}
        for key in ("image", "question"):
            if key not in obj:
                raise UserError(f'{where}: missing "{key}"; every line needs "image" and "question" strings')
            value = obj[key]
            if not isinstance(value, str):
                raise UserError(f'{where}: "{key}" must be a string, got {_type_name(value)}; put it in quotes')
            if not value.strip():
                raise UserError(f'{where}: "{key}" is empty; give a non-empty string')
            values[key] = check_text(value, f'"{key}"', where)

        answer_value = obj.get("answer")
        answer: str | None
        if answer_value is None:
            answer = None
        elif isinstance(answer_value, str):
            if not answer_value.strip():
                raise UserError(f'{where}: "answer" is empty; give the expected answer, or leave "answer" out')
            answer = check_text(answer_value, '"answer"', where)
        elif isinstance(answer_value, (int, float)) and not isinstance(answer_value, bool):
            answer = str(answer_value)
        else:
            raise UserError(
                f'{where}: "answer" must be a string, a number or null, got {_type_name(answer_value)}; '
                "put the expected answer in quotes"
            )

        kind, tags = _type_and_tags(obj, where)
        followup = _optional_text(obj, "followup", where)
        followup_answer = _optional_text(obj, "followup_answer", where, numbers=True)
        if followup_answer is not None and followup is None:
            raise UserError(f'{where}: "followup_answer" without "followup"; add the follow-up question')
        image = _resolve_image(values["image"], prompts_path, root, where)
        items.append(
            PromptItem(
                image=image,
                question=values["question"],
                answer=answer,
                line=number,
                type=kind,
                tags=tags,
                followup=followup,
                followup_answer=followup_answer,
            )
        )

    if not items:
        raise UserError(f"prompts file '{path}' is empty (no JSON lines); add one object per line like {_EXAMPLE_LINE}")
    return items


def _optional_text(obj: dict, key: str, where: str, numbers: bool = False) -> str | None:
    """An optional non-empty string field of a prompts line (a number too when ``numbers``), or None.

    Raises:
        UserError: an empty string, or a value of another type.
    """
    value = obj.get(key)
    if value is None:
        return None
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f'{where}: "{key}" must be a string, got {_type_name(value)}; put it in quotes')
    if not value.strip():
        raise UserError(f'{where}: "{key}" is empty; give a non-empty string, or leave "{key}" out')
    return check_text(value, f'"{key}"', where)
