"""decode_image / encode_image: refusal of bad input (4xx) and format fidelity."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

from hiresfix.images import ImageInputError, Picture, decode_image, encode_b64, encode_image


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries (almost) no pixel data: a bomb probe."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _rgb(seed=0, h=20, w=30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "junk", [b"hello world, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff"]
)
def test_junk_bytes_are_400(junk):
    with pytest.raises(ImageInputError) as e:
        decode_image(junk)
    assert e.value.status == 400


def test_empty_is_400():
    with pytest.raises(ImageInputError) as e:
        decode_image(b"")
    assert e.value.status == 400


@pytest.mark.parametrize("b64", ["not base64 at all!!", "data:image/png;base64,@@@@", "abc"])
def test_bad_base64_is_400(b64):
    with pytest.raises(ImageInputError, match="base64") as e:
        decode_image(b64)
    assert e.value.status == 400


@pytest.mark.parametrize("side", [5000, 100_000])  # above our limit; far above PIL's own bomb limit
def test_decompression_bomb_is_413(side):
    with pytest.raises(ImageInputError) as e:
        decode_image(_png_header_only(side, side))
    assert e.value.status == 413


def test_too_long_base64_is_413_before_decoding():
    with pytest.raises(ImageInputError, match="limit is 100 bytes") as e:
        decode_image(
            "!" * 10_000, max_bytes=100
        )  # not even base64 (400), but refused for its length first
    assert e.value.status == 413


def test_too_many_bytes_is_413():
    with pytest.raises(ImageInputError) as e:
        decode_image(_png(Image.fromarray(_rgb())), max_bytes=100)
    assert e.value.status == 413


def test_unsupported_format_is_400():
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, "BMP")
    with pytest.raises(ImageInputError, match="BMP") as e:
        decode_image(buf.getvalue())
    assert e.value.status == 400


def test_truncated_png_is_400():
    data = _png(Image.fromarray(_rgb(h=200, w=200)))
    with pytest.raises(ImageInputError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.status == 400


# --------------------------------------------------------------------------- accepted forms
def test_base64_data_url_and_wrapped_lines():
    raw = _png(Image.fromarray(_rgb()))
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    for s in (b64, "data:image/png;base64," + b64, wrapped):
        assert decode_image(s).size == (30, 20)


def test_rgb_png_round_trip_is_exact():
    a = _rgb()
    pic = decode_image(_png(Image.fromarray(a)))
    assert pic.bit_depth == 8 and not pic.grayscale and pic.alpha is None
    assert np.array_equal(pic.rgb_u8(), a)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(pic)))), a)


def test_16bit_rgba_png_round_trip():
    rng = np.random.default_rng(1)
    bgra = rng.integers(0, 65536, (12, 9, 4), dtype=np.uint16)
    pic = decode_image(cv2.imencode(".png", bgra)[1].tobytes())
    assert pic.bit_depth == 16 and pic.alpha is not None
    assert np.allclose(pic.rgb[..., 0], bgra[..., 2] / 65535)  # BGR -> RGB
    back = cv2.imdecode(np.frombuffer(encode_image(pic), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, bgra)


def test_16bit_grey_png_round_trip():
    g = np.random.default_rng(2).integers(0, 65536, (10, 14), dtype=np.uint16)
    pic = decode_image(cv2.imencode(".png", g)[1].tobytes())
    assert pic.bit_depth == 16 and pic.grayscale
    back = cv2.imdecode(np.frombuffer(encode_image(pic), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.ndim == 2 and np.array_equal(back, g)


def test_16bit_grey_alpha_png_round_trip():
    rng = np.random.default_rng(3)
    g, a = rng.integers(0, 65536, (2, 7, 11), dtype=np.uint16)
    pic = Picture(
        np.repeat((g / 65535).astype(np.float32)[..., None], 3, 2),
        (a / 65535).astype(np.float32),
        bit_depth=16,
        grayscale=True,
    )
    data = encode_image(pic)
    assert data[24] == 16 and data[25] == 4  # IHDR: 16-bit grey+alpha
    back = decode_image(data)
    assert back.bit_depth == 16 and back.grayscale and back.alpha is not None
    assert np.array_equal(np.round(back.rgb[..., 0] * 65535).astype(np.uint16), g)
    assert np.array_equal(np.round(back.alpha * 65535).astype(np.uint16), a)


def test_dark_16bit_grey_is_not_mistaken_for_8bit():
    g = np.full((4, 4), 200, np.uint16)  # a very dark 16-bit image: max <= 255
    pic = decode_image(cv2.imencode(".png", g)[1].tobytes())
    assert pic.bit_depth == 16 and abs(pic.rgb.max() - 200 / 65535) < 1e-6


def test_grayscale_and_la():
    g = _rgb()[..., 0]
    pic = decode_image(_png(Image.fromarray(g, "L")))
    assert pic.grayscale and pic.alpha is None
    assert Image.open(io.BytesIO(encode_image(pic))).mode == "L"
    la = Image.merge("LA", [Image.fromarray(g), Image.fromarray(255 - g)])
    pic = decode_image(_png(la))
    assert pic.grayscale and pic.alpha is not None
    back = Image.open(io.BytesIO(encode_image(pic)))
    assert back.mode == "LA" and np.array_equal(np.asarray(back), np.asarray(la))


def test_palette_with_transparency_and_colour_key():
    p = Image.fromarray(_rgb()).quantize(8)
    pic = decode_image(_png(p, transparency=0))
    assert (
        pic.alpha is not None and set(np.unique(pic.alpha)) <= {0.0, 1.0} and pic.alpha.min() == 0
    )
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb.putpixel((1, 1), (1, 2, 3))
    pic = decode_image(_png(rgb, transparency=(1, 2, 3)))
    assert pic.alpha is not None and pic.alpha[1, 1] == 0 and pic.alpha[0, 0] == 1


@pytest.mark.parametrize(
    "orientation,size", [(1, (24, 40)), (3, (24, 40)), (6, (40, 24)), (8, (40, 24))]
)
def test_exif_orientation_jpeg(orientation, size):
    a = _rgb(h=40, w=24)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", exif=exif, quality=95)
    assert decode_image(buf.getvalue()).size == size


def test_exif_orientation_16bit_png():
    bgr = np.random.default_rng(4).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    raw = cv2.imencode(".png", bgr)[1].tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes()
    chunk = (
        struct.pack(">I", len(body))
        + b"eXIf"
        + body
        + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    )
    raw = raw[:33] + chunk + raw[33:]  # after IHDR
    pic = decode_image(raw)
    assert pic.bit_depth == 16 and pic.size == (6, 10)
    assert np.allclose(pic.rgb, np.rot90(bgr[..., ::-1] / 65535, -1), atol=1e-6)


def test_icc_profile_kept():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pic = decode_image(_png(Image.fromarray(_rgb()), icc_profile=icc))
    assert pic.info["icc_profile"] == icc
    for fmt in ("png", "jpeg", "webp"):
        assert Image.open(io.BytesIO(encode_image(pic, fmt))).info.get("icc_profile") == icc, fmt
    pic16 = decode_image(cv2.imencode(".png", np.zeros((3, 3, 3), np.uint16))[1].tobytes())
    pic16.info["icc_profile"] = icc
    again = decode_image(encode_image(pic16))
    assert again.bit_depth == 16 and again.info["icc_profile"] == icc


def test_jpeg_drops_alpha_onto_white():
    pic = Picture(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.float32))
    back = np.asarray(Image.open(io.BytesIO(encode_image(pic, "jpeg"))))
    assert back.shape == (4, 4, 3) and back.min() > 245


def test_with_pixels_copies_info():
    pic = Picture(np.zeros((2, 2, 3), np.float32), info={"k": 1})
    other = pic.with_pixels(np.ones((2, 2, 3)))
    other.info["k"] = 2
    assert pic.info["k"] == 1 and other.rgb.dtype == np.float32


def test_encode_b64_decodes_back():
    pic = decode_image(_png(Image.fromarray(_rgb())))
    assert decode_image(encode_b64(pic)).size == (30, 20)


def test_cmyk_profile_is_not_embedded_in_rgb_output():
    # A CMYK JPEG's ICC profile describes CMYK data; the RGB pixels we give back must not carry it
    # (colour-managed viewers would misread or reject the file).
    icc = bytearray(132)
    icc[0:4], icc[12:16], icc[16:20], icc[20:24], icc[36:40] = (
        (132).to_bytes(4, "big"),
        b"prtr",
        b"CMYK",
        b"Lab ",
        b"acsp",
    )
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG", icc_profile=bytes(icc))
    pic = decode_image(buf.getvalue())
    assert "icc_profile" not in pic.info
    for fmt in ("png", "jpeg", "webp"):
        out = Image.open(io.BytesIO(encode_image(pic, fmt)))
        assert out.mode in ("RGB", "RGBA") and out.info.get("icc_profile") is None, fmt


def test_16bit_grey_colour_key_transparency_becomes_alpha():
    # tRNS on a 16-bit grey PNG (PIL opens it as I;16): the keyed grey value is transparent.
    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    g = np.array([[0, 1000], [65535, 1000]], dtype=">u2")
    rows = b"".join(b"\x00" + g[i].tobytes() for i in range(2))
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 0, 0, 0, 0))
        + chunk(b"tRNS", struct.pack(">H", 1000))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    pic = decode_image(raw)
    assert pic.bit_depth == 16 and pic.grayscale
    assert pic.alpha is not None and pic.alpha.tolist() == [[1.0, 0.0], [1.0, 0.0]]


# --------------------------------------------------------------------------- PNG compression
def _photo_like(h=96, w=128) -> np.ndarray:
    """Smooth gradients plus mild noise: compresses like a photo, unlike pure noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=2)
    noise = np.random.default_rng(1).normal(0, 3, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("level", range(10))
def test_every_png_level_is_lossless(level):
    """8-bit RGB and RGBA (Pillow), 16-bit RGB (OpenCV) and 16-bit grey+alpha (our own writer)."""
    rgb8 = _photo_like()
    pic = decode_image(_png(Image.fromarray(rgb8)))
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(encode_image(pic, png_level=level)))), rgb8
    )
    rgba8 = np.dstack([rgb8, rgb8[..., 0]])
    pic = decode_image(_png(Image.fromarray(rgba8, "RGBA")))
    back = np.asarray(Image.open(io.BytesIO(encode_image(pic, png_level=level))))
    assert np.array_equal(back, rgba8)
    rgb16 = (rgb8.astype(np.uint16) * 257 + 3)[..., ::-1].copy()  # BGR for OpenCV
    pic = decode_image(cv2.imencode(".png", rgb16)[1].tobytes())
    data = encode_image(pic, png_level=level)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), rgb16)
    la = Picture(np.repeat(pic.rgb[..., :1], 3, axis=2), pic.rgb[..., 1], 16, grayscale=True)
    back = cv2.imdecode(np.frombuffer(encode_image(la, png_level=level), np.uint8), -1)
    assert back.dtype == np.uint16 and np.array_equal(
        back[..., 0], (la.rgb[..., 0] * 65535 + 0.5).astype(np.uint16)
    )


def test_png_default_is_the_fast_level_and_levels_trade_size():
    pic = Picture(_photo_like(256, 256).astype(np.float32) / 255.0)
    sizes = {lv: len(encode_image(pic, png_level=lv)) for lv in (0, 1, 6)}
    assert encode_image(pic) == encode_image(pic, png_level=1)
    assert sizes[1] < sizes[0] / 1.5  # level 1 still compresses, level 0 only stores
    assert sizes[6] < sizes[0] / 1.5
    # Level 6 is byte for byte what Pillow writes by default (the encoder before issue 14).
    assert encode_image(pic, png_level=6) == _png(pic.to_pil())
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="0-9"):
            encode_image(pic, png_level=bad)


def test_to_u8_matches_the_plain_formula():
    a = np.concatenate(
        [np.linspace(-0.5, 1.5, 20001, dtype=np.float32), np.array([0, 1, 0.5 / 255], np.float32)]
    )
    a = np.concatenate([a, np.nextafter(a, np.float32(2)), np.nextafter(a, np.float32(-2))])
    want = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(Picture(a.reshape(1, -1, 1).repeat(3, axis=2)).rgb_u8()[0, :, 0], want)
