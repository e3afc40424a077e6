"""What one deployment accepts beyond the schema's hard bounds: the profile's request limits and the
configured model names. Domain rules, checked by the ingress before any stage runs; Ray-free.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hiresfix.schemas import GenerateRequest, RequestError, UpscaleRequest


class Limits(BaseModel):
    """serve_config `args.limits`: stricter than the schema's bounds, per profile."""

    model_config = ConfigDict(extra="forbid")
    max_side: int | None = Field(
        None, description="Largest base width/height this profile accepts."
    )
    max_steps: int | None = Field(None, description="Most denoising steps per pass.")
    max_output_side: int = Field(
        8192, description="Longest side of a hires fix or /upscale result."
    )
    max_input_pixels: int = Field(
        4096 * 4096, description="/upscale decompression-bomb guard (header)."
    )
    max_input_bytes: int = Field(
        32 * 1024 * 1024, description="Largest decoded /upscale image file."
    )

    def max_body_bytes(self) -> int:
        """A request body: the image base64-encoded, plus room for the other fields."""
        return self.max_input_bytes * 4 // 3 + 1024 * 1024

    def check_generate(self, req: GenerateRequest) -> None:
        for name in ("width", "height"):
            value = getattr(req, name)
            if self.max_side and value > self.max_side:
                raise RequestError(
                    name, f"{value} exceeds this deployment's limit of {self.max_side}"
                )
        if req.hires_fix and max(req.output_size()) > self.max_output_side:
            knob = (
                "hires_height"
                if req.hires_height and not req.hires_width
                else "hires_width"
                if req.hires_width
                else "hires_scale"
            )
            raise RequestError(
                knob,
                f"hires output would be {max(req.output_size())} px on its long side;"
                f" this deployment's limit is {self.max_output_side}:"
                f" lower {knob} or the base size",
            )
        self._check_steps("num_inference_steps", req.num_inference_steps)
        if req.hires_fix:
            self._check_steps("hires_steps", req.hires_steps)

    def upscale_size(self, req: UpscaleRequest, width: int, height: int) -> tuple[int, int]:
        """The exact /upscale result size for a decoded image, or a 422 naming `scale`."""
        size = (max(1, round(width * req.scale)), max(1, round(height * req.scale)))
        if max(size) > self.max_output_side:
            raise RequestError(
                "scale",
                f"output would be {max(size)} px on its long side; the limit is"
                f" {self.max_output_side}: lower scale",
            )
        return size

    def _check_steps(self, name: str, steps: int) -> None:
        if self.max_steps and steps > self.max_steps:
            raise RequestError(name, f"{steps} exceeds this deployment's limit of {self.max_steps}")


def check_models(
    req: GenerateRequest | UpscaleRequest, upscalers: list[str], faces: list[str]
) -> None:
    """Unknown model names are a client error here, not a fallback later (one bad job inside the
    upscaler's @serve.batch would fail the whole batch)."""
    if req.upscaler is not None and req.upscaler not in upscalers:
        raise RequestError(
            "upscaler",
            f"unknown upscaler {req.upscaler!r}; configured: {', '.join(upscalers) or 'none'}",
        )
    if req.face_model is not None and req.face_model not in faces:
        raise RequestError(
            "face_model",
            f"unknown face model {req.face_model!r}; configured: {', '.join(faces) or 'none'}",
        )
