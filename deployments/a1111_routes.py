"""AUTOMATIC1111's API on the ingress: txt2img, extra-single-image and the read-only lists A1111
clients fetch at start-up. The mapping is hiresfix/a1111.py; these routes only call the Ingress's
helpers (`_generate`, `_upscale`, `_encode`, `_stage_infos`), and `Ingress` inherits them (Ray
Serve's @serve.ingress finds routes on base classes through the class's MRO).
"""

# No `from __future__ import annotations`: FastAPI must see real types on the route methods.
import json
import time

from fastapi import Request
from fastapi.responses import Response

from deployments.http import api, error_docs, json_answer, request_id
from hiresfix.a1111 import (
    ExtrasRequest,
    ExtrasResponse,
    FaceRestorerItem,
    OptionsUpdate,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
    Txt2ImgResponse,
    UpscalerItem,
    checkpoint,
    face_restorers,
    info_json,
    options,
    samplers,
    schedulers,
    update_options,
    upscalers,
)
from hiresfix.schemas import RequestError

TXT2IMG_ERRORS = error_docs(400, 401, 408, 409, 413, 422, 429, 500, 503)
EXTRAS_ERRORS = error_docs(400, 401, 408, 413, 422, 429, 500, 503)
LIST_ERRORS = error_docs(401, 500)


class A1111Routes:
    """Mixed into the Ingress (deployments/ingress.py)."""

    @api.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse, responses=TXT2IMG_ERRORS)
    async def a1111_txt2img(self, body: Txt2ImgRequest, request: Request) -> Response:
        """AUTOMATIC1111's txt2img API (hiresfix/a1111.py): A1111 clients work unchanged."""
        req, notes = body.to_generate(self.upscaler_names)
        rid, t0 = request_id(request), time.perf_counter()
        ours = await self._encode(await self._generate(req, rid), "png", t0, rid)
        meta = ours.model_dump(mode="json", exclude={"image", "images"})
        return json_answer(
            Txt2ImgResponse(
                images=ours.images,
                parameters=body.model_dump(),
                info=info_json(req, ours.seeds, meta, notes),
            )
        )

    @api.post(
        "/sdapi/v1/extra-single-image", response_model=ExtrasResponse, responses=EXTRAS_ERRORS
    )
    async def a1111_extras(self, body: ExtrasRequest) -> Response:
        """AUTOMATIC1111's upscale API (hiresfix/a1111.py)."""
        req, notes = body.to_upscale(self.upscaler_names)
        t0 = time.perf_counter()
        try:
            batch = await self._upscale(req, t0)
        except RequestError as exc:  # name the field the A1111 client sent
            exc.field = {"scale": "upscaling_resize", "upscaler": "upscaler_1"}.get(
                exc.field, exc.field
            )
            raise
        ours = await self._encode(batch, "png", t0, None)
        meta = {**ours.model_dump(mode="json", exclude={"image", "images"}), "ignored": notes}
        fallback = f" (fallback: {ours.fallback_reason.value})" if ours.fallback_reason else ""
        return json_answer(
            ExtrasResponse(
                image=ours.image,
                html_info=f"<p>upscaler: {ours.upscaler_used}{fallback}</p>",
                info=json.dumps(meta),
            )
        )

    # --- read-only lists ---
    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem], responses=LIST_ERRORS)
    async def a1111_samplers(self) -> list[SamplerItem]:
        """The samplers `sampler_name` takes (our names are aliases)."""
        return samplers()

    @api.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], responses=LIST_ERRORS)
    async def a1111_schedulers(self) -> list[SchedulerItem]:
        return schedulers()

    @api.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], responses=LIST_ERRORS)
    async def a1111_upscalers(self) -> list[UpscalerItem]:
        """Exactly the `hr_upscaler` / `upscaler_1` names that select an upscaler here."""
        infos = await self._stage_infos()
        scales = {m["name"]: m.get("scale") for m in infos["Upscaler"].get("models", [])}
        return upscalers(self.upscaler_names, scales)

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], responses=LIST_ERRORS)
    async def a1111_sd_models(self) -> list[SDModelItem]:
        """The one SDXL model this deployment serves."""
        return [checkpoint(await self._sdxl_source())]

    @api.get(
        "/sdapi/v1/face-restorers", response_model=list[FaceRestorerItem], responses=LIST_ERRORS
    )
    async def a1111_face_restorers(self) -> list[FaceRestorerItem]:
        return face_restorers(self.face_names)

    @api.get("/sdapi/v1/options", response_model=dict, responses=LIST_ERRORS)
    async def a1111_options(self) -> dict:
        """A subset of A1111's settings, as this deployment has them."""
        return options(await self._sdxl_source(), self.face_names)

    @api.post(
        "/sdapi/v1/options",
        response_model=OptionsUpdate,
        responses=error_docs(400, 401, 408, 413, 422, 429, 500, 503),
    )
    async def a1111_set_options(self, body: dict) -> OptionsUpdate:
        """Changes nothing (the options are the deployment's, shared by every client): answers
        which keys sent differ and stay as they are; another checkpoint is a 422."""
        return update_options(body, await self._sdxl_source(), self.face_names)
