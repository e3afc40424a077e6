"""Image interchange between stages, and safe decode/encode at the edges.

Every stage passes a `Picture`: float32 RGB in [0, 1] plus optional alpha, and what the source
was (bit depth, grayscale) so that the encoder can give back the same kind of file. Keeping floats
between stages means a 16-bit PNG is never squeezed through 8 bits halfway.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageOps

# Decompression-bomb guard: checked on the header, before any pixel is decoded.
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096
DEFAULT_MAX_INPUT_BYTES = 32 * 1024 * 1024


class ImageInputError(ValueError):
    """The client sent an image we refuse; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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

    def with_pixels(self, rgb: np.ndarray, alpha: np.ndarray | None = None) -> "Picture":
        return replace(self, rgb=rgb.astype(np.float32, copy=False), alpha=alpha)

    # --- PIL bridges (8-bit; what diffusers and OpenCV stages consume) ---
    @classmethod
    def from_pil(cls, im: Image.Image) -> "Picture":
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
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _to_u16(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)


def _from_pil(im: Image.Image) -> Picture:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNGs open as I;16 (or I). Keep the 16 bits.
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        g = (a / peak).astype(np.float32)
        return Picture(np.repeat(g[..., None], 3, axis=2), None, 16 if peak > 255 else 8, True)
    if mode == "F":
        g = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        return Picture(np.repeat(g[..., None], 3, axis=2), None, 16, True)
    grayscale = mode in ("L", "LA", "1")
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
    rgba = im.convert("RGBA" if has_alpha else "RGB")
    a = np.asarray(rgba, dtype=np.float32) / 255.0
    return Picture(
        np.ascontiguousarray(a[..., :3]),
        np.ascontiguousarray(a[..., 3]) if has_alpha else None,
        8,
        grayscale,
    )


def decode_image(
    data: bytes | str,
    *,
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> Picture:
    """Base64 (or raw bytes) -> Picture, refusing bombs, junk and unsupported formats with 4xx."""
    raw = _b64decode(data) if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ImageInputError(
            f"image is {len(raw)} bytes; the limit is {max_bytes} bytes: send a smaller file", 413
        )
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
            w, h = probe.size
    except Exception as exc:  # PIL raises many types for junk
        raise ImageInputError(f"image could not be decoded ({exc.__class__.__name__}): send PNG, JPEG or WebP")
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ImageInputError(f"image format {fmt} is not supported: send PNG, JPEG or WebP")
    if w * h > max_pixels:
        raise ImageInputError(
            f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}: send a smaller image", 413
        )
    if fmt == "PNG":
        pic = _decode_png_16(raw)
        if pic is not None:
            return pic
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: apply orientation, then forget it
            pic = _from_pil(im)
    except ImageInputError:
        raise
    except Exception as exc:
        raise ImageInputError(f"image data is corrupt ({exc.__class__.__name__}: {exc})")
    pic.info["source_format"] = fmt.lower()
    return pic


def _decode_png_16(raw: bytes) -> Picture | None:
    """PIL drops 16-bit colour PNGs to 8 bits; OpenCV keeps them. Only used for 16-bit colour."""
    import cv2

    # Bit depth lives at byte 24 of the IHDR chunk; colour type at 25 (2 = RGB, 6 = RGBA).
    if len(raw) < 26 or raw[24] != 16 or raw[25] not in (2, 6):
        return None
    arr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        return None
    a = arr.astype(np.float32) / 65535.0
    rgb = a[..., 2::-1] if a.shape[2] >= 3 else a  # BGR(A) -> RGB
    alpha = a[..., 3] if a.shape[2] == 4 else None
    pic = Picture(np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha), 16)
    pic.info["source_format"] = "png"
    return pic


def _b64decode(s: str) -> bytes:
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("image is not valid base64: send the file bytes base64-encoded")


def encode_image(pic: Picture, fmt: str = "png", quality: int = 95) -> bytes:
    """Picture -> file bytes. PNG keeps 16 bits, grayscale and alpha; JPEG drops alpha (on white)."""
    fmt = fmt.lower()
    if fmt == "png" and pic.bit_depth == 16:
        import cv2

        if pic.grayscale and pic.alpha is None:
            arr = _to_u16(pic.rgb.mean(axis=2))
        else:
            arr = _to_u16(pic.rgb[..., ::-1])  # RGB -> BGR
            if pic.alpha is not None:
                arr = np.dstack([arr, _to_u16(pic.alpha)])
        ok, buf = cv2.imencode(".png", arr)
        if not ok:
            raise RuntimeError("PNG encode failed")
        return buf.tobytes()
    im = pic.to_pil()
    if pic.grayscale:
        im = im.convert("LA" if pic.alpha is not None else "L")
    out = io.BytesIO()
    if fmt == "jpeg":
        if im.mode in ("RGBA", "LA"):
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[3])
            im = bg.convert("L") if pic.grayscale else bg
        im.save(out, "JPEG", quality=quality)
    elif fmt == "webp":
        im.save(out, "WEBP", quality=quality)
    else:
        im.save(out, "PNG")
    return out.getvalue()


def encode_b64(pic: Picture, fmt: str = "png") -> str:
    return base64.b64encode(encode_image(pic, fmt)).decode("ascii")
