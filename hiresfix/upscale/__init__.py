"""Neural upscaling (RealESRGAN and whatever else spandrel loads), Ray-free.

`UpscalerBank.from_settings(settings)` loads the configured models (recording, never raising, why
one is unavailable) and `upscale_jobs` runs tiled, batched inference with LANCZOS fallbacks.
torch and spandrel are imported lazily, so this package imports without them.
"""

from hiresfix.upscale.bank import UnknownModelError, UpscaleJob, UpscalerBank
from hiresfix.upscale.settings import UpscalerModelSpec, UpscalerSettings

__all__ = [
    "UpscalerSettings",
    "UpscalerModelSpec",
    "UpscalerBank",
    "UpscaleJob",
    "UnknownModelError",
]
