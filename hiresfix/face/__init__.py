"""Face restoration pass: OpenCV detection, FFHQ alignment, spandrel restorers (GFPGAN,
RestoreFormer).

Ray-free; `deployments/refine.py` wraps it. Importing this package pulls in neither torch nor
spandrel nor OpenCV: they are imported when `FaceRestorer.from_settings` runs. See README.md here
for behaviour, configuration and the licences of the supported models.
"""

from hiresfix.face.restorer import FaceRestorer, UnknownFaceModelError
from hiresfix.face.settings import FaceModelSpec, FaceSettings

__all__ = ["FaceModelSpec", "FaceRestorer", "FaceSettings", "UnknownFaceModelError"]
