"""Stub of ``sgl_kernel`` so stock SGLang 0.5.23 can run on a CPU-only machine.

Only for the stock-SGLang *baseline* subprocess of ``benchmarks/``: it must never
be on the path of crosspool_sgl's own server or tests. The benchmark adds
``patches/stubs`` to ``PYTHONPATH`` of that one subprocess.

Why it exists: with ``SGLANG_USE_CPU_ENGINE=1`` (needed, or SGLang tries to
import vllm) several SGLang modules import ``*_cpu`` kernels from ``sgl_kernel``
at import time, and the CPU build of sgl-kernel is not on the package registry.
The names below are exactly those that ``sglang.Engine`` imported while serving
a tiny Qwen3-MoE with ``attention_backend="torch_native"`` (traced with a
catch-all stub); tiny Mixtral needed no others. None of them was *called*: they
serve speculative decoding and KV-cache copies between layers/pools. Each
raises ``NotImplementedError`` naming itself, so a benchmark can never silently
run a fake kernel; a name missing from the list fails the import with
``ImportError``, so SGLang's own fallbacks still apply.

The stub registers no ``torch.ops.sgl_kernel`` ops, so SGLang's
``cpu_has_amx_support()`` stays False and its plain-torch CPU paths are used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

# Imported by sglang 0.5.23 under is_cpu(); where from, for the next person to re-trace:
_STUBBED_NAMES = (
    "copy_all_layer_kv_cache_cpu",  # kernels/ops/kvcache/cache_move.py
    "assign_req_to_token_pool_cpu",  # srt/mem_cache/allocation.py (speculative decoding path)
    "assign_draft_cache_locs_contiguous_cpu",  # kernels/ops/speculative/cache_locs.py
    "assign_extend_cache_locs_cpu",  # kernels/ops/speculative/cache_locs.py
    "build_tree_kernel_efficient_cpu",  # kernels/ops/speculative/spec_tree.py
    "verify_tree_greedy_cpu",  # kernels/ops/speculative/spec_tree.py
    "fill_accept_out_cache_loc_cpu",  # kernels/ops/speculative/eagle.py
    "fill_bonus_tokens_cpu",  # kernels/ops/speculative/eagle.py
)


def make_raising_stub(name: str) -> Callable[..., NoReturn]:
    """Return a callable that fails loudly, so a call never passes for a real kernel."""

    def _stub(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{name} is a stub (crosspool_sgl patches/stubs/sgl_kernel): the CPU build of "
            "sgl-kernel is not installed, so stock SGLang cannot run this kernel on this machine"
        )

    _stub.__name__ = _stub.__qualname__ = name
    return _stub


globals().update({name: make_raising_stub(name) for name in _STUBBED_NAMES})
__all__ = list(_STUBBED_NAMES)
