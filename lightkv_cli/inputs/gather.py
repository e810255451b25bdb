"""Everything a run takes as input, gathered from the command line: images, videos and questions paired
up, with what was skipped or ignored. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightkv_cli.errors import UserError
from lightkv_cli.inputs.images import ImageInput, Skipped, collect_images, load_image_input, resolved_path
from lightkv_cli.inputs.prompts import DEFAULT_PROMPT, DEFAULT_VIDEO_PROMPT, PromptItem, check_text, load_prompts
from lightkv_cli.inputs.video import VideoInput, load_video


@dataclass
class Inputs:
    """Images paired with questions, ready to profile.

    Attributes:
        images: one loaded image per item (the same image may appear for several questions).
        items: the questions, with optional expected answers, in order.
        skipped: files that could not be used, with the reason.
        ignored: files in image directories that are not images by extension.
    """

    images: list[ImageInput | VideoInput]
    items: list[PromptItem]
    skipped: list[Skipped]
    ignored: list[Path]


def gather_inputs(
    images: Sequence[str | Path],
    prompt: str | None = None,
    prompts: str | Path | None = None,
    limit: int | None = None,
    videos: Sequence[str | Path] = (),
) -> Inputs:
    """Collect the (image, question) pairs of a profile.

    Each of ``videos`` (a folder of frames or a video file, see :func:`load_video`) adds one
    (video, question) pair after the images, asked ``prompt`` (default :data:`DEFAULT_VIDEO_PROMPT`).

    With ``prompts`` (a JSON-lines file), each line names its image (resolved against the file's
    folder, then ``images[0]``, then the current folder); each distinct image is loaded once.
    Without it, every image found in ``images`` gets ``prompt`` (default :data:`DEFAULT_PROMPT`).

    Args:
        images: image files and/or directories.
        prompt: the question asked about every image.
        prompts: a prompts file (exclusive with ``prompt``).
        limit: use at most this many pairs (stops loading once reached).

    Raises:
        UserError: both ``prompt`` and ``prompts``, no inputs at all, an empty ``prompt``, a missing
            path, or a bad prompts file (with its line number).
    """
    loaded: list[ImageInput] = []
    items: list[PromptItem] = []
    skipped: list[Skipped] = []
    ignored: list[Path] = []
    if prompt is not None:
        check_text(prompt, "--prompt", "")  # valid Unicode, not absurdly long
    if prompts is not None:
        if prompt is not None:
            raise UserError("give either --prompt or --prompts, not both")
        root = Path(images[0]) if images else None
        seen: dict[Path, ImageInput | None] = {}
        for item in load_prompts(prompts, image_root=root):
            if limit is not None and len(items) >= limit:
                break
            key = resolved_path(item.image)
            if key not in seen:
                got = load_image_input(item.image)
                seen[key] = got if isinstance(got, ImageInput) else None
                if isinstance(got, Skipped):
                    skipped.append(Skipped(item.image, f"{got.reason} (prompts line {item.line})"))
            if seen[key] is not None:
                loaded.append(seen[key])
                items.append(item)
        _add_videos(videos, prompt, limit, loaded, items)
        return Inputs(loaded, items, skipped, ignored)
    if not images and not videos:
        raise UserError("no inputs: give --images DIR (or image files), --video DIR_OR_FILE, or --prompts FILE.jsonl")
    question = DEFAULT_PROMPT if prompt is None else prompt
    if not question.strip():
        raise UserError("--prompt is empty; give a question or instruction about the images")
    if images:
        loaded, skipped, ignored = collect_images(images, limit=limit)
    items = [PromptItem(image=im.path, question=question, answer=None, line=0) for im in loaded]
    _add_videos(videos, prompt, limit, loaded, items)
    return Inputs(loaded, items, skipped, ignored)


def _add_videos(videos, prompt, limit, loaded: list, items: list) -> None:
    question = DEFAULT_VIDEO_PROMPT if prompt is None else prompt
    for v in videos:
        if limit is not None and len(items) >= limit:
            return
        video = load_video(v)
        loaded.append(video)
        items.append(PromptItem(image=video.path, question=question, answer=None, line=0))
