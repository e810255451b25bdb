"""The user's inputs: finding, loading and validating images, videos and prompts files.

Everything here is CPU-only and uses only the standard library and Pillow (no torch), so it can run
before any model is loaded and fail fast on bad input.

* :func:`collect_images` (``images``) turns the paths given on the command line (files and/or
  directories) into decoded RGB images, plus a list of files that could not be used (:class:`Skipped`)
  and a list of non-image files that were ignored.
* :func:`load_image` (``images``) decodes one file into a fully loaded RGB :class:`PIL.Image.Image`
  (first frame of animations, EXIF orientation applied, alpha composited on white) or raises
  :class:`ImageLoadError`.
* :func:`load_video` (``video``) reads a folder of frames or a video file.
* :func:`load_prompts` (``prompts``) reads a JSON-lines prompts file into :class:`PromptItem` objects,
  raising :class:`~lightkv_cli.errors.UserError` with ``file:line:`` in the message for any mistake.
* :func:`gather_inputs` (``gather``) pairs images, videos and questions for a run.

User mistakes that make the whole run pointless (a path that does not exist, a malformed prompts file)
raise ``UserError``; a single unreadable image does not: it is reported as ``Skipped`` and the run
goes on with the other images.
"""

from __future__ import annotations

from lightkv_cli.inputs.gather import Inputs, gather_inputs
from lightkv_cli.inputs.images import (
    IMAGE_EXTENSIONS,
    ImageInput,
    ImageLoadError,
    Skipped,
    collect_images,
    describe_skipped,
    load_image,
    load_image_input,
)
from lightkv_cli.inputs.prompts import DEFAULT_PROMPT, DEFAULT_VIDEO_PROMPT, PromptItem, load_prompts
from lightkv_cli.inputs.video import MAX_VIDEO_FRAMES, VIDEO_EXTENSIONS, VideoInput, load_video

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_VIDEO_PROMPT",
    "IMAGE_EXTENSIONS",
    "MAX_VIDEO_FRAMES",
    "VIDEO_EXTENSIONS",
    "ImageInput",
    "ImageLoadError",
    "Inputs",
    "PromptItem",
    "Skipped",
    "VideoInput",
    "collect_images",
    "describe_skipped",
    "gather_inputs",
    "load_image",
    "load_image_input",
    "load_prompts",
    "load_video",
]
