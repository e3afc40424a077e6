"""The OpenAI Images API on the ingress: `POST /v1/images/generations` and `GET /v1/models`.

The mapping is hiresfix/openai_api.py; these routes only call the Ingress's helpers (`_generate`,
`_encode`, `_sdxl_source`), and `Ingress` inherits them (Ray Serve's @serve.ingress finds routes on
base classes through the class's MRO). Errors under /v1/ take OpenAI's shape in deployments/http.py
(error_shape_for) and deployments/guard.py.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the route methods.
import time

from fastapi import Request
from fastapi.responses import Response

from deployments.http import api, json_answer, request_id
from hiresfix.openai_api import (
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    check_model,
    model_list,
    model_needs_lookup,
    openai_error_docs,
    to_openai,
)
from hiresfix.schemas import RequestError

GENERATIONS_ERRORS = openai_error_docs(400, 401, 404, 408, 409, 413, 429, 500, 503)
MODELS_ERRORS = openai_error_docs(401, 500)


class OpenAIRoutes:
    """Mixed into the Ingress (deployments/ingress.py)."""

    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=GENERATIONS_ERRORS)
    async def openai_generations(self, body: ImageGenerationRequest, request: Request) -> Response:
        """OpenAI's `images.generate` (b64_json answers). hiresfix's /generate fields are
        accepted beside OpenAI's (the SDK's `extra_body`)."""
        if model_needs_lookup(body.model):
            check_model(body.model, await self._sdxl_source())
        mapped = body.to_generate(self.limits.max_side)
        rid, t0 = request_id(request), time.perf_counter()
        req = mapped.request
        try:
            batch = await self._generate(req, rid)
        except RequestError as exc:  # a limit on a field the client spelled size or n
            if exc.field in ("width", "height", "hires_width", "hires_height", "hires_scale"):
                exc.message = f"{mapped.size[0]}x{mapped.size[1]}: {exc.message}"
                exc.field = "size"
            raise
        ours = await self._encode(batch, req.output_format, t0, rid)
        answer = json_answer(to_openai(ours, mapped))
        answer.headers["x-request-id"] = rid
        return answer

    @api.get("/v1/models", response_model=ModelList, responses=MODELS_ERRORS)
    async def openai_models(self) -> ModelList:
        """What `model` takes: the served SDXL model (OpenAI's image model names mean it too)."""
        return model_list(await self._sdxl_source())
