"""lightkv's processor for the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL): images, videos and text.

transformers 5.x builds ``Qwen2VLProcessor`` only when its torchvision-based video processor can be
built, so without torchvision a Qwen checkpoint's processor cannot even be constructed. This one
needs only Pillow: it uses the checkpoint's own tokenizer and the PIL backend of its image processor
(``Qwen2VLImageProcessorPil``: resize to multiples of ``patch_size · merge_size``, CLIP
normalisation, patch flattening), and implements what the rest of the processor does from its
definition:

- every ``<|image_pad|>`` / ``<|video_pad|>`` placeholder becomes ``t·h·w / merge_size²``
  placeholders, one per token the vision tower emits after its ``merge_size × merge_size`` merge;
- a video (a list of frames) is resized to one size, padded to a multiple of ``temporal_patch_size``
  frames by repeating the last, and cut into patches of ``temporal_patch_size`` consecutive frames:
  each patch vector is ``(channels, temporal_patch_size, patch, patch)`` flattened, in the same
  spatial order as an image's patches (``pixel_values_videos`` ``(t·h·w, C·T·p·p)``,
  ``video_grid_thw`` ``(num_videos, 3)``);
- ``mm_token_type_ids`` marks text (0), image (1) and video (2) tokens, which the model needs to build
  its M-RoPE positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
MARKER_FILE = "lightkv_processor.json"


class QwenVLProcessor:
    """Turns text with image/video placeholders, PIL images and videos into Qwen2-VL model inputs.

    Args:
        image_processor: a ``Qwen2VLImageProcessorPil`` (any object with its ``__call__``,
            ``merge_size``, ``patch_size``, ``temporal_patch_size`` and ``size``).
        tokenizer: the checkpoint's tokenizer; must know ``<|image_pad|>`` and ``<|video_pad|>``.
        video_max_pixels: upper bound on one frame's pixels after resizing (default: the image
            processor's ``longest_edge``).
    """

    def __init__(self, image_processor, tokenizer, video_max_pixels: int | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.video_max_pixels = video_max_pixels
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    # --- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer, the image processor and a marker naming this processor."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (directory / MARKER_FILE).write_text(
            json.dumps({"processor": "lightkv.QwenVLProcessor", "video_max_pixels": self.video_max_pixels}) + "\n"
        )

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs) -> QwenVLProcessor:
        """Load the tokenizer and the PIL image processor of a checkpoint (directory or cached Hub id).

        Raises:
            OSError: the files are not available locally.
        """
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, **kwargs)
        video_max = None
        marker = Path(source) / MARKER_FILE
        if marker.is_file():
            video_max = json.loads(marker.read_text()).get("video_max_pixels")
        return cls(image_processor, tokenizer, video_max_pixels=video_max)

    # --- text ------------------------------------------------------------------------------
    def decode(self, *args, **kwargs):
        """The tokenizer's ``decode``."""
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        """The tokenizer's ``batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    # --- vision ----------------------------------------------------------------------------
    def encode_video(self, frames: Sequence) -> tuple[torch.Tensor, list[int]]:
        """Patches and grid of one video.

        Args:
            frames: RGB PIL images in time order (at least one); resized to the first frame's
                target size.

        Returns:
            ``(patches, [t, h, w])``: ``(t·h·w, C·T·p·p)`` float32 patches, with ``t`` frame groups of
            ``temporal_patch_size`` frames and ``h × w`` patches (before the 2×2 merge) per group.

        Raises:
            ValueError: no frames.
        """
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        if not frames:
            raise ValueError("a video needs at least one frame")
        T = self.temporal_patch_size
        factor = self.patch_size * self.merge_size
        size = self.image_processor.size
        min_pixels = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
        max_pixels = self.video_max_pixels or (size["longest_edge"] if isinstance(size, dict) else size.longest_edge)
        w0, h0 = frames[0].size
        h, w = smart_resize(h0, w0, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        resized = [f.convert("RGB").resize((w, h), Image.Resampling.BICUBIC) for f in frames]
        while len(resized) % T:
            resized.append(resized[-1])
        out = self.image_processor(images=resized, return_tensors="pt")
        pv, grid = out["pixel_values"], out["image_grid_thw"]
        gh, gw = int(grid[0, 1]), int(grid[0, 2])
        F, N, p = len(resized), gh * gw, self.patch_size
        # Each frame's patches carry the frame T times (an image's temporal copies): keep one copy,
        # then put T consecutive frames on the temporal axis of one patch.
        x = pv.view(F, N, 3, T, p, p)[:, :, :, 0]  # (F, N, C, p, p)
        x = x.view(F // T, T, N, 3, p, p).permute(0, 2, 3, 1, 4, 5)  # (t, N, C, T, p, p)
        return x.reshape((F // T) * N, 3 * T * p * p).contiguous(), [F // T, gh, gw]

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        videos: Sequence[Sequence] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = False,
        **kwargs,
    ) -> dict:
        """Encode a batch.

        Args:
            images: a PIL image or a list of them, in placeholder order across the batch.
            text: one prompt or a list; each ``<|image_pad|>`` / ``<|video_pad|>`` stands for one image
                / video and is expanded to its token count.
            videos: a list of videos, each a list of PIL frames.
            padding: as the tokenizer's (left padding for batches).

        Returns:
            ``input_ids``, ``attention_mask`` ``(B, S)``, ``mm_token_type_ids`` ``(B, S)``, and
            ``pixel_values`` + ``image_grid_thw`` and/or ``pixel_values_videos`` + ``video_grid_thw``.

        Raises:
            ValueError: the number of placeholders and of images (videos) differ.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        data: dict = {}
        counts: dict[str, list[int]] = {IMAGE_TOKEN: [], VIDEO_TOKEN: []}
        merge = self.merge_size**2
        if images:
            out = self.image_processor(images=list(images), return_tensors="pt")
            data["pixel_values"] = out["pixel_values"]
            data["image_grid_thw"] = out["image_grid_thw"]
            counts[IMAGE_TOKEN] = [int(g.prod()) // merge for g in out["image_grid_thw"]]
        if videos:
            patches, grids = zip(*(self.encode_video(v) for v in videos))
            data["pixel_values_videos"] = torch.cat(patches)
            data["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            counts[VIDEO_TOKEN] = [t * h * w // merge for t, h, w in grids]
        for token, ns in counts.items():
            found = sum(t.count(token) for t in texts)
            if found != len(ns):
                kind = "images" if token == IMAGE_TOKEN else "videos"
                raise ValueError(f"the text has {found} {token} placeholders but {len(ns)} {kind} were given")
            it = iter(ns)
            texts = [_expand(t, token, it) for t in texts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=padding)
        ids = enc["input_ids"]
        tt = torch.zeros_like(ids)
        tt[ids == self.image_token_id] = 1
        tt[ids == self.video_token_id] = 2
        data = {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": tt, **data}
        return data


def _expand(text: str, token: str, counts) -> str:
    parts = text.split(token)
    out = parts[0]
    for part in parts[1:]:
        out += token * next(counts) + part
    return out
