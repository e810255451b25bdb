"""Finding, loading and validating the user's images and prompts.

Everything here is CPU-only and uses only the standard library and Pillow (no torch), so it can run
before any model is loaded and fail fast on bad input.

* :func:`collect_images` turns the paths given on the command line (files and/or directories) into
  decoded RGB images, plus a list of files that could not be used (:class:`Skipped`) and a list of
  non-image files that were ignored.
* :func:`load_image` decodes one file into a fully loaded RGB :class:`PIL.Image.Image` (first frame of
  animations, EXIF orientation applied, alpha composited on white) or raises :class:`ImageLoadError`.
* :func:`load_prompts` reads a JSON-lines prompts file into :class:`PromptItem` objects, raising
  :class:`~lightkv_cli.errors.UserError` with ``file:line:`` in the message for any mistake.

User mistakes that make the whole run pointless (a path that does not exist, a malformed prompts file)
raise ``UserError``; a single unreadable image does not — it is reported as ``Skipped`` and the run
goes on with the other images.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

__all__ = [
    "DEFAULT_PROMPT",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "ImageInput",
    "ImageLoadError",
    "PromptItem",
    "Skipped",
    "VideoInput",
    "collect_images",
    "describe_skipped",
    "load_image",
    "load_prompts",
    "load_video",
]

#: File name extensions (lower case) that a directory scan treats as images. Matching ignores case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

#: File name extensions (lower case) read as video files (decoded with PyAV, the ``video`` extra).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")

#: The question asked about each image when the user gives no prompts file.
DEFAULT_PROMPT = "Describe this image in one sentence."
#: The question asked about each video when the user gives no prompt.
DEFAULT_VIDEO_PROMPT = "Describe this video in one sentence."
#: Frames taken from one video at most (spread evenly over it).
MAX_VIDEO_FRAMES = 8

_PROMPT_KEYS = ("image", "question", "answer")
_MAX_DETAIL_CHARS = 100


class ImageLoadError(Exception):
    """An image file that could not be decoded.

    ``reason`` (also ``str(error)``) is a short human phrase such as ``"empty file (0 bytes)"`` or
    ``"truncated or corrupt image (image file is truncated)"``, suitable for :class:`Skipped`.
    This is deliberately not a ``UserError``: one bad file should not stop a run.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """A file that was meant to be used as an image but could not be.

    ``reason`` is a short phrase, e.g. ``"not a recognised image (unknown file format)"``.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageInput:
    """One successfully loaded image.

    ``image`` is a fully loaded RGB image (its file is closed); ``width`` and ``height`` are its size in
    pixels after EXIF orientation was applied; ``sha256`` is the hex digest of the file's bytes (so
    results can be tied to the exact file). ``image`` takes no part in equality comparison.
    """

    path: Path
    image: Image.Image = field(compare=False, repr=False)
    width: int
    height: int
    sha256: str


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


@dataclass(frozen=True)
class PromptItem:
    """One line of a prompts file: an image, the question to ask about it and an optional reference answer.

    ``image`` is the resolved path (it exists, but has not been decoded yet); ``line`` is the 1-based line
    number in the prompts file, or 0 when the item was not read from a file.
    """

    image: Path
    question: str
    answer: str | None
    line: int


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    """First line of an exception's message, shortened, for use inside a reason phrase."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) > _MAX_DETAIL_CHARS:
        text = text[: _MAX_DETAIL_CHARS - 3] + "..."
    return text


def _read_error(exc: OSError) -> ImageLoadError:
    detail = exc.strerror or _short(exc)
    return ImageLoadError(f"cannot read file ({detail})")


def _too_large(exc: BaseException) -> ImageLoadError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS
    suffix = f", limit {limit:,}" if limit else ""
    return ImageLoadError(f"image too large ({pixels}{suffix})")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image to mode ``L``.

    16-bit data (mode ``I;16*``, or ``I`` with values in 0..65535 beyond 255) is scaled by 1/257;
    values already in 0..255 are kept; anything else is stretched linearly from its min..max.
    """
    if img.mode.startswith("I;16"):
        img = img.convert("I")
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = img.getextrema()  # type: ignore[misc]
        if lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
        elif lo >= 0 and hi <= 65535 and img.mode == "I":
            lo, hi = 0.0, 65535.0
    if hi <= lo:
        hi = lo + 1.0
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    if img.mode == "I":
        img = img.convert("F")
    return img.point(lambda v: v * scale + offset).convert("L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on a white background."""
    mode = img.mode
    has_alpha = (
        ("A" in mode or "a" in mode or "transparency" in img.info)
        and mode not in ("I", "F")
        and not mode.startswith("I;16")
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit_gray(img).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(f"unsupported colour mode {mode} ({_short(exc)})") from exc


def _decode(data: bytes) -> Image.Image:
    """Decode image bytes into a new, fully loaded RGB image; raises :class:`ImageLoadError`."""
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as "too large".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(exc) from exc
        except UnidentifiedImageError as exc:
            raise ImageLoadError("not a recognised image (unknown file format)") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"truncated or corrupt image ({_short(exc)})") from exc
        with img:
            try:
                img.seek(0)  # first frame of animated GIF/WebP
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _too_large(exc) from exc
            except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
                raise ImageLoadError(f"truncated or corrupt image ({_short(exc)})") from exc
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # malformed EXIF: keep the pixels as stored rather than lose the image
                oriented = img
            if oriented is None:  # pragma: no cover - only with in_place=True
                oriented = img
            rgb = _to_rgb(oriented)
    rgb.load()
    return rgb


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _read_error(exc) from exc


def load_image(path: Path) -> Image.Image:
    """Read and fully decode one image file into a new RGB image.

    Takes the first frame of animations, applies EXIF orientation, converts grayscale/palette/16-bit
    images to RGB and composites transparent images on a white background. The returned image is fully
    loaded and no file handle stays open.

    Raises:
        ImageLoadError: with a short ``reason``: ``"empty file (0 bytes)"``,
            ``"not a recognised image (...)"``, ``"truncated or corrupt image (...)"``,
            ``"image too large (N pixels, limit M)"`` (more than ``PIL.Image.MAX_IMAGE_PIXELS``) or
            ``"cannot read file (<OS error>)"`` (missing file, directory, permission denied, ...).
    """
    return _decode(_read_bytes(Path(path)))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image_input(path: Path) -> ImageInput | Skipped:
    """Load one image file into an :class:`ImageInput`, or say why it cannot be used.

    Never raises for a bad file: returns a :class:`Skipped` with the reason instead.
    """
    try:
        if path.exists() and not path.is_file() and not path.is_dir():
            # FIFOs, sockets, devices: reading could block forever.
            raise ImageLoadError("not a regular file")
        data = _read_bytes(path)
        image = _decode(data)
    except ImageLoadError as exc:
        return Skipped(path=path, reason=exc.reason)
    return ImageInput(
        path=path,
        image=image,
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def collect_images(
    paths: Sequence[str | Path],
    limit: int | None = None,
) -> tuple[list[ImageInput], list[Skipped], list[Path]]:
    """Load every image named by ``paths`` (files and/or directories), or the first ``limit``.

    Directories are scanned non-recursively in name order: hidden entries (name starting with ``.``)
    and subdirectories are ignored silently, files whose extension is not in :data:`IMAGE_EXTENSIONS`
    go to the ``ignored`` list, and image files that fail to load become :class:`Skipped` entries.
    A file named explicitly is always attempted, whatever its extension. A path that appears more than
    once (after resolving symlinks and ``..``) is used only the first time.

    Returns:
        ``(loaded, skipped, ignored)``. Nothing is raised when no image loads; the caller decides.

    Raises:
        UserError: a path does not exist.
    """
    loaded: list[ImageInput] = []
    skipped: list[Skipped] = []
    ignored: list[Path] = []
    seen: set[Path] = set()

    def first_time(p: Path) -> bool:
        key = _resolved(p)
        if key in seen:
            return False
        seen.add(key)
        return True

    def attempt(p: Path) -> None:
        if limit is not None and len(loaded) >= limit:
            return
        result = load_image_input(p)
        if isinstance(result, Skipped):
            skipped.append(result)
        else:
            loaded.append(result)

    for raw in paths:
        given = Path(raw).expanduser()
        if not given.exists():
            raise UserError(f"image path '{raw}' does not exist")
        if given.is_dir():
            try:
                entries = sorted(given.iterdir(), key=lambda e: e.name)
            except OSError as exc:
                raise UserError(
                    f"cannot list image folder '{raw}' ({exc.strerror or exc}); check its permissions"
                ) from exc
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    continue
                if not first_time(entry):
                    continue
                if not _is_image_name(entry):
                    ignored.append(entry)
                    continue
                attempt(entry)
        else:
            if first_time(given):
                attempt(given)
    return loaded, skipped, ignored


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
            (e for e in p.iterdir() if e.is_file() and not e.name.startswith(".") and _is_image_name(e)),
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
                data = _read_bytes(f)
                frames.append(_decode(data))
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
        data = _read_bytes(p)
        try:
            with av.open(str(p)) as container:
                decoded = [frame.to_image() for frame in container.decode(video=0)]
        except Exception as exc:  # PyAV raises its own error types for damaged or unknown files
            raise UserError(
                f"cannot decode video '{path}' ({_short(exc)}); give a short video file or a folder of frames"
            ) from None
        if not decoded:
            raise UserError(f"video '{path}' has no frames")
        frames = [decoded[i].convert("RGB") for i in _evenly(len(decoded), max_frames)]
        digest = hashlib.sha256(data).hexdigest()
    return VideoInput(path=p, frames=frames, width=frames[0].width, height=frames[0].height, sha256=digest)


def describe_skipped(s: Skipped) -> str:
    """One line for the user, e.g. ``"skipped broken.jpg: truncated or corrupt image (...)"``."""
    return f"skipped {s.path.name}: {s.reason}"


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

_EXAMPLE_LINE = '{"image": "cat.png", "question": "What animal is this?", "answer": "cat"}'


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _resolve_image(value: str, prompts_path: Path, image_root: Path | None, where: str) -> Path:
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        if candidate.exists():
            return candidate
        raise UserError(f"{where}: image '{value}' not found (looked in {candidate.parent}); fix the path")
    bases: list[Path] = [prompts_path.parent]
    if image_root is not None:
        bases.append(image_root)
    bases.append(Path("."))
    looked: list[Path] = []
    seen: set[Path] = set()
    for base in bases:
        key = _resolved(base)
        if key in seen:
            continue
        seen.add(key)
        looked.append(base)
        path = base / candidate
        if path.exists():
            return path
    places = ", ".join(f"'{_resolved(b)}'" for b in looked)
    raise UserError(
        f"{where}: image '{value}' not found (looked in {places}); fix the path or give an image root folder"
    )


def load_prompts(path: str | Path, image_root: Path | None = None) -> list[PromptItem]:
    """Read a JSON-lines prompts file.

    Each non-blank line that does not start with ``#`` must be an object
    ``{"image": str, "question": str, "answer": str (optional)}``. ``answer`` may also be a number
    (converted with ``str``) or ``null`` (no answer). A relative ``image`` is looked up next to the
    prompts file, then under ``image_root`` (a folder, or a file whose folder is used), then in the
    current directory; the first existing path wins. Images are only checked for existence, not
    decoded — use :func:`load_image` for that.

    Raises:
        UserError: the file does not exist, cannot be read, is not UTF-8, has no items, or a line is
            invalid (message starts with ``"<path>:<line>:"`` and says how to fix it).
    """
    prompts_path = Path(path).expanduser()
    if not prompts_path.exists():
        raise UserError(f"prompts file '{path}' does not exist")
    if prompts_path.is_dir():
        raise UserError(f"prompts file '{path}' is a directory; give a .jsonl file with one JSON object per line")
    try:
        text = prompts_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"prompts file '{path}' is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except OSError as exc:
        raise UserError(f"cannot read prompts file '{path}' ({exc.strerror or exc})") from exc

    root: Path | None = None
    if image_root is not None:
        root = Path(image_root).expanduser()
        if root.is_file():
            root = root.parent

    items: list[PromptItem] = []
    # split on "\n" only: JSON strings may legally contain other Unicode line separators.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                f"each line must be one JSON object like {_EXAMPLE_LINE}"
            ) from exc
        if not isinstance(obj, dict):
            raise UserError(
                f"{where}: expected a JSON object, got {_type_name(obj)}; write one object per line like "
                f"{_EXAMPLE_LINE}"
            )
        unknown = [k for k in obj if k not in _PROMPT_KEYS]
        if unknown:
            names = ", ".join(f"'{k}'" for k in unknown)
            allowed = ", ".join(f"'{k}'" for k in _PROMPT_KEYS)
            raise UserError(f"{where}: unknown key(s) {names}; allowed keys are {allowed}")

        values: dict[str, str] = {}
        for key in ("image", "question"):
            if key not in obj:
                raise UserError(f'{where}: missing "{key}"; every line needs "image" and "question" strings')
            value = obj[key]
            if not isinstance(value, str):
                raise UserError(f'{where}: "{key}" must be a string, got {_type_name(value)}; put it in quotes')
            if not value.strip():
                raise UserError(f'{where}: "{key}" is empty; give a non-empty string')
            values[key] = value

        answer_value = obj.get("answer")
        answer: str | None
        if answer_value is None:
            answer = None
        elif isinstance(answer_value, str):
            answer = answer_value
        elif isinstance(answer_value, (int, float)) and not isinstance(answer_value, bool):
            answer = str(answer_value)
        else:
            raise UserError(
                f'{where}: "answer" must be a string, a number or null, got {_type_name(answer_value)}; '
                "put the expected answer in quotes"
            )

        image = _resolve_image(values["image"], prompts_path, root, where)
        items.append(PromptItem(image=image, question=values["question"], answer=answer, line=number))

    if not items:
        raise UserError(f"prompts file '{path}' is empty (no JSON lines); add one object per line like {_EXAMPLE_LINE}")
    return items


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
    if prompts is not None:
        if prompt is not None:
            raise UserError("give either --prompt or --prompts, not both")
        root = Path(images[0]) if images else None
        seen: dict[Path, ImageInput | None] = {}
        for item in load_prompts(prompts, image_root=root):
            if limit is not None and len(items) >= limit:
                break
            key = _resolved(item.image)
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
