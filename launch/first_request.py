"""Wait for a crosspool server, then send a first request to every hosted model (the demo's last step).

python launch/first_request.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import sys
import time

import openai
import requests


def wait_healthy(url: str, timeout_s: float, server_pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    sys.exit(f"server at {url} not healthy after {timeout_s:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for /health")
    args = p.parse_args()
    wait_healthy(args.url, args.wait)
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="none")
    models = [m.id for m in client.models.list().data]
    print(f"hosted models: {', '.join(models)}")
    for model in models:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello in five words."}],
            max_tokens=16,
            temperature=0,
        )
        text = reply.choices[0].message.content
        print(f"[{model}] {text!r} ({reply.usage.completion_tokens} tokens; random weights, so not English)")


if __name__ == "__main__":
    main()
