"""prepare_image: decoding, limits, conversions (checked pixel by pixel against numpy) and the
storage policy (original bytes when nothing was converted, a deterministic PNG otherwise)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from mmrag.retrievers.errors import ConfigError, InvalidItemError
from mmrag.retrievers.kb.images import DEFAULT_MAX_IMAGE_PIXELS, prepare_image
from tests.corpus import (
    FIRST_FRAME_RGB,
    SECOND_FRAME_RGB,
    animated_gif,
    cmyk_jpeg,
    drawn_image,
    encode,
    exif_rotated_jpeg,
    gray16_png,
    noisy_jpeg,
    palette_alpha_png,
    png_bomb,
    truncated_jpeg,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixels(data: bytes, frame: int = 0) -> np.ndarray:
    """Decode ``data`` with Pillow alone: the reference the prepared image is compared with."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(frame)
        return np.asarray(im.convert("RGB"))


def raw(data: bytes) -> tuple[str, np.ndarray, dict]:
    with Image.open(io.BytesIO(data)) as im:
        return im.mode, np.asarray(im), dict(im.info)


def assert_stored_as_png(p) -> None:
    assert p.ext == ".png" and p.data.startswith(PNG_SIGNATURE)
    assert p.sha256 == hashlib.sha256(p.data).hexdigest()
    np.testing.assert_array_equal(pixels(p.data), np.asarray(p.image))  # lossless
    with Image.open(io.BytesIO(p.data)) as stored:
        assert stored.mode == "RGB" and "transparency" not in stored.info


def reason(image, **kw) -> str:
    with pytest.raises(InvalidItemError) as e:
        prepare_image(image, **kw)
    return e.value.reason


# ------------------------------------------------------------------------------- storage policy
def test_plain_jpeg_keeps_its_original_bytes_from_a_path_str_or_bytes(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(drawn_image(0)[0], "JPEG", quality=90))
    data = path.read_bytes()
    for given in (path, str(path), data, bytearray(data)):
        p = prepare_image(given)
        assert (p.data, p.ext, p.notes) == (data, ".jpg", [])
        assert p.sha256 == hashlib.sha256(data).hexdigest()
        assert p.image.mode == "RGB" and p.image.size == (48, 40)
        np.testing.assert_array_equal(np.asarray(p.image), pixels(data))


@pytest.mark.parametrize("fmt, mode, ext, params", [
    ("PNG", "RGB", ".png", {}),
    ("WEBP", "RGB", ".webp", {"lossless": True}),
    ("JPEG", "L", ".jpg", {"quality": 90}),  # grayscale: plain L -> RGB, still stored as is
    ("PNG", "L", ".png", {}),
])
def test_plain_rgb_and_gray_files_are_stored_byte_for_byte(fmt, mode, ext, params):
    data = encode(drawn_image(1)[0].convert(mode), fmt, **params)
    p = prepare_image(data)
    assert (p.data, p.ext, p.notes, p.image.mode) == (data, ext, [], "RGB")
    np.testing.assert_array_equal(np.asarray(p.image), pixels(data))


def test_extension_comes_from_the_content_not_the_file_name(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(drawn_image(2)[0], "PNG"))
    p = prepare_image(path)
    assert p.ext == ".png" and p.data == path.read_bytes()


def test_camera_mpo_jpeg_is_kept_and_not_called_animated():
    data = encode(Image.new("RGB", (20, 16), (10, 200, 30)), "MPO", save_all=True,
                  append_images=[Image.new("RGB", (20, 16), (0, 0, 255))])
    p = prepare_image(data)
    assert (p.data, p.ext, p.notes) == (data, ".jpg", [])


def test_pil_input_is_stored_as_png_that_depends_on_pixels_only():
    im, _ = drawn_image(3)
    twin = im.copy()
    twin.info.update({"dpi": (300, 300), "comment": b"not part of the picture"})
    a, b = prepare_image(im), prepare_image(twin)
    assert_stored_as_png(a)
    assert a.data == b.data and a.sha256 == b.sha256
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(im))


def test_converted_file_gives_the_same_png_from_path_bytes_or_opened_image(tmp_path):
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(cmyk_jpeg())
    with Image.open(path) as opened:
        results = [prepare_image(path), prepare_image(path.read_bytes()), prepare_image(opened)]
    assert len({r.data for r in results}) == 1 and len({r.sha256 for r in results}) == 1
    assert results[0].sha256 != hashlib.sha256(path.read_bytes()).hexdigest()


def test_colour_profile_is_kept_for_rgb_pixels_and_dropped_after_cmyk_conversion():
    profile = b"an RGB colour profile"  # Pillow stores ICC bytes without parsing them
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 100))
    kept = prepare_image(encode(rgba, "PNG", icc_profile=profile))
    with Image.open(io.BytesIO(kept.data)) as stored:
        assert stored.info.get("icc_profile") == profile
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 50, 100, 0)), "JPEG", icc_profile=b"a CMYK colour profile")
    converted = prepare_image(cmyk)
    with Image.open(io.BytesIO(converted.data)) as stored:
        assert "icc_profile" not in stored.info
    assert converted.image.info == {} and kept.image.info == {}  # the pixels, without stale metadata


# ------------------------------------------------------------------------------------ conversions
def test_cmyk_is_converted_to_rgb():
    data = cmyk_jpeg()
    mode, cmyk, _ = raw(data)
    assert mode == "CMYK"
    p = prepare_image(data)
    assert p.notes == ["converted CMYK to RGB"]
    ink = cmyk.astype(float) / 255
    expected = 255 * (1 - ink[..., :3]) * (1 - ink[..., 3:])  # subtractive inks, then black
    np.testing.assert_allclose(np.asarray(p.image, dtype=float), expected, atol=1)
    assert_stored_as_png(p)


def _as_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values), "TIFF")


@pytest.mark.parametrize("make, mode", [
    (gray16_png, "I;16"),
    (lambda: _as_tiff(raw(gray16_png())[1].astype(">u2")), "I;16B"),
    (lambda: _as_tiff(raw(gray16_png())[1].astype(np.int32)), "I"),
])
def test_16bit_gray_is_scaled_to_8bit_not_clipped(make, mode):
    data = make()
    got_mode, values, _ = raw(data)
    assert got_mode == mode and values.max() > 255
    p = prepare_image(data)
    assert p.notes == ["converted 16-bit to 8-bit"]
    out = np.asarray(p.image)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    expected = np.round(values.astype(float) * 255 / 65535)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255 and len(np.unique(out)) > 200
    assert not np.array_equal(out[..., 0], np.minimum(values, 255))  # what Pillow's convert("L") does
    assert_stored_as_png(p)


def test_16bit_gray_transparent_level_becomes_white():
    values = raw(gray16_png())[1]
    p = prepare_image(encode(Image.fromarray(values), "PNG", transparency=0))
    assert p.notes == ["converted 16-bit to 8-bit", "flattened transparency onto white"]
    out = np.asarray(p.image)[..., 0]
    expected = np.where(values == 0, 255, np.round(values.astype(float) * 255 / 65535))
    np.testing.assert_array_equal(out, expected)


def test_32bit_values_outside_the_16bit_range_are_refused():
    data = _as_tiff(np.array([[0, 70000], [5, 6]], dtype=np.int32))
    assert "outside the 16-bit range" in reason(data)


def test_palette_with_transparency_is_composited_onto_white():
    data = palette_alpha_png()
    mode, index, info = raw(data)
    assert mode == "P"
    with Image.open(io.BytesIO(data)) as im:
        palette = np.array(im.getpalette()[:12], dtype=float).reshape(4, 3)
    alpha = np.frombuffer(info["transparency"], dtype=np.uint8).astype(float)[index][..., None] / 255
    expected = palette[index] * alpha + 255 * (1 - alpha)
    p = prepare_image(data)
    assert p.notes == ["flattened transparency onto white"]
    out = np.asarray(p.image, dtype=float)
    np.testing.assert_allclose(out, expected, atol=1)
    assert (out[index == 0] == 255).all()  # the fully transparent entry is plain white
    assert_stored_as_png(p)


def test_rgba_and_rgb_with_a_transparent_colour_are_composited_onto_white():
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.linspace(0, 255, 8).astype(np.uint8)
    p = prepare_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    a = rgba[..., 3:].astype(float) / 255
    np.testing.assert_allclose(np.asarray(p.image, dtype=float), rgba[..., :3] * a + 255 * (1 - a), atol=1)
    assert p.notes == ["flattened transparency onto white"]
    assert_stored_as_png(p)

    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb.putpixel((0, 0), (1, 2, 3))
    p = prepare_image(encode(rgb, "PNG", transparency=(1, 2, 3)))  # PNG tRNS: one colour is see-through
    assert p.image.getpixel((0, 0)) == (255, 255, 255) and p.image.getpixel((1, 1)) == (10, 20, 30)
    assert p.notes == ["flattened transparency onto white"]
    assert_stored_as_png(p)


def test_opaque_alpha_is_dropped_without_a_note_but_not_stored_as_is():
    data = encode(Image.new("RGBA", (4, 4), (9, 8, 7, 255)), "PNG")
    p = prepare_image(data)
    assert p.notes == [] and p.data != data
    assert p.image.getpixel((0, 0)) == (9, 8, 7)
    assert_stored_as_png(p)


@pytest.mark.parametrize("fmt, params", [
    ("GIF", {"duration": 100}),
    ("WEBP", {"lossless": True}),
    ("PNG", {}),  # APNG
])
def test_animation_keeps_its_first_frame(fmt, params):
    frames = [Image.new("RGB", (16, 16), FIRST_FRAME_RGB), Image.new("RGB", (16, 16), SECOND_FRAME_RGB)]
    data = animated_gif() if fmt == "GIF" else encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    p = prepare_image(data)
    assert p.notes == ["animated image: kept the first frame"]
    np.testing.assert_array_equal(np.asarray(p.image), pixels(data, frame=0))
    assert not np.array_equal(pixels(data, frame=0), pixels(data, frame=1))
    assert np.abs(np.asarray(p.image, dtype=int) - FIRST_FRAME_RGB).max() <= 2
    assert_stored_as_png(p)


def test_animated_pil_image_is_rewound_to_its_first_frame():
    with Image.open(io.BytesIO(animated_gif())) as im:
        im.seek(1)
        p = prepare_image(im)
    assert np.abs(np.asarray(p.image, dtype=int) - FIRST_FRAME_RGB).max() <= 2


# EXIF orientation tags as the EXIF spec defines them: how to turn the stored pixels for display.
DISPLAY = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1),   # mirror, then 90 degrees counter-clockwise
    6: lambda a: np.rot90(a, -1),             # 90 degrees clockwise
    7: lambda a: np.rot90(np.fliplr(a), -1),  # mirror, then 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),              # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAY))
def test_exif_orientation_is_applied(orientation):
    data = exif_rotated_jpeg(orientation)
    stored = pixels(data)
    p = prepare_image(data)
    assert p.notes == ["applied EXIF orientation"]
    np.testing.assert_array_equal(np.asarray(p.image), DISPLAY[orientation](stored))
    assert_stored_as_png(p)
    if orientation == 6:
        assert p.image.size == (24, 40)  # was 40x24
        # the red block moved from the top-left corner to the top-right one
        assert p.image.getpixel((20, 3))[1] < 60 and p.image.getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_1_needs_nothing():
    data = exif_rotated_jpeg(1)
    p = prepare_image(data)
    assert (p.data, p.notes) == (data, [])


# ------------------------------------------------------------------------------------------ errors
def test_missing_file_directory_and_empty_file(tmp_path):
    assert reason(tmp_path / "nope.jpg") == f"image file not found: {tmp_path / 'nope.jpg'}"
    assert "is a directory" in reason(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason(tmp_path / "empty.jpg") == "image is empty (0 bytes)"
    assert reason(b"") == "image is empty (0 bytes)"


def test_byte_limit(tmp_path):
    data = encode(drawn_image(4)[0], "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    limit = len(data) - 1
    for given in (path, data):
        r = reason(given, max_bytes=limit)
        assert f"{len(data):,} bytes, over the limit of {limit:,}" in r and "max_image_bytes" in r
    assert prepare_image(path, max_bytes=len(data)).data == data


def test_non_image_data_behind_an_image_name(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"<html>not a picture</html>")
    assert reason(path).startswith("not an image file")


def test_formats_outside_the_list_are_refused():
    ico = encode(Image.new("RGB", (16, 16), "red"), "ICO")  # Pillow could decode it; ingestion does not
    assert reason(ico).startswith("not an image file")


def test_truncated_image_is_refused_on_full_decode():
    with Image.open(io.BytesIO(truncated_jpeg())) as im:
        assert im.size == (120, 96)  # the header alone looks fine
    assert "truncated" in reason(truncated_jpeg())


def test_pixel_limit_names_count_limit_and_fix():
    r = reason(png_bomb(400, 300), max_pixels=100_000)
    assert "400x300 = 120,000 pixels" in r and "limit of 100,000" in r and "raise max_image_pixels" in r
    assert prepare_image(png_bomb(400, 300), max_pixels=120_000).image.size == (400, 300)


def test_pixel_limit_is_checked_before_decoding():
    # The scan data is cut: decoding would fail as truncated. The size check must come first.
    assert "pixels, over the limit of 10,000" in reason(truncated_jpeg(), max_pixels=10_000)


def test_default_limit_refuses_a_real_decompression_bomb():
    r = reason(png_bomb(8200, 8200))
    assert "67,240,000 pixels" in r and f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in r


def test_pillow_bomb_error_is_explained():
    # Over 2 * PIL.Image.MAX_IMAGE_PIXELS, Pillow itself refuses inside Image.open.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_bomb(13400, 13400)))
    r = reason(png_bomb(13400, 13400), max_pixels=10**9)
    assert "179,560,000 pixels" in r and f"{2 * Image.MAX_IMAGE_PIXELS:,}" in r and "PIL.Image.MAX_IMAGE_PIXELS" in r


def test_modes_without_a_sound_conversion_are_refused():
    data = encode(Image.new("F", (4, 4), 0.5), "TIFF")
    assert "mode 'F' cannot be converted to RGB soundly" in reason(data)


def test_wrong_input_types_and_limits():
    assert reason(None) == "no image given"
    assert "got int" in reason(42)
    with pytest.raises(ConfigError, match="max_pixels"):
        prepare_image(noisy_jpeg(), max_pixels=0)
    with pytest.raises(ConfigError, match="max_bytes"):
        prepare_image(noisy_jpeg(), max_bytes=-1)
