"""CUDA virtual-memory backing of the KV arena on a real GPU (skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mapped_chunks_are_usable_and_unmapping_returns_memory():
    from crosspool_sgl.mem.arena_backing import CudaVMMBacking

    dev = torch.device("cuda")
    chunk = 2 << 20
    backing = CudaVMMBacking(64 * chunk, chunk, dev)
    free_before, _ = torch.cuda.mem_get_info()
    for c in (0, 5, 63):
        backing.map(c)
    torch.cuda.synchronize()
    free_mapped, _ = torch.cuda.mem_get_info()
    assert free_before - free_mapped >= 3 * chunk
    view = backing.tensor[5 * chunk : 6 * chunk].view(torch.float32)
    view.fill_(3.0)
    assert float(view.sum()) == 3.0 * view.numel()
    for c in (0, 5, 63):
        backing.unmap(c)
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after - free_mapped >= 3 * chunk
    backing.close()
