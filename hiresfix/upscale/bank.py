"""The upscaler bank: every configured model, its load status, and batched upscaling with fallbacks.

No Ray here: the Ray deployment wraps an `UpscalerBank` and feeds `upscale_jobs` the jobs of
concurrent requests (@serve.batch), whose tiles then share forward passes. A job's output is the
same bits alone or batched with any others (see tiling.py and runner._OneDnnConv2d).

Outcome rules (each fallback answers with LANCZOS on float data, so 16-bit stays 16-bit):
* `use_neural=False` -> "lanczos", disabled_by_request (logged at INFO: the client asked for it).
* model not loaded -> "lanczos" with the reason recorded at load (not_installed / weights_missing /
  error) and a detail saying what to fix. Logged as a warning.
* out of memory -> the whole model group is retried with the tile halved, down to `min_tile`;
  still OOM -> "lanczos", out_of_memory. Any other exception -> "lanczos", error, with the message.
* target size not larger than the source in either axis (scale 1.0 included) -> the model is not
  run (a GAN pass resampled straight back down only invents texture); the picture is resampled to
  the target, which for an equal size returns it unchanged, and the outcome still names the model
  that was asked for (or "lanczos" with the reason, when that model is unavailable or disabled),
  so every job gets an outcome built by the same rules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hiresfix.images import Picture
from hiresfix.runtime import ModelRecord, free_device_memory, is_oom, yield_cpu
from hiresfix.schemas import FallbackReason, ModelInfo
from hiresfix.stages import UpscaleOutcome
from hiresfix.upscale.resample import resize_picture, resize_plane
from hiresfix.upscale.settings import UpscalerModelSpec, UpscalerSettings
from hiresfix.weights import file_problem

log = logging.getLogger("hiresfix.upscale")

LANCZOS = "lanczos"


class UnknownModelError(ValueError):
    """A job named an upscaler that is not configured (a client error: answer 4xx)."""

    def __init__(self, name: str | None, configured: list[str]):
        self.name = name
        self.configured = list(configured)
        if name is None:
            msg = "no upscaler models are configured"
        else:
            msg = f"unknown upscaler {name!r}; configured: {', '.join(configured) or 'none'}"
        super().__init__(msg)


@dataclass
class UpscaleJob:
    picture: Picture
    target_size: tuple[int, int]  # (w, h): the exact output size
    model: str | None = None  # None = the bank's default
    use_neural: bool = True


class UpscalerBank:
    """Every configured model as a ModelRecord whose `model` is its runner.Runner once loaded."""

    def __init__(self, settings: UpscalerSettings, entries: list[ModelRecord]):
        self.settings = settings
        self._entries = {e.name: e for e in entries}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_settings(cls, s: UpscalerSettings) -> UpscalerBank:
        """Load every configured model. Never raises for a missing, corrupt or unimportable model:
        its status (reason, detail) is recorded, logged, and requests for it fall back to
        LANCZOS."""
        yield_cpu(s.cpu_nice)  # LANCZOS fallbacks are CPU work too
        runtime, import_error = _import_runtime()
        if runtime is not None and s.models:
            runtime.configure_threads(s.num_threads)
            try:
                runtime.configure_gpu(s)
            except Exception as exc:  # a bad device setting must not take the replica down
                log.warning("upscaler: GPU setup failed: %s", exc)
        entries = [_load(spec, s, runtime, import_error) for spec in s.models]
        bank = cls(s, entries)
        for e in entries:
            if e.available:
                log.info(
                    "upscaler %s: %s x%d on %s/%s",
                    e.name,
                    e.architecture,
                    e.model.caps.scale,
                    e.device,
                    e.dtype,
                )
            else:
                log.warning("upscaler %s unavailable (%s): %s", e.name, e.reason.value, e.detail)
        return bank

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        return list(self._entries)

    def default_name(self) -> str | None:
        if self.settings.default is not None:
            return self.settings.default
        return next(iter(self._entries), None)

    def resolve(self, name: str | None) -> str:
        """None -> the default; an unknown name (or no models at all) -> UnknownModelError."""
        resolved = self.default_name() if name is None else name
        if resolved is None or resolved not in self._entries:
            raise UnknownModelError(name, self.names())
        return resolved

    def neural_available(self) -> bool:
        return any(e.available for e in self._entries.values())

    def runner(self, name: str | None = None):
        """The loaded runner (module, caps, device, dtype) of a model, or None: for tests and
        benches."""
        return self._entries[self.resolve(name)].model

    def needs_model(self, job: UpscaleJob) -> bool:
        """Whether the job runs a network (else LANCZOS or nothing: no forward pass to share)."""
        if not job.use_neural or not _grows(job):
            return False
        try:
            entry = self._entries.get(self._job_model(job) or "")
        except UnknownModelError:
            return True  # upscale_jobs raises it, on the usual path
        return entry is not None and entry.available

    def models_info(self) -> list[ModelInfo]:
        default = self.default_name()
        return [
            e.info("upscaler", name == default, scale=e.model.caps.scale if e.available else None)
            for name, e in self._entries.items()
        ]

    def warm_up(self) -> dict[str, float]:
        """`warmup` in the settings: the default model once over one full tile, at replica start,
        so the first request does not pay for loading kernels and autotuning. Seconds per input
        size ("WxH"); {} when off, or when that model did not load or fell back (its requests
        fall back anyway: nothing to warm)."""
        name = self.default_name()
        entry = self._entries.get(name or "")
        if not self.settings.warmup or entry is None or not entry.available:
            return {}
        side = self._tile_side(entry) if entry.model.caps.tileable else 256
        scale = entry.model.caps.scale
        grey = Picture(np.full((side, side, 3), 0.5, dtype=np.float32))
        t0 = time.perf_counter()
        (out,) = self.upscale_jobs([UpscaleJob(grey, (side * scale, side * scale), name, True)])
        if out.fallback_reason is not None:
            log.warning("upscaler warm-up fell back to LANCZOS: %s", out.fallback_detail)
            return {}
        return {f"{side}x{side}": time.perf_counter() - t0}

    # ------------------------------------------------------------------ upscaling
    def upscale(
        self,
        pictures: list[Picture],
        scale: float,
        *,
        model: str | None = None,
        use_neural: bool = True,
        target_sizes: list[tuple[int, int]] | None = None,
    ) -> list[UpscaleOutcome]:
        """Convenience: one job per picture; default target = (round(w*scale), round(h*scale))."""
        if target_sizes is None:
            target_sizes = [
                (max(1, round(p.width * scale)), max(1, round(p.height * scale))) for p in pictures
            ]
        if len(target_sizes) != len(pictures):
            raise ValueError(f"{len(pictures)} pictures but {len(target_sizes)} target sizes")
        return self.upscale_jobs(
            [UpscaleJob(p, tuple(t), model, use_neural) for p, t in zip(pictures, target_sizes)]
        )

    def upscale_jobs(self, jobs: list[UpscaleJob]) -> list[UpscaleOutcome]:
        """One outcome per job, same order. Jobs that share a model share forward passes.

        Unknown model names raise UnknownModelError before any work (validate them at the ingress:
        inside a @serve.batch one bad job would fail the whole batch)."""
        for job in jobs:
            _check_target(job)
        names = [self._job_model(j) for j in jobs]
        outcomes: list[UpscaleOutcome | None] = [None] * len(jobs)
        # One group per model and starting tile: its tiles share forward passes. The tile is each
        # job's own (whole image for untileable nets), never widened by the others in the group.
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (job, name) in enumerate(zip(jobs, names)):
            entry = self._entries.get(name) if name else None
            if not job.use_neural:
                outcomes[i] = _lanczos(
                    job,
                    FallbackReason.disabled_by_request,
                    "use_realesrgan is false: LANCZOS was requested",
                )
            elif entry is None:
                outcomes[i] = _lanczos(
                    job,
                    FallbackReason.weights_missing,
                    "no upscaler models are configured (upscale.models is empty):"
                    " add one to the profile and fetch it with `hiresfix weights`",
                )
            elif not entry.available:
                outcomes[i] = _lanczos(job, entry.reason, f"upscaler {name!r}: {entry.detail}")
            elif not _grows(job):
                outcomes[i] = UpscaleOutcome(resize_picture(job.picture, job.target_size), name)
            else:
                groups.setdefault((name, self._start_tile(entry, job)), []).append(i)
        budget = self.settings.max_native_megapixels * 1e6
        for (name, tile), idx in groups.items():
            entry = self._entries[name]
            # The full-size accumulators of a group live in host memory together: run the group in
            # chunks under the budget (same bits: a tile's output never depends on its company).
            chunk, used = [], 0.0
            for i in idx:
                need = self._native_pixels(entry, jobs[i])
                if need > budget:
                    outcomes[i] = _lanczos(
                        jobs[i],
                        FallbackReason.out_of_memory,
                        f"upscaler {name!r} would hold {need / 1e6:.0f} MP at its native"
                        f" x{entry.model.caps.scale} scale, above max_native_megapixels"
                        f" ({budget / 1e6:.0f}): ask for a smaller image or scale",
                    )
                    continue
                if chunk and used + need > budget:
                    self._run_chunk(entry, jobs, chunk, tile, outcomes)
                    chunk, used = [], 0.0
                chunk.append(i)
                used += need
            if chunk:
                self._run_chunk(entry, jobs, chunk, tile, outcomes)
        return outcomes  # type: ignore[return-value]

    def _run_chunk(
        self, entry: ModelRecord, jobs: list[UpscaleJob], idx: list[int], tile: int, outcomes: list
    ) -> None:
        for i, outcome in zip(idx, self._run_group(entry, [jobs[i] for i in idx], tile)):
            outcomes[i] = outcome

    def _native_pixels(self, entry: ModelRecord, job: UpscaleJob) -> float:
        s = entry.model.caps.scale ** _passes(
            job, entry.model.caps.scale, self.settings.beyond_native
        )
        planes = 2 if _alpha_varies(job.picture) else 1
        return job.picture.width * job.picture.height * s * s * planes

    def _job_model(self, job: UpscaleJob) -> str | None:
        if job.model is None and not self._entries:
            return None  # nothing configured: LANCZOS with a reason, not a client error
        return self.resolve(job.model)

    def _tile_side(self, entry: ModelRecord) -> int:
        return entry.spec.tile_size or self.settings.tile_size

    def _start_tile(self, entry: ModelRecord, job: UpscaleJob) -> int:
        if entry.model.caps.tileable:
            return self._tile_side(entry)
        # Untileable: start whole-image; OOM halving still applies.
        return max(job.picture.width, job.picture.height) + self.settings.tile_overlap

    def _run_group(
        self, entry: ModelRecord, jobs: list[UpscaleJob], tile: int
    ) -> list[UpscaleOutcome]:
        s, r = self.settings, entry.model
        with entry.lock:
            while True:
                failure = None
                try:
                    return self._neural(r, jobs, tile)
                except Exception as exc:  # noqa: BLE001 - every failure becomes a LANCZOS outcome
                    failure = (is_oom(exc), f"{type(exc).__name__}: {exc}")
                    if not failure[0]:  # unexpected: keep the traceback in the log
                        log.warning("upscaler %s failed", entry.name, exc_info=True)
                # Outside the except block, so the traceback (and the tensors its frames hold) is
                # gone.
                oom, message = failure
                if not oom:
                    return [
                        _lanczos(
                            j,
                            FallbackReason.error,
                            f"upscaler {entry.name!r} failed ({message}); LANCZOS was used",
                        )
                        for j in jobs
                    ]
                free_device_memory(r.device)
                if tile <= s.min_tile:
                    return [
                        _lanczos(
                            j,
                            FallbackReason.out_of_memory,
                            f"upscaler {entry.name!r} ran out of memory on {entry.device}"
                            f" even with {s.min_tile} px tiles; free device memory, lower"
                            " tile_batch or raise gpu_memory_fraction",
                        )
                        for j in jobs
                    ]
                smaller = max(s.min_tile, tile // 2)
                log.warning(
                    "upscaler %s: out of memory at %d px tiles (%s); retrying at %d px",
                    entry.name,
                    tile,
                    message,
                    smaller,
                )
                tile = smaller

    def _neural(self, r, jobs: list[UpscaleJob], tile: int) -> list[UpscaleOutcome]:
        import torch

        from hiresfix.upscale.tiling import upscale_planes

        s, caps = self.settings, r.caps
        # Planes: each job's RGB, plus its alpha as grey through the same model when it varies
        # (so the alpha edge stays aligned with the sharpened colour edge; opaque alpha is free).
        planes: list[tuple[int, str, Any]] = []
        passes = [_passes(j, caps.scale, s.beyond_native) for j in jobs]
        for i, job in enumerate(jobs):
            planes.append((i, "rgb", _chw(job.picture.rgb)))
            if _alpha_varies(job.picture):
                planes.append(
                    (i, "alpha", _chw(np.repeat(job.picture.alpha[..., None], 3, axis=2)))
                )
        done: dict[tuple[int, str], Any] = {}
        with torch.inference_mode():
            for p in range(max(passes)):
                active = [pl for pl in planes if passes[pl[0]] > p]
                outs = upscale_planes(
                    [pl[2] for pl in active],
                    r.forward,
                    scale=caps.scale,
                    rule=caps.size,
                    tile=tile,
                    overlap=s.tile_overlap,
                    batch=s.tile_batch,
                    fixed_batch=not r.batch_invariant,
                )
                planes = []
                for (i, kind, _), out in zip(active, outs):
                    if passes[i] > p + 1:
                        planes.append((i, kind, out.permute(2, 0, 1).contiguous()))
                    else:
                        done[(i, kind)] = out
                del outs, active
        results = []
        for i, job in enumerate(jobs):
            results.append(
                UpscaleOutcome(
                    _finish(job, done.get((i, "rgb")), done.get((i, "alpha"))), r.spec.name
                )
            )
            done.pop((i, "rgb"), None)
            done.pop((i, "alpha"), None)
        return results


# ---------------------------------------------------------------------- helpers
def _import_runtime():
    try:
        import torch  # noqa: F401 - explicit: `runner` may already be imported from a time torch was there

        from hiresfix.upscale import runner
    except ImportError as exc:
        return None, exc
    return runner, None


def _load(spec: UpscalerModelSpec, s: UpscalerSettings, runtime, import_error) -> ModelRecord:
    entry = ModelRecord(spec, s.model_path(spec))
    path = entry.path
    if runtime is None:
        return entry.fail(FallbackReason.not_installed, _not_installed(import_error))
    problem = file_problem(path, spec.sha256, _fetch_hint(spec, path))
    if problem:
        return entry.fail(FallbackReason.weights_missing, problem)
    try:
        desc = runtime.load_descriptor(str(path))
        r = runtime.Runner(spec, desc, s)
    except ImportError as exc:
        return entry.fail(FallbackReason.not_installed, _not_installed(exc))
    except Exception as exc:  # noqa: BLE001 - corrupt file, unsupported architecture, device error
        return entry.fail(
            FallbackReason.error, f"could not load {path}: {type(exc).__name__}: {exc}"
        )
    problem = r.caps.unusable_reason()
    if problem:
        return entry.fail(FallbackReason.error, f"{path}: {problem}")
    return entry.loaded(r, r.caps.architecture, r.device, r.dtype)


def _fetch_hint(spec: UpscalerModelSpec, path: Path) -> str:
    from hiresfix.upscale.download import known_weights

    known = known_weights(path.name)
    if known is not None and known.file == path.name:
        return (
            f"run `hiresfix weights {known.file.removesuffix('.pth')}"
            f" --weights-dir {path.parent}`, or "
        )
    if spec.url:
        return f"download {spec.url}, or "
    return ""


def _not_installed(exc: BaseException | None) -> str:
    return (
        f"the neural upscaler needs torch and spandrel, which cannot be imported ({exc});"
        " install them (pip install 'spandrel==0.4.2' torch torchvision)"
    )


def _lanczos(job: UpscaleJob, reason: FallbackReason, detail: str) -> UpscaleOutcome:
    level = logging.INFO if reason is FallbackReason.disabled_by_request else logging.WARNING
    log.log(
        level,
        "upscale %dx%d -> %dx%d fell back to LANCZOS (%s): %s",
        job.picture.width,
        job.picture.height,
        *job.target_size,
        reason.value,
        detail,
    )
    return UpscaleOutcome(resize_picture(job.picture, job.target_size), LANCZOS, reason, detail)


def _check_target(job: UpscaleJob) -> None:
    w, h = job.target_size
    if int(w) < 1 or int(h) < 1:
        raise ValueError(f"target size must be positive, got {job.target_size}")


def _grows(job: UpscaleJob) -> bool:
    w, h = job.target_size
    return w > job.picture.width or h > job.picture.height


def _passes(job: UpscaleJob, scale: int, beyond_native: str) -> int:
    """Model passes for a job: 1, or for `repeat` enough passes to reach the target."""
    need = max(job.target_size[0] / job.picture.width, job.target_size[1] / job.picture.height)
    if beyond_native != "repeat" or scale < 2 or need <= scale:
        return 1
    return math.ceil(math.log(need) / math.log(scale) - 1e-9)


def _alpha_varies(pic: Picture) -> bool:
    """Opaque (or any constant) alpha needs no model pass: it is filled in at the end."""
    a = pic.alpha
    return a is not None and float(a.min()) != float(a.max())


def _chw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.float32)).permute(2, 0, 1).contiguous()


def _finish(job: UpscaleJob, rgb, alpha) -> Picture:
    """Model output (HWC CPU tensors at native scale) -> Picture at the exact target size."""
    pic, size = job.picture, job.target_size
    rgb_np = rgb.numpy()
    if pic.grayscale:
        # The net may tint a grey image slightly; keep it exactly grey.
        g = resize_plane(rgb_np.mean(axis=2, dtype=np.float32), size)
        out_rgb = np.repeat(g[..., None], 3, axis=2)
    else:
        out_rgb = resize_plane(rgb_np, size, inplace=True)
    if pic.alpha is None:
        out_alpha = None
    elif alpha is not None:
        out_alpha = resize_plane(alpha.numpy().mean(axis=2, dtype=np.float32), size)
    else:  # constant alpha: nothing to upscale
        out_alpha = np.full((size[1], size[0]), float(pic.alpha.flat[0]), np.float32)
    return dataclasses.replace(pic, rgb=out_rgb, alpha=out_alpha, info=dict(pic.info))
