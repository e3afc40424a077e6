"""Configuration of the face restoration pass (the `face:` block of serve_config*.yaml).

Everything here is validated at start-up: a typo, a duplicate name, a default that names no
configured model, or `detector: retinaface` without `retinaface_file` is a configuration error that
stops the replica with a message. Missing or broken weight *files* are not:
`FaceRestorer.from_settings` records restorers as unavailable (the service keeps answering, faces
untouched) and a RetinaFace file it cannot use makes detection fall back to the OpenCV detector,
with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hiresfix.runtime import DeviceSetting, DtypeSetting
from hiresfix.weights import Sha256, WeightsFolder, check_model_names


class FaceModelSpec(BaseModel):
    """One configured face restorer: requests choose it by `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="What requests send as face_model.")
    file: str = Field(
        ...,
        min_length=1,
        description="Weights file (.pth/.safetensors), relative to weights_dir or absolute.",
    )
    sha256: Sha256 | None = Field(
        None, description="Expected SHA-256 of the file; a mismatch marks the model unavailable."
    )


class FaceSettings(WeightsFolder):
    model_config = ConfigDict(extra="forbid")

    models: list[FaceModelSpec] = Field(default_factory=list)
    default: str | None = Field(
        None, description="Model used when a request names none; null = first."
    )
    detector: Literal["opencv", "retinaface"] = Field(
        "opencv",
        description=(
            "opencv: bundled Haar cascades (offline, CPU). retinaface: facexlib's RetinaFace file "
            "(retinaface_file); if that file cannot be used, detection falls back to opencv with a "
            "warning."
        ),
    )
    retinaface_file: str | None = Field(
        None,
        description=(
            "RetinaFace weights: facexlib's detection_Resnet50_Final.pth or "
            "detection_mobilenet0.25_Final.pth, relative to weights_dir or absolute. "
            "Required by detector: retinaface; ignored by opencv."
        ),
    )
    retinaface_sha256: Sha256 | None = Field(
        None,
        description=(
            "Expected SHA-256 of retinaface_file; a mismatch makes detection fall back to opencv."
        ),
    )
    detector_threshold: float = Field(
        0.97,
        gt=0.0,
        lt=1.0,
        description=(
            "RetinaFace face score needed (0.97 = facexlib's FaceRestoreHelper, what GFPGAN uses). "
            "Ignored by opencv."
        ),
    )
    min_face_size: int = Field(
        48, ge=1, description="Faces smaller than this (px, box side) are skipped."
    )
    max_faces: int = Field(
        8, ge=1, description="At most this many faces (largest first) are restored per image."
    )
    device: DeviceSetting = "auto"
    dtype: DtypeSetting = Field(
        "auto",
        description=(
            "auto = fp32 (GFPGAN does not support fp16); a precision the model lacks runs fp32."
        ),
    )

    @field_validator("retinaface_file")
    @classmethod
    def _retinaface_file_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("retinaface_file must not be empty (leave it out, or name the file)")
        return v

    @model_validator(mode="after")
    def _detector_configured(self) -> FaceSettings:
        if self.detector == "retinaface" and self.retinaface_file is None:
            raise ValueError(
                "detector 'retinaface' needs retinaface_file: facexlib's "
                "detection_Resnet50_Final.pth or detection_mobilenet0.25_Final.pth "
                "(relative to weights_dir or absolute); or use detector: opencv"
            )
        return self

    @model_validator(mode="after")
    def _names_consistent(self) -> FaceSettings:
        check_model_names("face model", [m.name for m in self.models], self.default)
        return self

    def retinaface_path(self) -> Path | None:
        return None if self.retinaface_file is None else self.weights_file(self.retinaface_file)

    def default_name(self) -> str | None:
        if self.default is not None:
            return self.default
        return self.models[0].name if self.models else None
