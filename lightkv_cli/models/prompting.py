"""The prompt text sent to the model: the checkpoint's chat template when it has one, else the family's.

A fine-tuned checkpoint of a supported family, or LLaVA-NeXT-Vicuna with its system prompt, must be
profiled with the prompt it was trained on: :func:`build_prompt` renders the conversation with the
processor's (or its tokenizer's) chat template (``apply_chat_template`` with image / video content entries
and the generation prompt) when the checkpoint carries one, and falls back to the family's default template
(:meth:`~lightkv_cli.models.adapters.base.FamilyAdapter.format_prompt`) when it does not. ``system`` (the
``--system-prompt`` option) becomes the conversation's system message, or is put in front of the family
default. The text and where it came from are recorded per input in the results file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightkv_cli.errors import UserError

#: ``BuiltPrompt.source`` values.
CHAT_TEMPLATE, FAMILY_DEFAULT = "chat template", "family default"


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt as sent to the processor.

    Attributes:
        text: the prompt text, image / video placeholders included.
        source: :data:`CHAT_TEMPLATE` (the checkpoint's) or :data:`FAMILY_DEFAULT` (lightkv's per family).
    """

    text: str
    source: str


def chat_template_owner(processor: Any) -> Any | None:
    """The object whose ``apply_chat_template`` renders the checkpoint's template: the processor when it has
    a template, else its tokenizer when that has one; None when the checkpoint has no chat template."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        if owner is not None and getattr(owner, "chat_template", None) and hasattr(owner, "apply_chat_template"):
            return owner
    return None


def build_prompt(
    processor: Any, adapter: Any, question: str, *, num_images: int = 1, num_videos: int = 0, system: str | None = None
) -> BuiltPrompt:
    """The prompt for one question about ``num_images`` images (and ``num_videos`` videos).

    Args:
        processor: the model's processor (or tokenizer).
        adapter: the family adapter (its :meth:`format_prompt` is the fallback).
        question: the user's question.
        num_images: image placeholders in the user turn.
        num_videos: video placeholders (Qwen families).
        system: a system prompt (``--system-prompt``), or None.

    Returns:
        :class:`BuiltPrompt`.

    Raises:
        UserError: the checkpoint's chat template fails to render the conversation (one line naming it).
    """
    owner = chat_template_owner(processor)
    if owner is None:
        text = adapter.format_prompt(question, num_images=num_images, num_videos=num_videos)
        if system:
            text = system.strip() + "\n" + text
        return BuiltPrompt(text, FAMILY_DEFAULT)
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
    try:
        text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template error is the checkpoint's, said in one line
        raise UserError(
            f"the checkpoint's chat template could not render a prompt: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(text, str):  # some versions return a list for a batch of one
        text = text[0]
    return BuiltPrompt(text, CHAT_TEMPLATE)
