"""Offline face detection with OpenCV's bundled Haar cascades, plus 5-point landmarks.

Pipeline (all CPU, no downloads; needs opencv-python-headless 4.x, whose wheel ships the XML files):

1. Candidates: `haarcascade_frontalface_default` on a grayscale copy (downscaled for big images).
2. Verification, on the candidate's neighbourhood resampled so the face is ~120 px wide:
   the independent `haarcascade_frontalface_alt2` cascade must confirm it strongly, or confirm it
   moderately *and* `haarcascade_eye` must find a plausible eye pair. Haar cascades alone fire on
   coins, gravel and textures; painting a GFPGAN face onto a false positive is far worse than
   leaving a real face untouched, so this favours precision over recall.
3. Landmarks: with an eye pair, the two eye centres fix position, scale and roll; the nose and
   mouth corners are then placed by the similarity transform that maps the FFHQ template's eyes
   onto them (i.e. alignment is effectively from the eye pair). Without an eye pair, the eyes are
   put at fixed fractions of the Haar box (`BOX_EYES`, measured on frontal faces); no roll.
   RetinaFace (`retinaface.py`, when its weights are configured) yields real 5-point landmarks in
   the same `DetectedFace`.

Limits (documented for users): frontal, upright faces only (roughly within +-15 degrees of roll and
modest yaw); profile faces, strong occlusion and faces smaller than ~24 px in the detection image
are not found.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# FFHQ 5-point template for a 512 px aligned face (GFPGAN / facexlib): image-left eye,
# image-right eye, nose tip, image-left mouth corner, image-right mouth corner.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)

# Eye centres as fractions of an OpenCV frontal-face box when no eye pair is found.
BOX_EYES = ((0.28, 0.37), (0.72, 0.37))

DETECT_SIDE = 1024  # big images are detected on a copy with this long side ...
DETECT_MAX_SIDE = 2048  # ... unless min_face_size needs more resolution, up to this
DETECT_MIN_PX = 48  # a face of min_face_size px should be at least this big in the detection copy
HAAR_MIN_PX = 24  # the frontal-face cascades' window
VERIFY_PX = 120  # candidates are resampled to this face width for verification / eye search

_ALT_STRONG = 25  # alt2 neighbours that confirm a face on their own
_ALT_WITH_EYES = 10  # alt2 neighbours that confirm a face together with an eye pair ...
_DEFAULT_WITH_EYES = 8  # ... and this many neighbours from the first cascade
_SMALL_PX = 40  # candidates smaller than this need both a strong alt2 and an eye pair


class DetectorUnavailable(RuntimeError):
    """OpenCV (or its bundled cascades) cannot be used here."""


@dataclass
class DetectedFace:
    box: tuple[float, float, float, float]  # x, y, w, h in image pixels
    landmarks: np.ndarray  # 5 x 2 float32, image pixels, order of FFHQ_TEMPLATE_512
    eyes_found: bool  # landmarks from a detected eye pair (else from the box heuristic)
    score: float  # verification strength (alt2 neighbours); only for ordering / debugging

    @property
    def size(self) -> float:
        return float(min(self.box[2], self.box[3]))


def landmarks_from_eyes(left_eye, right_eye) -> np.ndarray:
    """5 points from two eye centres: the FFHQ template carried by the eye-to-eye similarity."""
    src = FFHQ_TEMPLATE_512[:2].astype(np.float64)
    dst = np.array([left_eye, right_eye], dtype=np.float64)
    # Similarity z -> a*z + b in complex form, exact for two point pairs.
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    a = (zd[1] - zd[0]) / (zs[1] - zs[0])
    b = zd[0] - a * zs[0]
    zt = a * (FFHQ_TEMPLATE_512[:, 0] + 1j * FFHQ_TEMPLATE_512[:, 1]) + b
    return np.stack([zt.real, zt.imag], axis=1).astype(np.float32)


def landmarks_from_box(x: float, y: float, w: float, h: float) -> np.ndarray:
    (lx, ly), (rx, ry) = BOX_EYES
    return landmarks_from_eyes((x + lx * w, y + ly * h), (x + rx * w, y + ry * h))


class OpenCVFaceDetector:
    name = "opencv"

    def __init__(self) -> None:
        try:
            import cv2
        except Exception as exc:  # ImportError, or a broken binary wheel
            raise DetectorUnavailable(
                f"opencv cannot be imported ({exc.__class__.__name__}: {exc})"
            ) from exc
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise DetectorUnavailable(
                f"this OpenCV ({getattr(cv2, '__version__', '?')}) has no CascadeClassifier"
                " / bundled cascades; install opencv-python-headless 4.x"
            )
        self._cv2 = cv2
        self._lock = threading.Lock()  # CascadeClassifier is not documented as thread-safe
        self._face = self._load("haarcascade_frontalface_default.xml")
        self._alt = self._load("haarcascade_frontalface_alt2.xml")
        self._eye = self._load("haarcascade_eye.xml")

    def _load(self, fname: str):
        path = self._cv2.data.haarcascades + fname
        clf = self._cv2.CascadeClassifier(path)
        if clf.empty():
            raise DetectorUnavailable(f"OpenCV cascade {path} is missing or unreadable")
        return clf

    # --- public ---
    def detect(self, rgb: np.ndarray, min_face_size: int = 48) -> list[DetectedFace]:
        """All verified faces in an H x W x 3 float [0, 1] (or uint8) RGB image, largest first."""
        with self._lock:
            return self._detect(rgb, min_face_size)

    def _detect(self, rgb: np.ndarray, min_face_size: int) -> list[DetectedFace]:
        cv2 = self._cv2
        gray = _gray_u8(rgb, cv2)
        h, w = gray.shape
        scale = detection_scale(w, h, min_face_size)
        small = gray
        if scale < 1.0:
            small = cv2.resize(
                gray,
                (max(1, round(w * scale)), max(1, round(h * scale))),
                interpolation=cv2.INTER_AREA,
            )
        if min(small.shape) < HAAR_MIN_PX:
            return []
        boxes, neighbours = self._face.detectMultiScale2(
            small, scaleFactor=1.1, minNeighbors=3, minSize=(HAAR_MIN_PX, HAAR_MIN_PX)
        )
        faces: list[DetectedFace] = []
        for (bx, by, bw, bh), n in zip(
            np.asarray(boxes).reshape(-1, 4), np.asarray(neighbours).ravel()
        ):
            box = (bx / scale, by / scale, bw / scale, bh / scale)
            face = self._verify(gray, box, int(n))
            if face is not None:
                faces.append(face)
        faces = _suppress_overlaps(faces)
        faces.sort(key=lambda f: f.box[2] * f.box[3], reverse=True)
        return faces

    # --- internals ---
    def _verify(self, gray: np.ndarray, box, n_default: int) -> DetectedFace | None:
        cv2 = self._cv2
        x, y, w, h = box
        f = VERIFY_PX / w
        pad = 0.3 * w
        x0, y0 = max(0, int(x - pad)), max(0, int(y - pad))
        x1, y1 = (
            min(gray.shape[1], int(np.ceil(x + w + pad))),
            min(gray.shape[0], int(np.ceil(y + h + pad))),
        )
        roi = gray[y0:y1, x0:x1]
        if roi.size == 0:
            return None
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        roi = cv2.resize(
            roi,
            (max(1, round(roi.shape[1] * f)), max(1, round(roi.shape[0] * f))),
            interpolation=interp,
        )
        _, alt_n = self._alt.detectMultiScale2(
            roi,
            scaleFactor=1.05,
            minNeighbors=1,
            minSize=(int(VERIFY_PX * 0.7),) * 2,
            maxSize=(int(VERIFY_PX * 1.4),) * 2,
        )
        alt = int(np.max(alt_n)) if len(alt_n) else 0
        # Eyes: search the upper 60 % of the face box.
        ox, oy = int(round((x - x0) * f)), int(round((y - y0) * f))
        upper = roi[oy : oy + int(0.6 * VERIFY_PX), ox : ox + VERIFY_PX]
        pair = None
        if upper.shape[0] >= 20 and upper.shape[1] >= 20:
            eyes = self._eye.detectMultiScale(
                upper,
                scaleFactor=1.05,
                minNeighbors=3,
                minSize=(VERIFY_PX // 8, VERIFY_PX // 8),
                maxSize=(VERIFY_PX // 2, VERIFY_PX // 2),
            )
            pair = _pick_eye_pair(np.asarray(eyes).reshape(-1, 4), VERIFY_PX)
        with_eyes = pair is not None and alt >= _ALT_WITH_EYES and n_default >= _DEFAULT_WITH_EYES
        if w < _SMALL_PX:  # upsampled a lot for verification: the cascades get credulous
            ok = with_eyes and alt >= _ALT_STRONG
        else:
            ok = with_eyes or alt >= _ALT_STRONG
        if not ok:
            log.debug(
                "face candidate %s rejected (default=%d alt2=%d eyes=%s)",
                box,
                n_default,
                alt,
                pair is not None,
            )
            return None
        if pair is not None:
            (lx, ly), (rx, ry) = pair
            to_img = lambda px, py: (x0 + (ox + px) / f, y0 + (oy + py) / f)  # noqa: E731
            lm = landmarks_from_eyes(to_img(lx, ly), to_img(rx, ry))
        else:
            lm = landmarks_from_box(*box)
        return DetectedFace(
            box=tuple(float(v) for v in box),
            landmarks=lm,
            eyes_found=pair is not None,
            score=float(alt),
        )


def detection_scale(width: int, height: int, min_face_size: int) -> float:
    """Resampling factor for the detection copy (<= 1)."""
    long_side = max(width, height)
    scale = max(DETECT_SIDE / long_side, DETECT_MIN_PX / max(1, min_face_size))
    return float(min(1.0, scale, DETECT_MAX_SIDE / long_side))


def _gray_u8(rgb: np.ndarray, cv2) -> np.ndarray:
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)


def _pick_eye_pair(eyes: np.ndarray, n: int):
    """The most plausible (image-left, image-right) eye centres among cascade hits, or None."""
    if len(eyes) < 2:
        return None
    centres = [(ex + ew / 2.0, ey + eh / 2.0) for ex, ey, ew, eh in eyes]
    (elx, ely), (erx, ery) = (
        (BOX_EYES[0][0] * n, BOX_EYES[0][1] * n),
        (BOX_EYES[1][0] * n, BOX_EYES[1][1] * n),
    )
    best, best_cost = None, None
    for i, (ax, ay) in enumerate(centres):
        for j, (bx, by) in enumerate(centres):
            if i == j or not ax < 0.5 * n < bx:
                continue
            dx, dy = bx - ax, by - ay
            if not (0.25 * n <= dx <= 0.65 * n) or abs(dy) > 0.35 * dx:
                continue
            cost = np.hypot(ax - elx, ay - ely) + np.hypot(bx - erx, by - ery)
            if best_cost is None or cost < best_cost:
                best, best_cost = ((ax, ay), (bx, by)), cost
    return best


def _suppress_overlaps(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Keep the stronger of two detections that cover the same face."""
    kept: list[DetectedFace] = []
    for f in sorted(faces, key=lambda f: f.score, reverse=True):
        if all(_iou(f.box, k.box) < 0.3 for k in kept):
            kept.append(f)
    return kept


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    ix = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    iy = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0
