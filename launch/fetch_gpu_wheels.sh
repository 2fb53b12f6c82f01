#!/usr/bin/env bash
# Download, on a machine with network, the wheels launch/gpu_check.sh installs on a GPU machine
# that has none (python 3.12, x86_64, with CUDA torch, triton, transformers and safetensors only).
#
#   launch/fetch_gpu_wheels.sh [DEST]              # pytest and its plugins (~1 MB)
#   FLASHINFER=1 launch/fetch_gpu_wheels.sh [DEST] # + FlashInfer 0.7.2 (SGLang 0.5.23's pin), ~70 MB
#
# DEST defaults to .gpu_wheels/ (git-ignored). Nothing is installed here: gpu_check.sh installs the
# folder with `pip install --target <scratch>` (or unzips the wheels) and puts it on PYTHONPATH.
# FlashInfer 0.7 ships no prebuilt kernels on PyPI (flashinfer-cubin stops at 0.6.13): it compiles
# them at first use, so it also needs nvcc on the GPU machine; gpu_check records it as skipped when
# it cannot be imported or used.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
pip_download() {
  # pip matches --platform tags literally: list the older manylinux tags a 2_28 machine also runs
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$@"
}
# pytest and what it imports (iniconfig, pluggy, pygments; packaging comes with transformers), pytest-timeout
# because pyproject.toml sets `timeout`.
pip_download pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0
if [[ "${FLASHINFER:-0}" == 1 ]]; then
  # flashinfer-python's import-time dependencies that a bare torch install lacks.
  pip_download flashinfer-python==0.7.2 apache-tvm-ffi==0.1.11 einops==0.8.2 tabulate==0.9.0 \
    nvidia-ml-py==13.580.82 click==8.5.1 ninja==1.13.0
fi
du -sh "$DEST"
ls "$DEST"
