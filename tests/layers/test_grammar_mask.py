"""The packed vocab mask in the core against xgrammar's own CPU kernel (the layout's owner)."""

from __future__ import annotations

import pytest
import torch
from xgrammar import apply_token_bitmask_inplace

from crosspool_sgl.layers.grammar import allocate_bitmask, apply_vocab_mask, unpack_bitmask


@pytest.mark.parametrize("vocab", [31, 32, 512, 1003, 151936])
def test_mask_matches_xgrammar_kernel(vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = torch.tensor([0, 2, 3])
    logits = torch.randn(5, vocab, generator=gen)
    bitmask = allocate_bitmask(len(rows), vocab)
    words = bitmask.shape[1]
    bitmask.copy_(
        torch.randint(-(2**31), 2**31 - 1, (len(rows), words), generator=gen, dtype=torch.int64).int()
    )
    ours = logits.clone()
    apply_vocab_mask(ours, rows, bitmask)
    ref = logits.clone()
    full = allocate_bitmask(logits.shape[0], vocab)  # xgrammar indexes logits and mask by the same row
    full[rows] = bitmask
    apply_token_bitmask_inplace(ref, full, indices=rows.tolist(), backend="cpu")  # xgrammar's CPU path
    assert torch.equal(ours, ref)
    assert torch.equal(ours[[1, 4]], logits[[1, 4]])  # rows without a grammar are untouched


def test_unpack_bit_order():
    bitmask = torch.tensor([[1 | (1 << 5), -(2**31)]], dtype=torch.int32)  # tokens 0, 5 and 63
    allowed = unpack_bitmask(bitmask, 64)[0]
    assert allowed.nonzero().flatten().tolist() == [0, 5, 63]
