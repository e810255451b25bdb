"""Options of ``lightkv profile`` and ``lightkv sweep`` on where the model comes from (``--revision``,
``--offline``) and what it is asked (``--system-prompt``, ``--followup``); the other shared options are in
:mod:`lightkv_cli.cli.common`."""

from __future__ import annotations

from typing import Annotated

import typer

RevisionOpt = Annotated[
    str | None,
    typer.Option(help="Branch, tag or commit of a Hugging Face Hub model to load (default: its default branch)."),
]


OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Download nothing: use only the Hugging Face cache (as HF_HUB_OFFLINE=1 does).",
    ),
]


FollowupOpt = Annotated[
    str | None,
    typer.Option(
        "--followup",
        metavar="QUESTION",
        help="A follow-up question asked after each answer from the same compressed cache (no second prefill), "
        "scored against the uncompressed model's follow-up answer; a prompts line's \"followup\" takes precedence.",
    ),
]


SystemPromptOpt = Annotated[
    str | None,
    typer.Option(
        "--system-prompt",
        metavar="TEXT",
        help="System prompt of every conversation (the chat template's system message; put before the family's "
        "default prompt when the checkpoint has no template).",
    ),
]


DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        metavar="auto|balanced|balanced_low_0|sequential",
        help="Place a model larger than one device over all available devices with accelerate (CPU and disk "
        "offload when they do not hold it).",
    ),
]
