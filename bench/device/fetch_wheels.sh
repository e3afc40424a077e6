#!/usr/bin/env bash
# Run HERE (not on the GPU machine): download the wheels the lent GPU machine lacks into .whl/
# (git-ignored) for run.sh, and into .whl-http/ for run_http.sh (the Serve graph over HTTP: Ray
# too, which does not fit beside OpenCV in one call's 64 MiB). Its Python 3.12 has torch, transformers, einops, pillow, scikit-image (OpenCV 5, see below), but
# not diffusers, spandrel or pydantic. Then call the device tool with carry [".whl"] and
# `bash bench/device/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# PYVER=3.11 WHL=.cache/whl311 fetches the same for this machine's Python (bench/device/check_here.sh).
PYVER=${PYVER:-3.12}
WHL=${WHL:-.whl}
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" -d "${DEST:-$WHL}" "$@"; }
rm -rf "$WHL" && mkdir -p "$WHL"
dl diffusers==0.42.1 spandrel==0.4.2 pydantic==2.14.4 annotated-types typing-inspection
core=$(unzip -p "$WHL"/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
dl "pydantic-core==$core"
# The device's OpenCV is 5.0, which has no Haar cascades (face detection): carry 4.14. Its wheel (62 MB)
# plus the rest exceeds the 64 MiB a call may carry, so it travels as an xz tarball (~41 MB).
cv=$(mktemp -d)
DEST=$cv dl opencv-python-headless==4.14.0.94
(cd "$cv" && unzip -q ./*.whl && rm ./*.whl && tar cf - . | xz -6 -T0 >"$OLDPWD/$WHL/opencv.tar.xz")
rm -rf "$cv"
# A real upscaler file (../shared does not travel): the GPU batch-invariance check and an x4 model
# serving an x2 request.
cp ../shared/weights/realesr-animevideov3-x4.safetensors "$WHL"/
du -sh "$WHL"

# run_http.sh: what Ray Serve and our graph need beyond the machine's packages (its list:
# /work/.library/device/KINDS.md; bench/device/check_here.sh proves the set on this machine).
H=$WHL-http
rm -rf "$H" && mkdir "$H"
cp "$WHL"/diffusers-*.whl "$WHL"/spandrel-*.whl "$WHL"/pydantic*.whl "$WHL"/annotated_types-*.whl \
  "$WHL"/typing_inspection-*.whl "$H"/
DEST=$H dl fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 aiohttp-cors==0.8.1 \
  colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 \
  google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 pyasn1==0.6.5 \
  pyasn1-modules==0.4.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  opentelemetry-exporter-prometheus==0.66b2 importlib-metadata==10.2.0 smart-open==9.0.4 \
  mmh3==5.3.1 grpcio-reflection==1.85.1 watchfiles==1.3.0
# Ray without what Serve never loads (Java jars, RLlib, Tune, Train, Data, the dashboard's web
# client): 79 MB as a wheel, 26 MB as this tarball.
r=$(mktemp -d)
DEST=$r dl ray==2.60.0
(cd "$r" && unzip -q ./*.whl && rm ./*.whl \
  && rm -rf ray/jars ray/rllib ray/tune ray/train ray/data ray/air ray/llm ray/cpp ray/dashboard/client/build \
  && tar cf - . | xz -6 -T0 >"$OLDPWD/$H/ray.tar.xz")
rm -rf "$r"
du -sh "$H"
