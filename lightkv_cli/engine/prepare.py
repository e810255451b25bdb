"""Model inputs for every (image, question) pair: the processor's tensors on the model's device, and the
fingerprint that says two sweeps saw the same inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_cli.errors import UserError
from lightkv_cli.inputs import ImageInput, PromptItem, Skipped, VideoInput
from lightkv_cli.measure.timing import Stopwatch
from lightkv_cli.models.loader import LoadedModel
from lightkv_cli.models.prompting import build_prompt


@dataclass
class ProfileInput:
    """One (image, question) pair, with its processor output on the model's device.

    Attributes:
        preprocess_ms: wall time of the processor (image resize/normalise, tokenisation) and the
            copy to the device, milliseconds; part of the time to first token.
        type, tags: the prompts line's group and labels (:class:`~lightkv_cli.inputs.PromptItem`);
            None and ``()`` when it gives none.
        line: the prompts file line it came from (0: not from a prompts file).
        oov_words: words of the question the tokenizer maps to its unknown token (recorded in the results
            as ``oov_words`` when any; the model's answer to such a question is not meaningful).
    """

    id: str
    image: ImageInput | VideoInput
    question: str
    answer: str | None
    tensors: dict
    prompt_tokens: int
    vision_tokens: int
    preprocess_ms: float = 0.0
    type: str | None = None
    tags: tuple[str, ...] = ()
    line: int = 0
    #: words of the question the tokenizer maps to its unknown token (set by the sweep job)
    oov_words: tuple[str, ...] = ()
    #: a follow-up question asked after the answer from the same cache, its expected answer, and the token
    #: ids of its turn (what follows the answer's end-of-sequence token: the family's turn template)
    followup: str | None = None
    followup_answer: str | None = None
    followup_ids: tuple[int, ...] = ()
    #: the exact prompt text sent to the processor, and where its template came from
    #: (:mod:`lightkv_cli.models.prompting`: ``chat template`` or ``family default``)
    prompt: str = ""
    prompt_template: str = "family default"
    system_prompt: str | None = None

    def to_dict(self) -> dict:
        """One entry of the ``inputs`` section of the results file; ``type`` and ``tags`` only when given."""
        out = {
            "id": self.id,
            "image": str(self.image.path),
            "kind": "video" if isinstance(self.image, VideoInput) else "image",
            "sha256": self.image.sha256,
            "width": self.image.width,
            "height": self.image.height,
            "question": self.question,
            "answer": self.answer,
            "prompt": self.prompt,
            "prompt_template": self.prompt_template,
            "prompt_tokens": self.prompt_tokens,
            "vision_tokens": self.vision_tokens,
            "preprocess_ms": self.preprocess_ms,
        }
        if self.type is not None:
            out["type"] = self.type
        if self.tags:
            out["tags"] = list(self.tags)
        if self.oov_words:
            out["oov_words"] = list(self.oov_words)
        if self.followup is not None:
            out["followup"] = self.followup
            out["followup_answer"] = self.followup_answer
        return out


def inputs_fingerprint(inputs: Sequence[ProfileInput]) -> str:
    """``sha256:<hex>`` over every input's image bytes hash, question and answer, in order.

    Two runs with the same fingerprint saw the same images and prompts (file names do not matter).
    """
    h = hashlib.sha256()
    for inp in inputs:
        key = [inp.image.sha256, inp.question, inp.answer]
        if inp.followup is not None:  # left out otherwise, so files written before follow-ups still resume
            key += [inp.followup, inp.followup_answer]
        if inp.prompt_template != "family default" or inp.system_prompt:  # likewise for the family's prompt
            key += [inp.prompt]
        h.update(json.dumps(key).encode())
    return f"sha256:{h.hexdigest()}"


def prepare_inputs(
    loaded: LoadedModel,
    images: Sequence[ImageInput],
    prompts: Sequence[PromptItem],
    system_prompt: str | None = None,
) -> list[ProfileInput]:
    """Build the model inputs for every (image, question) pair.

    Args:
        loaded: the model (its processor formats and tokenises the prompt).
        images: loaded images, one per prompt item, in the same order.
        prompts: the questions (and optional answers).
        system_prompt: a system prompt for every question (``--system-prompt``), or None.

    The prompt is the checkpoint's chat template when it has one, else the family's default
    (:func:`~lightkv_cli.models.prompting.build_prompt`); its text is recorded per input.

    Returns:
        One :class:`ProfileInput` per pair, tensors on the model's device and dtype.
    """
    names = [im.path.name for im in images]
    out = []
    adapter = loaded.adapter
    vision_ids = adapter.vision_token_ids()
    if any(isinstance(im, VideoInput) for im in images) and not adapter.supports_video:
        raise UserError(
            f"model '{loaded.name}' ({adapter.family}) takes no video input; use a Qwen2-VL or Qwen2.5-VL model "
            "(e.g. --model tiny-qwen2-vl or qwen2.5-vl) for --video"
        )
    for image, item in zip(images, prompts):
        ident = image.path.name if names.count(image.path.name) == 1 else f"{image.path.name}#L{item.line}"
        is_video = isinstance(image, VideoInput)
        built = build_prompt(
            loaded.processor,
            adapter,
            item.question,
            num_images=0 if is_video else 1,
            num_videos=int(is_video),
            system=system_prompt,
        )
        text = built.text
        with Stopwatch(loaded.device) as sw:
            if is_video:
                enc = loaded.processor(text=text, videos=[image.frames], return_tensors="pt")
            else:
                enc = loaded.processor(images=image.image, text=text, return_tensors="pt")
            tensors = {}
            for k, v in enc.items():
                if not isinstance(v, torch.Tensor):
                    continue
                v = v.to(loaded.device)
                if v.is_floating_point():
                    v = v.to(loaded.dtype)
                tensors[k] = v
        n_vis = int(torch.isin(tensors["input_ids"][0], torch.tensor(vision_ids, device=loaded.device)).sum())
        if not adapter.dynamic_resolution and not is_video and n_vis != adapter.vision_tokens_per_image():
            raise RuntimeError(
                f"processor produced {n_vis} vision tokens, expected {adapter.vision_tokens_per_image()}"
            )
        followup_ids: tuple[int, ...] = ()
        if item.followup is not None:
            tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
            turn = adapter.format_followup(item.followup)
            followup_ids = tuple(tokenizer(turn, add_special_tokens=False)["input_ids"])
        out.append(
            ProfileInput(
                id=ident,
                image=image,
                question=item.question,
                answer=item.answer,
                tensors=tensors,
                prompt_tokens=int(tensors["input_ids"].shape[1]),
                vision_tokens=n_vis,
                preprocess_ms=sw.ms,
                type=item.type,
                tags=item.tags,
                line=item.line,
                followup=item.followup,
                followup_answer=item.followup_answer,
                followup_ids=followup_ids,
                prompt=text,
                prompt_template=built.source,
                system_prompt=system_prompt,
            )
        )
    return out


def max_positions(loaded: LoadedModel) -> int | None:
    """The most positions (prompt plus generated tokens) the model's decoder takes:
    ``max_position_embeddings`` of its text config; None when the config does not say."""
    limit = getattr(loaded.adapter.text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def fit_inputs(
    loaded: LoadedModel, inputs: Sequence[ProfileInput], max_new_tokens: int
) -> tuple[list[ProfileInput], list[Skipped]]:
    """The inputs whose prompt tokens plus ``max_new_tokens`` fit the model's positions
    (:func:`max_positions`), and the others as :class:`~lightkv_cli.inputs.Skipped` with the reason.

    Raises:
        UserError: ``max_new_tokens`` alone reaches the model's positions, or no input fits.
    """
    limit = max_positions(loaded)
    if limit is None:
        return list(inputs), []
    where = f"model '{loaded.name}' takes at most {limit} positions (max_position_embeddings), prompt included"
    if max_new_tokens >= limit:
        shortest = min((i.prompt_tokens for i in inputs), default=1)
        raise UserError(
            f"--max-new-tokens {max_new_tokens} is too large: {where}; give at most {max(1, limit - shortest)}"
        )
    kept, skipped = [], []
    for inp in inputs:
        need = inp.prompt_tokens + max_new_tokens
        if need <= limit:
            kept.append(inp)
            continue
        line = f" (prompts line {inp.line})" if inp.line else ""
        skipped.append(
            Skipped(
                inp.image.path,
                f"{inp.prompt_tokens} prompt tokens + {max_new_tokens} new tokens do not fit: {where}{line}; "
                "shorten the question or lower --max-new-tokens",
            )
        )
    if not kept:
        raise UserError(
            f"nothing could be processed: no input fits the model ({where}); shorten the questions or lower "
            "--max-new-tokens"
        )
    return kept, skipped
