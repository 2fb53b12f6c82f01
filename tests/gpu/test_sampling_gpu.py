"""GPU: penalties and the grammar vocab mask on CUDA equal the CPU results (skips without CUDA)."""

from __future__ import annotations

import pytest
import torch

from crosspool_sgl.layers.grammar import allocate_bitmask, apply_vocab_mask
from crosspool_sgl.layers.penalties import PenaltyArgs, TokenCounts, apply_penalties

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_vocab_mask_cuda_equals_cpu():
    vocab, gen = 151936, torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=gen)
    rows = torch.tensor([1, 4, 6])
    bitmask = allocate_bitmask(3, vocab)
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, generator=gen, dtype=torch.int64).int())
    cpu = logits.clone()
    apply_vocab_mask(cpu, rows, bitmask)
    gpu = logits.cuda()
    apply_vocab_mask(gpu, rows.cuda(), bitmask)
    assert torch.equal(gpu.cpu(), cpu)


def test_penalties_cuda_equal_cpu():
    vocab, b = 32000, 6
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(b, vocab, generator=gen)
    hist = [torch.randint(0, vocab, (20,), generator=gen).tolist() for _ in range(b)]
    outs = []
    for device in ("cpu", "cuda"):
        counts = TokenCounts(vocab, torch.device(device))
        slots = counts.slots_for([f"r{i}" for i in range(b)], hist)
        col = lambda v, d=device: torch.full((b, 1), v, device=d)  # noqa: E731
        out = logits.to(device)
        apply_penalties(out, PenaltyArgs(counts.counts(slots), col(0.5), col(0.3), col(1.4)))
        outs.append(out.cpu())
    torch.testing.assert_close(outs[1], outs[0])
