"""Configuration of the face restoration pass (the `face:` block of serve_config*.yaml).

Everything here is validated at start-up: a typo, a duplicate name, a default that names no
configured model, or `detector: retinaface` without `retinaface_file` is a configuration error that
stops the replica with a message. Missing or broken weight *files* are not: `FaceRestorer.from_settings`
records restorers as unavailable (the service keeps answering, faces untouched) and a RetinaFace file
it cannot use makes detection fall back to the OpenCV detector, with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WEIGHTS_DIR_ENV = "HIRESFIX_WEIGHTS_DIR"


class FaceModelSpec(BaseModel):
    """One configured face restorer: requests choose it by `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="What requests send as face_model.")
    file: str = Field(
        ...,
        min_length=1,
        description="Weights file (.pth/.safetensors), relative to weights_dir or absolute.",
    )
    sha256: str | None = Field(
        None, description="Expected SHA-256 of the file; a mismatch marks the model unavailable."
    )

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str | None) -> str | None:
        return _hex_digest(v)


def _hex_digest(v: str | None) -> str | None:
    if v is None:
        return v
    v = v.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError("sha256 must be 64 hexadecimal digits")
    return v


class FaceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights_dir: str = Field(
        "weights", description=f"Folder for relative model files; env {WEIGHTS_DIR_ENV} overrides."
    )
    models: list[FaceModelSpec] = Field(default_factory=list)
    default: str | None = Field(None, description="Model used when a request names none; null = first.")
    detector: Literal["opencv", "retinaface"] = Field(
        "opencv",
        description=(
            "opencv: bundled Haar cascades (offline, CPU). retinaface: facexlib's RetinaFace file "
            "(retinaface_file); if that file cannot be used, detection falls back to opencv with a warning."
        ),
    )
    retinaface_file: str | None = Field(
        None,
        description=(
            "RetinaFace weights: facexlib's detection_Resnet50_Final.pth or detection_mobilenet0.25_Final.pth, "
            "relative to weights_dir or absolute. Required by detector: retinaface; ignored by opencv."
        ),
    )
    retinaface_sha256: str | None = Field(
        None, description="Expected SHA-256 of retinaface_file; a mismatch makes detection fall back to opencv."
    )
    detector_threshold: float = Field(
        0.97,
        gt=0.0,
        lt=1.0,
        description="RetinaFace face score needed (0.97 = facexlib's FaceRestoreHelper, what GFPGAN uses). "
        "Ignored by opencv.",
    )
    min_face_size: int = Field(48, ge=1, description="Faces smaller than this (px, box side) are skipped.")
    max_faces: int = Field(
        8, ge=1, description="At most this many faces (largest first) are restored per image."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float32 (GFPGAN does not support float16)."
    )

    @field_validator("retinaface_sha256")
    @classmethod
    def _retinaface_digest(cls, v: str | None) -> str | None:
        return _hex_digest(v)

    @field_validator("retinaface_file")
    @classmethod
    def _retinaface_file_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("retinaface_file must not be empty (leave it out, or name the file)")
        return v

    @model_validator(mode="after")
    def _detector_configured(self) -> "FaceSettings":
        if self.detector == "retinaface" and self.retinaface_file is None:
            raise ValueError(
                "detector 'retinaface' needs retinaface_file: facexlib's detection_Resnet50_Final.pth or "
                "detection_mobilenet0.25_Final.pth (relative to weights_dir or absolute); or use detector: opencv"
            )
        return self

    @model_validator(mode="after")
    def _names_consistent(self) -> "FaceSettings":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"face model names must be unique; repeated: {', '.join(dupes)}")
        if self.default is not None and self.default not in names:
            raise ValueError(
                f"face default {self.default!r} is not a configured model; "
                f"configured: {', '.join(names) or 'none'}"
            )
        return self

    # --- derived values (read the environment when called, never stored in the dump) ---
    def effective_weights_dir(self) -> Path:
        env = os.environ.get(WEIGHTS_DIR_ENV)
        return Path(env if env else self.weights_dir).expanduser()

    def model_path(self, spec: FaceModelSpec) -> Path:
        p = Path(spec.file).expanduser()
        return p if p.is_absolute() else self.effective_weights_dir() / p

    def retinaface_path(self) -> Path | None:
        if self.retinaface_file is None:
            return None
        p = Path(self.retinaface_file).expanduser()
        return p if p.is_absolute() else self.effective_weights_dir() / p

    def default_name(self) -> str | None:
        if self.default is not None:
            return self.default
        return self.models[0].name if self.models else None
