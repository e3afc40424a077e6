"""Fetch official Real-ESRGAN weight files (plain urllib; what the `weights` CLI command calls).

Hashes: a sha256 is listed only where it is known for certain; None means "not verified here" and
the file is accepted after a complete download (spandrel still rejects anything that is not a
model at load). Never fill in a hash that was not computed from the official file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hiresfix.upscale.settings import UpscalerModelSpec
from hiresfix.weights import checksum_mismatch, in_folder

_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"


@dataclass(frozen=True)
class KnownWeights:
    file: str
    url: str
    sha256: str | None
    scale: int
    note: str


# The release assets named in Real-ESRGAN's inference_realesrgan.py.
KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    w.file.removesuffix(".pth"): w
    for w in (
        KnownWeights(
            "RealESRGAN_x4plus.pth",
            f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
            None,
            4,
            "RRDBNet 23 blocks; general photos",
        ),
        KnownWeights(
            "RealESRGAN_x2plus.pth",
            f"{_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth",
            None,
            2,
            "RRDBNet 23 blocks with pixel-unshuffle input; general photos",
        ),
        KnownWeights(
            "RealESRGAN_x4plus_anime_6B.pth",
            f"{_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
            None,
            4,
            "RRDBNet 6 blocks; anime illustrations",
        ),
        KnownWeights(
            "realesr-animevideov3.pth",
            f"{_RELEASES}/v0.2.5.0/realesr-animevideov3.pth",
            None,
            4,
            "SRVGGNetCompact (XS); anime video, fastest",
        ),
        KnownWeights(
            "realesr-general-x4v3.pth",
            f"{_RELEASES}/v0.2.5.0/realesr-general-x4v3.pth",
            None,
            4,
            "SRVGGNetCompact (S); general scenes, fast",
        ),
        # The face pass's default restorer, so one command fills the weights folder for both stages.
        KnownWeights(
            "GFPGANv1.4.pth",
            "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
            None,
            1,
            "GFPGAN v1.4 face restorer (face pass)",
        ),
    )
}


class DownloadError(RuntimeError):
    """A weight file could not be fetched or verified; the message says what to do."""


def known_weights(name: str) -> KnownWeights | None:
    """Look a name up in KNOWN_WEIGHTS: with or without ".pth", any case."""
    key = Path(name).name.removesuffix(".pth").lower()
    return next((w for k, w in KNOWN_WEIGHTS.items() if k.lower() == key), None)


def download_weights(
    names: list[str] | str | None = None,
    weights_dir: str | os.PathLike = "weights",
    progress: bool = True,
    *,
    timeout: float = 30.0,
    force: bool = False,
) -> list[Path]:
    """Download known weights (names from KNOWN_WEIGHTS, with or without ".pth"; None, [] or "all"
    for every one) into `weights_dir`. Files already present (and matching a known hash) are kept.
    Returns the paths; raises DownloadError with a clear message (offline, checksum, unknown
    name)."""
    if not names or names == "all" or names == ["all"]:
        wanted = list(KNOWN_WEIGHTS)
    else:
        wanted = [names] if isinstance(names, str) else list(names)
    out = []
    for name in wanted:
        known = known_weights(name)
        if known is None:
            raise DownloadError(f"unknown weights {name!r}; known: {', '.join(KNOWN_WEIGHTS)}")
        out.append(
            fetch(
                known.url,
                Path(weights_dir) / known.file,
                known.sha256,
                progress=progress,
                timeout=timeout,
                force=force,
            )
        )
    return out


def download_spec(
    spec: UpscalerModelSpec,
    weights_dir: str | os.PathLike,
    progress: bool = True,
    *,
    timeout: float = 30.0,
    force: bool = False,
) -> Path:
    """Download a configured model from its own `url`, checked against its own `sha256`."""
    if not spec.url:
        raise DownloadError(
            f"upscaler {spec.name!r} has no url configured: copy {spec.file} by hand"
        )
    return fetch(
        spec.url,
        in_folder(weights_dir, spec.file),
        spec.sha256,
        progress=progress,
        timeout=timeout,
        force=force,
    )


def fetch(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 30.0,
    force: bool = False,
) -> Path:
    """Stream `url` to `dest` via a temporary file in the same folder (an interrupted download never
    leaves a half file under the real name), hashing as it goes."""
    dest = Path(dest)
    if dest.is_file() and not force:
        mismatch = checksum_mismatch(dest, sha256)
        if mismatch is None:
            return dest
        raise DownloadError(f"{dest} already exists: {mismatch} (force=True replaces it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https/file URLs
            except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(
                    f"could not download {url} ({reason}). If this machine is offline, download it"
                    f" elsewhere and copy it to {dest}"
                    " (or point HIRESFIX_WEIGHTS_DIR at its folder)"
                ) from exc
            with resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                bar = _bar(total, dest.name) if progress else None
                try:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        h.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                except (TimeoutError, OSError) as exc:
                    raise DownloadError(
                        f"download of {url} was interrupted ({exc}): run it again"
                    ) from exc
                finally:
                    if bar is not None:
                        bar.close()
        got = h.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise DownloadError(f"{url} has sha256 {got}, expected {sha256.lower()}: not saved")
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bar(total: int | None, name: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a requirement
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
