#!/usr/bin/env bash
# SGLang's own benchmark client (`python -m sglang.benchmark.serving`) against this server, with
# both of its SGLang backends: `sglang` (native /generate, the model picked by the URL prefix
# /models/{name}) and `sglang-oai` (/v1/completions, the model by the `model` field).
#
#   bash benchmarks/sglang_bench_serving.sh            # starts a server on the tiny demo models
#   BASE_URL=http://host:port MODEL=name TOKENIZER=/path bash benchmarks/sglang_bench_serving.sh
#
# Random token-id prompts (`--dataset-name random-ids`: `random` samples ShareGPT text, which it
# downloads) of the local tokenizer's vocabulary: nothing is downloaded.
# Writes benchmarks/results/sglang_bench_serving.md (the client's own result tables).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NUM_PROMPTS=${NUM_PROMPTS:-16}
OUT=benchmarks/results/sglang_bench_serving.md
server_pid=
tmp=$(mktemp -d)  # the client's per-request JSONL lines
trap 'rm -rf "$tmp"' EXIT
if [ -z "${BASE_URL:-}" ]; then
  paths=$($PY -c "from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models as e; p=e(names=['llama','mixtral']); print(p['llama'], p['mixtral'])")
  read -r llama mixtral <<<"$paths"
  PORT=${PORT:-$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")}
  BASE_URL=http://127.0.0.1:$PORT MODEL=mixtral TOKENIZER=$mixtral
  OMP_NUM_THREADS=1 $PY -m crosspool_sgl.launch_server --host 127.0.0.1 --port "$PORT" --log-level warning \
    --kv-pool-bytes 64M --model "llama=$llama" --model "mixtral=$mixtral" >/dev/null 2>&1 &
  server_pid=$!
  trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
  for _ in $(seq 300); do curl -sf "$BASE_URL/health" >/dev/null && break; sleep 1; done
fi
run() {  # backend, base url
  $PY -m sglang.benchmark.serving --backend "$1" --base-url "$2" --model "$MODEL" --tokenizer "$TOKENIZER" \
    --dataset-name random-ids --random-input-len 64 --random-output-len 16 --random-range-ratio 0.5 \
    --num-prompts "$NUM_PROMPTS" --request-rate inf --seed 1 --disable-tqdm --output-file "$tmp/$1.jsonl" 2>&1 |
    sed -n '/Serving Benchmark Result/,/^==*$/p'
}
{
  echo "# SGLang's benchmark client against crosspool-sgl"
  echo
  echo "\`bash benchmarks/sglang_bench_serving.sh\`: \`python -m sglang.benchmark.serving\` (sglang 0.5.23),"
  echo "random-ids dataset, $NUM_PROMPTS prompts of 32-64 tokens, 8-16 output tokens, all at once, model \`$MODEL\`"
  echo "(a tiny random-weight demo model on CPU: the numbers show the client runs, not performance)."
  for backend in sglang sglang-oai; do
    url=$BASE_URL
    [ "$backend" = sglang ] && url=$BASE_URL/models/$MODEL
    echo
    echo "## --backend $backend"
    echo
    echo '```'
    run "$backend" "$url"
    echo '```'
  done
} >"$OUT"
cat "$OUT"
