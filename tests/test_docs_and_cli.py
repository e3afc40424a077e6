"""One schema serves the API, the CLI and the docs: prove the three agree."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from hiresfix.apidoc import api_markdown
from hiresfix.cli import _payload, build_parser
from hiresfix.schemas import GenerateRequest, UpscaleRequest
from tests import REPO


def test_readme_api_tables_are_current():
    assert api_markdown() in (REPO / "README.md").read_text(), "run: python -m hiresfix.apidoc"


@pytest.mark.parametrize(
    "cmd, model, skip",
    [("generate", GenerateRequest, {"prompt"}), ("upscale", UpscaleRequest, {"image"})],
)
def test_cli_has_a_flag_for_every_schema_field(cmd, model, skip):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[cmd]
    dests = {a.dest for a in sub._actions}
    assert set(model.model_fields) - skip <= dests


def test_cli_flags_become_the_request_payload():
    ns = build_parser().parse_args(
        [
            "generate",
            "a cat",
            "--width",
            "512",
            "--hires-fix",
            "--no-use-realesrgan",
            "--hires-scale",
            "1.5",
            "--scheduler",
            "dpmpp_2m_karras",
            "--output-format",
            "webp",
        ]
    )
    body = _payload(ns, GenerateRequest)
    assert body == {
        "prompt": "a cat",
        "width": 512,
        "hires_fix": True,
        "use_realesrgan": False,
        "hires_scale": 1.5,
        "scheduler": "dpmpp_2m_karras",
        "output_format": "webp",
    }
    GenerateRequest.model_validate(body)


def test_cli_rejects_bad_values_before_sending():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hiresfix.cli",
            "generate",
            "x",
            "--height",
            "65",
            "--url",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "height" in p.stderr and "multiple of 8" in p.stderr


def test_cli_says_when_no_server_is_running():
    p = subprocess.run(
        [sys.executable, "-m", "hiresfix.cli", "generate", "x", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "no hiresfix server" in p.stderr


def test_cli_weights_prints_the_sha256_to_pin(tmp_path):
    """A file already present is kept (no network) and reported with its hash for the profile."""
    (tmp_path / "realesr-animevideov3.pth").write_bytes(b"pretend weights")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hiresfix.cli",
            "weights",
            "realesr-animevideov3",
            "--weights-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    digest = hashlib.sha256(b"pretend weights").hexdigest()
    assert f"realesr-animevideov3.pth  sha256 {digest}  (no official hash known: pin it" in p.stdout


def test_cli_weights_failure_is_a_message_not_a_traceback(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hiresfix.cli",
            "weights",
            "no-such-model",
            "--weights-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "unknown weights 'no-such-model'" in p.stderr
    assert "Traceback" not in p.stderr
