"""PNG encoding of a 1536 px answer: hiresfix.images.encode_image at each compress level vs the
encode as it was before issue 14 (Picture -> 8-bit PIL -> Pillow's default, zlib 6), measured in the
same run, alternating. Also checks every level decodes back to the same pixels (lossless).

    python bench/png_encode.py              # 1536 px photo and a flat graphic, levels 1, 6, 9
    python bench/png_encode.py --levels 0,1,2,3,6,9 --runs 7

Target (issue 14): the default level <= 0.25 of the old cost.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiresfix.images import PNG_COMPRESS_LEVEL, Picture, encode_image  # noqa: E402


def old_encode(pic: Picture) -> bytes:
    """What encode_image did before: clip/scale/round to 8 bits, then Pillow's default PNG."""
    rgb = (np.clip(pic.rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "PNG")
    return out.getvalue()


def pictures(side: int) -> dict[str, Picture]:
    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)
    flat = (
        Image.fromarray(data.logo()).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
    )
    return {
        "photo (astronaut)": Picture(np.asarray(photo, dtype=np.float32) / 255.0),
        "flat graphic (logo)": Picture(np.asarray(flat, dtype=np.float32) / 255.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--side", type=int, default=1536)
    ap.add_argument("--levels", default="1,6,9")
    ap.add_argument("--runs", type=int, default=5)
    ns = ap.parse_args()
    levels = [int(x) for x in ns.levels.split(",")]
    print(
        f"{ns.side} px RGB, median of {ns.runs} alternating runs; default level"
        f" {PNG_COMPRESS_LEVEL}; 'old' = before issue 14 (Pillow default, zlib 6)"
    )
    for name, pic in pictures(ns.side).items():
        want = pic.rgb_u8()
        variants = {"old": lambda p=pic: old_encode(p)}
        for lv in levels:
            variants[f"level {lv}"] = lambda p=pic, lv=lv: encode_image(p, png_level=lv)
        times: dict[str, list[float]] = {k: [] for k in variants}
        sizes: dict[str, int] = {}
        for r in range(ns.runs):
            for k in variants if r % 2 == 0 else list(variants)[::-1]:
                t = time.perf_counter()
                out = variants[k]()
                times[k].append(time.perf_counter() - t)
                if r == 0:
                    sizes[k] = len(out)
                    back = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))
                    assert np.array_equal(back, want), f"{k} is not lossless"
        old_t, old_s = statistics.median(times["old"]), sizes["old"]
        print(f"{name}: old {old_t * 1000:.0f} ms, {old_s / 1e6:.2f} MB")
        for k in variants:
            if k == "old":
                continue
            t = statistics.median(times[k])
            mark = "  <- default" if k == f"level {PNG_COMPRESS_LEVEL}" else ""
            print(
                f"  {k:8s} {t * 1000:6.0f} ms = {t / old_t:5.2f}x the old cost,"
                f" size {sizes[k] / old_s:5.2f}x, lossless{mark}"
            )


if __name__ == "__main__":
    main()
