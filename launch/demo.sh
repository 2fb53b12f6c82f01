#!/usr/bin/env bash
# Set up, start the server on the embedded demo models, send a first request to
# each model with the openai client, then keep serving until Ctrl-C.
# Extra arguments go to the server, e.g. `bash launch/demo.sh --port 30001`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
port=30000
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[$i]}" = "--port" ]; then port=${args[$((i + 1))]}; fi
done
.venv/bin/python -m crosspool_sgl.launch_server "$@" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
.venv/bin/python launch/first_request.py --url "http://127.0.0.1:$port"
echo "serving on http://127.0.0.1:$port — try: curl http://127.0.0.1:$port/v1/models (Ctrl-C to stop)"
wait "$server"
