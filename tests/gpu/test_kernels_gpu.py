"""The tests/kernels comparisons again, compiled for CUDA, plus bf16 (wrong in the interpreter)
and serving-sized shapes.

Triton picks interpreter vs compiler when it is first imported, and tests/kernels/conftest.py
turns the interpreter on for the whole pytest process. So this module imports neither triton nor
`kernels` at import time; when the interpreter is on, its cases skip and
`test_cases_in_a_compiled_process` reruns this file in a fresh process without TRITON_INTERPRET.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _load_cpu_tests(name: str) -> ModuleType:
    """tests/kernels/<name>.py as a module, for its builders and `check_*` helpers."""
    spec = importlib.util.spec_from_file_location(
        f"gpu_{name}", REPO_ROOT / "tests" / "kernels" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def moe_tests() -> ModuleType:
    if _interpreter_on():
        pytest.skip("Triton's interpreter is on in this process; test_cases_in_a_compiled_process runs these")
    return _load_cpu_tests("test_fused_moe")


@pytest.fixture
def lockstep_tests() -> ModuleType:
    if _interpreter_on():
        pytest.skip("Triton's interpreter is on in this process; test_cases_in_a_compiled_process runs these")
    return _load_cpu_tests("test_fused_moe_lockstep")


@pytest.fixture
def attention_tests() -> ModuleType:
    if _interpreter_on():
        pytest.skip("Triton's interpreter is on in this process; test_cases_in_a_compiled_process runs these")
    return _load_cpu_tests("test_paged_decode_attention")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe(moe_tests: ModuleType, dtype: torch.dtype) -> None:
    from kernels.fused_moe import fused_moe, fused_moe_torch

    for fn in (fused_moe, fused_moe_torch):
        for top_k in (1, 2):
            torch.manual_seed(top_k)
            moe_tests.check_fused_moe(
                fn, [moe_tests.MODEL_A, moe_tests.MODEL_B], [5, 4], top_k, 48, dtype, "cuda"
            )
        for case, (models, tokens, top_k, width, strided) in enumerate(moe_tests.SIZES):
            torch.manual_seed(100 + case)
            moe_tests.check_fused_moe(fn, models, tokens, top_k, width, dtype, "cuda", strided)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_serving_sizes(moe_tests: ModuleType, dtype: torch.dtype) -> None:
    """Two Qwen-MoE-like models (scaled down) in one launch, decode and prefill batch sizes."""
    from kernels.fused_moe import fused_moe

    models = [(16, 512, 256), (12, 768, 384)]
    for tokens in ([3, 5], [200, 100]):
        torch.manual_seed(sum(tokens))
        moe_tests.check_fused_moe(fused_moe, models, tokens, 4, 768, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_lockstep_rows(lockstep_tests: ModuleType, dtype: torch.dtype) -> None:
    """Three models' rows padded to one width and K (slot -1), with and without gpt-oss extras."""
    from kernels.fused_moe import fused_moe, fused_moe_torch

    for fn in (fused_moe, fused_moe_torch):
        for extras in (False, True):
            torch.manual_seed(11)
            lockstep_tests.check_mixed(fn, dtype, extras, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(attention_tests: ModuleType, dtype: torch.dtype) -> None:
    check = attention_tests.check_paged_decode_attention
    for group in (1, 4):
        for sliding_window in (0, 5):
            for num_splits in (None, 1, 3):
                torch.manual_seed(group * 10 + sliding_window)
                check(attention_tests.SEQ_LENS, 4, 2, group, 16, sliding_window, num_splits, dtype, "cuda")
    for sliding_window in (0, 1, 100, 1000):
        torch.manual_seed(sliding_window)
        check([150, 3, 97], 16, 1, 4, 24, sliding_window, 2, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_serving_sizes(attention_tests: ModuleType, dtype: torch.dtype) -> None:
    """Llama-like geometry (8 KV heads, G = 4, D = 128) with the default key-split heuristic."""
    torch.manual_seed(0)
    seq_lens = [1, 17, 300, 1023, 2048, 77]
    for sliding_window in (0, 512):
        attention_tests.check_paged_decode_attention(
            seq_lens, 16, 8, 4, 128, sliding_window, None, dtype, "cuda"
        )


def test_cases_in_a_compiled_process() -> None:
    if not _interpreter_on():
        pytest.skip("the cases run compiled in this process")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
