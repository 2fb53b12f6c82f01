#!/usr/bin/env bash
# Set up, start the server on the embedded demo models, send a first request to
# each model with the openai client, then keep serving until Ctrl-C.
# Extra arguments go to the server, e.g. `bash launch/demo.sh --port 30001`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
port=30000
args=("$@")
own_models=0
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[$i]}" = "--port" ]; then port=${args[$((i + 1))]}; fi
  if [ "${args[$i]}" = "--model" ] || [ "${args[$i]}" = "--config" ]; then own_models=1; fi
done
if [ "$own_models" = 0 ]; then
  # The server's demo models plus a tiny DeepSeek-V3 (MLA: its KV pages hold one latent per token).
  while IFS= read -r flag; do args+=(--model "$flag"); done < <(.venv/bin/python - <<'PY'
from crosspool_sgl.launch_server import DEMO_MODELS
from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

names = (*DEMO_MODELS, "deepseek_v3")
for name, path in ensure_tiny_models(names=names).items():
    print(f"{name}={path}")
PY
  )
fi
.venv/bin/python -m crosspool_sgl.launch_server "${args[@]}" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
.venv/bin/python launch/first_request.py --url "http://127.0.0.1:$port"
echo "serving on http://127.0.0.1:$port — try: curl http://127.0.0.1:$port/v1/models (Ctrl-C to stop)"
wait "$server"
