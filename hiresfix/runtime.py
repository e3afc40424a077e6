"""How every stage that runs a torch model (upscaler, face restorer, SDXL) picks its device and
precision, recognises running out of memory, and records what became of each configured model.

torch is imported inside the functions, never at module level: the upscaler bank and the face
restorer import this module before they know whether torch can be imported at all, and must then
record `not_installed` rather than fail.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from hiresfix.schemas import FallbackReason, ModelInfo

if TYPE_CHECKING:
    import torch

DeviceSetting = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16", "bf16"]
DtypeSetting = Literal["auto", "fp32", "fp16", "bf16"]

PRECISIONS: tuple[Precision, ...] = get_args(Precision)
_TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# What `dtype: auto` tries on a GPU, first supported wins (fp32 when none is). On a CPU auto is
# always fp32: half precision is slower there, not faster, and fp16 kernels are partly missing.
AUTO_ON_GPU: dict[str, tuple[Precision, ...]] = {
    # NaN/inf/black tiles of a half-precision pass are redone in fp32 (upscale/runner.py).
    "upscaler": ("fp16", "bf16"),
    # GFPGAN cannot run in fp16; face crops are few, so fp32 costs little.
    "face": (),
    # SDXL checkpoints are published and run in fp16; bf16 only when asked for.
    "sdxl": ("fp16",),
}


def torch_dtype(name: Precision) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def precision_name(dtype: torch.dtype) -> Precision:
    """torch.float16 -> "fp16": the one vocabulary used in settings, logs and GET /models."""
    torch_name = str(dtype).removeprefix("torch.")
    return next(p for p, t in _TORCH_NAMES.items() if t == torch_name)


def pick_device(setting: DeviceSetting) -> torch.device:
    """auto: the current CUDA device when torch sees one, else the CPU. Raises RuntimeError for
    `cuda` without a CUDA GPU (each stage records or raises it in its own way)."""
    import torch

    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if setting == "cuda":
        raise RuntimeError(
            "device 'cuda' is configured but torch sees no CUDA GPU: set device to auto or cpu"
        )
    return torch.device("cpu")


def pick_dtype(
    setting: DtypeSetting,
    device: torch.device,
    auto_on_gpu: tuple[Precision, ...],
    *,
    supports_fp16: bool = True,
    supports_bf16: bool = True,
    model: str = "this model",
) -> tuple[torch.dtype, str | None]:
    """The precision to run in, and a note when an explicit choice could not be honoured.

    `auto_on_gpu` is the stage's entry of AUTO_ON_GPU. An explicit precision the model does not
    support falls back to fp32 (the note says so)."""
    supported = {"fp32": True, "fp16": supports_fp16, "bf16": supports_bf16}
    note = None
    if setting == "auto":
        candidates = auto_on_gpu if device.type == "cuda" else ()
        name = next((p for p in candidates if supported[p]), "fp32")
    elif supported[setting]:
        name = setting
    else:
        name, note = "fp32", f"{model} does not support {setting}; running fp32"
    return torch_dtype(name), note


def yield_cpu(nice: int) -> int:
    """Raise every thread of this process to at least `nice` (Linux niceness is per thread; threads
    started later inherit it). On a CPU-only host the model's threads then give way to the HTTP path
    (proxy, ingress), so refusals and /health stay fast while inference fills every core. Returns
    the niceness reached; never raises (an unprivileged process can only go up, and may not even
    read another thread's value)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]  # no /proc: this thread only
    reached = 0
    for tid in tids:
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            if now < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            reached = max(reached, os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:  # the thread ended meanwhile, or we may not touch it
            continue
    return reached


def is_oom(exc: BaseException) -> bool:
    """Out of device or host memory. torch's CPU allocator raises a plain RuntimeError ("can't
    allocate memory"), some CUDA paths a RuntimeError saying "out of memory"."""
    torch = sys.modules.get("torch")  # not imported: the exception cannot be one of its own
    if isinstance(exc, MemoryError) or (
        torch is not None and isinstance(exc, torch.OutOfMemoryError)
    ):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def free_device_memory(device: torch.device | str | None) -> None:
    """Give cached CUDA blocks back after an OOM, so a retry (or the next request) can use them."""
    if device is None:
        return
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class ModelRecord:
    """One configured model file and what loading made of it: the loaded model, or why not.

    `spec` is the settings entry (UpscalerModelSpec, FaceModelSpec); `path` the resolved file.
    `model` is what runs (the upscaler's runner.Runner, the face restorer's spandrel descriptor);
    `lock` lets one forward pass at a time use it."""

    spec: Any
    path: Path
    model: Any = None
    architecture: str | None = None
    device: str | None = None
    dtype: Precision | None = None
    reason: FallbackReason | None = None
    detail: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def available(self) -> bool:
        return self.model is not None

    def fail(self, reason: FallbackReason, detail: str) -> ModelRecord:
        self.reason, self.detail = reason, detail
        return self

    def loaded(
        self,
        model: Any,
        architecture: str,
        device: torch.device,
        dtype: torch.dtype,
        note: str | None = None,
    ) -> ModelRecord:
        self.model, self.architecture, self.detail = model, architecture, note
        self.device, self.dtype = str(device), precision_name(dtype)
        return self

    def info(self, kind: Literal["upscaler", "face"], default: bool, **overrides: Any) -> ModelInfo:
        """The GET /models entry; `overrides` set what the stage knows beyond the file (scale, a
        detector that does not work)."""
        fields = dict(
            name=self.name,
            kind=kind,
            available=self.available,
            default=default,
            architecture=self.architecture,
            device=self.device,
            dtype=self.dtype,
            reason=self.reason.value if self.reason else None,
            detail=self.detail,
        )
        return ModelInfo(**{**fields, **overrides})
