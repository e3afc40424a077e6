#!/usr/bin/env bash
# Run ON the lent GPU machine (device tool, carry [".whl"]): every GPU figure the issues ask for,
# in one short call (~3 min on an H200). Prints everything; also writes $OUT/gpu_bench.log when $OUT is set.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
tar xJf .whl/opencv.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log=${OUT:-/tmp}/gpu_bench.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "== upscaler: RealESRGAN_x2plus-shaped, 768 -> 1536, fp16 (goal < 0.15 s, < 1.5 GB); raw vs product"
  timeout 150 python3 bench/gpu_upscale.py --size 768 --dtype fp16 --weights .whl/realesr-animevideov3-x4.safetensors
  echo "== upscaler: are a job's bits the same alone and batched with others on this GPU?"
  timeout 60 python3 bench/upscale_bench.py --company --device cuda --weights .whl/realesr-animevideov3-x4.safetensors
  echo "== face pass: GFPGAN-shaped, per face"
  timeout 90 python3 bench/face_bench.py --runs 3 --threads 8
  echo "== SDXL full size, random weights: base 768/30 steps, upscale 1536, refine 0.5, whole hires fix (goal < 5 s)"
  timeout 240 python3 bench/gpu_sdxl.py --size 768 --steps 30 --repeats 2 --variants
} 2>&1 | tee "$log"
