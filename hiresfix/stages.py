"""What travels between the stages of one request (base -> upscaler -> refine/face -> ingress).

A plain dataclass of Pictures, so the same object flows through the Ray graph (pickled between
replicas) and through in-process calls in tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hiresfix.images import Picture
from hiresfix.schemas import FaceRestorationInfo, FallbackReason, ImageResponse


@dataclass
class UpscaleOutcome:
    """One upscaled picture and how it was made."""

    picture: Picture
    upscaler_used: str  # configured model name, or "lanczos"
    fallback_reason: FallbackReason | None = None
    fallback_detail: str | None = None


@dataclass
class ImageBatch:
    pictures: list[Picture]
    seeds: list[int | None]
    timings: dict[str, float] = field(default_factory=dict)
    upscaler_used: str | None = None
    fallback_reason: FallbackReason | None = None
    fallback_detail: str | None = None
    face_restoration: FaceRestorationInfo = field(default_factory=FaceRestorationInfo)
    # Ensemble-of-experts only: base latents handed to the refine model (pictures is empty then).
    latents: Any = None
    # The request's id, carried from stage to stage so each can report progress (GET /progress).
    request_id: str | None = None
    # stage -> (requests, images) of the one model call this batch's pictures shared with others'
    # (hiresfix.sdxl run_batch / hires_batch; (1, n): alone). The answer's batched_with.
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 4)

    def record_upscale(self, outcomes: list[UpscaleOutcome]) -> None:
        """Adopt upscaled pictures; the first fallback (if any) is what the response reports."""
        self.pictures = [o.picture for o in outcomes]
        self.upscaler_used = outcomes[0].upscaler_used
        failed = next((o for o in outcomes if o.fallback_reason is not None), None)
        if failed is not None:
            self.upscaler_used = failed.upscaler_used
            self.fallback_reason = failed.fallback_reason
            self.fallback_detail = failed.fallback_detail

    def response(
        self, images: list[str], output_format: str, request_id: str | None
    ) -> ImageResponse:
        """The answer's body; `images` are the encoded pictures (base64, or [""] for an image/*
        answer)."""
        first = self.pictures[0]
        seeds = [s for s in self.seeds if s is not None]
        return ImageResponse(
            image=images[0],
            images=images,
            width=first.width,
            height=first.height,
            seed=seeds[0] if seeds else None,
            seeds=seeds,
            upscaler_used=self.upscaler_used,
            fallback_reason=self.fallback_reason,
            fallback_detail=self.fallback_detail,
            face_restoration=self.face_restoration,
            output_format=output_format,
            timings=self.timings,
            request_id=request_id,
            batched_with={stage: requests for stage, (requests, _) in self.shared.items()},
        )


# Fallbacks the ingress runs itself when an optional stage's replica (or its node) is gone: the
# request still succeeds and its answer says what was skipped (hiresfix/plan.py names them).
def upscale_unavailable(
    batch: ImageBatch, size: tuple[int, int], model: str | None, use_neural: bool
) -> ImageBatch:
    from hiresfix.upscale.resample import (
        resize_picture,  # here: hiresfix.upscale imports this module
    )

    batch.pictures = [resize_picture(p, tuple(size)) for p in batch.pictures]
    batch.upscaler_used = "lanczos"
    if use_neural:
        batch.fallback_reason = FallbackReason.upscaler_unavailable
        batch.fallback_detail = (
            "the upscaler stage was unavailable (its replica or node is gone); LANCZOS was used"
        )
    else:
        batch.fallback_reason = FallbackReason.disabled_by_request
        batch.fallback_detail = "use_realesrgan is false: LANCZOS was requested"
    return batch


def faces_unavailable(batch: ImageBatch, weight: float, model: str | None) -> ImageBatch:
    batch.face_restoration = FaceRestorationInfo(
        applied=False,
        model=model,
        reason="unavailable: the face stage's replica or node is gone; faces untouched",
    )
    return batch
