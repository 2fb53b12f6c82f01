"""The soak test's CI variant: 300 mixed requests (aborts, bad inputs, n > 1) against a real server,
then pools back to idle, no leaked process, RSS growth bounded (benchmarks/soak.py asserts them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--no-write", "--json"]
    cmd += ["--log", str(tmp_path / "server.log")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout[r.stdout.index("{") :]
    result = json.loads(out)
    assert r.returncode == 0, (result["checks"], (tmp_path / "server.log").read_text()[-3000:])
    assert all(result["checks"].values())
    assert sum(result["outcomes"].values()) == 300
    assert result["outcomes"].get("aborted", 0) > 10 and result["outcomes"].get("bad_400", 0) > 10
