"""Images: decode one file into a fully loaded RGB image (first frame of animations, EXIF orientation
applied, alpha composited on white, 16-bit and palette modes converted) or say in one line why not, and
collect the images of the paths given on the command line. Pillow only; no torch.

Memory stays bounded by one image at a time: a file is identified from its first bytes (Pillow's
``Image.open`` is lazy, and its size is checked before any pixel is decoded), so a large file that is
not an image is never read whole; an image is decoded once to check it and measure it, then let go,
and decoded again when its model inputs are built (:attr:`ImageInput.image`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lightkv_cli.errors import UserError

#: File name extensions (lower case) that a directory scan treats as images. Matching ignores case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


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
    """One image that decoded.

    ``width`` and ``height`` are its size in pixels after EXIF orientation was applied; ``sha256`` is
    the hex digest of the file's bytes (so results can be tied to the exact file). The pixels are not
    kept: :attr:`image` decodes the file again each time it is read (unless ``preloaded`` holds them).
    ``stamp`` (size and modification time of the file when it was read) lets :attr:`image` notice a
    file that changed since. Only ``path``, the size and ``sha256`` take part in equality.
    """

    path: Path
    preloaded: Image.Image | None = field(compare=False, repr=False)
    width: int
    height: int
    sha256: str
    stamp: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def image(self) -> Image.Image:
        """The image, fully loaded RGB: ``preloaded``, or decoded from ``path`` now (not kept).

        Raises:
            UserError: the file changed, disappeared or no longer decodes since it was read.
        """
        if self.preloaded is not None:
            return self.preloaded
        try:
            if self.stamp is not None and _stamp(self.path) != self.stamp:
                raise ImageLoadError("the file changed since the inputs were read")
            return load_image(self.path)
        except ImageLoadError as exc:
            raise UserError(
                f"image '{self.path}' can no longer be used: {exc.reason}; run again with the images unchanged"
            ) from None


_MAX_DETAIL_CHARS = 100


def short_error(exc: BaseException) -> str:
    """First line of an exception's message, shortened, for use inside a reason phrase."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) > _MAX_DETAIL_CHARS:
        text = text[: _MAX_DETAIL_CHARS - 3] + "..."
    return text


def _read_error(exc: OSError) -> ImageLoadError:
    detail = exc.strerror or short_error(exc)
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
        raise ImageLoadError(f"unsupported colour mode {mode} ({short_error(exc)})") from exc


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into a new, fully loaded RGB image; raises :class:`ImageLoadError`."""
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    return _decode(io.BytesIO(data))


def _decode(source) -> Image.Image:
    """Decode the image in the binary file object ``source`` (read lazily: Pillow identifies it from
    its first bytes and checks its size before decoding any pixel)."""
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as "too large".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(exc) from exc
        except UnidentifiedImageError as exc:
            raise ImageLoadError("not a recognised image (unknown file format)") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"truncated or corrupt image ({short_error(exc)})") from exc
        with img:
            try:
                img.seek(0)  # first frame of animated GIF/WebP
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _too_large(exc) from exc
            except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
                raise ImageLoadError(f"truncated or corrupt image ({short_error(exc)})") from exc
            # in place: no copy of the pixels; malformed EXIF: keep the pixels as stored rather than lose the image
            with contextlib.suppress(Exception):
                ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
    rgb.load()
    return rgb


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _read_error(exc) from exc


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of ``path``, None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise _read_error(exc) from exc
    return h.hexdigest()


def load_image(path: Path) -> Image.Image:
    """Read and fully decode one image file into a new RGB image.

    Takes the first frame of animations, applies EXIF orientation, converts grayscale/palette/16-bit
    images to RGB and composites transparent images on a white background. The returned image is fully
    loaded and no file handle stays open. The file is read as Pillow needs it: a file that is not an
    image is identified from its first bytes, not read whole.

    Raises:
        ImageLoadError: with a short ``reason``: ``"empty file (0 bytes)"``,
            ``"not a recognised image (...)"``, ``"truncated or corrupt image (...)"``,
            ``"image too large (N pixels, limit M)"`` (more than ``PIL.Image.MAX_IMAGE_PIXELS``) or
            ``"cannot read file (<OS error>)"`` (missing file, directory, permission denied, ...).
    """
    try:
        f = Path(path).open("rb")  # noqa: SIM115 - closed by the with below; the open error is reworded
    except OSError as exc:
        raise _read_error(exc) from exc
    with f:
        try:
            empty = os.fstat(f.fileno()).st_size == 0
        except OSError as exc:
            raise _read_error(exc) from exc
        if empty:
            raise ImageLoadError("empty file (0 bytes)")
        return _decode(f)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image_input(path: Path) -> ImageInput | Skipped:
    """Load one image file into an :class:`ImageInput`, or say why it cannot be used.

    Never raises for a bad file: returns a :class:`Skipped` with the reason instead.
    """
    try:
        if path.exists() and not path.is_file() and not path.is_dir():
            # FIFOs, sockets, devices: reading could block forever.
            raise ImageLoadError("not a regular file")
        stamp = _stamp(path)
        width, height = load_image(path).size  # decoded to check it, then let go
        digest = _file_sha256(path)
    except ImageLoadError as exc:
        return Skipped(path=path, reason=exc.reason)
    return ImageInput(path=path, preloaded=None, width=width, height=height, sha256=digest, stamp=stamp)


def resolved_path(path: Path) -> Path:
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
        key = resolved_path(p)
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
                if not is_image_name(entry):
                    ignored.append(entry)
                    continue
                attempt(entry)
        else:
            if first_time(given):
                attempt(given)
    return loaded, skipped, ignored


def describe_skipped(s: Skipped) -> str:
    """One line for the user, e.g. ``"skipped broken.jpg: truncated or corrupt image (...)"``."""
    return f"skipped {s.path.name}: {s.reason}"
