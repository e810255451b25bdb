"""Local checkpoint directories checked before transformers reads them: a damaged ``config.json`` or
missing weights is one line naming the file, not a traceback or a "not in the cache" message.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightkv_cli.errors import UserError
from lightkv_cli.models.adapters import supported_families

#: Weight files a checkpoint directory may hold (one of them is enough; ``model-00001-of-…`` shards
#: come with an index).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_checkpoint_dir(path: Path, weights: bool = True) -> None:
    """Refuse a local checkpoint directory whose ``config.json`` is not a JSON object with a
    ``model_type``, or (``weights``) that holds no weight file.

    Raises:
        UserError: one line naming the file and what is wrong.
    """
    config = Path(path) / "config.json"
    fix = "copy the checkpoint's config.json again"
    try:
        data = json.loads(config.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read '{config}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"'{config}' is not UTF-8 text (a binary or damaged file); {fix}") from None
    except (ValueError, RecursionError) as exc:
        raise UserError(f"'{config}' is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"'{config}' holds a JSON {type(data).__name__}, not an object with a model_type; {fix}")
    if not isinstance(data.get("model_type"), str):
        raise UserError(
            f'\'{config}\' has no "model_type" (e.g. "llava"), so its architecture is unknown; {fix} '
            f"(supported: {', '.join(supported_families())})"
        )
    if weights:
        for f in sorted(Path(path).glob("*.safetensors")):
            _check_safetensors(f)
    if weights and not any((Path(path) / f).is_file() for f in _WEIGHT_FILES):
        raise UserError(
            f"'{path}' has no weights ({' or '.join(_WEIGHT_FILES[::2])}); copy the checkpoint's weight files into "
            "it, or add --init random to plan memory and latency without them"
        )


def damaged_checkpoint(source: str, exc: Exception) -> UserError:
    """The one-line error for a checkpoint in ``source`` that ``exc`` says cannot be loaded."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(
        f"cannot load the checkpoint in '{source}' ({type(exc).__name__}: {first[:200]}); a file is truncated or "
        "damaged: copy (or download) the checkpoint again"
    )


def _check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header is damaged or whose tensors end past the end of the file
    (a truncated copy or download), reading only the header.

    Raises:
        UserError: naming the file.
    """
    fix = "the file is truncated or damaged: copy (or download) it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"'{path}' is not a valid safetensors file (damaged header); {fix}")
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__"
        and isinstance(t, dict)
        and isinstance(t.get("data_offsets"), list)
        and len(t["data_offsets"]) == 2
        and isinstance(t["data_offsets"][1], int)
    ]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise UserError(f"'{path}' holds {size:,} bytes but its tensors need {need:,}; {fix}")
