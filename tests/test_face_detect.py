"""Face detection, landmarks, alignment and paste-back: OpenCV only, no restorer model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data as skdata

from hiresfix.face.align import FACE_SIZE, align_face, paste_face
from hiresfix.face.detect import (
    FFHQ_TEMPLATE_512,
    OpenCVFaceDetector,
    detection_scale,
    landmarks_from_box,
    landmarks_from_eyes,
)


@pytest.fixture(scope="module")
def detector() -> OpenCVFaceDetector:
    return OpenCVFaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut().astype(np.float32) / 255.0


def test_astronaut_face_found_at_the_right_place(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    f = faces[0]
    x, y, w, h = f.box
    # Measured: box (177, 66, 95, 95); the face spans roughly x 165-275, y 60-190.
    assert 160 <= x and x + w <= 285 and 55 <= y and y + h <= 190
    assert 70 <= w <= 130
    assert f.eyes_found
    (lx, ly), (rx, ry) = f.landmarks[0], f.landmarks[1]
    assert 190 <= lx <= 212 and 235 <= rx <= 258  # eye centres, checked on the aligned crop
    assert 90 <= ly <= 112 and 90 <= ry <= 112
    nose, mouth_l, mouth_r = f.landmarks[2], f.landmarks[3], f.landmarks[4]
    assert ly < nose[1] < mouth_l[1] and mouth_l[0] < mouth_r[0]


def test_uint8_and_float_inputs_agree(detector, astronaut):
    a = detector.detect(astronaut)
    b = detector.detect(skdata.astronaut())
    assert [f.box for f in a] == [f.box for f in b]


def test_two_faces_largest_first(detector, astronaut):
    small = cv2.resize(astronaut, (384, 384), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((512, 512 + 384, 3), np.float32)
    canvas[:, :512] = astronaut[:, ::-1]  # mirrored: the face is now at x ~240-335
    canvas[:384, 512:] = small
    faces = detector.detect(canvas)
    assert len(faces) == 2
    assert faces[0].box[2] > faces[1].box[2]
    assert faces[0].box[0] < 512 <= faces[1].box[0]


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "coins", "camera"])
def test_no_face_in_photos_without_faces(detector, name):
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.dstack([img] * 3)
    assert detector.detect(img[..., :3]) == []
    # Upsampled x2 too: textures at new scales are where Haar cascades misfire.
    assert detector.detect(cv2.resize(img[..., :3], None, fx=2, fy=2)) == []


def test_flat_and_tiny_images(detector):
    assert detector.detect(np.full((256, 256, 3), 0.5, np.float32)) == []
    assert detector.detect(np.zeros((10, 7, 3), np.float32)) == []


def test_detection_scale_bounds():
    assert detection_scale(512, 512, 48) == 1.0
    assert detection_scale(4096, 2048, 48) == pytest.approx(0.5)  # capped at 2048 px
    assert detection_scale(4096, 4096, 400) == pytest.approx(0.25)  # big faces only: 1024 px
    assert detection_scale(1500, 1000, 200) == pytest.approx(1024 / 1500)


def test_landmarks_from_eyes_carry_the_template():
    lm = landmarks_from_eyes(FFHQ_TEMPLATE_512[0], FFHQ_TEMPLATE_512[1])
    np.testing.assert_allclose(lm, FFHQ_TEMPLATE_512, atol=1e-3)
    # Half size, shifted: every point follows.
    lm = landmarks_from_eyes(FFHQ_TEMPLATE_512[0] / 2 + 10, FFHQ_TEMPLATE_512[1] / 2 + 10)
    np.testing.assert_allclose(lm, FFHQ_TEMPLATE_512 / 2 + 10, atol=1e-3)
    box = landmarks_from_box(100, 50, 100, 100)
    assert box[0][0] < box[1][0] and box[0][1] == pytest.approx(box[1][1])


def test_alignment_maps_landmarks_onto_template(detector, astronaut):
    face = detector.detect(astronaut)[0]
    aligned = align_face(astronaut, face.landmarks)
    assert aligned.crop.shape == (FACE_SIZE, FACE_SIZE, 3) and aligned.crop.dtype == np.float32
    pts = np.c_[face.landmarks, np.ones(5)] @ aligned.affine.T
    np.testing.assert_allclose(pts, FFHQ_TEMPLATE_512, atol=1.0)
    x0, y0, x1, y1 = aligned.region
    assert 0 <= x0 < face.box[0] and x1 > face.box[0] + face.box[2]
    assert 0 <= y0 < face.box[1] and y1 <= astronaut.shape[0]


def test_paste_touches_only_the_warped_square(detector, astronaut):
    face = detector.detect(astronaut)[0]
    aligned = align_face(astronaut, face.landmarks)
    restored = np.ones_like(aligned.crop)  # white "restored" face
    out = paste_face(astronaut, aligned, restored, 1.0)
    changed = np.any(out != astronaut, axis=2)
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = aligned.region
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    crop_pts = np.c_[xs, ys, np.ones_like(xs)] @ aligned.affine.T
    assert crop_pts.min() >= 0 and crop_pts.max() <= FACE_SIZE
    # The centre of the face is fully replaced, the seam is feathered.
    cx, cy = (np.c_[[[256.0, 300.0, 1.0]]] @ aligned.inverse.T)[0]
    np.testing.assert_allclose(out[int(cy), int(cx)], 1.0, atol=1e-6)
    assert len(np.unique(out[changed][:, 0])) > 10
    # Weight scales the change linearly; weight 0 copies.
    half = paste_face(astronaut, aligned, restored, 0.5)
    np.testing.assert_allclose(half - astronaut, 0.5 * (out - astronaut), atol=1e-5)
    assert np.array_equal(paste_face(astronaut, aligned, restored, 0.0), astronaut)


def test_face_cut_by_the_image_edge(detector, astronaut):
    img = np.ascontiguousarray(astronaut[:, 150:])  # face now ~27 px from the left edge
    faces = detector.detect(img)
    assert len(faces) == 1
    aligned = align_face(img, faces[0].landmarks)
    assert aligned.region[0] == 0
    out = paste_face(img, aligned, np.ones_like(aligned.crop), 1.0)
    # The pasted face reaches the image edge (no unrestored strip along the border).
    fy = int(faces[0].box[1] + faces[0].box[3] / 2)
    np.testing.assert_allclose(out[fy, 0], 1.0, atol=1e-6)


def test_large_face_alignment_is_scale_consistent(detector, astronaut):
    """A face much bigger than the template goes through the area-averaging path: same crop."""
    face = detector.detect(astronaut)[0]
    ref = align_face(astronaut, face.landmarks)
    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_LINEAR)
    # Same physical landmarks, in the 4x image (pixel centres: x_big = 4 x + 1.5).
    aligned = align_face(big, face.landmarks * 4 + 1.5)
    assert np.hypot(*aligned.affine[0, :2]) < 0.75
    assert np.abs(aligned.crop - ref.crop).mean() < 0.01
    big_w, ref_w = aligned.region[2] - aligned.region[0], ref.region[2] - ref.region[0]
    assert abs((big_w - 4) - 4 * (ref_w - 4)) <= 4  # regions carry a 2 px margin per side
