#!/usr/bin/env bash
# Run HERE (not on the GPU machine): download the wheels the lent GPU machine lacks into .whl/
# (git-ignored). Its Python 3.12 has torch, transformers, einops, pillow, opencv, scikit-image, but
# not diffusers, spandrel or pydantic. Then call the device tool with carry [".whl"] and
# `bash bench/device/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$@"; }
rm -rf .whl && mkdir .whl
dl diffusers==0.42.1 spandrel==0.4.2 pydantic==2.14.4 annotated-types typing-inspection
core=$(unzip -p .whl/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
dl "pydantic-core==$core"
# Real upscaler files (../shared does not travel to the device): animevideov3 for the batch-invariance
# check, x4plus (RRDBNet, real weights) to show fp16 runs without NaN redo on real values.
cp ../shared/weights/realesr-animevideov3-x4.safetensors ../shared/weights/realesrgan-x4plus.safetensors .whl/
ls -la .whl
