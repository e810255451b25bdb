"""Options of the two passes of a sweep (``--batch-size``, ``--timing-inputs``, ``--timing-batch``), shared by
``lightkv profile`` and ``lightkv sweep``, and their parsing into :class:`~lightkv_cli.engine.plan.SweepSettings`
fields."""

from __future__ import annotations

from typing import Annotated

import typer

from lightkv_cli.cli.common import parse_int_list
from lightkv_cli.errors import UserError

BatchSizeOpt = Annotated[
    str,
    typer.Option(
        "--batch-size",
        help="Rows per batch of the quality pass (every input generated once, greedy, in left-padded batches of "
        "inputs with the same vision-token count): a number, or auto (8 on a CPU; on a GPU what half its free "
        "memory holds, at most 32). 1 runs every input alone.",
    ),
]


TimingInputsOpt = Annotated[
    str,
    typer.Option(
        "--timing-inputs",
        help="Inputs the timing pass measures (chosen across the vision-token counts, the same for every run), or all.",
    ),
]


TimingBatchOpt = Annotated[
    str,
    typer.Option(
        "--timing-batch",
        help="Batch sizes the timing pass measures, comma-separated, e.g. 1,8 (the first gives the headline times).",
    ),
]


def pass_settings(batch_size: str, timing_inputs: str, timing_batch: str) -> dict:
    """The ``batch_size``, ``timing_inputs`` and ``timing_batches`` of
    :class:`~lightkv_cli.engine.plan.SweepSettings` from ``--batch-size``, ``--timing-inputs`` and
    ``--timing-batch``.

    Raises:
        UserError: a value that is not a whole number ≥ 1 (or ``auto`` / ``all``).
    """

    def count(text: str, option: str, word: str) -> int | None:
        text = str(text).strip().lower()
        if text == word:
            return None
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise UserError(f"{option} takes a whole number of at least 1 or {word}, got '{text}'")
        return value

    batches = parse_int_list(timing_batch, "--timing-batch")
    if not batches or min(batches) < 1:
        raise UserError(f"--timing-batch takes batch sizes of at least 1, e.g. 1,8; got '{timing_batch}'")
    return {
        "batch_size": count(batch_size, "--batch-size", "auto"),
        "timing_inputs": count(timing_inputs, "--timing-inputs", "all"),
        "timing_batches": batches,
    }
