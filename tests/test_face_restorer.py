"""FaceRestorer: settings, every unavailable path provoked for real, and the pipeline end to end
with a tiny random RestoreFormer (~0.5 M parameters, ~1 s per face on one CPU thread) loaded
through spandrel exactly like real weights. GFPGAN itself is covered in test_face_gfpgan.py.
"""

from __future__ import annotations

import hashlib
import logging
import sys

import numpy as np
import pytest
import skimage.data as skdata
import torch
from pydantic import ValidationError

from hiresfix.face import FaceModelSpec, FaceRestorer, FaceSettings, UnknownFaceModelError
from hiresfix.face.align import align_face
from hiresfix.images import Picture


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A weights folder: a tiny random RestoreFormer (.safetensors), an SR model, junk."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.RestoreFormer import RestoreFormer

    d = tmp_path_factory.mktemp("face_weights")
    torch.manual_seed(0)
    rf = RestoreFormer(
        n_embed=64, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32
    )
    state = {k: v.contiguous() for k, v in rf.state_dict().items()}
    save_file(state, str(d / "tiny_restoreformer.safetensors"))
    torch.save(
        {"params_ema": state}, d / "tiny_restoreformer_ema.pth"
    )  # how GFPGAN releases wrap weights
    sr = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=2, upscale=2)
    torch.save(sr.state_dict(), d / "compact_x2.pth")
    (d / "corrupt.pth").write_bytes(b"PK\x03\x04 this is not a torch file" * 100)
    return d


def _settings(weights_dir, *models, **kw) -> FaceSettings:
    specs = [
        FaceModelSpec(name=n, file=f) if isinstance(f, str) else FaceModelSpec(name=n, **f)
        for n, f in models
    ]
    return FaceSettings(weights_dir=str(weights_dir), models=specs, **kw)


@pytest.fixture(scope="module")
def tiny(weights_dir) -> FaceRestorer:
    r = FaceRestorer.from_settings(
        _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"))
    )
    assert r.available(), r.models_info()
    return r


@pytest.fixture(scope="module")
def astronaut() -> Picture:
    return Picture(skdata.astronaut().astype(np.float32) / 255.0)


def _regions(restorer: FaceRestorer, pic: Picture):
    return [align_face(pic.rgb, f.landmarks).region for f in restorer.detect(pic)]


def _assert_changes_inside(before: np.ndarray, after: np.ndarray, regions) -> np.ndarray:
    changed = np.any(after != before, axis=2)
    inside = np.zeros_like(changed)
    for x0, y0, x1, y1 in regions:
        inside[y0:y1, x0:x1] = True
    assert not np.any(changed & ~inside), "pixels outside the face regions changed"
    return changed


# ---------------------------------------------------------------- settings
def test_settings_validation(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="needs retinaface_file"):
        FaceSettings(detector="retinaface")  # more in test_face_retinaface.py
    with pytest.raises(ValidationError, match="unique"):
        FaceSettings(models=[{"name": "a", "file": "x"}, {"name": "a", "file": "y"}])
    with pytest.raises(ValidationError, match="is not configured"):
        FaceSettings(models=[{"name": "a", "file": "x"}], default="b")
    with pytest.raises(ValidationError):
        FaceSettings(min_face_sise=10)  # typo: extra fields are refused
    with pytest.raises(ValidationError):
        FaceModelSpec(name="a", file="x", sha256="abc")
    s = FaceSettings(
        models=[{"name": "a", "file": "a.pth"}, {"name": "b", "file": str(tmp_path / "b.pth")}]
    )
    assert FaceSettings.model_validate(s.model_dump()) == s  # what the deployment receives
    assert s.default_name() == "a"
    monkeypatch.delenv("HIRESFIX_WEIGHTS_DIR", raising=False)
    assert s.model_path(s.models[0]).as_posix() == "weights/a.pth"
    monkeypatch.setenv("HIRESFIX_WEIGHTS_DIR", str(tmp_path / "w"))
    assert s.model_path(s.models[0]) == tmp_path / "w" / "a.pth"
    assert s.model_path(s.models[1]) == tmp_path / "b.pth"  # absolute stays


def test_pth_with_params_ema_loads_the_same_model(weights_dir, tiny, astronaut):
    r = FaceRestorer.from_settings(_settings(weights_dir, ("ema", "tiny_restoreformer_ema.pth")))
    assert r.available() and r.models_info()[0].architecture == "RestoreFormer"
    a = r.descriptor().model.state_dict()
    b = tiny.descriptor().model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_dir_env_is_used_for_loading(monkeypatch, weights_dir):
    monkeypatch.setenv("HIRESFIX_WEIGHTS_DIR", str(weights_dir))
    s = FaceSettings(
        weights_dir="/nonexistent", models=[{"name": "t", "file": "tiny_restoreformer.safetensors"}]
    )
    r = FaceRestorer.from_settings(s)
    assert r.available()


# ---------------------------------------------------------------- unavailable paths
def _assert_unchanged(restorer, pic, reason_prefix, model=None):
    out, info = restorer.restore(pic, 0.7, model)
    assert out is pic
    assert info.applied is False and info.faces_found == 0
    assert info.reason is not None and info.reason.startswith(reason_prefix), info.reason
    return info


def test_no_model_configured(astronaut):
    r = FaceRestorer.from_settings(FaceSettings())
    assert not r.available() and r.names() == [] and r.models_info() == []
    _assert_unchanged(r, astronaut, "not_configured")
    with pytest.raises(UnknownFaceModelError):
        r.resolve(None)


def test_missing_weight_file(weights_dir, astronaut, caplog):
    with caplog.at_level(logging.WARNING, logger="hiresfix.face"):
        r = FaceRestorer.from_settings(_settings(weights_dir, ("gfpgan", "GFPGANv1.4.pth")))
    assert "GFPGANv1.4.pth" in caplog.text
    assert not r.available()
    [info] = r.models_info()
    assert (
        info.kind == "face"
        and not info.available
        and info.default
        and info.reason == "weights_missing"
    )
    assert "not found" in info.detail
    _assert_unchanged(r, astronaut, "weights_missing")


def test_corrupt_weight_file(weights_dir, astronaut):
    r = FaceRestorer.from_settings(_settings(weights_dir, ("bad", "corrupt.pth")))
    assert not r.available()
    assert r.models_info()[0].reason == "error" and "corrupt" in r.models_info()[0].detail
    _assert_unchanged(r, astronaut, "error")


def test_checksum_mismatch_and_match(weights_dir, astronaut):
    good = hashlib.sha256((weights_dir / "tiny_restoreformer.safetensors").read_bytes()).hexdigest()
    r = FaceRestorer.from_settings(
        _settings(
            weights_dir,
            ("wrong", {"file": "tiny_restoreformer.safetensors", "sha256": "0" * 64}),
            ("right", {"file": "tiny_restoreformer.safetensors", "sha256": good.upper()}),
        )
    )
    wrong, right = r.models_info()
    assert not wrong.available and wrong.reason == "weights_missing" and "checksum" in wrong.detail
    assert right.available and right.architecture == "RestoreFormer"
    assert r.available()  # one usable model is enough
    _assert_unchanged(r, astronaut, "weights_missing", "wrong")


def test_not_a_face_model(weights_dir, astronaut):
    r = FaceRestorer.from_settings(_settings(weights_dir, ("sr", "compact_x2.pth")))
    [info] = r.models_info()
    assert not info.available and "not a supported face restoration model" in info.detail
    _assert_unchanged(r, astronaut, "error")


def test_spandrel_not_importable(monkeypatch, weights_dir, astronaut):
    monkeypatch.setitem(sys.modules, "spandrel", None)
    r = FaceRestorer.from_settings(
        _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"))
    )
    assert not r.available()
    [info] = r.models_info()
    assert info.reason == "not_installed" and "spandrel" in info.detail
    _assert_unchanged(r, astronaut, "not_installed")


def test_opencv_not_importable(monkeypatch, weights_dir, astronaut):
    monkeypatch.setitem(sys.modules, "cv2", None)
    r = FaceRestorer.from_settings(
        _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"))
    )
    assert not r.available()
    assert r.models_info()[0].reason == "not_installed"
    _assert_unchanged(r, astronaut, "not_installed")


def test_cuda_requested_without_cuda(weights_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # same answer on a GPU machine
    r = FaceRestorer.from_settings(
        _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"), device="cuda")
    )
    assert not r.available() and "cuda" in r.models_info()[0].detail


def test_unknown_model_name(tiny, astronaut):
    with pytest.raises(UnknownFaceModelError, match="configured: tiny") as e:
        tiny.resolve("codeformer")
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownFaceModelError):
        tiny.restore(astronaut, 0.5, "codeformer")
    assert tiny.resolve(None) == "tiny" and tiny.resolve("tiny") == "tiny"


# ---------------------------------------------------------------- behaviour (tiny model)
def test_models_info_loaded(tiny):
    [info] = tiny.models_info()
    assert info.available and info.default and info.architecture == "RestoreFormer"
    assert info.device == "cpu" and info.dtype == "fp32" and info.reason is None


def test_no_face_leaves_image_unchanged(tiny):
    for img in (skdata.coffee(), np.full((128, 160, 3), 128, np.uint8)):
        pic = Picture(img.astype(np.float32) / 255.0)
        out, info = tiny.restore(pic, 1.0)
        assert out is pic and not info.applied and info.faces_found == 0
        assert info.reason.startswith("no_face") and info.model == "tiny"


def test_min_face_size_skips(weights_dir, astronaut):
    s = _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"), min_face_size=150)
    r = FaceRestorer.from_settings(s)
    out, info = r.restore(astronaut, 1.0)
    assert out is astronaut and not info.applied and info.faces_found == 1
    assert info.reason.startswith("faces_too_small")


def test_weight_zero_returns_input(tiny, astronaut):
    out, info = tiny.restore(astronaut, 0.0)
    assert out is astronaut and not info.applied and info.faces_found == 1
    assert tiny.last_timings.forward == 0.0


def test_weight_blends_linearly_and_only_inside_the_face(tiny, astronaut):
    full, info = tiny.restore(astronaut, 1.0)
    assert info.applied and info.faces_found == 1 and info.model == "tiny" and info.reason is None
    part, _ = tiny.restore(astronaut, 0.3)
    changed = _assert_changes_inside(astronaut.rgb, full.rgb, _regions(tiny, astronaut))
    assert changed[100:140, 200:250].all()  # the eyes/nose area is replaced
    assert changed.sum() > 5000
    np.testing.assert_allclose(
        part.rgb - astronaut.rgb, 0.3 * (full.rgb - astronaut.rgb), atol=2e-5
    )
    assert astronaut.rgb.dtype == full.rgb.dtype == np.float32
    # Deterministic: the same request gives the same pixels.
    again, _ = tiny.restore(astronaut, 1.0)
    assert np.array_equal(again.rgb, full.rgb)


def test_alpha_16bit_grayscale_kept(tiny, astronaut):
    gray = np.repeat(astronaut.rgb.mean(axis=2, keepdims=True), 3, axis=2)
    alpha = np.linspace(0, 1, 512 * 512, dtype=np.float32).reshape(512, 512)
    pic = Picture(gray, alpha.copy(), bit_depth=16, grayscale=True, info={"source_format": "png"})
    out, info = tiny.restore(pic, 0.8)
    assert info.applied
    assert out.bit_depth == 16 and out.grayscale and out.info == {"source_format": "png"}
    assert np.array_equal(out.alpha, alpha)
    assert np.any(out.rgb != pic.rgb)
    assert np.array_equal(out.rgb[..., 0], out.rgb[..., 1]) and np.array_equal(
        out.rgb[..., 1], out.rgb[..., 2]
    )
    assert np.array_equal(pic.rgb, gray)  # the input is not modified in place


def test_two_faces_and_max_faces(weights_dir, astronaut):
    canvas = Picture(np.ascontiguousarray(np.hstack([astronaut.rgb, astronaut.rgb[:, ::-1]])))
    r = FaceRestorer.from_settings(
        _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"), max_faces=1)
    )
    one, info = r.restore(canvas, 1.0)
    assert info.applied and info.faces_found == 2 and r.last_timings.faces == 1
    changed = np.any(one.rgb != canvas.rgb, axis=2)
    assert changed[:, :512].any() != changed[:, 512:].any()  # exactly one side touched
    r = FaceRestorer.from_settings(
        _settings(weights_dir, ("tiny", "tiny_restoreformer.safetensors"))
    )
    both, info = r.restore(canvas, 1.0)
    assert info.faces_found == 2
    changed = _assert_changes_inside(canvas.rgb, both.rgb, _regions(r, canvas))
    assert changed[:, :512].any() and changed[:, 512:].any()


def test_runtime_failure_via_forward_hook(tiny, astronaut, caplog):
    def boom(module, args, output):
        raise RuntimeError("simulated CUDA error: device-side assert triggered")

    handle = tiny.descriptor().model.register_forward_hook(boom)
    try:
        with caplog.at_level(logging.WARNING, logger="hiresfix.face"):
            out, info = tiny.restore(astronaut, 0.6)
    finally:
        handle.remove()
    assert out is astronaut and not info.applied and info.faces_found == 1
    assert info.reason.startswith("error: RuntimeError: simulated CUDA error")
    assert "failed" in caplog.text
    assert tiny.available()  # a failed request does not take the model down


def _cpu_alloc_error() -> BaseException:
    try:  # host memory exhausted: torch's CPU allocator raises a RuntimeError, not OutOfMemoryError
        torch.empty(1 << 60, dtype=torch.uint8)
    except (RuntimeError, MemoryError) as exc:
        return exc
    raise AssertionError("a 1 EiB allocation succeeded")


@pytest.mark.parametrize(
    "exc",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), _cpu_alloc_error()],
)
def test_oom_is_reported_as_such(tiny, astronaut, exc):
    def oom(module, args):
        raise exc

    handle = tiny.descriptor().model.register_forward_pre_hook(oom)
    try:
        out, info = tiny.restore(astronaut, 0.6)
    finally:
        handle.remove()
    assert out is astronaut and info.reason.startswith("out_of_memory")


def test_restore_all_summarises_a_request(tiny, astronaut):
    flat = Picture(np.full((128, 128, 3), 0.5, np.float32))
    outs, info = tiny.restore_all([flat, astronaut, flat], 1.0)
    assert len(outs) == 3 and outs[0] is flat and outs[2] is flat  # no face: the input itself
    assert not np.array_equal(outs[1].rgb, astronaut.rgb)
    assert info.applied and info.faces_found >= 1 and info.model == "tiny"
    assert info.reason.startswith("no_face")  # why the other pictures were left alone
    outs, info = tiny.restore_all([flat], 1.0)
    assert not info.applied and info.faces_found == 0 and info.reason.startswith("no_face")
