"""Side-by-side comparison sheet: each result beside the original, plus a zoomed crop of the busiest
region (where upscalers differ most), enlarged with nearest-neighbour so the pixels are the pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hiresfix.images import Picture

_BG = (32, 32, 32)
_FG = (235, 235, 235)
_BOX = (255, 64, 64)
_LABEL_H = 22
_GAP = 8


def busiest_window(pic: Picture, window: int) -> tuple[int, int, int]:
    """(x, y, side) of the square window with the highest gradient energy (sum of squared
    luminance differences), found with an integral image in O(pixels)."""
    side = max(1, min(window, pic.width, pic.height))
    y = pic.rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    energy = np.zeros_like(y)
    energy[:, :-1] += np.diff(y, axis=1) ** 2
    energy[:-1, :] += np.diff(y, axis=0) ** 2
    ii = np.pad(energy.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[side:, side:] - ii[:-side, side:] - ii[side:, :-side] + ii[:-side, :-side]
    yy, xx = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(xx), int(yy), side


def compare_images(
    original: Picture,
    results: list[tuple[str, Picture]],
    *,
    panel: int = 384,
    crop: int = 48,
    zoom_panel: int = 384,
) -> Image.Image:
    """Columns: original, then each (label, result). Top row: the whole image fitted into `panel`
    px with the crop marked; bottom row: the busiest `crop`-px window of the original (and the same
    region of each result) enlarged with nearest to `zoom_panel` px: never below 100%."""
    x, y, side = busiest_window(original, crop)
    columns = [("original", original)] + list(results)
    zoom_side = max(zoom_panel, max(round(side * p.width / original.width) for _, p in columns))
    col_w = max(panel, zoom_side)
    sheet = Image.new(
        "RGB",
        (len(columns) * (col_w + _GAP) + _GAP, 2 * (_LABEL_H + _GAP) + panel + zoom_side + _GAP),
        _BG,
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (label, pic) in enumerate(columns):
        left = _GAP + i * (col_w + _GAP)
        sx, sy = pic.width / original.width, pic.height / original.height
        box = (round(x * sx), round(y * sy), round((x + side) * sx), round((y + side) * sy))
        im = _rgb(pic)
        # Whole image, fitted (downscale with LANCZOS for an honest overview).
        fit = min(panel / im.width, panel / im.height)
        view = im.resize(
            (max(1, round(im.width * fit)), max(1, round(im.height * fit))),
            Image.Resampling.LANCZOS,
        )
        top = _LABEL_H + _GAP
        draw.text((left, _GAP // 2), f"{label}  {pic.width}x{pic.height}", fill=_FG, font=font)
        sheet.paste(view, (left, top))
        draw.rectangle(
            [left + box[0] * fit, top + box[1] * fit, left + box[2] * fit, top + box[3] * fit],
            outline=_BOX,
            width=2,
        )
        # Zoomed crop, nearest, integer factor >= 1 so that no pixel is interpolated away.
        region = im.crop(box)
        factor = max(1, zoom_side // max(region.width, region.height, 1))
        zoomed = region.resize(
            (region.width * factor, region.height * factor), Image.Resampling.NEAREST
        )
        ztop = top + panel + _GAP + _LABEL_H
        draw.text(
            (left, ztop - _LABEL_H + 4),
            f"crop {box[2] - box[0]}px x{factor} nearest",
            fill=_FG,
            font=font,
        )
        sheet.paste(zoomed, (left, ztop))
    return sheet


def _rgb(pic: Picture) -> Image.Image:
    im = pic.to_pil()
    if im.mode == "RGBA":  # transparency shown over mid grey, not lost
        bg = Image.new("RGB", im.size, (128, 128, 128))
        bg.paste(im, mask=im.split()[3])
        return bg
    return im
