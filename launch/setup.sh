#!/usr/bin/env bash
# Create (or refresh) the project virtualenv at .venv: CPU torch, pinned deps,
# sglang without its CUDA-only dependencies, this package in editable mode and
# the CPU shims. Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.crosspool-setup-$(cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, alone: a resolver that sees a bare 'torch' pulls GBs of CUDA wheels.
pip install --no-deps torch==2.13.0
pip install --no-deps -r requirements.lock
pip install --no-deps sglang==0.5.23
pip install --no-deps --no-build-isolation -e .
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import patches.sitecustomize_hook" > "$site/crosspool_cpu_shims.pth"
.venv/bin/python -c 'import crosspool_sgl, sglang, transformers'
rm -f .venv/.crosspool-setup-*
touch "$stamp"
echo "crosspool-sgl: .venv ready"
