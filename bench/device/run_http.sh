#!/usr/bin/env bash
# Run ON the lent GPU machine (device tool, carry [".whl-http"], timeout_s 360), a lease's first
# call (then run.sh while the machine is warm): the hires fix end to end through HTTP
# (bench/gpu_http.py: the Serve graph of serve_config.yaml, full-size random SDXL) and 8
# concurrent clients; an estimated 3-5 min, never run on a GPU yet.
# First, HERE: `bash bench/device/fetch_wheels.sh` (it fills .whl-http/ too), and once
# `bash bench/device/check_here.sh`, which runs this same install and script on the CPU in a
# Python with only the machine's packages. Writes $OUT/gpu-<device>-<date>-http.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-http/*.whl || exit 1
tar xJf .whl-http/ray.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE '[A-Z][0-9]{2,4}[A-Z]?' | head -1 | tr 'A-Z' 'a-z')
log=${OUT:-/tmp}/gpu-${gpu:-gpu}-$(date +%F)-http.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, ray; print("torch", torch.__version__, "cuda", torch.version.cuda, "ray", ray.__version__)'
  echo "== issue 14 through HTTP: hires fix <= 2.5 s; 8 clients >= 1.6x the images/s of one"
  timeout 320 python3 bench/gpu_http.py --size 768 --steps 30 --repeats 3 --clients 8 --per-client 2 \
    --workdir /tmp/gpu-http || { echo "== serve log tail"; tail -c 8000 /tmp/gpu-http/serve.log; }
} 2>&1 | tee "$log"
echo "log: $log"
