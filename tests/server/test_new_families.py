"""DeepSeek-V2/V3 (MLA), GLM-4 MoE and gpt-oss served over HTTP: one server for all four.

The reference is transformers itself (greedy `generate` on the same directory), so each family's
test checks the native `/models/{name}/generate` tokens, then the `openai` client's completion and
chat completion, which must say the same as the native API.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest
import torch
import transformers

from tests.server.conftest import ServerHandle, free_port, stop_server, wait_healthy

FAMILIES = ("deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")
PROMPT = "a b c d e f g h i j k l m n o p q r s t u v w x y z"  # past gpt-oss's 16-token window
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def family_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    paths = {n: str(p) for n, p in ensure_tiny_models(names=FAMILIES).items()}
    port = free_port()
    log_path = tmp_path_factory.mktemp("families") / "server.log"
    cmd = [sys.executable, "-m", "crosspool_sgl.launch_server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--kv-pool-bytes", "32M", "--log-level", "warning"]
    for name, path in paths.items():
        cmd += ["--model", f"{name}={path}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    handle = ServerHandle(f"http://127.0.0.1:{port}", proc, paths, log_path)
    try:
        wait_healthy(handle)
        yield handle
    finally:
        stop_server(proc)


def _hf_greedy(path: str, text: str) -> list[int]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf.generation_config.eos_token_id = None
    ids = tok(text, return_tensors="pt").input_ids
    out = hf.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_over_native_and_openai_apis(family_server: ServerHandle, family: str) -> None:
    params = {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    r = family_server.post(f"/models/{family}/generate", json={"text": PROMPT, "sampling_params": params})
    assert r.status_code == 200, r.text
    native = r.json()
    assert native["output_ids"] == _hf_greedy(family_server.model_paths[family], PROMPT)

    client = openai.OpenAI(
        base_url=family_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    done = client.completions.create(
        model=family, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].text == native["text"]
    assert done.usage.completion_tokens == MAX_TOKENS
    chat = client.chat.completions.create(
        model=family, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == family and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1
