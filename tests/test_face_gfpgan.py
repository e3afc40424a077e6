"""GFPGAN end to end with RANDOM weights, through the same loading path as the released files.

The net is fixed at 512 px and 86 M parameters (~350 MB, ~4-10 s per face on one CPU thread), so
it is built and saved ONCE per test session (conftest's `random_gfpgan`) and the full restore
runs once here.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data as skdata

from hiresfix.face import FaceRestorer, FaceSettings
from hiresfix.face.align import align_face
from hiresfix.images import Picture


@pytest.fixture(scope="module")
def gfpgan_restorer(random_gfpgan) -> FaceRestorer:
    """Loads conftest's session-wide random GFPGAN file (built once per run, shared with the
    service tests) through FaceRestorer, exactly like a released GFPGANv1.4 file."""
    return FaceRestorer.from_settings(
        FaceSettings(
            weights_dir=str(random_gfpgan.parent),
            models=[{"name": "gfpgan", "file": random_gfpgan.name}],
        )
    )


@pytest.fixture(scope="module")
def astronaut() -> Picture:
    return Picture(skdata.astronaut().astype(np.float32) / 255.0)


def test_spandrel_detects_gfpgan(gfpgan_restorer):
    assert gfpgan_restorer.available()
    [info] = gfpgan_restorer.models_info()
    assert info.available and info.architecture == "GFPGAN" and info.kind == "face"
    assert info.dtype == "fp32" and info.default


def test_gfpgan_restores_the_face_and_nothing_else(gfpgan_restorer, astronaut):
    before = astronaut.rgb.copy()
    out, info = gfpgan_restorer.restore(astronaut, 0.5)
    assert info.applied and info.faces_found == 1 and info.model == "gfpgan" and info.reason is None
    assert np.array_equal(astronaut.rgb, before)  # input untouched
    faces = gfpgan_restorer.detect(astronaut)
    aligned = align_face(astronaut.rgb, faces[0].landmarks)
    x0, y0, x1, y1 = aligned.region
    changed = np.any(out.rgb != astronaut.rgb, axis=2)
    outside = changed.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any(), "pixels outside the face region changed"
    # Changed pixels all lie inside the warped 512 px square.
    ys, xs = np.nonzero(changed)
    crop = np.c_[xs, ys, np.ones_like(xs)] @ aligned.affine.T
    assert crop.min() >= 0 and crop.max() <= 512
    # The face itself (box centre) changed, visibly.
    fx, fy, fw, fh = (int(v) for v in faces[0].box)
    delta = np.abs(out.rgb - astronaut.rgb)[fy : fy + fh, fx : fx + fw]
    assert (delta.max(axis=2) > 0).mean() > 0.95 and delta.mean() > 0.01
    assert np.isfinite(out.rgb).all() and out.rgb.min() >= 0 and out.rgb.max() <= 1
    t = gfpgan_restorer.last_timings
    assert t.faces == 1 and t.forward > 0


def test_gfpgan_weight_zero_is_the_input(gfpgan_restorer, astronaut):
    out, info = gfpgan_restorer.restore(astronaut, 0.0)
    assert out is astronaut and not info.applied and info.faces_found == 1


def test_gfpgan_runtime_failure(gfpgan_restorer, astronaut):
    def boom(module, args):
        raise RuntimeError("injected failure")

    handle = gfpgan_restorer.descriptor("gfpgan").model.register_forward_pre_hook(boom)
    try:
        out, info = gfpgan_restorer.restore(astronaut, 0.5)
    finally:
        handle.remove()
    assert out is astronaut and not info.applied and info.faces_found == 1
    assert info.reason == "error: RuntimeError: injected failure"
    assert gfpgan_restorer.available()
