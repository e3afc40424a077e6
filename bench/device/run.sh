#!/usr/bin/env bash
# Run ON the lent GPU machine (device tool, carry [".whl"], timeout_s 600): every GPU figure issue 14
# asks for in one process, in one call of ~7-9 min on an H200. First, HERE: `bash bench/device/fetch_wheels.sh`.
# The same figure through HTTP (the headline) is run_http.sh's: a lease of 15 min holds the
# machine's start, run_http.sh (timeout_s 360) first, then this one with the time left.
# Prints everything and writes the log to $OUT/gpu-<device>-<date>.log (copy it to bench/results/);
# its hires-fix line reads "hires fix, total ... N.NN s" as the earlier logs' do.
# The steps run most-wanted first, each under its own timeout, so a slow one costs only itself;
# the timeouts add up to 540 s, which leaves the wheel install room in the tool's 600 s per call.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
tar xJf .whl/opencv.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE '[A-Z][0-9]{2,4}[A-Z]?' | head -1 | tr 'A-Z' 'a-z')
log=${OUT:-/tmp}/gpu-${gpu:-gpu}-$(date +%F).log
x4=.whl/realesr-animevideov3-x4.safetensors
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "== SDXL full size, random weights: base 768/30 steps, x2 upscale to 1536, refine 0.5, whole hires fix"
  echo "   (issue 14 goals: base <= 1.2 s, x2plus <= 30 ms, refine <= 1.2 s, hires fix <= 2.5 s, peak <= 9 GiB)"
  echo "   then, one on top of the other: VAE tiling off, fused QKV, channels_last UNet (PSNR to the one before)"
  timeout 180 python3 bench/gpu_sdxl.py --size 768 --steps 30 --repeats 2 --variants --levers
  echo "== SDXL batching: 8 requests 768 px / 10 steps (hires 1536, 5 steps), one at a time vs one call per stage"
  echo "   (goal: batched >= 1.6x the images/s of one at a time)"
  timeout 110 python3 bench/sdxl_batch.py --full --device cuda --size 768 --steps 10 --batch 8 --repeats 2
  echo "== upscaler: RealESRGAN_x2plus-shaped, 768 -> 1536, fp16: product vs the best plain forward"
  echo "   (eager, NHWC, torch.compile reduce-overhead = CUDA graphs); goal <= 1.1x of the best, <= 30 ms"
  timeout 150 python3 bench/gpu_upscale.py --size 768 --dtype fp16 --tiles 800 --runs 7 \
    --raw-variants eager,channels_last,compiled
  echo "== the same product with NHWC activations (upscaler.channels_last: on), and an x4 file serving x2"
  timeout 40 python3 bench/gpu_upscale.py --size 768 --dtype fp16 --tiles 800 --runs 7 --channels-last on \
    --weights "$x4"
  echo "== upscaler: are a job's bits the same alone and batched with others on this GPU?"
  timeout 30 python3 bench/upscale_bench.py --company --device cuda --weights "$x4"
  echo "== face pass: GFPGAN-shaped, per face"
  timeout 30 python3 bench/face_bench.py --runs 3 --threads 8
} 2>&1 | tee "$log"
echo "log: $log"
