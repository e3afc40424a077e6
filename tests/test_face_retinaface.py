"""RetinaFace detector: facexlib key layout, loading (prefix, variants, bad files), the decoder
against a literal port of facexlib's reference code, and the detector through FaceRestorer.

No real weights here (none may be downloaded): both variants are built with RANDOM weights and
saved as .pth exactly in facexlib's layout, then loaded through FaceSettings/FaceRestorer like the
release files. Random weights find nothing meaningful, so the decoding is tested with synthetic head
outputs that encode known faces, both directly and injected by a forward hook into `detect()`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from itertools import product

import cv2
import numpy as np
import pytest
import skimage.data as skdata
import torch
from pydantic import ValidationError

from hiresfix.face import FaceRestorer, FaceSettings
from hiresfix.face import restorer as restorer_mod
from hiresfix.face.align import FFHQ_TEMPLATE_512, align_face
from hiresfix.face.detect import landmarks_from_eyes
from hiresfix.face.retinaface import (
    ARCHS,
    MobileNetV1Body,
    ResNet50Body,
    RetinaFaceDetector,
    RetinaFaceLoadError,
    RetinaFaceNet,
    build_net,
    decode_boxes,
    decode_landmarks,
    detect_arch,
    detection_scale,
    nms,
    postprocess,
    prior_boxes,
    read_state_dict,
)
from hiresfix.images import Picture

R50, MNET = ARCHS  # resnet50, mobilenet0.25

# A face on skimage's astronaut (512 x 512), as RetinaFace would report it. The nose and mouth are
# deliberately NOT where the eye-pair similarity would put them, so a test can tell real landmarks
# from derived ones.
FACE_BOX = (176.0, 62.0, 272.0, 176.0)  # x1 y1 x2 y2
FACE_LM = np.array(
    [[202.0, 101.5], [247.0, 102.5], [226.0, 125.0], [204.5, 151.0], [240.0, 151.5]], np.float32
)


# -------------------------------------------------------- reference code (facexlib, literal)
def ref_priors(height: int, width: int) -> torch.Tensor:
    """facexlib retinaface_utils.PriorBox.forward, transcribed."""
    min_sizes, steps = [[16, 32], [64, 128], [256, 512]], [8, 16, 32]
    feature_maps = [[math.ceil(height / s), math.ceil(width / s)] for s in steps]
    anchors = []
    for k, f in enumerate(feature_maps):
        for i, j in product(range(f[0]), range(f[1])):
            for min_size in min_sizes[k]:
                s_kx, s_ky = min_size / width, min_size / height
                cx, cy = (j + 0.5) * steps[k] / width, (i + 0.5) * steps[k] / height
                anchors += [cx, cy, s_kx, s_ky]
    return torch.Tensor(anchors).view(-1, 4)


def ref_decode(loc, priors, variances=(0.1, 0.2)):
    boxes = torch.cat(
        (
            priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:],
            priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1]),
        ),
        1,
    )
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def prior_index(height: int, width: int, level: int, row: int, col: int, anchor: int) -> int:
    offset = sum(math.ceil(height / s) * math.ceil(width / s) * 2 for s in (8, 16, 32)[:level])
    return offset + (row * math.ceil(width / (8, 16, 32)[level]) + col) * 2 + anchor


def synthetic_heads(height: int, width: int, faces):
    """(loc, conf, landms) for a height x width input, every prior background except `faces`:
    (prior index, x1y1x2y2 box px, 5 x 2 landmarks px, score), encoded like facexlib's encode()."""
    pri = ref_priors(height, width).double()
    n = pri.shape[0]
    loc = torch.zeros(n, 4, dtype=torch.float64)
    conf = torch.zeros(n, 2, dtype=torch.float64)
    conf[:, 0] = 1.0
    landms = torch.zeros(n, 10, dtype=torch.float64)
    wh = torch.tensor([width, height], dtype=torch.float64)
    for idx, box, lm, score in faces:
        c, s = pri[idx, :2], pri[idx, 2:]
        b = torch.tensor(box, dtype=torch.float64)
        centre, size = (b[:2] + b[2:]) / 2 / wh, (b[2:] - b[:2]) / wh
        loc[idx] = torch.cat([(centre - c) / (0.1 * s), torch.log(size / s) / 0.2])
        conf[idx] = torch.tensor([1.0 - score, score])
        landms[idx] = ((torch.as_tensor(lm, dtype=torch.float64) / wh - c) / (0.1 * s)).reshape(-1)
    return loc.float(), conf.float(), landms.float()


def inject(net, faces_at):
    """Forward hook replacing the net's output by synthetic heads; faces_at(h, w) -> faces."""

    def hook(module, args, output):
        h, w = args[0].shape[2:]
        loc, conf, landms = synthetic_heads(h, w, faces_at(h, w))
        return loc[None], conf[None], landms[None]

    return net.register_forward_hook(hook)


# -------------------------------------------------------- fixtures
def _random_net(arch, seed: int) -> RetinaFaceNet:
    torch.manual_seed(seed)
    net = RetinaFaceNet(arch).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a load that drops them shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def rf_dir(tmp_path_factory):
    """Random RetinaFace files in facexlib's layout, a tiny random RestoreFormer, junk."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.RestoreFormer import RestoreFormer

    d = tmp_path_factory.mktemp("retinaface_weights")
    r50 = _random_net(R50, 0).state_dict()
    torch.save(
        {"module." + k: v for k, v in r50.items()}, d / "detection_Resnet50_Final.pth"
    )  # DataParallel form
    mnet = _random_net(MNET, 1).state_dict()
    torch.save(mnet, d / "detection_mobilenet0.25_Final.pth")
    torch.save({"module." + k: v for k, v in mnet.items()}, d / "mnet_module.pth")
    save_file({k: v.contiguous() for k, v in mnet.items()}, str(d / "mnet.safetensors"))
    torch.save(  # how a torch < 1.6 file looks: legacy (non-zip) pickle, no num_batches_tracked
        {"module." + k: v for k, v in mnet.items() if not k.endswith("num_batches_tracked")},
        d / "mnet_old_torch.pth",
        _use_new_zipfile_serialization=False,
    )
    torch.save(
        Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=2, upscale=2).state_dict(),
        d / "compact.pth",
    )
    (d / "corrupt.pth").write_bytes(b"PK\x03\x04 this is not a torch file" * 100)
    torch.manual_seed(0)
    rf = RestoreFormer(
        n_embed=64, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32
    )
    save_file(
        {k: v.contiguous() for k, v in rf.state_dict().items()},
        str(d / "tiny_restoreformer.safetensors"),
    )
    return d


def _settings(d, **kw) -> FaceSettings:
    return FaceSettings(
        weights_dir=str(d),
        models=[{"name": "tiny", "file": "tiny_restoreformer.safetensors"}],
        **kw,
    )


@pytest.fixture(scope="module")
def r50_restorer(rf_dir) -> FaceRestorer:
    r = FaceRestorer.from_settings(
        _settings(rf_dir, detector="retinaface", retinaface_file="detection_Resnet50_Final.pth")
    )
    assert r.available() and r.detector_name == "retinaface", r.models_info()
    return r


@pytest.fixture(scope="module")
def astronaut() -> Picture:
    return Picture(skdata.astronaut().astype(np.float32) / 255.0)


# -------------------------------------------------------- key layout (facexlib's files)
def test_resnet50_key_layout_matches_facexlib():
    sd = RetinaFaceNet(R50).state_dict()
    expected = {
        "body.conv1.weight": (64, 3, 7, 7),
        "body.bn1.running_var": (64,),
        "body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "body.layer2.0.conv2.weight": (128, 128, 3, 3),
        "body.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fpn.output1.0.weight": (256, 512, 1, 1),
        "fpn.output2.0.weight": (256, 1024, 1, 1),
        "fpn.output3.0.weight": (256, 2048, 1, 1),
        "fpn.merge1.0.weight": (256, 256, 3, 3),
        "fpn.merge2.1.running_mean": (256,),
        "ssh1.conv3X3.0.weight": (128, 256, 3, 3),
        "ssh2.conv5X5_1.0.weight": (64, 256, 3, 3),
        "ssh3.conv7x7_3.1.weight": (64,),
        "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),  # 2 anchors x 2 classes
        "ClassHead.2.conv1x1.bias": (4,),
        "BboxHead.1.conv1x1.weight": (8, 256, 1, 1),
        "LandmarkHead.2.conv1x1.weight": (20, 256, 1, 1),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(
        k.startswith(("body.fc", "body.avgpool")) for k in sd
    )  # IntermediateLayerGetter drops them
    assert sum(p.numel() for p in RetinaFaceNet(R50).parameters()) == 27_293_600


def test_resnet50_body_is_torchvisions_resnet50():
    """Same keys and the same outputs as facexlib's IntermediateLayerGetter(torchvision
    resnet50)."""
    import torchvision.models as tvm
    from torchvision.models._utils import IntermediateLayerGetter as getter

    torch.manual_seed(3)
    ref = getter(tvm.resnet50(weights=None), {"layer2": 1, "layer3": 2, "layer4": 3}).eval()
    body = ResNet50Body().eval()
    assert list(body.state_dict()) == list(ref.state_dict())
    body.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 75, 50)
    with torch.no_grad():
        for a, b in zip(body(x), ref(x).values()):
            assert torch.equal(a, b)


def test_mobilenet_key_layout_matches_facexlib():
    sd = RetinaFaceNet(MNET).state_dict()
    expected = {
        "body.stage1.0.0.weight": (8, 3, 3, 3),
        "body.stage1.1.0.weight": (8, 1, 3, 3),  # depthwise
        "body.stage1.1.3.weight": (16, 8, 1, 1),
        "body.stage2.0.3.weight": (128, 64, 1, 1),
        "body.stage3.1.3.weight": (256, 256, 1, 1),
        "body.stage3.1.4.running_var": (256,),
        "fpn.output1.0.weight": (64, 64, 1, 1),
        "fpn.output3.0.weight": (64, 256, 1, 1),
        "ssh1.conv3X3.0.weight": (32, 64, 3, 3),
        "ssh1.conv7x7_3.0.weight": (16, 16, 3, 3),
        "ClassHead.0.conv1x1.weight": (4, 64, 1, 1),
        "BboxHead.0.conv1x1.weight": (8, 64, 1, 1),
        "LandmarkHead.0.conv1x1.weight": (20, 64, 1, 1),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("body.fc", "body.avg")) for k in sd)
    assert isinstance(RetinaFaceNet(MNET).body, MobileNetV1Body)


# -------------------------------------------------------- loading
def test_variant_detection_and_module_prefix(rf_dir):
    r50 = read_state_dict(rf_dir / "detection_Resnet50_Final.pth")
    assert not any(k.startswith("module.") for k in r50)
    assert detect_arch(r50) is R50
    plain = read_state_dict(rf_dir / "detection_mobilenet0.25_Final.pth")
    assert detect_arch(plain) is MNET
    for other in ("mnet_module.pth", "mnet.safetensors", "mnet_old_torch.pth"):
        net = build_net(read_state_dict(rf_dir / other))
        assert net.arch is MNET
        assert all(
            torch.equal(v, net.state_dict()[k]) for k, v in plain.items() if "num_batches" not in k
        ), other
    # What was saved is what runs (BatchNorm statistics included).
    net = build_net(plain)
    x = torch.randn(1, 3, 64, 48) * 50
    ref = _random_net(MNET, 1)
    with torch.no_grad():
        for a, b in zip(net(x), ref(x)):
            assert torch.equal(a, b)


def test_bad_state_dicts_are_refused(rf_dir):
    with pytest.raises(RetinaFaceLoadError, match="not a RetinaFace"):
        detect_arch(read_state_dict(rf_dir / "compact.pth"))
    sd = read_state_dict(rf_dir / "detection_mobilenet0.25_Final.pth")
    broken = {k: v for k, v in sd.items() if not k.startswith("ssh2.")}
    with pytest.raises(RetinaFaceLoadError, match="missing"):
        build_net(broken)
    three_anchors = dict(sd, **{"ClassHead.0.conv1x1.weight": torch.zeros(6, 64, 1, 1)})
    with pytest.raises(RetinaFaceLoadError, match="2 anchors"):
        build_net(three_anchors)
    with pytest.raises(RuntimeError):  # torch.load: not a zip archive
        read_state_dict(rf_dir / "corrupt.pth")


# -------------------------------------------------------- priors / decoding / NMS
@pytest.mark.parametrize("hw", [(48, 64), (37, 50), (512, 512), (77, 1)])
def test_priors_match_the_reference(hw):
    ours, ref = prior_boxes(*hw), ref_priors(*hw)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)


def test_decode_by_hand():
    h, w = 48, 64
    pri = prior_boxes(h, w)
    i = prior_index(h, w, level=0, row=2, col=3, anchor=1)  # centre (28, 20) px, min size 32
    np.testing.assert_allclose(
        pri[i].numpy(), [3.5 * 8 / 64, 2.5 * 8 / 48, 32 / 64, 32 / 48], rtol=1e-6
    )
    loc = torch.zeros_like(pri)
    loc[i] = torch.tensor([1.0, -2.0, 0.0, 5 * math.log(2.0)])
    box = decode_boxes(loc, pri)[i] * torch.tensor([w, h, w, h])
    # centre (28 + 0.1 * 32, 20 - 2 * 0.1 * 32) = (31.2, 13.6); size (32, 2 * 32)
    np.testing.assert_allclose(box.numpy(), [15.2, -18.4, 47.2, 45.6], atol=1e-4)
    torch.testing.assert_close(decode_boxes(loc, pri), ref_decode(loc, pri))
    pre = torch.zeros(len(pri), 10)
    pre[i] = torch.tensor([1.0, 0.0, 0.0, 1.0, -1.0, -1.0, 2.0, 0.5, 0.0, 0.0])
    lm = decode_landmarks(pre, pri)[i] * torch.tensor([w, h])
    np.testing.assert_allclose(
        lm.numpy(),
        [[31.2, 20.0], [28.0, 23.2], [24.8, 16.8], [34.4, 21.6], [28.0, 20.0]],
        atol=1e-4,
    )


def test_postprocess_threshold_and_nms():
    h, w = 512, 512
    lm = FACE_LM
    near = prior_index(h, w, 1, 7, 13, 1)
    faces = [
        (near, FACE_BOX, lm, 0.99),
        (near - 2, np.add(FACE_BOX, 4.0), lm + 4.0, 0.985),  # the same face again: suppressed
        (prior_index(h, w, 0, 50, 10, 1), (60, 380, 120, 450), lm * 0.5 + [-40, 330], 0.98),
        (prior_index(h, w, 2, 3, 3, 0), (300, 300, 500, 500), lm + 200, 0.5),  # below the threshold
    ]
    loc, conf, landms = synthetic_heads(h, w, faces)
    det = postprocess(loc, conf, landms, prior_boxes(h, w), w, h, threshold=0.97)
    assert det.scores.tolist() == pytest.approx([0.99, 0.98])
    np.testing.assert_allclose(det.boxes[0], FACE_BOX, atol=1e-3)
    np.testing.assert_allclose(det.landmarks[0], lm, atol=1e-3)
    np.testing.assert_allclose(det.boxes[1], (60, 380, 120, 450), atol=1e-3)
    # A lower threshold lets the fourth through; NMS off (threshold 1) keeps the duplicate.
    assert len(postprocess(loc, conf, landms, prior_boxes(h, w), w, h, threshold=0.4).scores) == 3
    assert (
        len(postprocess(loc, conf, landms, prior_boxes(h, w), w, h, 0.97, nms_threshold=1.0).scores)
        == 3
    )
    with pytest.raises(ValueError, match="do not match the priors"):
        postprocess(loc, conf, landms, prior_boxes(h, w + 8), w + 8, h)


def test_nms_follows_py_cpu_nms():
    boxes = np.array(
        [[10, 10, 60, 60], [12, 12, 62, 62], [100, 100, 150, 150], [30, 30, 80, 80]], np.float32
    )
    scores = np.array([0.99, 0.98, 0.97, 0.985], np.float32)
    # IoU(0, 3) with facexlib's +1 areas: 31*31 / (2 * 51*51 - 31*31) = 0.227 -> kept at 0.4
    assert nms(boxes, scores, 0.4).tolist() == [0, 3, 2]
    assert nms(boxes, scores, 0.2).tolist() == [0, 2]
    assert nms(boxes[:0], scores[:0]).tolist() == []


def test_detection_scale():
    assert detection_scale(512, 512, 48) == 1.0
    assert detection_scale(2048, 2048, 48) == pytest.approx(
        0.5
    )  # 1024 px: a 48 px face is 24 px there
    assert detection_scale(4096, 4096, 48) == pytest.approx(0.5)  # ... so not smaller than that
    assert detection_scale(4096, 4096, 200) == pytest.approx(0.25)
    assert detection_scale(8192, 4096, 10) == pytest.approx(0.25)  # capped at 2048 px


# -------------------------------------------------------- the detector, head outputs injected
def test_injected_face_comes_out_of_detect_in_image_pixels(rf_dir, astronaut):
    det = RetinaFaceDetector.from_file(rf_dir / "detection_mobilenet0.25_Final.pth")
    # 2048 px picture: detected on a 1024 px copy, so the net sees the face at half size.
    big = cv2.resize(astronaut.rgb, (2048, 2048), interpolation=cv2.INTER_LINEAR)
    seen = []

    def faces_at(h, w):  # the face as the net sees it: twice the astronaut's coordinates
        seen.append((h, w))
        return [(prior_index(h, w, 2, 7, 13, 0), np.multiply(FACE_BOX, 2), FACE_LM * 2, 0.995)]

    handle = inject(det.net, faces_at)
    try:
        faces = det.detect(big, min_face_size=48)
        assert seen == [(1024, 1024)]
        [f] = faces
        np.testing.assert_allclose(f.landmarks, FACE_LM * 4, atol=5e-3)  # in the 2048 px picture
        np.testing.assert_allclose(f.box, (704, 248, 384, 456), atol=5e-3)  # x, y, w, h
        assert (
            f.score == pytest.approx(0.995)
            and f.eyes_found
            and f.size == pytest.approx(384, abs=1e-2)
        )
        # uint8 input: the same faces
        assert det.detect((big * 255 + 0.5).astype(np.uint8))[0].box == pytest.approx(f.box)
    finally:
        handle.remove()
    # Eyes closer than 5 px (a profile face): dropped, like GFPGAN's eye_dist_threshold.
    squashed = FACE_LM.copy()
    squashed[1] = squashed[0] + [3.0, 0.0]
    handle = inject(
        det.net, lambda h, w: [(prior_index(h, w, 1, 7, 13, 1), FACE_BOX, squashed, 0.995)]
    )
    try:
        assert det.detect(astronaut.rgb) == []
    finally:
        handle.remove()


def test_injected_face_is_restored_with_its_own_landmarks(r50_restorer, astronaut, monkeypatch):
    net = r50_restorer.detector.net
    used = []
    real_align = restorer_mod.align_face

    def spy(rgb, landmarks, size=512):
        used.append(np.array(landmarks))
        return real_align(rgb, landmarks, size)

    monkeypatch.setattr(restorer_mod, "align_face", spy)
    handle = inject(net, lambda h, w: [(prior_index(h, w, 1, 7, 13, 1), FACE_BOX, FACE_LM, 0.99)])
    try:
        [face] = r50_restorer.detect(astronaut)
        out, info = r50_restorer.restore(astronaut, 1.0)
    finally:
        handle.remove()
    np.testing.assert_allclose(face.landmarks, FACE_LM, atol=1e-3)
    assert info.applied and info.faces_found == 1 and info.model == "tiny"
    [lm] = used
    np.testing.assert_allclose(lm, FACE_LM, atol=1e-3)
    derived = landmarks_from_eyes(FACE_LM[0], FACE_LM[1])
    assert (
        np.abs(derived[2:] - FACE_LM[2:]).max() > 3
    )  # the five real points, not the eye-pair guess
    # The crop is the one those five points define; pixels change only inside its square.
    aligned = align_face(astronaut.rgb, FACE_LM)
    from_eyes = align_face(astronaut.rgb, derived)
    assert (
        np.abs(aligned.affine - from_eyes.affine).max() > 1.0
    )  # a different crop than the eye pair's
    pts = np.c_[FACE_LM, np.ones(5)] @ aligned.affine.T
    assert np.abs(pts - FFHQ_TEMPLATE_512).max() < 12  # robust 5-point fit onto the template
    changed = np.any(out.rgb != astronaut.rgb, axis=2)
    ys, xs = np.nonzero(changed)
    crop = np.c_[xs, ys, np.ones_like(xs)] @ aligned.affine.T
    assert changed.sum() > 5000 and crop.min() >= 0 and crop.max() <= 512


# -------------------------------------------------------- through FaceRestorer, random weights
def test_random_resnet50_end_to_end(r50_restorer, astronaut):
    [info] = r50_restorer.models_info()
    assert info.available and info.reason is None
    assert "detector: retinaface (RetinaFace ResNet-50 on cpu, threshold 0.97)" in info.detail
    out, result = r50_restorer.restore(astronaut, 0.7)
    assert r50_restorer.last_timings.detect > 0
    assert result.reason is None or result.reason.split(":")[0] in ("no_face", "faces_too_small"), (
        result.reason
    )
    assert out.rgb.shape == astronaut.rgb.shape


def test_random_mobilenet_end_to_end_with_a_low_threshold(rf_dir, astronaut):
    """A threshold random weights pass: random 'faces' go through align/restore/paste without
    error."""
    r = FaceRestorer.from_settings(
        _settings(
            rf_dir,
            detector="retinaface",
            retinaface_file=str(rf_dir / "mnet_module.pth"),  # absolute path, module. prefix
            detector_threshold=0.01,
            max_faces=1,
            min_face_size=1,
        )
    )
    assert r.detector_name == "retinaface" and "MobileNetV1-0.25" in r.detector_detail
    faces = r.detect(astronaut)
    assert faces and all(np.isfinite(f.landmarks).all() for f in faces)
    assert [f.box[2] * f.box[3] for f in faces] == sorted(
        (f.box[2] * f.box[3] for f in faces), reverse=True
    )
    _, info = r.restore(astronaut, 0.5)
    assert info.faces_found == len(faces)
    assert info.reason is None or not info.reason.startswith(("error", "out_of_memory")), (
        info.reason
    )


# -------------------------------------------------------- configuration and fallbacks
def test_settings_validation(rf_dir):
    with pytest.raises(ValidationError, match="needs retinaface_file"):
        FaceSettings(detector="retinaface")
    with pytest.raises(ValidationError):
        FaceSettings(detector="retinaface", retinaface_file="x.pth", detector_threshold=1.5)
    with pytest.raises(ValidationError):
        FaceSettings(detector="retinaface", retinaface_file="x.pth", retinaface_sha256="abc")
    with pytest.raises(ValidationError):
        FaceSettings(detector="retinaface", retinaface_file=" ")
    s = FaceSettings(
        detector="retinaface",
        retinaface_file="detection_Resnet50_Final.pth",
        weights_dir=str(rf_dir),
    )
    assert FaceSettings.model_validate(s.model_dump()) == s
    assert s.retinaface_path() == rf_dir / "detection_Resnet50_Final.pth"
    # opencv with a staged file: the file is ignored, nothing is loaded.
    r = FaceRestorer.from_settings(_settings(rf_dir, retinaface_file="corrupt.pth"))
    assert (
        r.detector_name == "opencv"
        and r.detector_detail is None
        and r.models_info()[0].detail is None
    )


def _assert_fallback(r: FaceRestorer, astronaut, code: str, words: str):
    assert r.available() and r.detector_name == "opencv"
    [info] = r.models_info()
    assert info.available and info.reason is None
    assert info.detail.startswith(f"detector fallback: retinaface unavailable ({code}: ")
    assert words in info.detail and info.detail.endswith("; using opencv")
    out, result = r.restore(astronaut, 0.0)  # the OpenCV detector still finds the astronaut
    assert out is astronaut and result.faces_found == 1 and result.reason.startswith("zero_weight")


def test_missing_retinaface_file_falls_back_to_opencv(rf_dir, astronaut, caplog):
    with caplog.at_level(logging.WARNING, logger="hiresfix.face"):
        r = FaceRestorer.from_settings(
            _settings(rf_dir, detector="retinaface", retinaface_file="nope.pth")
        )
    assert "falling back to the OpenCV detector" in caplog.text and "nope.pth" in caplog.text
    _assert_fallback(r, astronaut, "weights_missing", "not found")


def test_corrupt_or_foreign_retinaface_file_falls_back(rf_dir, astronaut):
    r = FaceRestorer.from_settings(
        _settings(rf_dir, detector="retinaface", retinaface_file="corrupt.pth")
    )
    _assert_fallback(r, astronaut, "error", "corrupt or unsupported")
    r = FaceRestorer.from_settings(
        _settings(rf_dir, detector="retinaface", retinaface_file="compact.pth")
    )
    _assert_fallback(r, astronaut, "error", "not a RetinaFace")


def test_retinaface_checksum(rf_dir, astronaut):
    f = "detection_mobilenet0.25_Final.pth"
    r = FaceRestorer.from_settings(
        _settings(rf_dir, detector="retinaface", retinaface_file=f, retinaface_sha256="0" * 64)
    )
    _assert_fallback(r, astronaut, "weights_missing", "checksum mismatch")
    good = hashlib.sha256((rf_dir / f).read_bytes()).hexdigest()
    r = FaceRestorer.from_settings(
        _settings(rf_dir, detector="retinaface", retinaface_file=f, retinaface_sha256=good)
    )
    assert r.detector_name == "retinaface"


def test_cuda_requested_without_cuda_falls_back(rf_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # same answer on a GPU machine
    r = FaceRestorer.from_settings(
        _settings(
            rf_dir,
            detector="retinaface",
            retinaface_file="detection_mobilenet0.25_Final.pth",
            device="cuda",
        )
    )
    assert r.detector_name == "opencv" and "cuda" in r.detector_detail


def test_no_detector_at_all(rf_dir, astronaut, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    r = FaceRestorer.from_settings(
        _settings(rf_dir, detector="retinaface", retinaface_file="nope.pth")
    )
    assert not r.available() and r.detector is None
    [info] = r.models_info()
    assert (
        info.reason == "not_installed"
        and "retinaface unavailable too (weights_missing" in info.detail
    )
    out, result = r.restore(astronaut, 0.5)
    assert out is astronaut and result.reason.startswith("not_installed")
