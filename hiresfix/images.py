"""Image interchange between stages, and safe decode/encode at the edges.

Every stage passes a `Picture`: float32 RGB in [0, 1] plus optional alpha, and what the source
was (bit depth, grayscale) so that the encoder can give back the same kind of file. Keeping floats
between stages means a 16-bit PNG is never squeezed through 8 bits halfway.

Format fidelity kept through decode -> encode: 16-bit PNG (RGB, RGBA, grey, grey+alpha), grayscale,
alpha (including palette and colour-key transparency), the embedded ICC profile
(`info["icc_profile"]`, written back into PNG/JPEG/WebP), and EXIF orientation (applied to the
pixels, then dropped).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageOps

from hiresfix.schemas import RequestError

# Decompression-bomb guard: checked on the header, before any pixel is decoded.
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096
DEFAULT_MAX_INPUT_BYTES = 32 * 1024 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageInputError(RequestError):
    """The client sent an image we refuse (400 undecodable, 413 too large): the `image` field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__("image", message, status)

    def __str__(self) -> str:
        return self.message


@dataclass
class Picture:
    rgb: np.ndarray  # H x W x 3 float32 in [0, 1]
    alpha: np.ndarray | None = None  # H x W float32 in [0, 1]
    bit_depth: int = 8
    grayscale: bool = False
    info: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def with_pixels(self, rgb: np.ndarray, alpha: np.ndarray | None = None) -> Picture:
        # info is copied: two stages holding the same dict would see each other's edits.
        return replace(
            self, rgb=rgb.astype(np.float32, copy=False), alpha=alpha, info=dict(self.info)
        )

    # --- PIL bridges (8-bit; what diffusers and OpenCV stages consume) ---
    @classmethod
    def from_pil(cls, im: Image.Image) -> Picture:
        return _from_pil(im)

    def to_pil(self) -> Image.Image:
        """8-bit RGB (or RGBA) PIL image."""
        rgb = _to_u8(self.rgb)
        if self.alpha is None:
            return Image.fromarray(rgb, "RGB")
        return Image.fromarray(np.dstack([rgb, _to_u8(self.alpha)]), "RGBA")

    def rgb_u8(self) -> np.ndarray:
        return _to_u8(self.rgb)


def _to_u8(a: np.ndarray) -> np.ndarray:
    # clip(a, 0, 1) * 255 + 0.5, with one temporary instead of three (same bits: in [0, 1] the same
    # float ops, outside it the same 0.5 / 255.5): at 1536 px the PNG answer waits on this.
    t = a * 255.0
    t += 0.5
    return np.clip(t, 0.5, 255.5, out=t).astype(np.uint8)


def _to_u16(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)


def _from_pil(im: Image.Image, source_bits: int | None = None) -> Picture:
    """PIL image -> Picture. `source_bits` (from the PNG header) disambiguates PIL's mode "I"."""
    mode = im.mode
    icc = im.info.get("icc_profile")
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNGs open as I;16 (or I). Keep the 16 bits.
        a = np.asarray(im, dtype=np.float64)
        if source_bits is not None:
            sixteen = source_bits == 16
        else:
            sixteen = mode.startswith("I;16") or a.max() > 255
        g = np.clip(a / (65535.0 if sixteen else 255.0), 0.0, 1.0).astype(np.float32)
        key = im.info.get(
            "transparency"
        )  # colour-key (tRNS) transparency: that grey value is clear
        alpha = None if not isinstance(key, int) else (a != key).astype(np.float32)
        pic = Picture(np.repeat(g[..., None], 3, axis=2), alpha, 16 if sixteen else 8, True)
    elif mode == "F":
        g = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        pic = Picture(np.repeat(g[..., None], 3, axis=2), None, 16, True)
    else:
        grayscale = mode in ("L", "LA", "La", "1")
        # Palette and colour-key (tRNS) transparency become a real alpha channel.
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
        want = "RGBA" if has_alpha else "RGB"
        rgba = im if mode == want else im.convert(want)  # convert() copies even to its own mode
        u8 = np.asarray(rgba)
        a = np.divide(u8, np.float32(255.0), dtype=np.float32)  # = float32(u8) / 255, one array
        pic = Picture(
            np.ascontiguousarray(a[..., :3]),
            np.ascontiguousarray(a[..., 3]) if has_alpha else None,
            8,
            grayscale,
        )
    # Only an RGB or grey profile describes the pixels we keep: a CMYK (or other) one would be
    # re-embedded into an RGB file, which colour-managed viewers misread or reject.
    if icc and icc[16:20] in (b"RGB ", b"GRAY"):
        pic.info["icc_profile"] = icc
    return pic


def decode_image(
    data: bytes | str,
    *,
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> Picture:
    """Base64 (or raw bytes) -> Picture, refusing bombs, junk and unsupported formats with 4xx."""
    # Base64 holds 3 bytes per 4 characters: refuse a too-long string before copying and decoding it
    # (the slack covers a data: URL prefix and line breaks).
    if isinstance(data, str) and len(data) > max_bytes * 4 // 3 * 1.05 + 4096:
        raise ImageInputError(
            f"image is about {len(data) * 3 // 4} bytes; the limit is {max_bytes} bytes:"
            " send a smaller file",
            413,
        )
    raw = _b64decode(data) if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise ImageInputError(
            f"image is {len(raw)} bytes; the limit is {max_bytes} bytes: send a smaller file", 413
        )
    if not raw:
        raise ImageInputError("image is empty: send PNG, JPEG or WebP bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below) is the guard; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as probe:
                fmt = probe.format
                w, h = probe.size
    except Image.DecompressionBombError as exc:
        # PIL refuses headers beyond twice its own limit before we can read the size.
        raise ImageInputError(
            f"image header declares too many pixels: the limit is {max_pixels}", 413
        ) from exc
    except Exception as exc:  # PIL raises many types for junk; the client needs no exception names
        raise ImageInputError("image could not be decoded: send PNG, JPEG or WebP") from exc
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ImageInputError(f"image format {fmt} is not supported: send PNG, JPEG or WebP")
    if w * h > max_pixels:
        raise ImageInputError(
            f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}: send a smaller image",
            413,
        )
    png_bits = raw[24] if fmt == "PNG" and len(raw) > 25 else None
    try:
        pic = _decode_png_16(raw) if fmt == "PNG" else None
        if pic is not None:
            pic = _orient(pic, _png_orientation(raw))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(raw)) as im:
                    im.load()
                    # Phone photos: apply the orientation, then forget it (in place: no copy).
                    ImageOps.exif_transpose(im, in_place=True)
                    pic = _from_pil(im, png_bits)
    except ImageInputError:
        raise
    except Exception as exc:
        raise ImageInputError("image data is corrupt or truncated: send the whole file") from exc
    pic.info["source_format"] = fmt.lower()
    return pic


def _decode_png_16(raw: bytes) -> Picture | None:
    """PIL drops 16-bit colour (and grey+alpha) PNGs to 8 bits; OpenCV keeps them."""
    import cv2

    # Bit depth lives at byte 24 of the IHDR chunk; colour type at 25 (2 RGB, 4 grey+alpha, 6 RGBA).
    if len(raw) < 26 or raw[24] != 16 or raw[25] not in (2, 4, 6):
        return None
    arr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageInputError("image data is corrupt (16-bit PNG could not be decoded)")
    if arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    a = arr.astype(np.float32) / 65535.0
    rgb = a[..., 2::-1]  # BGR(A) -> RGB; OpenCV expands grey+alpha to BGRA
    alpha = a[..., 3] if a.shape[2] == 4 else None
    pic = Picture(
        np.ascontiguousarray(rgb),
        None if alpha is None else np.ascontiguousarray(alpha),
        16,
        grayscale=raw[25] == 4,
    )
    icc = _png_icc(raw)
    if icc:
        pic.info["icc_profile"] = icc
    return pic


def _png_chunks(raw: bytes):
    """(type, body) of each PNG chunk, read from the bytes without decoding any pixels."""
    pos = 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        yield kind, raw[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return
        pos += 12 + length


def _png_icc(raw: bytes) -> bytes | None:
    for kind, body in _png_chunks(raw):
        if kind == b"iCCP":
            name_end = body.find(b"\x00")
            try:
                return zlib.decompress(body[name_end + 2 :])  # skip name, NUL, compression method
            except zlib.error:
                return None
    return None


def _png_orientation(raw: bytes) -> int:
    """EXIF orientation from a PNG eXIf chunk (PIL would decode the whole image to find it)."""
    for kind, body in _png_chunks(raw):
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(body)
            except Exception:  # a broken EXIF block is not worth refusing the image for
                return 1
            return int(exif.get(0x0112, 1))
    return 1


# EXIF orientation -> numpy ops on (H, W, ...) arrays, for the paths that bypass PIL's transpose.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _orient(pic: Picture, orientation: int) -> Picture:
    op = _ORIENT.get(orientation)
    if op is None:
        return pic
    alpha = None if pic.alpha is None else np.ascontiguousarray(op(pic.alpha))
    return replace(pic, rgb=np.ascontiguousarray(op(pic.rgb)), alpha=alpha)


def _b64decode(s: str) -> bytes:
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        pass
    # Many encoders wrap base64 at 76 columns; the line breaks are not part of the data.
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(
            "image is not valid base64: send the file bytes base64-encoded"
        ) from exc


# PNG is lossless at every level; the level only trades encode time for file size. Measured on
# 1536 px photos (bench/png_encode.py, bench/results/README.md): Pillow's default (zlib 6, default
# strategy) costs ~0.8 s; level 1 here (zlib 1 with the run-length strategy Z_RLE) ~0.2x of that
# for files 0-1% larger on photos (8% on flat graphics); 9 (zlib 9) the smallest files at ~5x.
PNG_COMPRESS_LEVEL = 1


def png_zlib(level: int) -> tuple[int, int]:
    """(zlib level, zlib strategy) for our PNG compress level 0-9: 1 is the fast run-length mode,
    every other level is zlib's own with its default strategy (0 = stored)."""
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compress level must be 0-9, got {level}")
    return (1, zlib.Z_RLE) if level == 1 else (level, zlib.Z_DEFAULT_STRATEGY)


def encode_image(
    pic: Picture, fmt: str = "png", quality: int = 95, *, png_level: int = PNG_COMPRESS_LEVEL
) -> bytes:
    """Picture -> file bytes. PNG keeps 16 bits, grayscale and alpha; JPEG drops alpha (on white).

    The ICC profile the source carried is embedded again, so wide-gamut photos keep their colours.
    `png_level`: PNG compression 0-9 (see PNG_COMPRESS_LEVEL); lossless at every level.
    """
    fmt = fmt.lower()
    if fmt == "png" and PNG_PARAMETERS in pic.info:  # see "A1111 parameters" at the end
        plain = replace(pic, info={k: v for k, v in pic.info.items() if k != PNG_PARAMETERS})
        data = encode_image(plain, fmt, quality, png_level=png_level)
        return png_with_text(data, PNG_PARAMETERS, pic.info[PNG_PARAMETERS])
    icc = pic.info.get("icc_profile")
    if fmt == "png" and pic.bit_depth == 16:
        return _encode_png_16(pic, icc, png_level)
    im = pic.to_pil()
    if pic.grayscale:
        im = im.convert("LA" if pic.alpha is not None else "L")
    out = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    if fmt == "jpeg":
        if im.mode in ("RGBA", "LA"):
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[3])
            im = bg.convert("L") if pic.grayscale else bg
        im.save(out, "JPEG", quality=quality, **extra)
    elif fmt == "webp":
        im.save(out, "WEBP", quality=quality, **extra)
    else:
        level, strategy = png_zlib(png_level)
        # Pillow's -1 is its own default (zlib's strategy with its adaptive row filters): level 6
        # is then byte for byte what Pillow writes by default.
        kind = -1 if strategy == zlib.Z_DEFAULT_STRATEGY else strategy
        im.save(out, "PNG", compress_level=level, compress_type=kind, **extra)
    return out.getvalue()


def _encode_png_16(pic: Picture, icc: bytes | None, png_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    level, strategy = png_zlib(png_level)
    if pic.grayscale and pic.alpha is not None:
        # OpenCV cannot write grey+alpha; the format is simple enough to write directly.
        la = np.dstack([_to_u16(pic.rgb.mean(axis=2)), _to_u16(pic.alpha)]).astype(">u2")
        data = _png_raw(pic.width, pic.height, 4, la, level, strategy)
    else:
        import cv2

        if pic.grayscale:
            arr = _to_u16(pic.rgb.mean(axis=2))
        else:
            arr = _to_u16(pic.rgb[..., ::-1])  # RGB -> BGR
            if pic.alpha is not None:
                arr = np.dstack([arr, _to_u16(pic.alpha)])
        params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY, strategy]
        ok, buf = cv2.imencode(".png", arr, params)
        if not ok:
            raise RuntimeError("PNG encode failed")
        data = buf.tobytes()
    return _png_insert_icc(data, icc) if icc else data


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _png_raw(
    width: int,
    height: int,
    color_type: int,
    pixels_be: np.ndarray,
    level: int = 6,
    strategy: int = zlib.Z_DEFAULT_STRATEGY,
) -> bytes:
    """A 16-bit PNG from big-endian samples (rows unfiltered; zlib does the work)."""
    rows = pixels_be.reshape(height, -1).tobytes()
    stride = len(rows) // height
    scan = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", _deflate(scan, level, strategy))
        + _png_chunk(b"IEND", b"")
    )


def _deflate(data: bytes, level: int, strategy: int) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
    return z.compress(data) + z.flush()


def _png_insert_icc(data: bytes, icc: bytes) -> bytes:
    """Add an iCCP chunk right after IHDR (where the PNG spec wants it: before PLTE/IDAT)."""
    ihdr_end = 8 + 8 + 13 + 4
    body = b"ICC profile\x00\x00" + zlib.compress(icc)
    return data[:ihdr_end] + _png_chunk(b"iCCP", body) + data[ihdr_end:]


def encode_b64(pic: Picture, fmt: str = "png", *, png_level: int = PNG_COMPRESS_LEVEL) -> str:
    return base64.b64encode(encode_image(pic, fmt, png_level=png_level)).decode("ascii")


# --- A1111 parameters ---------------------------------------------------------------------------
# A picture whose info holds PNG_PARAMETERS (the routes set A1111's generation text there,
# hiresfix/a1111.py) gets it as a PNG text chunk: A1111's png-info and tools read it back.
PNG_PARAMETERS = "parameters"


def png_with_text(data: bytes, key: str, text: str) -> bytes:
    """A PNG with a text chunk added right after IHDR (readers find it without decoding pixels):
    tEXt when the text is Latin-1, else uncompressed UTF-8 iTXt."""
    try:
        chunk = _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        body = key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
        chunk = _png_chunk(b"iTXt", body)
    ihdr_end = 8 + 8 + 13 + 4
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def psnr(a, b, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shaped images (inf when identical); `peak` is
    the value range: 255 for 8-bit arrays, 1.0 for `Picture.rgb`. Tests and benchmarks state
    every "same image within tolerance" in it."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
