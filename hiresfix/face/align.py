"""Align a face to the restorer's 512 px FFHQ template, and paste a restored face back.

Same geometry as GFPGAN/facexlib: a 4-DOF similarity (rotation, uniform scale, translation)
estimated with `cv2.estimateAffinePartial2D` from the 5 landmarks to the template; crop with a
constant grey border; paste back with the inverse affine under a mask that is the warped template
square, eroded and Gaussian-blurred so that the seam fades out *inside* the square. Pixels outside
the (warped) square are never written.

All work is on float32 RGB in [0, 1], so a 16-bit source is not squeezed through 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hiresfix.face.detect import FFHQ_TEMPLATE_512

FACE_SIZE = 512
BORDER_RGB = (135 / 255.0, 133 / 255.0, 132 / 255.0)  # facexlib's crop border value


@dataclass
class AlignedFace:
    crop: np.ndarray  # FACE_SIZE x FACE_SIZE x 3 float32 RGB
    affine: np.ndarray  # 2 x 3, image -> crop
    inverse: np.ndarray  # 2 x 3, crop -> image
    region: tuple[int, int, int, int]  # x0, y0, x1, y1: the pixels a paste may touch (clipped)


def estimate_affine(landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    import cv2

    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    m, _ = cv2.estimateAffinePartial2D(
        np.asarray(landmarks, np.float32), template, method=cv2.LMEDS
    )
    if m is None:  # degenerate landmarks (all equal): fall back to the least-squares fit
        m, _ = cv2.estimateAffinePartial2D(
            np.asarray(landmarks, np.float32),
            template,
            method=cv2.RANSAC,
            ransacReprojThreshold=1e9,
        )
    if m is None:
        raise ValueError("cannot estimate a face alignment from these landmarks")
    return m.astype(np.float64)


def paste_region(
    inverse: np.ndarray, width: int, height: int, size: int = FACE_SIZE
) -> tuple[int, int, int, int]:
    """Bounding box (clipped to the image) of the crop square mapped back into the image."""
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    pts = corners @ inverse.T
    x0 = max(0, int(np.floor(pts[:, 0].min())) - 2)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - 2)
    x1 = min(width, int(np.ceil(pts[:, 0].max())) + 2)
    y1 = min(height, int(np.ceil(pts[:, 1].max())) + 2)
    return x0, y0, x1, y1


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = FACE_SIZE) -> AlignedFace:
    import cv2

    m = estimate_affine(landmarks, size)
    inv = cv2.invertAffineTransform(m)
    region = paste_region(inv, rgb.shape[1], rgb.shape[0], size)
    src, m_src = rgb, m
    scale = float(np.hypot(m[0, 0], m[0, 1]))
    x0, y0, x1, y1 = region
    if scale < 0.75 and x1 > x0 and y1 > y0:
        # A face much larger than the template: a bilinear warp would alias, so shrink the
        # face's neighbourhood with area averaging first and warp from that.
        w, h = x1 - x0, y1 - y0
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        src = cv2.resize(
            np.ascontiguousarray(rgb[y0:y1, x0:x1]), (nw, nh), interpolation=cv2.INTER_AREA
        )
        back = np.array([[w / nw, 0.0, x0], [0.0, h / nh, y0], [0.0, 0.0, 1.0]])  # small -> image
        m_src = m @ back
    crop = cv2.warpAffine(
        np.ascontiguousarray(src, dtype=np.float32),
        m_src,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_RGB,
    )
    return AlignedFace(crop, m, inv, region)


def paste_face(
    rgb: np.ndarray, face: AlignedFace, restored: np.ndarray, weight: float, inplace: bool = False
) -> np.ndarray:
    """`rgb` with `restored` (crop space) blended in at `weight` under a feathered mask.

    Only pixels inside `face.region` where the mask is > 0 change; every other pixel keeps its
    value bit for bit. Returns a copy unless `inplace` (then `rgb` itself, modified).
    """
    import cv2

    out = rgb if inplace else rgb.copy()
    x0, y0, x1, y1 = face.region
    if x1 <= x0 or y1 <= y0:
        return out
    size = restored.shape[0]
    inv = face.inverse.copy()
    inv[:, 2] -= (x0, y0)  # warp straight into the region, not the whole image
    rw, rh = x1 - x0, y1 - y0
    back = cv2.warpAffine(
        np.ascontiguousarray(restored, np.float32), inv, (rw, rh), flags=cv2.INTER_LINEAR
    )
    mask = cv2.warpAffine(np.ones((size, size), np.float32), inv, (rw, rh), flags=cv2.INTER_LINEAR)
    # Keep only pixels fully inside the square (the interpolated rim would mix in the black
    # outside), shave one more pixel, then feather inwards.
    mask = (mask > 0.999).astype(np.float32)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=1)
    edge = max(1, int(np.sqrt(float(mask.sum()))) // 20)
    kernel = np.ones((2 * edge + 1, 2 * edge + 1), np.uint8)
    mask = cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1)
    mask = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0, borderType=cv2.BORDER_REPLICATE)
    mask *= np.float32(weight)
    region = out[y0:y1, x0:x1]
    touch = mask > 0
    m3 = mask[..., None]
    blended = region + m3 * (back - region)
    region[touch] = blended[touch]
    return out
