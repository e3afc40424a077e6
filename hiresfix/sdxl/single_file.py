"""Key prefixes of an original-layout ("ldm", A1111/ComfyUI) SDXL .safetensors checkpoint that
loading.py checks before diffusers' `from_single_file` converts the file: the UNet's place, and the
OpenCLIP text encoder's, which tells a base (embedders.1) from a refiner (embedders.0) and both from
SD 1.x/2.x files (cond_stage_model.*).
"""

UNET = "model.diffusion_model."
OPEN_CLIP_BASE = "conditioner.embedders.1.model."
OPEN_CLIP_REFINER = "conditioner.embedders.0.model."
