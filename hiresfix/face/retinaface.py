"""RetinaFace face detector (pure torch), weight-compatible with facexlib's released files.

Loads, unchanged, the two files facexlib publishes (v0.1.0 release, MIT, from
biubug6/Pytorch_Retinaface):

* `detection_Resnet50_Final.pth`   - ResNet-50 backbone (torchvision layout: `body.conv1`,
  `body.layer1..4`), FPN/SSH width 256;
* `detection_mobilenet0.25_Final.pth` - MobileNetV1 x0.25 backbone (`body.stage1..3`), width 64.

The state-dict layout is facexlib's `RetinaFace` module exactly (`body.*`, `fpn.output1..3`,
`fpn.merge1..2`, `ssh1..3`, `ClassHead.N.conv1x1`, `BboxHead.N.conv1x1`, `LandmarkHead.N.conv1x1`);
a leading `module.` (DataParallel) is stripped. Which backbone a file holds is read from its keys
(`ARCHS`, a table, not code paths); the widths are then checked against the file's tensor shapes.
The backbone is built here (no torchvision, no facexlib); the ResNet-50 is torchvision's v1.5
Bottleneck layout (stride on the 3x3 conv), which is what facexlib instantiates.

Algorithm (facexlib `RetinaFace.detect_faces` / biubug6 `detect.py`):

1. input BGR, 0..255 float, minus the per-channel mean (104, 117, 123), NCHW;
2. network -> per prior: box offsets (4), class logits (2, softmaxed; column 1 = face), landmark
   offsets (10);
3. priors: for each level (steps 8/16/32, min sizes 16,32 / 64,128 / 256,512), for each feature
   cell row-major, for each min size: (cx, cy, s/W, s/H), normalised, clip off;
4. decode with variances (0.1, 0.2): centre = prior_c + d * 0.1 * prior_s,
   size = prior_s * exp(d * 0.2); landmarks = prior_c + d * 0.1 * prior_s; scale by (W, H);
5. keep score > threshold, sort by score, NMS at IoU 0.4 (facexlib's `py_cpu_nms`, with its +1
   pixel area convention).

Landmark order is the RetinaFace (WIDER FACE annotation) order: image-left eye, image-right eye,
nose, image-left mouth corner, image-right mouth corner - the order of `FFHQ_TEMPLATE_512`, which
is why facexlib feeds them to the template unchanged.

Differences from facexlib, on purpose: the image is detected at most at ~1024 px long side (more
only when `min_face_size` needs it), like the OpenCV detector, instead of at its original size; the
default threshold is the 0.97 of facexlib's `FaceRestoreHelper` (what GFPGAN runs), not the 0.8
default argument of `detect_faces`; faces whose eyes are closer than 5 px are dropped (GFPGAN's
`eye_dist_threshold=5`).

Not verified against the released files (they cannot be downloaded where this was written): the key
names and shapes follow facexlib's `retinaface.py` / `retinaface_net.py` and torchvision's resnet50
(cross-checked in the tests against torchvision itself), and the parameter counts (27.29 M, 0.43 M)
fit the files' published sizes (~104 MiB, ~1.7 MB), but a real file has not been loaded here.
Tolerated on purpose: a `module.` prefix, missing BatchNorm `num_batches_tracked` buffers, the
legacy (pre-zip) pickle format. Anything else that differs (an unexpected or missing key, a shape)
is refused with the key named.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hiresfix.face.detect import DETECT_MAX_SIDE, DETECT_SIDE, DetectedFace

# --- reference configuration (facexlib generate_config, both variants) ---------------------------
MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
STEPS: tuple[int, ...] = (8, 16, 32)
VARIANCES: tuple[float, float] = (0.1, 0.2)
MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)
NUM_ANCHORS = 2  # len(MIN_SIZES[k])
DEFAULT_THRESHOLD = 0.97  # facexlib FaceRestoreHelper.get_face_landmarks_5 (GFPGAN)
NMS_THRESHOLD = 0.4
MIN_EYE_DIST = 5.0  # px, GFPGAN's eye_dist_threshold
DETECT_MIN_PX = 24  # a face of min_face_size px should be at least this big in the detection copy


class RetinaFaceLoadError(ValueError):
    """The file is not a RetinaFace state dict this module can run."""


# --- building blocks (names = facexlib/biubug6 attribute names, they are the state-dict keys) ---
def _conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(leaky, inplace=True),
    )


def _conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))


def _conv_bn1x1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, stride, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(leaky, inplace=True),
    )


def _conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNetV1 x0.25 up to stage3 (what facexlib's IntermediateLayerGetter keeps: no avg/fc)."""

    out_channels = (64, 128, 256)

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2, leaky=0.1),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)]
        )
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        return [s1, s2, self.stage3(s2)]


class _Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (v1.5: stride on conv2), same attribute names."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Body(nn.Module):
    """torchvision resnet50 without avgpool/fc, returning layer2, layer3, layer4."""

    out_channels = (512, 1024, 2048)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * 4, 1, stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [_Bottleneck(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * 4
        layers += [_Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class SSH(nn.Module):
    def __init__(self, in_channel: int, out_channel: int):
        super().__init__()
        assert out_channel % 4 == 0
        leaky = 0.1 if out_channel <= 64 else 0.0
        self.conv3X3 = _conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = _conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = _conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn_no_relu(
            out_channel // 4, out_channel // 4
        )  # sic: lower-case x upstream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.conv3X3(x)
        c5_1 = self.conv5X5_1(x)
        c5 = self.conv5X5_2(c5_1)
        c7 = self.conv7x7_3(self.conv7X7_2(c5_1))
        return F.relu(torch.cat([c3, c5, c7], dim=1))


class FPN(nn.Module):
    def __init__(self, in_channels_list: tuple[int, int, int], out_channels: int):
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        self.output1 = _conv_bn1x1(in_channels_list[0], out_channels, leaky=leaky)
        self.output2 = _conv_bn1x1(in_channels_list[1], out_channels, leaky=leaky)
        self.output3 = _conv_bn1x1(in_channels_list[2], out_channels, leaky=leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class _Head(nn.Module):
    def __init__(self, inchannels: int, num_anchors: int, per_anchor: int):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(inchannels, num_anchors * per_anchor, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1).contiguous()
        return out.view(out.shape[0], -1, self.per_anchor)


# --- architectures as data ---------------------------------------------------------------------
@dataclass(frozen=True)
class RetinaFaceArch:
    name: str  # facexlib's network_name
    title: str
    signature: tuple[str, ...]  # keys only this backbone has
    body: Callable[[], nn.Module]
    body_channels: tuple[int, int, int]  # FPN inputs (facexlib: in_channel * 2, * 4, * 8)
    width: int  # FPN / SSH / head input channels (facexlib: out_channel)
    release_file: str


ARCHS: tuple[RetinaFaceArch, ...] = (
    RetinaFaceArch(
        name="resnet50",
        title="RetinaFace ResNet-50",
        signature=("body.conv1.weight", "body.layer4.2.conv3.weight"),
        body=ResNet50Body,
        body_channels=ResNet50Body.out_channels,
        width=256,
        release_file="detection_Resnet50_Final.pth",
    ),
    RetinaFaceArch(
        name="mobilenet0.25",
        title="RetinaFace MobileNetV1-0.25",
        signature=("body.stage1.0.0.weight", "body.stage3.1.3.weight"),
        body=MobileNetV1Body,
        body_channels=MobileNetV1Body.out_channels,
        width=64,
        release_file="detection_mobilenet0.25_Final.pth",
    ),
)


class RetinaFaceNet(nn.Module):
    """facexlib's `RetinaFace` network (phase 'test'): image -> (loc, softmax conf, landmarks)."""

    def __init__(self, arch: RetinaFaceArch):
        super().__init__()
        self.arch = arch
        w = arch.width
        self.body = arch.body()
        self.fpn = FPN(arch.body_channels, w)
        self.ssh1, self.ssh2, self.ssh3 = SSH(w, w), SSH(w, w), SSH(w, w)
        self.ClassHead = nn.ModuleList(_Head(w, NUM_ANCHORS, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(w, NUM_ANCHORS, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(w, NUM_ANCHORS, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, F.softmax(conf, dim=-1), landms


# --- loading -------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.safetensors file, `module.` prefix stripped. Raises on anything else."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "params_ema", "params", "model", "net"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and not any(
                isinstance(v, torch.Tensor) for v in obj.values()
            ):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise RetinaFaceLoadError(f"{path} holds no state dict ({type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise RetinaFaceLoadError(f"{path}: entry {k!r} is not a tensor")
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def detect_arch(state: dict[str, torch.Tensor]) -> RetinaFaceArch:
    """The entry of ARCHS a state dict belongs to; its shapes checked.

    Raises RetinaFaceLoadError.
    """
    arch = next((a for a in ARCHS if all(k in state for k in a.signature)), None)
    if arch is None:
        sample = ", ".join(sorted(state)[:4])
        raise RetinaFaceLoadError(
            "not a RetinaFace state dict (expected facexlib's "
            + " or ".join(a.release_file for a in ARCHS)
            + f"); first keys: {sample}"
        )
    fpn_w = state.get("fpn.output1.0.weight")
    cls_w = state.get("ClassHead.0.conv1x1.weight")
    if fpn_w is None or cls_w is None:
        raise RetinaFaceLoadError(
            f"{arch.title} file without FPN or class head (fpn.output1 / ClassHead.0)"
        )
    expected_fpn = (arch.width, arch.body_channels[0], 1, 1)
    expected_cls = (NUM_ANCHORS * 2, arch.width, 1, 1)
    if tuple(fpn_w.shape) != expected_fpn or tuple(cls_w.shape) != expected_cls:
        raise RetinaFaceLoadError(
            f"{arch.title} file with unexpected widths: fpn.output1 {tuple(fpn_w.shape)} (expected "
            f"{expected_fpn}), ClassHead.0 {tuple(cls_w.shape)} (expected {expected_cls}: "
            f"{NUM_ANCHORS} anchors x 2 classes)"
        )
    return arch


def build_net(state: dict[str, torch.Tensor]) -> RetinaFaceNet:
    """A RetinaFaceNet in eval mode holding `state` (facexlib key layout, prefix already
    stripped)."""
    arch = detect_arch(state)
    net = RetinaFaceNet(arch)
    own = net.state_dict()
    # Files written by old torch have no BatchNorm num_batches_tracked (unused in eval): tolerated.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RetinaFaceLoadError(
            f"{arch.title} state dict does not match: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise RetinaFaceLoadError(
            f"{arch.title} state dict shape mismatch at {k}:"
            f" {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        )
    net.load_state_dict(state, strict=False)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# --- priors and decoding (facexlib retinaface_utils, vectorised) --------------------------------
def prior_boxes(height: int, width: int) -> torch.Tensor:
    """(P, 4) float32 priors (cx, cy, w, h), normalised, in the order of the heads' outputs."""
    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step / width
        s = torch.tensor(sizes, dtype=torch.float64)
        gy, gx, gs = torch.meshgrid(cy, cx, s, indexing="ij")  # row, column, anchor
        out.append(torch.stack([gx, gy, gs / width, gs / height], dim=-1).reshape(-1, 4))
    return torch.cat(out).to(torch.float32)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """(P, 4) offsets -> (P, 4) x1, y1, x2, y2, normalised."""
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """(P, 10) offsets -> (P, 5, 2) points, normalised."""
    d = pre.reshape(-1, 5, 2)
    return priors[:, None, :2] + d * variances[0] * priors[:, None, 2:]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Indices kept, best first: facexlib's py_cpu_nms (areas with the +1 pixel convention)."""
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[ovr <= threshold]
    return np.asarray(keep, dtype=np.int64)


@dataclass
class Detections:
    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2, pixels of the image the net saw
    scores: np.ndarray  # N float32
    landmarks: np.ndarray  # N x 5 x 2 float32, same pixels, FFHQ_TEMPLATE_512 order


def postprocess(
    loc: torch.Tensor,
    conf: torch.Tensor,
    landms: torch.Tensor,
    priors: torch.Tensor,
    width: int,
    height: int,
    threshold: float = DEFAULT_THRESHOLD,
    nms_threshold: float = NMS_THRESHOLD,
) -> Detections:
    """One image's head outputs (P x 4, P x 2 softmaxed, P x 10) -> thresholded, NMS'd
    detections."""
    loc, conf, landms, priors = (t.detach().float().cpu() for t in (loc, conf, landms, priors))
    if not (loc.shape[0] == conf.shape[0] == landms.shape[0] == priors.shape[0]):
        raise ValueError(
            f"head outputs do not match the priors: loc {tuple(loc.shape)},"
            f" conf {tuple(conf.shape)}, "
            f"landmarks {tuple(landms.shape)}, priors {tuple(priors.shape)}"
        )
    scores = conf[:, 1]
    sel = torch.nonzero(scores > threshold).flatten()  # NaN scores never pass
    wh = torch.tensor([width, height], dtype=torch.float32)
    boxes = (decode_boxes(loc[sel], priors[sel]) * wh.repeat(2)).numpy()
    points = (decode_landmarks(landms[sel], priors[sel]) * wh).numpy()
    s = scores[sel].numpy()
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(points).all(axis=(1, 2))
    boxes, points, s = boxes[finite], points[finite], s[finite]
    keep = nms(boxes, s, nms_threshold) if len(s) else np.zeros(0, np.int64)
    return Detections(
        boxes=boxes[keep].astype(np.float32).reshape(-1, 4),
        scores=s[keep].astype(np.float32).reshape(-1),
        landmarks=points[keep].astype(np.float32).reshape(-1, 5, 2),
    )


def detection_scale(width: int, height: int, min_face_size: int) -> float:
    """Resampling factor (<= 1) of the detection copy: long side ~DETECT_SIDE unless faces of
    min_face_size px would drop below DETECT_MIN_PX there; never above DETECT_MAX_SIDE."""
    long_side = max(width, height)
    scale = max(DETECT_SIDE / long_side, DETECT_MIN_PX / max(1, min_face_size))
    return float(min(1.0, scale, DETECT_MAX_SIDE / long_side))


# --- the detector ------------------------------------------------------------------------------
class RetinaFaceDetector:
    """Drop-in for OpenCVFaceDetector: `detect(rgb, min_face_size) -> list[DetectedFace]`."""

    name = "retinaface"

    def __init__(
        self,
        net: RetinaFaceNet,
        device: str | torch.device = "cpu",
        threshold: float = DEFAULT_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
        min_eye_dist: float = MIN_EYE_DIST,
    ):
        self.net = net.to(device).eval()
        self.arch = net.arch
        self.device = torch.device(device)
        self.threshold = float(threshold)
        self.nms_threshold = float(nms_threshold)
        self.min_eye_dist = float(min_eye_dist)
        self._lock = threading.Lock()
        self._mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=self.device).view(
            1, 3, 1, 1
        )

    @classmethod
    def from_file(
        cls, path: str | Path, device: str | torch.device = "cpu", **kw
    ) -> RetinaFaceDetector:
        """Load facexlib's release file (or any file in its layout). Raises on a bad file."""
        return cls(build_net(read_state_dict(path)), device, **kw)

    def describe(self) -> str:
        return f"{self.arch.title} on {self.device}, threshold {self.threshold:g}"

    def detect(self, rgb: np.ndarray, min_face_size: int = 48) -> list[DetectedFace]:
        """All faces in an H x W x 3 float [0, 1] (or uint8) RGB image, largest first."""
        x = _bgr_255(rgb)
        h, w = x.shape[:2]
        if min(h, w) < 8:
            return []
        scale = detection_scale(w, h, min_face_size)
        t = torch.from_numpy(x).permute(2, 0, 1)[None].to(self.device)
        dh, dw = h, w
        if scale < 1.0:
            dh, dw = max(1, round(h * scale)), max(1, round(w * scale))
            t = F.interpolate(
                t, size=(dh, dw), mode="bilinear", align_corners=False, antialias=True
            )
        det = self.run(t - self._mean)
        sx, sy = w / dw, h / dh
        faces = []
        for box, score, lm in zip(det.boxes, det.scores, det.landmarks):
            box = box * np.array([sx, sy, sx, sy], np.float32)
            lm = lm * np.array([sx, sy], np.float32)
            if np.hypot(*(lm[0] - lm[1])) < self.min_eye_dist:
                continue  # side face or a face too small to align
            x1, y1, x2, y2 = (float(v) for v in box)
            faces.append(
                DetectedFace(
                    box=(x1, y1, x2 - x1, y2 - y1),
                    landmarks=np.ascontiguousarray(lm, np.float32),
                    eyes_found=True,
                    score=float(score),
                )
            )
        faces.sort(key=lambda f: f.box[2] * f.box[3], reverse=True)
        return faces

    def run(self, x: torch.Tensor) -> Detections:
        """A mean-subtracted BGR 1 x 3 x H x W tensor -> detections in its pixels."""
        height, width = int(x.shape[2]), int(x.shape[3])
        with self._lock, torch.inference_mode():
            loc, conf, landms = self.net(x)
        priors = prior_boxes(height, width)
        return postprocess(
            loc[0], conf[0], landms[0], priors, width, height, self.threshold, self.nms_threshold
        )


def _bgr_255(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    if a.dtype == np.uint8:
        f = a.astype(np.float32)
    else:
        f = np.clip(a.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(255.0)
    return np.ascontiguousarray(f[..., ::-1])
