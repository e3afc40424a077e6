"""POST /img2img: the client's picture redrawn at `strength`, or (with a mask) inpainted.

Both run on the base model's modules already in memory: the img2img and inpaint pipelines are
built around them per request (no weights are loaded or copied). With the base model's 4-channel
UNet, diffusers' SDXL inpaint pipeline keeps the unmasked latents at each step; the decoded result
is then composited over the input with the feathered mask, so pixels the mask keeps come back
exactly as sent (as A1111 does).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image, ImageFilter

from hiresfix.images import Picture
from hiresfix.schedule import hires_schedule_length
from hiresfix.schemas import Img2ImgRequest
from hiresfix.sdxl.generate import (
    StepCallback,
    _diffusers_callback,
    _vae_guard,
    encode_prompt,
    generators,
    request_pipeline,
    request_seeds,
)
from hiresfix.stages import ImageBatch


class Img2ImgStage:
    def __init__(self, pipe):
        self.pipe = pipe  # any SDXL pipeline: only its modules are used
        self._serial = _vae_guard(pipe)

    def run(
        self,
        batch: ImageBatch,
        req: Img2ImgRequest,
        size: tuple[int, int],
        mask: Picture | None = None,
        *,
        on_step: StepCallback | None = None,
    ) -> ImageBatch:
        start = time.perf_counter()
        init = fit_picture(batch.pictures[0], size, req.resize_mode)
        soft = box = None
        if mask is not None:
            soft = mask_weights(mask, size, req.resize_mode, req.mask_blur, req.mask_invert)
            if req.inpaint_area == "only_masked":
                box = inpaint_box(soft, req.inpaint_padding, size)
        # What the pipeline redraws: the picture, or the crop around the mask at full size.
        work_rgb, work_mask = init.rgb, soft
        if box is not None:
            x0, y0, x1, y1 = box
            work_rgb = _resize(init.rgb[y0:y1, x0:x1], size)
            work_mask = _resize(soft[y0:y1, x0:x1], size)
        if work_mask is not None and req.inpaint_fill == "fill":
            work_rgb = fill_masked(work_rgb, work_mask)
        cls = (
            StableDiffusionXLInpaintPipeline
            if mask is not None
            else StableDiffusionXLImg2ImgPipeline
        )
        pipe = request_pipeline(self.pipe, req.scheduler, cls)
        seeds = request_seeds(req.seed, req.num_images)
        embeds = encode_prompt(pipe, req.prompt, req.negative_prompt, req.guidance_scale)
        steps = hires_schedule_length(
            req.num_inference_steps, 0, req.strength, pipe.scheduler.config.num_train_timesteps
        )
        extra = {}
        if work_mask is not None:  # the inpaint pipeline would otherwise resize to its default
            extra.update(
                mask_image=Image.fromarray(_u8(work_mask), "L"), width=size[0], height=size[1]
            )
        with self._serial:
            out = pipe(
                **embeds,
                image=Image.fromarray(_u8(work_rgb), "RGB"),
                strength=req.strength,
                num_inference_steps=steps,
                guidance_scale=req.guidance_scale,
                num_images_per_prompt=req.num_images,
                generator=generators(seeds),
                callback_on_step_end=_diffusers_callback(on_step),
                **extra,
            )
        pictures = []
        for im in out.images:
            rgb = Picture.from_pil(im.resize(size, Image.LANCZOS) if im.size != size else im).rgb
            if box is not None:  # the redrawn crop back in its place, at its size
                x0, y0, x1, y1 = box
                full = init.rgb.copy()
                full[y0:y1, x0:x1] = _resize(rgb, (x1 - x0, y1 - y0))
                rgb = full
            if soft is not None:  # what the mask keeps is the input, exactly
                w = soft[..., None]
                rgb = init.rgb * (1.0 - w) + rgb * w
            pictures.append(init.with_pixels(rgb, init.alpha))
        result = dataclasses.replace(
            batch, pictures=pictures, seeds=list(seeds), timings=dict(batch.timings)
        )
        result.add_time("img2img", time.perf_counter() - start)
        return result


# --- inpainting helpers ---------------------------------------------------------------------------
def inpaint_box(
    soft: np.ndarray, padding: int, size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """only_masked: (x0, y0, x1, y1) around every pixel the mask touches, `padding` wider, then
    grown to the output's aspect ratio (the crop is redrawn at the output size without
    stretching) within the picture. None when the mask is empty or the box is the whole picture.
    """
    h, w = soft.shape
    ys, xs = np.nonzero(soft > 0.5 / 255)
    if not len(xs):
        return None
    x0, x1 = max(0, xs.min() - padding), min(w, xs.max() + 1 + padding)
    y0, y1 = max(0, ys.min() - padding), min(h, ys.max() + 1 + padding)
    aspect = size[0] / size[1]
    if (x1 - x0) / (y1 - y0) < aspect:  # too narrow: widen, centred, shifted inside the picture
        x0, x1 = _grow(x0, x1, min(w, round((y1 - y0) * aspect)), w)
    else:
        y0, y1 = _grow(y0, y1, min(h, round((x1 - x0) / aspect)), h)
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    lo = max(0, lo - (want - (hi - lo)) // 2)
    hi = lo + want
    if hi > limit:
        lo, hi = max(0, limit - want), limit
    return lo, hi


def fill_masked(rgb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """inpaint_fill "fill": the masked area painted with its surroundings' colours, from wide to
    fine (normalised Gaussian blurs of the kept pixels: a finer one wins where it has support),
    as A1111's "fill" does. Kept pixels are unchanged."""
    keep = (weights < 0.5).astype(np.float32)
    if not keep.any():
        return rgb
    filled = np.broadcast_to(rgb[keep > 0].mean(axis=0), rgb.shape).astype(np.float32)
    for radius in (64, 16, 4, 1):
        den = _blur(keep, radius)
        num = _blur(rgb * keep[..., None], radius)
        ok = (den > 0.02)[..., None]
        filled = np.where(ok, num / np.maximum(den, 1e-6)[..., None], filled)
    return np.clip(np.where(keep[..., None] > 0, rgb, filled), 0.0, 1.0).astype(np.float32)


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of float32 planes; a wide one on a picture shrunk by radius / 8 (the same
    smooth field for the fill, a fraction of the work: 1024 px took 1.7 s at full size)."""
    import cv2  # the face pass's dependency too

    f = max(1, int(radius // 8))
    if f == 1:
        return cv2.GaussianBlur(a, (0, 0), sigmaX=radius, borderType=cv2.BORDER_REFLECT)
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=radius / f, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# --- size handling (A1111's resize modes) --------------------------------------------------------
def fit_picture(pic: Picture, size: tuple[int, int], mode: str) -> Picture:
    """The picture at `size`: stretched (resize), covering then centre-cropped (crop), or fitted
    then extended with its edge pixels (fill)."""
    if pic.size == size:
        return pic
    rgb = _fit(pic.rgb, size, mode)
    alpha = None if pic.alpha is None else _fit(pic.alpha, size, mode)
    return pic.with_pixels(rgb, alpha)


def mask_weights(
    mask: Picture, size: tuple[int, int], mode: str, blur: int, invert: bool = False
) -> np.ndarray:
    """H x W float weights in [0, 1] (1 = repaint) from a mask image: its luminance (times its
    alpha, so a transparent area is kept), fitted like the image, the edge feathered by `blur`."""
    grey = mask.rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    if invert:
        grey = 1.0 - grey
    if mask.alpha is not None:
        grey = grey * mask.alpha
    w = _fit(grey.astype(np.float32), size, mode)
    if blur:
        im = Image.fromarray(_u8(w), "L").filter(ImageFilter.GaussianBlur(blur))
        w = np.asarray(im, np.float32) / 255.0
    return np.clip(w, 0.0, 1.0)


def _fit(a: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    w, h = size
    ih, iw = a.shape[:2]
    if mode == "resize":
        return _resize(a, (w, h))
    scale = max(w / iw, h / ih) if mode == "crop" else min(w / iw, h / ih)
    sw, sh = max(1, round(iw * scale)), max(1, round(ih * scale))
    r = _resize(a, (sw, sh))
    if mode == "crop":
        x, y = (sw - w) // 2, (sh - h) // 2
        return np.ascontiguousarray(r[y : y + h, x : x + w])
    x, y = (w - sw) // 2, (h - sh) // 2
    pad = [(y, h - sh - y), (x, w - sw - x)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(r, pad, mode="edge")


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float planes resized with LANCZOS, channel by channel (PIL's float mode keeps precision)."""
    if a.shape[1] == size[0] and a.shape[0] == size[1]:
        return a
    planes = a[..., None] if a.ndim == 2 else a
    out = np.stack(
        [
            np.asarray(Image.fromarray(planes[..., c], "F").resize(size, Image.LANCZOS))
            for c in range(planes.shape[2])
        ],
        axis=2,
    )
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out[..., 0] if a.ndim == 2 else out


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
