"""Which stages a request runs, in order: the one table the ingress chains and progress counts.

A request's plan is a list of `StageCall`s: the stage's name (what GET /progress shows), how many
steps it runs, and which deployment method it calls with which arguments. The ingress passes the
picture batch from each call into the next (deployments/ingress.py) and the progress board opens
the request with `steps_of(plan)`, so the two can never disagree. Ray-free and torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hiresfix.schedule import hires_steps_run
from hiresfix.schemas import GenerateRequest, Img2ImgRequest, UpscaleRequest
from hiresfix.stages import ImageBatch, faces_unavailable, upscale_unavailable


@dataclass(frozen=True)
class StageCall:
    stage: str  # base, finish, img2img, upscale, hires, face
    steps: int  # denoising steps; the upscale and face passes count as one
    deployment: str  # "base", "upscaler" or "refine": a handle the ingress holds
    method: str
    args: tuple[Any, ...] = ()  # after the incoming batch (the first stage gets no batch)
    # An optional stage's documented fallback, run by the ingress when the stage is gone; None =
    # the request fails with a retryable 503.
    fallback: Callable[..., ImageBatch] | None = None


def generate_plan(req: GenerateRequest, request_id: str | None = None) -> list[StageCall]:
    n = req.num_inference_steps
    if req.refiner_switch_at is None:
        plan = [StageCall("base", n, "base", "generate", (req, request_id))]
    else:  # ensemble of experts: the base stops at the switch point, the refine model finishes
        base = max(1, min(n - 1, round(n * req.refiner_switch_at))) if n > 1 else 1
        plan = [
            StageCall("base", base, "base", "generate", (req, request_id)),
            StageCall("finish", max(1, n - base), "refine", "finish", (req,)),
        ]
    return plan + _hires(req) + _face(req)


def img2img_plan(
    req: Img2ImgRequest, gen: GenerateRequest, size: tuple[int, int], mask: Any
) -> list[StageCall]:
    """/img2img: the decoded picture is redrawn (inpainted with `mask`) at `size` on the base
    model, then the hires fix and face pass of `gen` (req.as_generate at that size) follow."""
    steps = hires_steps_run(req.num_inference_steps, 0, req.strength)
    return (
        [StageCall("img2img", steps, "base", "img2img", (req, size, mask))]
        + _hires(gen)
        + _face(gen)
    )


def _hires(req: GenerateRequest) -> list[StageCall]:
    plan = []
    if req.hires_fix:
        plan += [
            StageCall(
                "upscale",
                1,
                "upscaler",
                "upscale",
                (req.output_size(), req.upscaler, req.use_realesrgan),
                upscale_unavailable,
            ),
            StageCall(
                "hires",
                hires_steps_run(req.num_inference_steps, req.hires_steps, req.denoising_strength),
                "refine",
                "hires",
                (req,),
            ),
        ]
    return plan


def upscale_plan(req: UpscaleRequest, size: tuple[int, int]) -> list[StageCall]:
    """/upscale: the decoded picture goes to the upscaler, then (optionally) the face pass."""
    return [
        StageCall(
            "upscale",
            1,
            "upscaler",
            "upscale",
            (size, req.upscaler, req.use_realesrgan),
            upscale_unavailable,
        )
    ] + _face(req)


def _face(req: GenerateRequest | UpscaleRequest) -> list[StageCall]:
    if not req.use_face_restoration:
        return []
    return [
        StageCall(
            "face",
            1,
            "refine",
            "restore_faces",
            (req.face_restoration_weight, req.face_model),
            faces_unavailable,
        )
    ]


def steps_of(plan: list[StageCall]) -> dict[str, int]:
    """Steps per stage, in order: what the progress board counts."""
    return {c.stage: c.steps for c in plan}
