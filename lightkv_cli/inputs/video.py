"""Videos for the Qwen families: a folder of frame images (file-name order) or a short video file decoded
with PyAV (the ``video`` extra), at most ``MAX_VIDEO_FRAMES`` frames spread evenly. No torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from lightkv_cli.errors import UserError
from lightkv_cli.inputs.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    decode_image,
    is_image_name,
    read_bytes,
    short_error,
)

#: File name extensions (lower case) read as video files (decoded with PyAV, the ``video`` extra).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


#: Frames taken from one video at most (spread evenly over it).
MAX_VIDEO_FRAMES = 8


@dataclass(frozen=True)
class VideoInput:
    """One loaded video: a directory of frames or a short video file.

    ``frames`` are fully loaded RGB images in time order (at most :data:`MAX_VIDEO_FRAMES`, taken
    evenly over the video); ``width`` and ``height`` are the first frame's size in pixels; ``sha256``
    is the hex digest of the file's bytes, or of the frame files' digests in order for a directory.
    ``frames`` take no part in equality comparison.
    """

    path: Path
    frames: list = field(compare=False, repr=False)
    width: int
    height: int
    sha256: str

    @property
    def image(self):
        """The first frame (for thumbnails)."""
        return self.frames[0]


def _evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def load_video(path: str | Path, max_frames: int = MAX_VIDEO_FRAMES) -> VideoInput:
    """Load a video for the Qwen families: a directory of frame images or a video file.

    A directory's image files (:data:`IMAGE_EXTENSIONS`) are frames in file-name order; it needs
    nothing beyond Pillow. A video file is decoded with PyAV (``pip install "lightkv[video]"``).
    At most ``max_frames`` frames are kept, spread evenly over the video.

    Raises:
        UserError: the path does not exist, a directory without frame images, an unreadable frame,
            a video file without PyAV installed, or a file PyAV cannot decode.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"video '{path}' does not exist; give a directory of frames or a video file")
    if p.is_dir():
        files = sorted(
            (e for e in p.iterdir() if e.is_file() and not e.name.startswith(".") and is_image_name(e)),
            key=lambda e: e.name,
        )
        if not files:
            raise UserError(
                f"video folder '{path}' has no frame images ({', '.join(IMAGE_EXTENSIONS)}); put one image per frame "
                "in it"
            )
        files = [files[i] for i in _evenly(len(files), max_frames)]
        frames, digests = [], []
        for f in files:
            try:
                data = read_bytes(f)
                frames.append(decode_image(data))
            except ImageLoadError as exc:
                raise UserError(f"video folder '{path}': frame {f.name}: {exc.reason}") from None
            digests.append(hashlib.sha256(data).hexdigest())
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    else:
        try:
            import av  # optional: the "video" extra
        except ImportError:
            raise UserError(
                f"reading the video file '{path}' needs PyAV: pip install \"lightkv[video]\" (or pass a folder of "
                "frame images)"
            ) from None
        data = read_bytes(p)
        try:
            with av.open(str(p)) as container:
                decoded = [frame.to_image() for frame in container.decode(video=0)]
        except Exception as exc:  # PyAV raises its own error types for damaged or unknown files
            raise UserError(
                f"cannot decode video '{path}' ({short_error(exc)}); give a short video file or a folder of frames"
            ) from None
        if not decoded:
            raise UserError(f"video '{path}' has no frames")
        frames = [decoded[i].convert("RGB") for i in _evenly(len(decoded), max_frames)]
        digest = hashlib.sha256(data).hexdigest()
    return VideoInput(path=p, frames=frames, width=frames[0].width, height=frames[0].height, sha256=digest)
