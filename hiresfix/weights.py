"""Where weight files live and how they are checked: shared by every stage that loads files
(upscaler, face restorer), so both read the same folder and mean the same thing by a checksum.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

# Set on a pod or a laptop to point every profile at the folder that holds the files.
WEIGHTS_DIR_ENV = "HIRESFIX_WEIGHTS_DIR"


def weights_dir(configured: str | os.PathLike) -> Path:
    """The effective weights folder: $HIRESFIX_WEIGHTS_DIR when set and non-empty, else the
    config's."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or configured).expanduser()


def weights_path(configured_dir: str | os.PathLike, file: str) -> Path:
    """A configured file in the effective weights folder (see `in_folder`)."""
    return in_folder(weights_dir(configured_dir), file)


def in_folder(folder: str | os.PathLike, file: str) -> Path:
    """Absolute paths stay; relative ones live in `folder`."""
    p = Path(file).expanduser()
    return p if p.is_absolute() else Path(folder) / p


class WeightsFolder(BaseModel):
    """Settings base of every stage that loads weight files. The environment override is applied
    when a file is looked up, not stored: a profile validated on a laptop and shipped to a pod
    finds the pod's folder, and the dump says what was configured."""

    weights_dir: str = Field(
        "weights",
        description=(
            f"Folder for relative weight files; ${WEIGHTS_DIR_ENV}, when set and non-empty,"
            " overrides it."
        ),
    )

    def effective_weights_dir(self) -> Path:
        return weights_dir(self.weights_dir)

    def weights_file(self, file: str) -> Path:
        """Where a configured file is read from (absolute, or in the effective folder)."""
        return weights_path(self.weights_dir, file)

    def model_path(self, spec) -> Path:
        """The file of a model entry (anything with `.file`)."""
        return self.weights_file(spec.file)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def normalise_sha256(v: str) -> str:
    """64 hex digits, lower-cased; anything else is a configuration error."""
    v = v.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError("sha256 must be 64 hexadecimal digits")
    return v


# The type of every configured checksum field (compared lower-case).
Sha256 = Annotated[str, AfterValidator(normalise_sha256)]


def checksum_mismatch(path: str | os.PathLike, expected: str | None) -> str | None:
    """None when nothing is expected or the file's SHA-256 is `expected`; else what is wrong."""
    if expected is None:
        return None
    got = sha256_file(path)
    if got == expected.lower():
        return None
    return (
        f"checksum mismatch for {path}: sha256 {got}, expected {expected.lower()};"
        " the file is truncated or a different model: fetch it again"
    )


def file_problem(path: Path, sha256: str | None, fetch_hint: str = "") -> str | None:
    """Why a configured weight file cannot be loaded as it is (absent, unreadable, other bytes
    than expected), or None. `fetch_hint`: how to get the file, e.g. "run `hiresfix weights x`,
    or "."""
    if not path.is_file():
        return (
            f"weights file not found at {path}: {fetch_hint}copy the file there,"
            f" or set {WEIGHTS_DIR_ENV} to the folder that holds it"
        )
    try:
        return checksum_mismatch(path, sha256)
    except OSError as exc:
        return f"cannot read {path}: {type(exc).__name__}: {exc}"


def check_model_names(kind: str, names: list[str], default: str | None) -> None:
    """Settings validator body: names unique, default (if any) among them."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{kind} names must be unique; repeated: {', '.join(dupes)}")
    if default is not None and default not in names:
        raise ValueError(
            f"default {kind} {default!r} is not configured;"
            f" configured: {', '.join(names) or 'none'}"
        )
