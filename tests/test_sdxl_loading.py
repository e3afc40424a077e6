"""Loading the SDXL pipelines: every source round-trips to the same pixels, bad files fail at
start-up with the file named, and each setting takes effect."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from safetensors.torch import save_file

from hiresfix.images import psnr
from hiresfix.sdxl import (
    BaseStage,
    ModelLoadError,
    RefineStage,
    SDXLSettings,
    build_tiny_sdxl,
    load_base_pipeline,
    load_refine_pipeline,
)
from hiresfix.sdxl.settings import WarmupSettings
from hiresfix.sdxl.warmup import warm_up_base, warm_up_hires
from tests import REPO
from tests.sdxl_fixtures import assert_valid, make_req, pixels, same, upscaled
from tests.single_file_writer import save_single_file


def config_only_copy(folder: Path, dest: Path) -> Path:
    """The configs and tokenizers of a diffusers folder, without any weights."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def first_image(settings: SDXLSettings, **req) -> np.ndarray:
    return pixels(BaseStage(load_base_pipeline(settings)).run(make_req(**req)))


# --- the tiny model -----------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_idempotent(tiny_cache_dir, tmp_path):
    ref = tiny_cache_dir / "tiny-sdxl"
    built = build_tiny_sdxl(tmp_path / "again")
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert all((ref / f).read_bytes() == (built / f).read_bytes() for f in files)
    stamp = (built / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_tiny_sdxl(built) == built
    assert (built / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "something.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="foreign"):
        build_tiny_sdxl(tmp_path / "foreign")


def test_tiny_build_by_concurrent_replicas_gives_one_complete_folder(tiny_cache_dir, tmp_path):
    """A service's base and refine replicas build the same cache folder at the same moment; the
    loser of the race once failed its rename and Serve restarted it (a second model load)."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "shared-cache" / "tiny-sdxl"
    with ThreadPoolExecutor(3) as pool:
        built = list(pool.map(lambda _: build_tiny_sdxl(target), range(3)))
    assert built == [target] * 3
    ref = tiny_cache_dir / "tiny-sdxl"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    leftovers = [p.name for p in target.parent.iterdir() if p.is_dir() and p != target]
    assert leftovers == [], leftovers  # no half-built temporary folder stays behind


def test_tiny_source_builds_into_cache_dir(tmp_path, monkeypatch, base_stage):
    monkeypatch.setenv("HIRESFIX_CACHE_DIR", str(tmp_path / "env-cache"))
    s = SDXLSettings()
    assert s.source == "tiny" and s.cache_dir == str(tmp_path / "env-cache")
    assert SDXLSettings(cache_dir="explicit").cache_dir == "explicit"
    image = first_image(s)
    assert (tmp_path / "env-cache" / "tiny-sdxl" / "model_index.json").is_file()
    assert np.array_equal(image, pixels(base_stage.run(make_req())))


# --- the three loading forms round-trip ---------------------------------------------------------


def test_diffusers_folder_round_trip(base_pipe, base_stage, tmp_path):
    base_pipe.save_pretrained(tmp_path / "saved")
    image = first_image(SDXLSettings(source="diffusers", path=str(tmp_path / "saved")))
    assert np.array_equal(image, pixels(base_stage.run(make_req())))


def test_diffusers_folder_variant(base_pipe, base_stage, tmp_path):
    base_pipe.save_pretrained(tmp_path / "fp16-named", variant="fp16")
    assert (tmp_path / "fp16-named" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    image = first_image(
        SDXLSettings(source="diffusers", path=str(tmp_path / "fp16-named"), variant="fp16")
    )
    assert np.array_equal(image, pixels(base_stage.run(make_req())))
    with pytest.raises(ModelLoadError, match="fp16-named"):
        load_base_pipeline(SDXLSettings(source="diffusers", path=str(tmp_path / "fp16-named")))


def make_hf_cache(src: Path, hub: Path, repo_id: str) -> None:
    """src laid out as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


_HUB_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from hiresfix.sdxl import BaseStage, ModelLoadError, SDXLSettings, load_base_pipeline
from tests.sdxl_fixtures import make_req
pipe = load_base_pipeline(SDXLSettings(source="hub", path=sys.argv[1]))
np.save(sys.argv[2], np.stack([p.rgb for p in BaseStage(pipe).run(make_req()).pictures]))
try:
    load_base_pipeline(SDXLSettings(source="hub", path="nobody/not-cached"))
except ModelLoadError as exc:
    print("MISSING:", exc)
"""


def test_hub_id_from_local_cache_offline(tiny_cache_dir, base_stage, tmp_path):
    # A fresh process: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, at import.
    make_hf_cache(tiny_cache_dir / "tiny-sdxl", tmp_path / "hf" / "hub", "hiresfix-test/tiny-sdxl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "hub.npy"
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, "hiresfix-test/tiny-sdxl", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.load(out), pixels(base_stage.run(make_req())))
    missing = next(line for line in proc.stdout.splitlines() if line.startswith("MISSING:"))
    assert "nobody/not-cached" in missing and "HF_HUB_OFFLINE=1" in missing


def test_single_file_round_trip(tiny_cache_dir, base_pipe, base_stage, tmp_path):
    ckpt = tmp_path / "tiny-sdxl.safetensors"
    save_single_file(base_pipe, ckpt)
    cfg = config_only_copy(tiny_cache_dir / "tiny-sdxl", tmp_path / "config")
    s = SDXLSettings(source="single_file", path=str(ckpt), single_file_config=str(cfg))
    pipe = load_base_pipeline(s)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(base_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert same(BaseStage(pipe).run(make_req()), base_stage.run(make_req()))


def test_single_file_refiner_round_trip(tiny_cache_dir, refiner_stage, base_stage, tmp_path):
    ckpt = tmp_path / "tiny-refiner.safetensors"
    save_single_file(refiner_stage.pipe, ckpt)
    cfg = config_only_copy(tiny_cache_dir / "tiny-sdxl-refiner", tmp_path / "config")
    s = SDXLSettings(
        refiner_source="single_file", refiner_path=str(ckpt), refiner_single_file_config=str(cfg)
    )
    stage = RefineStage(load_refine_pipeline(s))
    assert stage.pipe.text_encoder is None and stage.pipe.config.requires_aesthetics_score
    up = upscaled(base_stage.run(make_req(hires_fix=True)))
    assert same(
        stage.hires(up, make_req(hires_fix=True)), refiner_stage.hires(up, make_req(hires_fix=True))
    )


# --- bad files fail at load, naming the file ----------------------------------------------------


@pytest.fixture
def bad(tmp_path, base_pipe, tiny_cache_dir):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    foreign = tmp_path / "RealESRGAN_x4plus.safetensors"
    save_file({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, str(foreign))
    ckpt = tmp_path / "good-base.safetensors"
    save_single_file(base_pipe, ckpt)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_cache_dir / "tiny-sdxl", truncated)
    unet_file = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[:5000])
    swapped = tmp_path / "swapped"  # readable files, wrong model: the VAE's weights as the UNet's
    shutil.copytree(tiny_cache_dir / "tiny-sdxl", swapped)
    shutil.copy(
        swapped / "vae" / "diffusion_pytorch_model.safetensors",
        swapped / "unet" / "diffusion_pytorch_model.safetensors",
    )
    no_index = tmp_path / "no_index"
    shutil.copytree(tiny_cache_dir / "tiny-sdxl", no_index)
    (no_index / "model_index.json").unlink()
    return dict(
        garbage=garbage,
        foreign=foreign,
        ckpt=ckpt,
        truncated=truncated,
        swapped=swapped,
        no_index=no_index,
        cfg=tiny_cache_dir / "tiny-sdxl",
        tmp=tmp_path,
    )


CASES = {
    "unreadable single file": (
        lambda b: dict(
            source="single_file", path=str(b["garbage"]), single_file_config=str(b["cfg"])
        ),
        "garbage.safetensors",
    ),
    "not an SDXL checkpoint": (
        lambda b: dict(
            source="single_file", path=str(b["foreign"]), single_file_config=str(b["cfg"])
        ),
        "RealESRGAN_x4plus.safetensors",
    ),
    "missing single file": (
        lambda b: dict(source="single_file", path=str(b["tmp"] / "nope.safetensors")),
        "nope.safetensors",
    ),
    "single file without config, offline": (
        lambda b: dict(source="single_file", path=str(b["ckpt"])),
        "good-base.safetensors",
    ),
    "missing folder": (
        lambda b: dict(source="diffusers", path=str(b["tmp"] / "nowhere")),
        "nowhere",
    ),
    "folder without model_index.json": (
        lambda b: dict(source="diffusers", path=str(b["no_index"])),
        "model_index.json",
    ),
    "truncated weights": (
        lambda b: dict(source="diffusers", path=str(b["truncated"])),
        str(Path("truncated") / "unet" / "diffusion_pytorch_model.safetensors"),
    ),
    "wrong weights": (lambda b: dict(source="diffusers", path=str(b["swapped"])), "swapped"),
    "vae_path not there": (lambda b: dict(vae_path=str(b["tmp"] / "no-vae-here")), "no-vae-here"),
    "vae hub id not cached": (lambda b: dict(vae_path="nobody/no-such-vae"), "nobody/no-such-vae"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_weights_fail_at_load_naming_the_file(bad, case, tiny_cache_dir):
    make, name = CASES[case]
    s = SDXLSettings(cache_dir=str(tiny_cache_dir), **make(bad))
    with pytest.raises(ModelLoadError) as err:
        load_base_pipeline(s)
    assert name in str(err.value)


def test_base_checkpoint_refused_as_refiner(bad):
    s = SDXLSettings(
        refiner_source="single_file",
        refiner_path=str(bad["ckpt"]),
        refiner_single_file_config=str(bad["cfg"]),
    )
    with pytest.raises(ModelLoadError, match="good-base.safetensors.*refiner"):
        load_refine_pipeline(s)


def test_settings_are_strict():
    with pytest.raises(pydantic.ValidationError):
        SDXLSettings(sorce="tiny")
    with pytest.raises(pydantic.ValidationError, match="needs a path"):
        SDXLSettings(source="diffusers")
    with pytest.raises(pydantic.ValidationError, match="refiner_path"):
        SDXLSettings(refiner_source="single_file")


# --- refine pipeline ----------------------------------------------------------------------------


def test_refine_pipeline_shares_the_base_modules(tiny_settings, base_pipe):
    ref = load_refine_pipeline(tiny_settings, base=base_pipe)
    assert type(ref).__name__ == "StableDiffusionXLImg2ImgPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer"):
        assert getattr(ref, name) is getattr(base_pipe, name), name
    assert base_pipe.unet.dtype == torch.float32  # sharing did not recast the shared modules
    alone = load_refine_pipeline(
        tiny_settings
    )  # a refine replica of its own loads the base weights
    assert alone.unet is not base_pipe.unet
    assert all(
        torch.equal(a, b) for a, b in zip(alone.unet.parameters(), base_pipe.unet.parameters())
    )


def test_separate_refiner_is_the_refiner(refiner_stage):
    pipe = refiner_stage.pipe
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder_2.config.hidden_size


# --- settings take effect -----------------------------------------------------------------------


def test_device_and_dtype(tiny_settings):
    s = tiny_settings
    pipe = load_base_pipeline(s.model_copy(update={"dtype": "bf16"}))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    batch = BaseStage(pipe).run(make_req())
    assert_valid(batch, 1, (64, 64))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="cuda"):
            load_base_pipeline(s.model_copy(update={"device": "cuda"}))


def test_half_precision_with_an_upcasting_vae_serialises_calls(
    tiny_settings, tiny_cache_dir, base_pipe, tmp_path
):
    """diffusers casts a force_upcast VAE to float32 and back inside each call: such pipelines run
    one call at a time, and overlapping requests still give the pictures of sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    from hiresfix.sdxl.generate import _VAE_CAST_LOCK

    pipe = load_base_pipeline(tiny_settings.model_copy(update={"dtype": "bf16"}))
    assert pipe.vae.config.force_upcast and BaseStage(pipe)._serial is _VAE_CAST_LOCK
    refine = RefineStage(load_refine_pipeline(tiny_settings, base=pipe))
    assert refine._serial is _VAE_CAST_LOCK
    reqs = [make_req(seed=s, hires_fix=True) for s in (1, 2, 3)]

    def full(req):
        return refine.hires(upscaled(BaseStage(pipe).run(req)), req)

    sequential = [full(r) for r in reqs]
    with ThreadPoolExecutor(3) as pool:
        assert all(same(a, b) for a, b in zip(sequential, pool.map(full, reqs)))
    # An fp16-safe VAE (force_upcast false) lets calls overlap.
    vae = type(pipe.vae).from_pretrained(
        tiny_cache_dir / "tiny-sdxl", subfolder="vae", force_upcast=False
    )
    vae.save_pretrained(tmp_path / "fp16-fix")
    fixed = load_base_pipeline(
        tiny_settings.model_copy(update={"dtype": "bf16", "vae_path": str(tmp_path / "fp16-fix")})
    )
    assert not fixed.vae.config.force_upcast and BaseStage(fixed)._serial is not _VAE_CAST_LOCK
    assert BaseStage(base_pipe)._serial is not _VAE_CAST_LOCK  # float32: nothing to cast


@pytest.mark.parametrize("model, vae", [("bf16", "fp32"), ("fp16", "bf16")])
def test_vae_dtype_holds_the_vae_in_its_own_precision(
    tiny_settings, base_pipe, base_stage, refine_stage, model, vae
):
    """sdxl.vae_dtype: the VAE stays in its precision whatever the UNet's (as ComfyUI's bf16 VAE),
    so there is no fp32 copy per call and calls overlap; the pipelines' inputs are cast to it."""
    from concurrent.futures import ThreadPoolExecutor

    from hiresfix.runtime import torch_dtype
    from hiresfix.sdxl.generate import _VAE_CAST_LOCK

    s = tiny_settings.model_copy(update={"dtype": model, "vae_dtype": vae})
    pipe = load_base_pipeline(s)
    refine = RefineStage(load_refine_pipeline(s, base=pipe))
    assert pipe.unet.dtype == torch_dtype(model)
    assert refine.pipe.vae is pipe.vae and pipe.vae.dtype == torch_dtype(vae)  # sharing kept it
    assert not pipe.vae.config.force_upcast
    # Loaded in its own precision from the (fp32) files: not rounded to the model's on the way.
    own = {k: v.to(torch_dtype(vae)) for k, v in base_pipe.vae.state_dict().items()}
    assert all(torch.equal(v, own[k]) for k, v in pipe.vae.state_dict().items())
    assert BaseStage(pipe)._serial is not _VAE_CAST_LOCK and refine._serial is not _VAE_CAST_LOCK
    reqs = [make_req(seed=seed, hires_fix=True) for seed in (1, 2)]
    stages = (BaseStage(pipe), refine)

    def full(req, stages=stages):
        return stages[1].hires(upscaled(stages[0].run(req)), req)  # VAE decode, encode, decode

    sequential = [full(r) for r in reqs]
    with ThreadPoolExecutor(2) as pool:
        assert all(same(a, b) for a, b in zip(sequential, pool.map(full, reqs)))
    # The fp32 pipeline's pictures within half precision (measured 38 and 46 dB here).
    assert psnr(_u8(sequential[0]), _u8(full(reqs[0], (base_stage, refine_stage)))) > 30


def test_auto_dtype_is_fp32_on_cpu(base_pipe):
    assert base_pipe.device.type == "cpu" and base_pipe.unet.dtype == torch.float32


def test_vae_tiling_setting(tiny_settings, base_pipe):
    assert base_pipe.vae.use_tiling  # on by default
    untiled = load_base_pipeline(tiny_settings.model_copy(update={"vae_tiling": False}))
    assert not untiled.vae.use_tiling
    # The tiny VAE's tile is 64 px, so a 128 px decode is tiled; tiles blend, so pixels differ.
    req = make_req(width=128, height=128)
    assert not same(BaseStage(base_pipe).run(req), BaseStage(untiled).run(req))
    assert same(BaseStage(base_pipe).run(make_req()), BaseStage(untiled).run(make_req()))


def _u8(batch) -> np.ndarray:
    return np.stack([p.rgb_u8() for p in batch.pictures]).astype(int)


def test_compiled_unet_draws_what_eager_draws(tiny_settings, base_stage):
    # sdxl.compile: torch.compile (inductor) in place, so the per-request and img2img pipelines
    # share it. Its kernels may sum in another order than eager's: the documented tolerance is
    # one 8-bit level (the tiny model on this CPU: identical). Compiling takes ~1 min here.
    from torch._dynamo.utils import counters

    pipe = load_base_pipeline(tiny_settings.model_copy(update={"compile": True}))
    assert pipe.unet._compiled_call_impl is not None
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    stage = BaseStage(pipe)
    # The replica's warm-up (sdxl.warmup) compiles; a request of that size then compiles nothing.
    warm_up_base(stage, WarmupSettings(sizes=[(64, 64)], steps=1))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    compiled = stage.run(make_req())
    assert counters["stats"]["unique_graphs"] == graphs, "the request compiled again"
    assert_valid(compiled, 1, (64, 64))
    eager = base_stage.run(make_req())
    diff = np.abs(_u8(compiled) - _u8(eager))
    assert diff.max() <= 1, f"compiled vs eager: {diff.max()} levels apart"


def test_warm_up_draws_each_configured_size(base_stage, refine_stage):
    w = WarmupSettings(sizes=[(64, 64), (64, 96)], steps=1, hires_scale=1.5)
    assert set(warm_up_base(base_stage, w)) == {"64x64", "64x96"}
    assert set(warm_up_hires(refine_stage, w)) == {"96x96", "96x144"}  # x1.5, as /generate sizes
    assert warm_up_base(base_stage, WarmupSettings()) == {}  # the default: none


def test_warm_up_sizes_are_checked_as_generate_checks_them():
    with pytest.raises(pydantic.ValidationError, match="multiple of 8"):
        SDXLSettings(warmup={"sizes": [[770, 768]]})
    with pytest.raises(pydantic.ValidationError, match="hires_scale"):
        SDXLSettings(warmup={"sizes": [[768, 768]], "hires_scale": 9})
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        SDXLSettings(warmup={"size": [[768, 768]]})


def test_vae_path_replaces_the_vae(tiny_settings, tiny_cache_dir, base_pipe, base_stage, tmp_path):
    # A whole pipeline folder: its vae/ is used (here the same weights: same pixels).
    same_vae = load_base_pipeline(
        tiny_settings.model_copy(update={"vae_path": str(tiny_cache_dir / "tiny-sdxl")})
    )
    assert same(BaseStage(same_vae).run(make_req()), base_stage.run(make_req()))
    # A VAE folder with other weights: other pixels, same latents.
    vae = type(base_pipe.vae).from_pretrained(tiny_cache_dir / "tiny-sdxl", subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.2)
    vae.save_pretrained(tmp_path / "other-vae")
    other = load_base_pipeline(
        tiny_settings.model_copy(update={"vae_path": str(tmp_path / "other-vae")})
    )
    assert not same(BaseStage(other).run(make_req()), base_stage.run(make_req()))


def test_num_threads_setting(tiny_settings):
    before = torch.get_num_threads()
    try:
        load_base_pipeline(tiny_settings.model_copy(update={"num_threads": 2}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
