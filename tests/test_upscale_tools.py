"""Weight download (offline: file:// URLs and a refused port) and the comparison sheet."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from hiresfix.images import Picture
from hiresfix.upscale import UpscalerModelSpec
from hiresfix.upscale.compare import busiest_window, compare_images
from hiresfix.upscale.download import (
    KNOWN_WEIGHTS,
    DownloadError,
    download_spec,
    download_weights,
    fetch,
)


def test_known_table_is_official_and_hashes_are_real_or_none():
    assert set(KNOWN_WEIGHTS) == {
        "RealESRGAN_x2plus",
        "RealESRGAN_x4plus",
        "RealESRGAN_x4plus_anime_6B",
        "realesr-animevideov3",
        "realesr-general-x4v3",
        "GFPGANv1.4",
    }
    for name, w in KNOWN_WEIGHTS.items():
        assert w.url.startswith(
            (
                "https://github.com/xinntao/Real-ESRGAN/releases/download/",
                "https://github.com/TencentARC/GFPGAN/releases/download/",
            )
        )
        assert w.url.endswith("/" + w.file) and w.file == name + ".pth"
        assert w.sha256 is None or len(w.sha256) == 64


def test_fetch_verifies_sha256(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = fetch(src.as_uri(), tmp_path / "out" / "m.pth", good, progress=False)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(DownloadError, match="sha256"):
        fetch(src.as_uri(), tmp_path / "out" / "bad.pth", "0" * 64, progress=False)
    assert not (tmp_path / "out" / "bad.pth").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.pth"]  # no .part left behind


def test_fetch_with_progress_bar(tmp_path, capsys):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    assert fetch(src.as_uri(), tmp_path / "w.pth", progress=True).stat().st_size == 3_000_000


def test_offline_fails_with_clear_message(tmp_path):
    # Port 9 (discard) on localhost: refused immediately, like a machine with no route out.
    with pytest.raises(DownloadError, match="offline") as e:
        fetch(
            "http://127.0.0.1:9/RealESRGAN_x4plus.pth",
            tmp_path / "RealESRGAN_x4plus.pth",
            progress=False,
            timeout=5,
        )
    assert str(tmp_path / "RealESRGAN_x4plus.pth") in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_weights_names(tmp_path, monkeypatch):
    with pytest.raises(DownloadError, match="unknown weights"):
        download_weights(["RealESRGAN_x8"], tmp_path)
    (tmp_path / "realesr-animevideov3.pth").write_bytes(b"present")  # present: kept, no network
    assert download_weights("realesr-animevideov3.pth", tmp_path, progress=False) == [
        tmp_path / "realesr-animevideov3.pth"
    ]
    seen = []
    monkeypatch.setattr(
        "hiresfix.upscale.download.fetch", lambda url, dest, sha, **kw: seen.append(url) or dest
    )
    for everything in ("all", None, []):  # the CLI passes None when no name is given
        seen.clear()
        assert len(download_weights(everything, tmp_path)) == 6 and len(seen) == 6
    assert download_weights(["realesrgan_x4plus"], tmp_path) == [tmp_path / "RealESRGAN_x4plus.pth"]


def test_download_spec(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    s = UpscalerModelSpec(
        name="a", file="sub/a.pth", url=src.as_uri(), sha256=hashlib.sha256(b"abc").hexdigest()
    )
    assert download_spec(s, tmp_path / "w", progress=False).read_bytes() == b"abc"
    with pytest.raises(DownloadError, match="no url"):
        download_spec(UpscalerModelSpec(name="b", file="b.pth"), tmp_path)


def test_busiest_window_finds_the_texture():
    rgb = np.full((64, 96, 3), 0.5, np.float32)
    rgb[40:56, 70:86] = np.random.default_rng(0).random((16, 16, 3))
    x, y, side = busiest_window(Picture(rgb), 16)
    assert side == 16 and abs(x - 70) <= 2 and abs(y - 40) <= 2


def test_compare_images_sheet():
    orig = Picture(data.astronaut()[::8, ::8].astype(np.float32) / 255)  # 64 px
    big = Picture(
        np.asarray(
            Image.fromarray(orig.rgb_u8()).resize((256, 256), Image.Resampling.NEAREST), np.float32
        )
        / 255
    )
    alpha = Picture(big.rgb.copy(), np.ones((256, 256), np.float32) * 0.5)
    sheet = compare_images(
        orig, [("model", big), ("with alpha", alpha)], panel=200, crop=32, zoom_panel=128
    )
    assert isinstance(sheet, Image.Image) and sheet.mode == "RGB"
    assert sheet.width > 3 * 128 and sheet.height > 200 + 128
    # The panels hold picture content, not a blank canvas.
    a = np.asarray(sheet)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50
