"""Validate and normalise one ingestion image.

:func:`prepare_image` decodes an image completely (so that truncated files fail here, not later in
the embedder), applies its EXIF orientation, converts it to 8-bit RGB and picks the bytes to keep in
the knowledge base's content-addressed image store. A bad image raises :class:`InvalidItemError`
whose ``reason`` becomes one line of the ingest report; every conversion that changes what the
image looks like is recorded in ``notes`` so that the report can count it.
:func:`normalise_image` runs the same checks and conversions for an image that is embedded but not
stored (a query image), and :func:`read_regular_file` is how every file of a source is read.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, InvalidItemError
from .records import ImageInput

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_BYTES = 50 * 2**20
# The pixel count alone does not bound the memory an image costs: encoders resize the short side up
# to their input size and keep the aspect ratio (CLIP: shortest edge 224), so a 103-byte 200000x1
# PNG becomes 44,800,000x224 before the centre crop. Measured through a real ingest with a 30-px
# encoder: +1.7 GB peak RSS for 200000x1, +3.5 GB for 400000x1, both far under max_pixels. Real
# pictures are nowhere near such shapes (wide panoramas about 10:1, web banners 728x90 = 8:1, long
# phone screenshots about 1:25), so 100:1 refuses only degenerate images and bounds the resized
# image at 100 x the encoder's input size squared (224 x 22,400 x 3 bytes = 15 MB for CLIP).
DEFAULT_MAX_ASPECT_RATIO = 100
# An image needs at least one pixel each way: a 0-px side cannot be saved (Pillow's "cannot write
# empty image") and makes an encoder's resize divide by zero.
MIN_IMAGE_SIDE = 1
# Exception texts quoted in a reason are cut to this length: a decoder's message can carry data.
_MAX_DETAIL_CHARS = 200

NOTE_CMYK = "converted CMYK to RGB"
NOTE_16BIT = "converted 16-bit to 8-bit"
NOTE_TRANSPARENCY = "flattened transparency onto white"
NOTE_EXIF = "applied EXIF orientation"
NOTE_ANIMATED = "animated image: kept the first frame"

# The formats ingestion decodes. Pillow opens many more (EPS even runs Ghostscript); a short list
# keeps untrusted files away from rarely used decoders. The JPEG opener also returns MPO images:
# camera JPEGs that carry extra pictures (depth maps, previews) after the photo.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Formats whose original bytes are stored as they are when the image needs no conversion.
_KEPT_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}

# Modes that Pillow converts to RGB exactly (no information about the picture is lost or invented).
_PLAIN_MODES = {"1", "L", "P", "RGB", "RGBX", "YCbCr"}
_ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa"}
# 16-bit grayscale as PNG and TIFF decode it; "I" is how older Pillow versions (and callers)
# hold the same data in 32 bits.
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_SUPPORTED_MODES = sorted(_PLAIN_MODES | _ALPHA_MODES | _HIGH_BIT_DEPTH_MODES | {"CMYK"})

_EXIF_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255, 255)


@dataclass
class PreparedImage:
    """A validated image and the bytes that represent it in the image store."""

    image: Image.Image  # RGB, 8-bit, EXIF orientation applied, first frame of animations
    data: bytes  # the bytes to keep in the content-addressed store
    ext: str  # ".jpg", ".png" or ".webp", matching the format of ``data``
    sha256: str  # hex sha256 of ``data``: the store key and the dedup key
    notes: list[str]  # conversions that changed the picture (NOTE_* phrases)


def prepare_image(
    image: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> PreparedImage:
    """Decode, check and normalise one image; raise :class:`InvalidItemError` if it is unusable.

    ``image`` is a file path, encoded bytes or a PIL image. Encoded JPEG, PNG and WebP images that
    need no conversion beyond grayscale-to-RGB keep their original bytes (so the store holds the
    user's file, byte for byte); anything converted, and every PIL input, is stored as a PNG of the
    normalised RGB image, which is lossless and depends on the pixels only.

    Truncated images are only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False
    (Pillow's default); setting that process-wide switch makes Pillow fill missing data silently.

    Limits: at most ``max_bytes`` encoded, ``max_pixels`` decoded, and a shape no longer than
    ``max_aspect_ratio``:1 with no side under :data:`MIN_IMAGE_SIDE` (see
    :data:`DEFAULT_MAX_ASPECT_RATIO`); a path must name a regular file (see :func:`read_regular_file`).
    """
    limits = _Limits(max_pixels, max_bytes, max_aspect_ratio)
    if isinstance(image, Image.Image):
        rgb, notes, icc = _normalise_pil(image, limits)
        return _prepared(rgb, notes, _png(rgb, icc), ".png")
    data = _encoded(image, limits)
    with _open(data) as im:
        _check_size(im.size, limits)  # from the header, before any pixel is decoded (bombs)
        _load(im)
        rgb, notes, icc = _normalise(im)
        ext = _KEPT_FORMATS.get(im.format)
        if ext is not None and not notes and im.mode in ("L", "RGB") and "transparency" not in im.info:
            return _prepared(rgb, notes, data, ext)
    return _prepared(rgb, notes, _png(rgb, icc), ".png")


def normalise_image(
    image: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> tuple[Image.Image, list[str]]:
    """The checks and conversions of :func:`prepare_image` (same formats, limits and modes) for an
    image that is embedded but never stored, such as a query image: returns the 8-bit RGB picture
    and its notes, without encoding the bytes a store would keep."""
    limits = _Limits(max_pixels, max_bytes, max_aspect_ratio)
    if isinstance(image, Image.Image):
        rgb, notes, _ = _normalise_pil(image, limits)
        return rgb, notes
    with _open(_encoded(image, limits)) as im:
        _check_size(im.size, limits)
        _load(im)
        rgb, notes, _ = _normalise(im)
    return rgb, notes


@dataclass(frozen=True)
class _Limits:
    max_pixels: int
    max_bytes: int
    max_aspect_ratio: float

    def __post_init__(self):
        _check_limit("max_pixels", self.max_pixels)
        _check_limit("max_bytes", self.max_bytes)
        ratio = self.max_aspect_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:  # NaN fails too
            raise ConfigError(f"`max_aspect_ratio` must be a number >= 1 (long side / short side), got {ratio!r}.")


def _normalise_pil(image: Image.Image, limits: _Limits) -> tuple[Image.Image, list[str], bytes | None]:
    _check_size(image.size, limits)
    if getattr(image, "is_animated", False) and image.tell() != 0:
        image.seek(0)
    _load(image)
    return _normalise(image)


def _encoded(image: ImageInput, limits: _Limits) -> bytes:
    """The encoded bytes of a path or bytes input, within ``max_bytes``."""
    if isinstance(image, (str, os.PathLike)):
        return _read_file(os.fspath(image), limits.max_bytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        _check_bytes(len(data), limits.max_bytes)
        return data
    if image is None:
        raise InvalidItemError("no image given")
    raise InvalidItemError(f"image must be a file path, encoded bytes or a PIL image, got {type(image).__name__}")


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        # Pillow refuses sizes over 2 * Image.MAX_IMAGE_PIXELS inside open(), before our own check
        # can run, so that limit applies on top of max_pixels.
        raise InvalidItemError(_pillow_bomb_reason(e)) from None
    except UnidentifiedImageError:
        raise InvalidItemError(
            f"not an image file: the data (starting {data[:8]!r}) is not JPEG, PNG, WebP, GIF, BMP or TIFF"
        ) from None
    except Exception as e:  # header parsers raise many types (SyntaxError, struct.error, ...) on bad data
        raise InvalidItemError(_corrupt(e)) from None


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, ... on bad data
        raise InvalidItemError(_corrupt(e)) from None


def _normalise(im: Image.Image) -> tuple[Image.Image, list[str], bytes | None]:
    """Return the 8-bit RGB picture, the notes, and the ICC profile still valid for it (if any)."""
    notes: list[str] = []
    if getattr(im, "is_animated", False) and im.format != "MPO":
        notes.append(NOTE_ANIMATED)  # open() decodes frame 0, and PIL inputs were rewound to it
    if im.getexif().get(_EXIF_ORIENTATION_TAG, 1) in range(2, 9):
        im = ImageOps.exif_transpose(im)
        notes.append(NOTE_EXIF)
    source_mode = im.mode
    if im.mode in _HIGH_BIT_DEPTH_MODES:
        im = _scale_16bit(im)
        notes.append(NOTE_16BIT)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append(NOTE_TRANSPARENCY)
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    elif im.mode == "CMYK":
        rgb = im.convert("RGB")
        notes.append(NOTE_CMYK)
    elif im.mode in _PLAIN_MODES:
        rgb = im.convert("RGB")
    else:
        raise InvalidItemError(
            f"image mode {im.mode!r} cannot be converted to RGB soundly "
            f"(supported modes: {', '.join(_SUPPORTED_MODES)})"
        )
    # An ICC profile describes the colour space of the pixel values: still true after plain RGB
    # conversions, wrong after CMYK or grayscale ones (and it would sneak into the PNG otherwise).
    icc = im.info.get("icc_profile") if source_mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA") else None
    rgb.info = {}  # pixels only: a CMYK profile or an applied EXIF orientation no longer describes them
    return rgb, notes, icc


def _scale_16bit(im: Image.Image) -> Image.Image:
    """Map 16-bit gray onto 8 bits by scaling (Pillow's convert("L") clips everything above 255)."""
    values = np.asarray(im)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InvalidItemError(
            f"image mode {im.mode!r} holds values {low}..{high}, outside the 16-bit range 0..65535; "
            "it cannot be scaled to 8-bit soundly"
        )
    gray = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    transparent = im.info.get("transparency")
    if transparent is None:
        return Image.fromarray(gray, "L")
    # A PNG tRNS chunk names one 16-bit gray level as fully transparent.
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([gray, alpha]), "LA")


def _png(rgb: Image.Image, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    # Pillow writes no timestamp and rgb.info is empty, so the bytes depend on the pixels (and the
    # kept ICC profile) only: equal pictures get equal sha256 keys.
    rgb.save(buf, format="PNG", icc_profile=icc)
    return buf.getvalue()


def _prepared(rgb: Image.Image, notes: list[str], data: bytes, ext: str) -> PreparedImage:
    return PreparedImage(image=rgb, data=data, ext=ext, sha256=hashlib.sha256(data).hexdigest(), notes=notes)


def _read_file(path: str, max_bytes: int) -> bytes:
    data = read_regular_file(path, "image file", max_bytes, lambda size: _check_bytes(size, max_bytes))
    _check_bytes(len(data), max_bytes)  # the file may have grown or shrunk since fstat
    return data


# What a path that is not a regular file is, for reasons (stat's S_IS* tests, in stat's order).
_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer (so the fstat check
# below can refuse it); regular files ignore the flag. O_NOCTTY: a terminal never becomes ours.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def read_regular_file(path: str, what: str, max_bytes: int, check_size: Callable[[int], None]) -> bytes:
    """Read at most ``max_bytes + 1`` bytes of the regular file at ``path``; raise
    :class:`InvalidItemError` naming ``what`` ("image file", "sidecar", ...) otherwise.

    Only regular files are read: opening a FIFO blocks until a writer comes (forever, in an
    ingestion), a device can stream without end or act on being opened, a socket cannot be opened.
    The type is checked with ``stat`` before opening, so none of them is opened, and again with
    ``fstat`` on the descriptor, because the path can be swapped for a FIFO between the two calls.
    ``check_size`` gets the file's size before anything is read, and raises to refuse it.
    """
    with open_regular_file(path, what) as f:
        check_size(os.fstat(f.fileno()).st_size)
        try:
            return f.read(max_bytes + 1)
        except OSError as e:
            raise InvalidItemError(f"cannot read {what} {path}: {e.strerror or e}") from None


def check_regular_file(path: str, what: str) -> None:
    """Raise :class:`InvalidItemError` unless ``path`` is a regular file (symlinks followed), without
    opening it."""
    try:
        _require_regular(os.stat(path).st_mode, path, what)
    except FileNotFoundError:
        raise InvalidItemError(f"{what} not found: {path}") from None
    except OSError as e:  # EACCES, ELOOP, ENAMETOOLONG, ...
        raise InvalidItemError(f"cannot read {what} {path}: {e.strerror or e}") from None


def open_regular_file(path: str, what: str) -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file (see :func:`read_regular_file`)."""
    check_regular_file(path, what)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise InvalidItemError(f"{what} not found: {path}") from None
    except OSError as e:  # ENXIO: swapped for a socket since the check; EACCES, ...
        raise InvalidItemError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, path, what)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(mode: int, path: str, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    raise InvalidItemError(f"{what} {path} is {kind}, not a regular file; only regular files are read")


def _check_bytes(size: int, max_bytes: int) -> None:
    if size == 0:
        raise InvalidItemError("image is empty (0 bytes)")
    if size > max_bytes:
        raise InvalidItemError(f"image is {size:,} bytes, over the limit of {max_bytes:,} (raise max_image_bytes)")


def _check_size(size: tuple[int, int], limits: _Limits) -> None:
    """Refuse an empty image, a decompression bomb, and a shape that explodes when resized."""
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InvalidItemError(f"image is {width}x{height}: it has no pixels")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise InvalidItemError(
            f"image is {width}x{height} = {pixels:,} pixels, over the limit of {limits.max_pixels:,} "
            "(a possible decompression bomb; raise max_image_pixels to accept it)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InvalidItemError(
            f"image is {width}x{height}, an aspect ratio of {ratio:,.0f}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1 (an encoder resizes the short side up and keeps the shape, which can "
            "take gigabytes for such an image; crop or split it)"
        )


def _pillow_bomb_reason(error: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (
        f"image has {size}, over Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} "
        "(raise PIL.Image.MAX_IMAGE_PIXELS as well as max_image_pixels to accept it)"
    )


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")


def _corrupt(error: Exception) -> str:
    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    # repr's escapes without its quotes: a decoder's message can quote raw file data.
    detail = repr(detail[:_MAX_DETAIL_CHARS])[1:-1] + ("..." if len(detail) > _MAX_DETAIL_CHARS else "")
    return f"image data is truncated or corrupt ({detail})"
