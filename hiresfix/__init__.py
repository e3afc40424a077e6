"""hiresfix: SDXL + RealESRGAN hires fix.

Model code here imports no Ray; `deployments/` wraps it.
"""

__version__ = "0.1.0"
