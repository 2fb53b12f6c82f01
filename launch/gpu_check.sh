#!/usr/bin/env bash
# One call on a machine with a CUDA GPU, under 8 minutes: every test in tests/gpu (compiled Triton
# kernels vs float64 references, FlashInfer vs torch attention, CUDA VMM map/unmap of KV chunks,
# pinned-host residency, CUDA-graph replay vs eager greedy tokens for every architecture,
# colocated vs disaggregated over NCCL) and benchmarks/gpu_decode_step.py; results as markdown
# in benchmarks/results/gpu/ (see benchmarks/README.md, "GPU check").
#
#   launch/gpu_check.sh
#   PYTHON=python3 GPU_WHEELS=.gpu_wheels GPU_CHECK_OUT=benchmarks/results/gpu launch/gpu_check.sh
#
# Needs only the engine core's dependencies (torch with CUDA, triton, transformers, safetensors);
# pytest (and FlashInfer, optionally) come from wheels fetched beforehand with
# launch/fetch_gpu_wheels.sh, installed into a scratch dir on PYTHONPATH, never into an environment.
# Exit: 0 all passed; 1 a test or the benchmark failed or ran out of time (see the .md files);
# 2 no CUDA GPU (one line on stderr, nothing run); 3 pytest missing and no wheel for it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RESULTS=${GPU_CHECK_OUT:-$ROOT/benchmarks/results/gpu}
WHEELS=${GPU_WHEELS:-$ROOT/.gpu_wheels}
TEST_BUDGET_S=${GPU_CHECK_TEST_S:-330}
BENCH_BUDGET_S=${GPU_CHECK_BENCH_S:-110}

# GPU_CHECK_ON_CPU=1 runs the pipeline without a GPU (the GPU tests skip, the benchmark refuses):
# for testing this script itself (tests/launch/test_gpu_check.py), never a GPU result.
if [[ "${GPU_CHECK_ON_CPU:-0}" != 1 ]] &&
  ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch missing or torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
start=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
SITE="$SCRATCH/site"
mkdir -p "$SITE" "$RESULTS"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  if ! "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "${wheels[@]}" 2>"$SCRATCH/pip.log"; then
    echo "gpu_check: pip install --target failed ($(tail -1 "$SCRATCH/pip.log")); unzipping the wheels instead"
    for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
  fi
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import pytest' >/dev/null 2>&1; then
  echo "gpu_check: pytest is not importable and $WHEELS has no wheel for it: run launch/fetch_gpu_wheels.sh where there is network and carry $WHEELS" >&2
  exit 3
fi

"$PY" - >"$SCRATCH/env.md" <<'EOF'
import importlib, platform, torch
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"- GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB)")
else:
    print("- GPU: none (GPU_CHECK_ON_CPU=1: a test of the script, not a GPU result)")
print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("triton", "flashinfer", "transformers", "pytest"):
    try:
        print(f"- {name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001 - reported, the checks that need it skip
        print(f"- {name}: not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
EOF

# Most informative first, so a run out of time loses the least: then every other tests/gpu file.
tests=()
for f in kernels static_decode attention_backends new_families arena_backing weight_store sampling disagg_nccl; do
  [[ -f tests/gpu/test_${f}_gpu.py ]] && tests+=("tests/gpu/test_${f}_gpu.py")
done
for f in tests/gpu/test_*.py; do [[ " ${tests[*]} " == *" $f "* ]] || tests+=("$f"); done
echo "gpu_check: tests/gpu, ${#tests[@]} files (budget ${TEST_BUDGET_S}s)"
timeout -k 10 "$TEST_BUDGET_S" "$PY" -m pytest "${tests[@]}" -v -p no:cacheprovider -o timeout=240 \
  >"$SCRATCH/pytest.log" 2>&1
test_rc=$?
tail -3 "$SCRATCH/pytest.log"

echo "gpu_check: benchmarks/gpu_decode_step.py (budget ${BENCH_BUDGET_S}s)"
timeout -k 10 "$BENCH_BUDGET_S" "$PY" benchmarks/gpu_decode_step.py --out "$RESULTS/decode_step.md" \
  >"$SCRATCH/bench.log" 2>&1
bench_rc=$?
tail -4 "$SCRATCH/bench.log"

"$PY" "$ROOT/launch/gpu_check_report.py" --results "$RESULTS" --env "$SCRATCH/env.md" \
  --pytest-log "$SCRATCH/pytest.log" --pytest-rc "$test_rc" \
  --bench-log "$SCRATCH/bench.log" --bench-rc "$bench_rc" --seconds "$(($(date +%s) - start))"
if [[ $test_rc -ne 0 || $bench_rc -ne 0 ]]; then
  echo "gpu_check: FAILED (pytest rc=$test_rc, benchmark rc=$bench_rc; 124 = out of time); see $RESULTS/summary.md"
  exit 1
fi
echo "gpu_check: all passed in $(($(date +%s) - start))s; results in $RESULTS"
