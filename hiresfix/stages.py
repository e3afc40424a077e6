"""What travels between the stages of one request (base -> upscaler -> refine/face -> ingress).

A plain dataclass of Pictures, so the same object flows through the Ray graph (pickled between
replicas) and through in-process calls in tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hiresfix.images import Picture
from hiresfix.schemas import FaceRestorationInfo, FallbackReason


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
