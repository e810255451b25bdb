"""The results file (``results.json``, schema ``lightkv.results/1``, fields in docs/results-schema.md):
validate, load, write atomically. No torch: ``lightkv report`` and ``lightkv check results.json`` read
results through this module alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightkv_cli import __version__
from lightkv_cli.errors import UserError
from lightkv_cli.files import write_text_atomic

SCHEMA = "lightkv.results/1"


SCHEMA_NAME, SCHEMA_VERSION = "lightkv.results", 1


def check_schema(results: object, where: str) -> dict:
    """Validate that ``results`` is a results dictionary this version can read.

    Raises:
        UserError: not a lightkv results file, or one written by a newer lightkv (newer schema).
    """
    schema = results.get("schema") if isinstance(results, dict) else None
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_NAME + "/"):
        raise UserError(
            f'{where} is not a lightkv results file (no "schema": "{SCHEMA}"); give the results.json a sweep wrote'
        )
    try:
        version = int(schema.split("/", 1)[1])
    except ValueError:
        raise UserError(f"{where}: unknown schema '{schema}'; expected {SCHEMA}") from None
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{where} uses schema {schema}, newer than this lightkv {__version__} reads ({SCHEMA}); "
            "upgrade lightkv (pip install -U lightkv) to read it"
        )
    if not isinstance(results.get("runs"), list):
        raise UserError(f"{where}: the results file has no list of runs; it is damaged or not from lightkv")
    return results


def load_results(path: Path) -> dict:
    """Read and validate a results file.

    Raises:
        UserError: missing or unreadable file, invalid JSON, not a results file, or a newer schema.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"results file '{path}' does not exist; give the results.json a sweep wrote") from None
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON (line {exc.lineno}: {exc.msg}); was the file cut short?") from None
    return check_schema(data, str(path))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (temporary file + rename in the same folder).

    Non-finite numbers (an infinite KL divergence, say) are written as ``null``, since JSON has no
    representation for them.
    """
    write_text_atomic(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
