#!/usr/bin/env python3
"""Copy serve_config.yaml into k8s/rayservice.yaml's spec.serveConfigV2 (kept verbatim, comments
too). The rest of k8s/ is written by hand; tests/test_k8s.py validates every document.

Run after editing serve_config.yaml; tests/test_k8s.py fails while the two differ.
`--check`: change nothing, exit 1 when the manifest is out of date.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "rayservice.yaml"
START = "  serveConfigV2: |\n"
END = "  rayClusterConfig:\n"


def rendered() -> str:
    config = (ROOT / "serve_config.yaml").read_text().splitlines()
    while config and config[0].startswith("#"):  # the file's own header comment stays out
        config.pop(0)
    body = "".join(("    " + line if line else "") + "\n" for line in config).rstrip("\n") + "\n"
    text = MANIFEST.read_text()
    a, b = text.index(START) + len(START), text.index(END)
    return text[:a] + body + text[b:]


def main() -> None:
    text = rendered()
    if "--check" in sys.argv[1:]:
        if text != MANIFEST.read_text():
            sys.exit(f"{MANIFEST.relative_to(ROOT)} is out of date: run scripts/render_k8s.py")
        return
    MANIFEST.write_text(text)
    print("updated", MANIFEST.relative_to(ROOT))


if __name__ == "__main__":
    main()
