#!/usr/bin/env bash
# Run HERE (not on the GPU machine): download the wheels the lent GPU machine lacks into .whl/
# (git-ignored). Its Python 3.12 has torch, transformers, einops, pillow, scikit-image (OpenCV 5, see below), but
# not diffusers, spandrel or pydantic. Then call the device tool with carry [".whl"] and
# `bash bench/device/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "${DEST:-.whl}" "$@"; }
rm -rf .whl && mkdir .whl
dl diffusers==0.42.1 spandrel==0.4.2 pydantic==2.14.4 annotated-types typing-inspection
core=$(unzip -p .whl/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
dl "pydantic-core==$core"
# The device's OpenCV is 5.0, which has no Haar cascades (face detection): carry 4.14. Its wheel (62 MB)
# plus the rest exceeds the 64 MiB a call may carry, so it travels as an xz tarball (~41 MB).
cv=$(mktemp -d)
DEST=$cv dl opencv-python-headless==4.14.0.94
(cd "$cv" && unzip -q ./*.whl && rm ./*.whl && tar cf - . | xz -6 -T0 >"$OLDPWD/.whl/opencv.tar.xz")
rm -rf "$cv"
# A real upscaler file (../shared does not travel): the GPU batch-invariance check and an x4 model
# serving an x2 request.
cp ../shared/weights/realesr-animevideov3-x4.safetensors .whl/
ls -la .whl && du -sh .whl
