"""FaceRestorer: detect faces, align them to 512 px, restore with a spandrel model, paste back.

Detection is OpenCV's Haar cascades, or RetinaFace (`detector: retinaface`, facexlib's weight file).
A RetinaFace file that cannot be used (missing, checksum mismatch, corrupt, not a RetinaFace, torch
not importable, device unavailable) does not disable the pass: detection falls back to OpenCV, with
a warning in the log and a "detector fallback: ..." note in every face model's `models_info` detail.

Never raises for an environment problem (missing/corrupt weights, spandrel or torch not
importable, OpenCV without cascades, a failure or OOM during a forward pass): the picture comes
back unchanged with `FaceRestorationInfo(applied=False, reason="<code>: <detail>")` and the request
succeeds. It does raise `UnknownFaceModelError` (a ValueError: a 400 for the client) when a
request names a model that is not configured.

Reason codes (the part before the colon) follow `hiresfix.schemas.FallbackReason` where they
overlap: not_configured, not_installed, weights_missing, out_of_memory, error, plus the
informational no_face, faces_too_small, zero_weight.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiresfix.face.align import FACE_SIZE, align_face, paste_face
from hiresfix.face.detect import DetectedFace, DetectorUnavailable, OpenCVFaceDetector
from hiresfix.face.settings import FaceSettings
from hiresfix.images import Picture
from hiresfix.runtime import (
    AUTO_ON_GPU,
    ModelRecord,
    free_device_memory,
    is_oom,
    pick_device,
    pick_dtype,
)
from hiresfix.schemas import FaceRestorationInfo, FallbackReason, ModelInfo
from hiresfix.weights import file_problem

log = logging.getLogger("hiresfix.face")

# spandrel architecture ids we know how to drive (CodeFormer only with spandrel_extra_arches).
SUPPORTED_ARCHS = ("GFPGAN", "RestoreFormer", "CodeFormer")


class UnknownFaceModelError(ValueError):
    """A request named a face model that is not configured."""


@dataclass
class FaceTimings:
    """Seconds spent per phase by the last `restore` call of this thread (bench / logging)."""

    detect: float = 0.0
    align: float = 0.0
    forward: float = 0.0
    paste: float = 0.0
    faces: int = 0


class FaceRestorer:
    """Every configured restorer as a ModelRecord whose `model` is its spandrel descriptor once
    loaded, and the face detector."""

    def __init__(
        self,
        settings: FaceSettings,
        models: dict[str, ModelRecord],
        detector: Any,  # OpenCVFaceDetector | RetinaFaceDetector | None
        detector_error: str | None,
        detector_note: str | None = None,
    ):
        self.settings = settings
        self._models = models
        self._detector = detector
        self._detector_error = detector_error
        self._detector_note = detector_note  # which detector runs / why not the configured one
        self._local = threading.local()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(cls, s: FaceSettings) -> FaceRestorer:
        """Load every configured model now. Problems are recorded and logged, never raised."""
        detector, detector_error, detector_note = _build_detector(s)

        models = {m.name: ModelRecord(m, s.model_path(m)) for m in s.models}
        if models:
            spandrel_mod, lib_error = _import_backend()
            for m in models.values():
                if lib_error is not None:
                    m.fail(FallbackReason.not_installed, lib_error)
                else:
                    _load_model(m, s, spandrel_mod)
                if m.available:
                    log.info(
                        "face model %r loaded: %s on %s/%s from %s",
                        m.name,
                        m.architecture,
                        m.device,
                        m.dtype,
                        m.path,
                    )
                else:
                    log.warning(
                        "face model %r unavailable (%s): %s", m.name, m.reason.value, m.detail
                    )
        return cls(s, models, detector, detector_error, detector_note)

    # ------------------------------------------------------------------ status
    def available(self) -> bool:
        """True when the detector works and at least one configured restorer is loaded."""
        return self._detector is not None and any(m.available for m in self._models.values())

    @property
    def detector(self) -> Any:
        """The detector in use (OpenCVFaceDetector or RetinaFaceDetector), None if none works."""
        return self._detector

    @property
    def detector_name(self) -> str | None:
        """ "opencv", "retinaface", or None when no detector works."""
        return getattr(self._detector, "name", None)

    @property
    def detector_detail(self) -> str | None:
        """Which detector runs, or why the configured one does not (also in models_info detail)."""
        return self._detector_note

    def names(self) -> list[str]:
        return list(self._models)

    def resolve(self, name: str | None) -> str:
        """The configured model a request means (None = the default).

        Unknown -> UnknownFaceModelError.
        """
        if name is None:
            default = self.settings.default_name()
            if default is None:
                raise UnknownFaceModelError("no face restoration model is configured")
            return default
        if name not in self._models:
            raise UnknownFaceModelError(
                f"unknown face model {name!r}; configured: {', '.join(self._models) or 'none'}"
            )
        return name

    def models_info(self) -> list[ModelInfo]:
        default = self.settings.default_name()
        out = []
        for name, m in self._models.items():
            overrides: dict[str, Any] = {}
            if m.available and self._detector is None:
                overrides = dict(
                    available=False,
                    reason=FallbackReason.not_installed.value,
                    detail=self._detector_error,
                )
            elif m.available and self._detector_note:
                overrides = dict(detail="; ".join(x for x in (m.detail, self._detector_note) if x))
            out.append(m.info("face", name == default, **overrides))
        return out

    def descriptor(self, name: str | None = None) -> Any:
        """The loaded spandrel descriptor of a model (None when unavailable); for ops and tests."""
        return self._models[self.resolve(name)].model

    @property
    def last_timings(self) -> FaceTimings:
        return getattr(self._local, "timings", FaceTimings())

    # ------------------------------------------------------------------ work
    def detect(self, picture: Picture) -> list[DetectedFace]:
        """Every verified face (any size the detector sees), largest first.

        Raises if no detector.
        """
        if self._detector is None:
            raise RuntimeError(self._detector_error or "face detector unavailable")
        return self._detector.detect(picture.rgb, self.settings.min_face_size)

    def restore(
        self, picture: Picture, weight: float, model: str | None = None
    ) -> tuple[Picture, FaceRestorationInfo]:
        """Restore the faces of one picture; weight 0 = the input itself, 1 = fully restored.

        Raises only UnknownFaceModelError (a model name that is not configured).
        """
        timings = FaceTimings()
        self._local.timings = timings
        if not self._models and model is None:
            return picture, _not_applied(
                None, 0, "not_configured: no face restoration model is configured"
            )
        name = self.resolve(model)
        m = self._models[name]
        if not m.available:
            return picture, _not_applied(name, 0, f"{m.reason.value}: {m.detail}")
        if self._detector is None:
            return picture, _not_applied(name, 0, self._detector_error)
        w = float(weight)
        w = 0.0 if not w > 0.0 else min(w, 1.0)  # NaN and negatives mean "unchanged"

        found = 0
        try:
            t = time.perf_counter()
            faces = self.detect(picture)
            timings.detect = time.perf_counter() - t
            found = len(faces)
            if not faces:
                return picture, _not_applied(name, 0, "no_face: no face found")
            usable = [f for f in faces if f.size >= self.settings.min_face_size]
            if not usable:
                return picture, _not_applied(
                    name,
                    found,
                    f"faces_too_small: {found} face(s) found, all smaller than min_face_size "
                    f"{self.settings.min_face_size} px",
                )
            if w == 0.0:
                return picture, _not_applied(
                    name, found, "zero_weight: face_restoration_weight is 0"
                )
            usable = usable[: self.settings.max_faces]

            rgb = None  # copied once, on the first paste; faces are always cut from the input
            for face in usable:
                t = time.perf_counter()
                aligned = align_face(picture.rgb, face.landmarks, FACE_SIZE)
                timings.align += time.perf_counter() - t
                t = time.perf_counter()
                restored = self.restore_crop(name, aligned.crop)
                timings.forward += time.perf_counter() - t
                t = time.perf_counter()
                if picture.grayscale:
                    restored = np.repeat(restored.mean(axis=2, keepdims=True), 3, axis=2)
                if rgb is None:
                    rgb = np.array(picture.rgb, dtype=np.float32, copy=True)
                paste_face(rgb, aligned, restored, w, inplace=True)
                timings.paste += time.perf_counter() - t
                timings.faces += 1
        except Exception as exc:  # a failure in the pass must not fail the request
            code = "out_of_memory" if is_oom(exc) else "error"
            if code == "out_of_memory":
                free_device_memory(m.device)
            log.warning(
                "face restoration with %r failed; image left unchanged", name, exc_info=True
            )
            return picture, _not_applied(name, found, f"{code}: {exc.__class__.__name__}: {exc}")
        out = picture.with_pixels(rgb, picture.alpha)
        return out, FaceRestorationInfo(applied=True, faces_found=found, model=name)

    def restore_all(
        self, pictures: list[Picture], weight: float, model: str | None = None
    ) -> tuple[list[Picture], FaceRestorationInfo]:
        """Restore every picture of a request; one summary for the response: applied if any picture
        was, faces counted over all, the first reason a picture was left alone."""
        results = [self.restore(p, weight, model) for p in pictures]
        infos = [info for _, info in results]
        applied = [i for i in infos if i.applied]
        summary = FaceRestorationInfo(
            applied=bool(applied),
            faces_found=sum(i.faces_found for i in infos),
            model=(applied or infos)[0].model if infos else None,
            reason=next((i.reason for i in infos if not i.applied), None),
        )
        return [out for out, _ in results], summary

    def restore_crop(self, name: str, crop: np.ndarray) -> np.ndarray:
        """One aligned 512 x 512 x 3 float RGB face -> restored, same shape, in [0, 1]."""
        import torch

        m = self._models[self.resolve(name)]
        if not m.available:
            raise RuntimeError(f"face model {name!r} is not available: {m.detail}")
        desc = m.model
        with m.lock, torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None]
            x = x.to(device=desc.device, dtype=desc.dtype).clamp_(0.0, 1.0)
            if m.architecture == "GFPGAN":
                # The raw net works in [-1, 1]. The stored noise maps make the output reproducible
                # (upstream draws fresh noise per call; same distribution, so same quality).
                y = desc.model(x * 2.0 - 1.0, return_rgb=False, randomize_noise=False)[0]
                y = (y + 1.0) / 2.0
            else:
                y = desc(x)  # spandrel's call_fn normalises (RestoreFormer, CodeFormer)
            y = y.clamp_(0.0, 1.0).float()[0].permute(1, 2, 0).cpu().numpy()
        if not np.all(np.isfinite(y)):
            raise FloatingPointError("face model produced non-finite values")
        return np.ascontiguousarray(y, dtype=np.float32)


# ---------------------------------------------------------------------- helpers
def _not_applied(model: str | None, found: int, reason: str | None) -> FaceRestorationInfo:
    return FaceRestorationInfo(applied=False, faces_found=found, model=model, reason=reason)


def _import_backend():
    """(spandrel, None) or (None, why)."""
    try:
        import torch  # noqa: F401 - named in the reason when it is the one missing
    except Exception as exc:
        return None, f"torch cannot be imported ({exc.__class__.__name__}: {exc})"
    try:
        import spandrel
    except Exception as exc:
        return None, f"spandrel cannot be imported ({exc.__class__.__name__}: {exc})"
    try:  # CodeFormer & co. (non-commercial licences): only when the operator installed them
        import spandrel_extra_arches  # type: ignore[import-not-found]

        try:
            spandrel_extra_arches.install(ignore_duplicates=True)
        except TypeError:
            spandrel_extra_arches.install()
    except ImportError:
        pass
    except Exception as exc:  # already installed by another component, or a version mismatch
        log.debug("spandrel_extra_arches.install(): %s", exc)
    return spandrel, None


def _build_detector(s: FaceSettings) -> tuple[Any, str | None, str | None]:
    """(detector, error, note). RetinaFace when configured and usable, else OpenCV. Never raises."""
    note, why = None, None
    if s.detector == "retinaface":
        det, why = _load_retinaface(s)
        if det is not None:
            note = f"detector: retinaface ({det.describe()})"
            log.info("face detector: %s from %s", det.describe(), s.retinaface_path())
            return det, None, note
        note = f"detector fallback: retinaface unavailable ({why}); using opencv"
        log.warning(
            "RetinaFace face detector unavailable (%s); falling back to the OpenCV detector", why
        )
    try:
        return OpenCVFaceDetector(), None, note
    except DetectorUnavailable as exc:
        error = f"not_installed: face detector unavailable: {exc}"
        if why:
            error += f"; retinaface unavailable too ({why})"
        log.warning("face restoration disabled: %s", error)
        return None, error, note


def _load_retinaface(s: FaceSettings):
    """(RetinaFaceDetector, None) or (None, "<code>: <detail>"). Never raises."""
    path = s.retinaface_path()
    problem = file_problem(path, s.retinaface_sha256)
    if problem:
        return None, f"weights_missing: {problem}"
    try:
        from hiresfix.face.retinaface import RetinaFaceDetector  # imports torch
    except ImportError as exc:
        return None, f"not_installed: torch cannot be imported ({exc.__class__.__name__}: {exc})"
    try:
        device = pick_device(s.device)
    except Exception as exc:
        return None, f"error: {exc.__class__.__name__}: {exc}"
    try:
        det = RetinaFaceDetector.from_file(path, device=device, threshold=s.detector_threshold)
    except Exception as exc:
        code = "out_of_memory" if is_oom(exc) else "error"
        return None, (
            f"{code}: cannot load {path} as a RetinaFace detector (corrupt or unsupported file): "
            f"{exc.__class__.__name__}: {exc}"
        )
    return det, None


def _load_model(m: ModelRecord, s: FaceSettings, spandrel) -> None:
    """Fill m with the loaded descriptor, or with why not. Never raises."""
    path = m.path
    problem = file_problem(path, m.spec.sha256)
    if problem:
        m.fail(FallbackReason.weights_missing, problem)
        return
    try:
        device = pick_device(s.device)
    except Exception as exc:
        m.fail(FallbackReason.error, f"{exc.__class__.__name__}: {exc}")
        return
    try:
        desc = spandrel.ModelLoader().load_from_file(str(path))
    except Exception as exc:
        m.fail(
            FallbackReason.error,
            f"cannot load {path} as a model (corrupt or unsupported file): "
            f"{exc.__class__.__name__}: {exc}",
        )
        return
    arch = getattr(getattr(desc, "architecture", None), "id", None) or type(desc).__name__
    purpose = getattr(desc, "purpose", None)
    if purpose != "FaceSR" or arch not in SUPPORTED_ARCHS:
        m.fail(
            FallbackReason.error,
            f"{path} is not a supported face restoration model"
            f" (architecture {arch}, purpose {purpose}); "
            f"supported: {', '.join(SUPPORTED_ARCHS)}",
        )
        return
    dtype, note = pick_dtype(
        s.dtype,
        device,
        AUTO_ON_GPU["face"],
        supports_fp16=desc.supports_half,
        supports_bf16=desc.supports_bfloat16,
        model=arch,
    )
    try:
        desc.to(device)
        desc.to(dtype)
        desc.eval()
        for p in desc.model.parameters():
            p.requires_grad_(False)
    except Exception as exc:
        m.fail(
            FallbackReason.out_of_memory if is_oom(exc) else FallbackReason.error,
            f"cannot move {arch} to {device}: {exc.__class__.__name__}: {exc}",
        )
        return
    if note:
        log.warning("face model %r: %s", m.name, note)
    m.loaded(desc, arch, device, dtype, note)
