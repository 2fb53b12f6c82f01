"""crosspool-sgl: many cold MoE models served from a shared weights pool and a cross-model KV pool."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    # Lazy: `import crosspool_sgl` stays cheap (no torch/transformers) for the CLI tools.
    if name == "Engine":
        from crosspool_sgl.engine import Engine

        return Engine
    raise AttributeError(name)
