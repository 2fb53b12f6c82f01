"""Shared fixtures: the tiny random-weight models (built once, cached under .cache/)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALL_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    return ensure_tiny_models(ROOT / ".cache" / "tiny_models")
