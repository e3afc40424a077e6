"""Where weight files live and how they are checked: shared by every stage that loads files
(upscaler, face restorer), so both read the same folder and mean the same thing by a checksum.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Set on a pod or a laptop to point every profile at the folder that holds the files.
WEIGHTS_DIR_ENV = "HIRESFIX_WEIGHTS_DIR"


def weights_dir(configured: str | os.PathLike) -> Path:
    """The effective weights folder: $HIRESFIX_WEIGHTS_DIR when set and non-empty, else the config's."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or configured).expanduser()


def weights_path(configured_dir: str | os.PathLike, file: str) -> Path:
    """A configured file: absolute paths stay, relative ones live in the effective weights folder."""
    p = Path(file).expanduser()
    return p if p.is_absolute() else weights_dir(configured_dir) / p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def normalise_sha256(v: str | None) -> str | None:
    """Field validator body: None, or 64 hex digits (lower-cased)."""
    if v is None:
        return v
    v = v.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError("sha256 must be 64 hexadecimal digits")
    return v


def check_model_names(kind: str, names: list[str], default: str | None) -> None:
    """Settings validator body: names unique, default (if any) among them."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{kind} names must be unique; repeated: {', '.join(dupes)}")
    if default is not None and default not in names:
        raise ValueError(f"default {kind} {default!r} is not configured; configured: {', '.join(names) or 'none'}")
