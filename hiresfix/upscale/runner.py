"""One loaded upscaler: spandrel load, device/precision choice, and a guarded batch forward.

Imported lazily by the bank (it imports torch), so that a missing torch/spandrel is a recorded
`not_installed` status rather than an import error of the whole package.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import threading

import torch
import torch.nn.functional as F

from hiresfix.runtime import AUTO_ON_GPU, pick_device, pick_dtype, precision_name
from hiresfix.upscale.caps import ModelCaps
from hiresfix.upscale.settings import UpscalerModelSpec, UpscalerSettings

log = logging.getLogger("hiresfix.upscale")

_threads_lock = threading.Lock()


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op thread count (process-wide) when the bank is built, not per request:
    `num_threads`, else OMP_NUM_THREADS, else all usable cores.

    OMP_NUM_THREADS is what ops (and Ray: 1 for a replica without num_cpus) set for every model
    process on the host; the SDXL replicas honour it through torch. Taking all cores regardless
    put a 2-thread upscaler beside busy SDXL replicas on a 2-core box: every parallel region waited
    for a descheduled sibling thread and a 0.4 s upscale took 93 s (the autoscaling chaos test).
    torch defaults to the physical core count of the host, which in a container limited by CPU
    affinity oversubscribes; sched_getaffinity is what this process may actually use.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if num_threads:
        want = num_threads
    elif env.isdigit() and int(env) > 0:
        want = int(env)
    elif hasattr(os, "sched_getaffinity"):
        want = len(os.sched_getaffinity(0))
    else:
        want = os.cpu_count() or 1
    with _threads_lock:
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
    return want


def configure_gpu(settings: UpscalerSettings) -> None:
    """Cap this process's share of the GPU: Ray's fractional num_gpus only schedules, it does not
    stop a replica from taking the whole card."""
    if (
        settings.gpu_memory_fraction is None
        or not torch.cuda.is_available()
        or settings.device == "cpu"
    ):
        return
    torch.cuda.set_per_process_memory_fraction(
        settings.gpu_memory_fraction, torch.cuda.current_device()
    )


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU does bf16 dot products at twice its fp32 rate. Without them
    oneDNN emulates bf16, slower than fp32, so `auto` stays fp32 there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no cheap way to ask; fp32 is the safe choice
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def load_descriptor(path: str):
    """spandrel is imported here, not at module level: ImportError means not_installed."""
    import spandrel

    desc = spandrel.ModelLoader().load_from_file(path)
    if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.purpose not in (
        "SR",
        "Restoration",
    ):
        kind = getattr(desc, "purpose", type(desc).__name__)
        raise ValueError(
            f"{desc.architecture.name} is a {kind} model, not a super-resolution upscaler"
        )
    return desc


class _OneDnnConv2d(torch.nn.Conv2d):
    """Conv2d that runs CPU float32 through oneDNN at every batch size, so that a tile's output
    does not depend on how many other tiles share its forward pass.

    Why: torch picks the CPU conv kernel per call. fp32 3x3 convs go to oneDNN when the batch has
    2+ samples, but a batch of one whose input has <= 20480 elements (C*H*W: for an RGB first conv,
    tiles up to ~82 px) goes to its native im2col+GEMM kernel ("Slow2d"), which rounds differently:
    enough, on the RRDB nets, to flip 8-bit pixels (figures: bench/results/upscaler-notes.md).
    Batched oneDNN passes agree with each other bit for bit, so calling oneDNN directly for one
    sample gives those same bits at the same speed: nothing is padded and nothing costs extra.
    """

    def _conv_forward(self, input, weight, bias):
        if (
            input.device.type != "cpu"
            or input.dtype != torch.float32
            or isinstance(self.padding, str)
        ):
            return super()._conv_forward(input, weight, bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return torch.ops.aten.mkldnn_convolution(
            input, weight, bias, padding, self.stride, self.dilation, self.groups
        )


def _route_convs_to_onednn(module: torch.nn.Module) -> None:
    """Plain Conv2d layers (not subclasses, which may have their own forward) become
    _OneDnnConv2d."""
    if not torch.backends.mkldnn.is_available():
        return
    for m in module.modules():
        if type(m) is torch.nn.Conv2d:
            m.__class__ = _OneDnnConv2d


class Runner:
    """A model on its device, in its working precision (the bank's ModelRecord lock lets one
    forward run at a time).

    `batch_invariant`: a tile's output is the same bits whatever else shares its forward pass
    (checked at load); when False the tiler gives every pass of one tile shape the same batch size.
    """

    def __init__(self, spec: UpscalerModelSpec, desc, settings: UpscalerSettings):
        self.spec = spec
        self.caps = ModelCaps.from_descriptor(desc)
        self.device = pick_device(settings.device)
        setting = settings.dtype
        cpu = self.device.type == "cpu"
        if setting == "auto" and cpu and self.caps.supports_bf16 and cpu_has_native_bf16():
            # Twice fp32's speed; 52-54 dB from fp32 in 8-bit output on photos, tiled vs untiled
            # unchanged (bench/results/README.md, issue 14). `dtype: fp32` opts out.
            setting = "bf16"
        self.dtype, note = pick_dtype(
            setting,
            self.device,
            AUTO_ON_GPU["upscaler"],
            supports_fp16=self.caps.supports_fp16,
            supports_bf16=self.caps.supports_bf16,
            model=self.caps.architecture,
        )
        if note:
            log.warning("upscaler %s: %s", spec.name, note)
        self.min_tile = settings.min_tile
        module = desc.model.eval()
        if self.device.type == "cpu":
            _route_convs_to_onednn(module)
        # The fp32 master stays on the CPU: tiles whose low-precision output is NaN/inf/black are
        # redone with it (moved to the device only the first time that happens).
        self._fp32_cpu = copy.deepcopy(module) if self.dtype != torch.float32 else None
        self._fp32_dev: torch.nn.Module | None = None
        self.module = module.to(self.device, self.dtype)
        # NHWC (on a CPU by default): oneDNN's convs then read and write activations as they are,
        # instead of re-laying NCHW input and output around every conv (RRDB: 350 per forward).
        # 14-20% faster, same numbers to float rounding (bench/results/README.md, issue 14).
        want = settings.channels_last
        self.channels_last = want == "on" or (want == "auto" and self.device.type == "cpu")
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
            if self._fp32_cpu is not None:
                self._fp32_cpu = self._fp32_cpu.to(memory_format=torch.channels_last)
        self.redone_tiles = 0
        self.batch_invariant = False
        self._smoke_test()
        self.batch_invariant = self.device.type == "cpu" and self._probe_batch_invariance()

    @torch.inference_mode()
    def _smoke_test(self) -> None:
        """One tiny forward at load, so a precision the device cannot run (or a net that cannot run
        at all) shows up in the model status now, not as an error on every request."""
        side = self.caps.size.tile_side(8)
        x = torch.rand(1, self.caps.in_channels, side, side, device=self.device)
        if self.dtype != torch.float32:
            try:
                self.module(x.to(self.dtype))
                return
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "upscaler %s: %s forward fails on %s (%s); using fp32",
                    self.spec.name,
                    self.dtype_name,
                    self.device,
                    exc,
                )
                self.module = self._fp32_cpu.to(self.device)
                self.dtype, self._fp32_cpu = torch.float32, None
        self.module(x)

    @torch.inference_mode()
    def _probe_batch_invariance(self) -> bool:
        """Three small samples alone, together, and in another order: the same bits each time?
        Small (16 px and up), as that is where torch's default CPU kernel choice depends on the
        batch size; a net whose other layers are batch-dependent fails this and gets fixed
        passes."""
        side = self.caps.size.tile_side(16)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(3, self.caps.in_channels, side, side, generator=gen).to(
            self.device, self.dtype
        )
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        together = self.module(x.contiguous(memory_format=fmt))  # the layout forward() feeds
        alone = self.module(x[2:3].contiguous(memory_format=fmt))
        swapped = self.module(x[[2, 0]].contiguous(memory_format=fmt))
        ok = (
            torch.equal(together[2], alone[0])
            and torch.equal(together[2], swapped[0])
            and torch.equal(together[0], swapped[1])
        )
        if not ok:
            log.info(
                "upscaler %s: outputs depend on the batch on %s/%s; every pass of a tile shape"
                " gets the same batch size",
                self.spec.name,
                self.device,
                self.dtype_name,
            )
        return ok

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return precision_name(self.dtype)

    def _fp32_module(self) -> torch.nn.Module:
        if self.dtype == torch.float32:
            return self.module
        if self._fp32_dev is None:
            self._fp32_dev = self._fp32_cpu.to(self.device)
        return self._fp32_dev

    def _inject(self, x: torch.Tensor) -> None:
        """The configured chaos fault (UpscalerModelSpec.inject_fault, docs/chaos.md), raised where
        a real one would be: inside the forward, under the bank's retry and fallback handling."""
        fault = self.spec.inject_fault
        if fault == "oom_always" or (fault == "oom" and max(x.shape[-2:]) > self.min_tile):
            raise torch.OutOfMemoryError(
                f"injected fault: out of memory for a {x.shape[-1]}x{x.shape[-2]} tile"
                f" (min_tile {self.min_tile})"
            )
        if fault == "error":
            raise RuntimeError("injected fault: forward failed")

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CPU float32 (B, 3, h, w) in [0, 1] -> float32 (B, 3, h*s, w*s) in [0, 1] on the
        device."""
        self._inject(x)
        xd = x.to(self.device, non_blocking=True)
        if self.channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        y = self.module(xd.to(self.dtype)).float()
        if self.dtype != torch.float32:
            bad = _failed(xd, y)
            if bool(bad.any()):
                # fp16 overflows to inf in some nets (large activations), which then spreads NaN.
                # The whole pass is redone (its shape, hence its bits, do not depend on how many of
                # its tiles failed), and only the failed tiles are replaced.
                y[bad] = self._fp32_module()(xd).float()[bad]
                self.redone_tiles += int(bad.sum())
                log.warning(
                    "upscaler %s: %d tile(s) gave NaN/inf/black output in %s; redone in fp32",
                    self.spec.name,
                    int(bad.sum()),
                    self.dtype_name,
                )
        if not bool(torch.isfinite(y).all()):
            raise FloatingPointError(f"model {self.spec.name} produced NaN/inf even in fp32")
        return y.clamp_(0.0, 1.0)


def _failed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample: non-finite output, or black output for an input that is not black."""
    nonfinite = ~torch.isfinite(y).flatten(1).all(dim=1)
    in_max = x.flatten(1).amax(dim=1)
    out_max = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).flatten(1).amax(dim=1)
    black = (in_max > 0.05) & (out_max < 0.1 * in_max)
    return nonfinite | black
