"""Validate and normalise one ingestion image.

:func:`prepare_image` decodes an image completely (so that truncated files fail here, not later in
the embedder), applies its EXIF orientation, converts it to 8-bit RGB and picks the bytes to keep in
the knowledge base's content-addressed image store. A bad image raises :class:`InvalidItemError`
whose ``reason`` becomes one line of the ingest report; every conversion that changes what the
image looks like is recorded in ``notes`` so that the report can count it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, InvalidItemError
from .records import ImageInput

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_BYTES = 50 * 2**20

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
) -> PreparedImage:
    """Decode, check and normalise one image; raise :class:`InvalidItemError` if it is unusable.

    ``image`` is a file path, encoded bytes or a PIL image. Encoded JPEG, PNG and WebP images that
    need no conversion beyond grayscale-to-RGB keep their original bytes (so the store holds the
    user's file, byte for byte); anything converted, and every PIL input, is stored as a PNG of the
    normalised RGB image, which is lossless and depends on the pixels only.

    Truncated images are only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False
    (Pillow's default); setting that process-wide switch makes Pillow fill missing data silently.
    """
    _check_limit("max_pixels", max_pixels)
    _check_limit("max_bytes", max_bytes)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        if getattr(image, "is_animated", False) and image.tell() != 0:
            image.seek(0)
        _load(image)
        rgb, notes, icc = _normalise(image)
        return _prepared(rgb, notes, _png(rgb, icc), ".png")
    if isinstance(image, (str, os.PathLike)):
        data = _read_file(os.fspath(image), max_bytes)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        _check_bytes(len(data), max_bytes)
    elif image is None:
        raise InvalidItemError("no image given")
    else:
        raise InvalidItemError(f"image must be a file path, encoded bytes or a PIL image, got {type(image).__name__}")
    return _prepare_encoded(data, max_pixels)


def _prepare_encoded(data: bytes, max_pixels: int) -> PreparedImage:
    im = _open(data)
    with im:
        # The header gives the size before any pixel is decoded, so a decompression bomb is refused
        # without allocating its pixels.
        _check_pixels(im.size, max_pixels)
        _load(im)
        rgb, notes, icc = _normalise(im)
        ext = _KEPT_FORMATS.get(im.format)
        if ext is not None and not notes and im.mode in ("L", "RGB") and "transparency" not in im.info:
            return _prepared(rgb, notes, data, ext)
    return _prepared(rgb, notes, _png(rgb, icc), ".png")


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
    try:
        with open(path, "rb") as f:
            _check_bytes(os.fstat(f.fileno()).st_size, max_bytes)  # before reading a huge file
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise InvalidItemError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidItemError(f"image path is a directory, not a file: {path}") from None
    except OSError as e:
        raise InvalidItemError(f"cannot read image file {path}: {e.strerror or e}") from None
    _check_bytes(len(data), max_bytes)  # the file may have changed since fstat (or be a pipe)
    return data


def _check_bytes(size: int, max_bytes: int) -> None:
    if size == 0:
        raise InvalidItemError("image is empty (0 bytes)")
    if size > max_bytes:
        raise InvalidItemError(f"image is {size:,} bytes, over the limit of {max_bytes:,} (raise max_image_bytes)")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    pixels = size[0] * size[1]
    if pixels > max_pixels:
        raise InvalidItemError(
            f"image is {size[0]}x{size[1]} = {pixels:,} pixels, over the limit of {max_pixels:,} "
            "(a possible decompression bomb; raise max_image_pixels to accept it)"
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
    return f"image data is truncated or corrupt ({detail})"
