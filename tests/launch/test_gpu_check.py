"""launch/gpu_check.sh and benchmarks/gpu_decode_step.py refuse clearly without a GPU; the report
script turns a pytest log into the results' markdown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@no_gpu
def test_gpu_check_refuses_without_cuda(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out")}
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU visible"), res.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@no_gpu
def test_decode_step_benchmark_refuses_without_cuda():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_decode_step.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert (
        res.stdout.strip()
        == "gpu_decode_step: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured"
    )


def test_report_renders_outcomes(tmp_path):
    static, disagg = "tests/gpu/test_static_decode_gpu.py::", "tests/gpu/test_disagg_nccl_gpu.py::"
    log = "\n".join(
        [
            f"{static}test_graph_replay_greedy_equals_eager[triton-llama] PASSED [ 10%]",
            f"{static}test_flashinfer_graph_decode_matches_torch[None] SKIPPED [ 20%]",
            f"{disagg}test_disaggregated_over_nccl_equals_colocated[1] FAILED [ 30%]",
            "=========================== short test summary info ============================",
            f"FAILED {disagg}test_disaggregated_over_nccl_equals_colocated[1] - boom",
            "=================== 1 failed, 1 passed, 1 skipped in 9.00s ====================",
        ]
    )
    (tmp_path / "pytest.log").write_text(log)
    (tmp_path / "bench.log").write_text("Traceback: oops\n")
    (tmp_path / "env.md").write_text("- GPU: fake\n")
    out = tmp_path / "results"
    args = ["--results", out, "--env", tmp_path / "env.md", "--pytest-log", tmp_path / "pytest.log"]
    args += ["--pytest-rc", "1", "--bench-log", tmp_path / "bench.log", "--bench-rc", "1", "--seconds", "42"]
    subprocess.run(
        [sys.executable, str(ROOT / "launch" / "gpu_check_report.py"), *map(str, args)], check=True
    )
    tests = (out / "tests.md").read_text()
    assert "1 failed, 1 passed, 1 skipped" in tests and "boom" in tests
    assert f"| `{static}test_graph_replay_greedy_equals_eager[triton-llama]` | PASSED |" in tests
    assert "1 passed, 1 skipped" in (out / "static_decode.md").read_text()
    assert "1 failed" in (out / "disagg_nccl.md").read_text()
    assert (
        "FAILED (exit 1)" in (out / "decode_step.md").read_text()
        and "oops" in (out / "decode_step.md").read_text()
    )
    assert "wall time: 42 s" in (out / "summary.md").read_text()


@no_gpu
def test_gpu_check_pipeline_on_cpu(tmp_path):
    """The whole script with GPU_CHECK_ON_CPU=1: wheels dir empty, GPU tests skip, the benchmark
    refuses, so it exits 1 with every results file written."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable,
        "GPU_CHECK_ON_CPU": "1",
        "GPU_WHEELS": str(tmp_path / "no_wheels"),
        "GPU_CHECK_OUT": str(tmp_path / "out"),
        "TMPDIR": str(tmp_path),
    }
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "benchmark rc=2" in res.stdout
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "summary.md",
        "tests.md",
        "static_decode.md",
        "disagg_nccl.md",
        "decode_step.md",
    }
    tests = (out / "tests.md").read_text()
    assert "pytest exit 0" in tests and "skipped" in tests and "| FAILED |" not in tests
    assert "test_graph_replay_greedy_equals_eager" in (out / "static_decode.md").read_text()


_WITHOUT_FRONT_END = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sglang", "xgrammar", "fastapi", "uvicorn", "openai", "zmq"):
            raise ModuleNotFoundError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, Block())
import pytest
from crosspool_sgl.runtime import build_runtime
from crosspool_sgl.server_args import EngineArgs, KVPoolArgs, ModelSpec
rt = build_runtime(EngineArgs(models=(ModelSpec("llama", sys.argv[1]),), show_progress=False,
                              kv_pool=KVPoolArgs(total_bytes=32 << 20)))
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/gpu"]))
"""


def test_gpu_tests_and_runtime_need_no_sglang(tiny_models):
    """The GPU machine has no sglang (nor xgrammar, fastapi, ...): tests/gpu must import and the
    runtime the NCCL test builds must start without them."""
    res = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FRONT_END, str(tiny_models["llama"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "tests collected" in res.stdout
