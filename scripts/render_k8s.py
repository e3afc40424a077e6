#!/usr/bin/env python3
"""Copy serve_config.yaml into k8s/rayservice.yaml's spec.serveConfigV2 (kept verbatim, comments
too).

Run after editing serve_config.yaml; tests/test_configs.py fails while the two differ.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "  serveConfigV2: |\n"
END = "  rayClusterConfig:\n"


def main() -> None:
    config = (ROOT / "serve_config.yaml").read_text().splitlines()
    while config and config[0].startswith("#"):  # the file's own header comment stays out
        config.pop(0)
    body = "".join(("    " + line if line else "") + "\n" for line in config).rstrip("\n") + "\n"
    manifest = ROOT / "k8s" / "rayservice.yaml"
    text = manifest.read_text()
    a, b = text.index(START) + len(START), text.index(END)
    manifest.write_text(text[:a] + body + text[b:])
    print("updated", manifest.relative_to(ROOT))


if __name__ == "__main__":
    main()
