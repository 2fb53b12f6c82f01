"""fused_moe (Triton, interpreted here) and fused_moe_torch against the float64 reference.

Shape legend: T = tokens, K = top-k, W = hidden_states width (Hmax), E = experts of one model,
H / I = hidden / intermediate size of one model, S = slots in the pool.
The `check_*` helpers take a device so tests/gpu/test_kernels_gpu.py reruns them compiled on CUDA.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import kernels.fused_moe as fused_moe_module
from kernels.fused_moe import align_pairs_to_slots, fused_moe, fused_moe_ref, fused_moe_torch

# Max |out - ref| / max |ref|. fp16 rounds the intermediate activation and the output.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}
GAP = 11  # NaN elements between matrices: reading past a matrix or ignoring an offset shows as NaN

ModelShape = tuple[int, int, int]  # (E, H, I)
MODEL_A: ModelShape = (5, 40, 24)
MODEL_B: ModelShape = (3, 24, 56)


@dataclass
class Pool:
    """An arena holding every expert of several models, plus the slot tables into it."""

    arena: torch.Tensor  # [arena elements]
    w13_offset: torch.Tensor  # [S] int64
    w2_offset: torch.Tensor  # [S] int64
    hidden_size: torch.Tensor  # [S] int32
    inter_size: torch.Tensor  # [S] int32
    slots_of_model: list[list[int]]
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # per slot: w13 [2I, H], w2 [H, I] (as packed)

    def tables(self) -> tuple[torch.Tensor, ...]:
        return self.arena, self.w13_offset, self.w2_offset, self.hidden_size, self.inter_size


def build_pool(models: list[ModelShape], dtype: torch.dtype, device: str) -> Pool:
    """Pack the experts of `models` into one arena: slots numbered model by model, placed in
    shuffled order with NaN gaps, so the offset table is the only way to find a matrix."""
    shapes = [(hidden, inter) for num_experts, hidden, inter in models for _ in range(num_experts)]
    weights = [
        (torch.randn(2 * inter, hidden) / hidden**0.5, torch.randn(hidden, inter) / inter**0.5)
        for hidden, inter in shapes
    ]
    chunks, w13_offset, w2_offset = [torch.full((GAP,), float("nan"))], [0] * len(shapes), [0] * len(shapes)
    cursor = GAP
    for slot in random.Random(len(shapes)).sample(range(len(shapes)), len(shapes)):
        for matrix, offsets in zip(weights[slot], (w13_offset, w2_offset), strict=True):
            offsets[slot] = cursor
            chunks += [matrix.flatten(), torch.full((GAP,), float("nan"))]
            cursor += matrix.numel() + GAP
    starts = [sum(m[0] for m in models[:i]) for i in range(len(models))]
    return Pool(
        arena=torch.cat(chunks).to(dtype=dtype, device=device),
        w13_offset=torch.tensor(w13_offset, dtype=torch.int64, device=device),
        w2_offset=torch.tensor(w2_offset, dtype=torch.int64, device=device),
        hidden_size=torch.tensor([h for h, _ in shapes], dtype=torch.int32, device=device),
        inter_size=torch.tensor([i for _, i in shapes], dtype=torch.int32, device=device),
        slots_of_model=[list(range(s, s + m[0])) for s, m in zip(starts, models, strict=True)],
        weights=[(w13.to(dtype), w2.to(dtype)) for w13, w2 in weights],
    )


def route(
    pool: Pool, tokens_per_model: list[int], top_k: int, width: int, strided: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of every model, rows shuffled; each picks top_k distinct experts of its own model,
    never the model's last expert (a slot with no tokens). Columns >= H are NaN: never to be read."""
    device, dtype = pool.arena.device, pool.arena.dtype
    model_of_row = [m for m, n in enumerate(tokens_per_model) for _ in range(n)]
    random.Random(sum(tokens_per_model)).shuffle(model_of_row)
    hidden_states = torch.full((len(model_of_row), 2 * width if strided else width), float("nan"))
    topk_ids = torch.empty((len(model_of_row), top_k), dtype=torch.int32)
    for t, m in enumerate(model_of_row):
        slots = pool.slots_of_model[m]
        hidden = int(pool.hidden_size[slots[0]])
        hidden_states[t, slice(0, 2 * hidden, 2) if strided else slice(0, hidden)] = torch.randn(hidden)
        topk_ids[t] = torch.tensor(slots)[torch.randperm(len(slots) - 1)[:top_k]]
    hidden_states = hidden_states.to(dtype=dtype, device=device)
    if strided:
        hidden_states = hidden_states[:, ::2]  # [T, W] with stride(1) == 2
    topk_weights = torch.softmax(torch.randn(len(model_of_row), top_k), dim=-1)  # [T, K]
    return hidden_states, topk_ids.to(device), topk_weights.to(device)


def check_fused_moe(
    fn: Callable[..., torch.Tensor],
    models: list[ModelShape],
    tokens_per_model: list[int],
    top_k: int,
    width: int,
    dtype: torch.dtype,
    device: str = "cpu",
    strided: bool = False,
) -> None:
    """`fn` matches the float64 reference, is exactly 0 past each row's H, and has no NaN."""
    pool = build_pool(models, dtype, device)
    hidden_states, topk_ids, topk_weights = route(pool, tokens_per_model, top_k, width, strided)
    assert hidden_states.is_contiguous() != strided
    ref = fused_moe_ref(hidden_states, topk_ids, topk_weights, *pool.tables())  # [T, W] float64
    out = fn(hidden_states, topk_ids, topk_weights, *pool.tables())  # [T, W]
    assert out.shape == hidden_states.shape and out.dtype == dtype
    assert not out.isnan().any()
    row_hidden = pool.hidden_size[topk_ids[:, 0].long()]  # [T]
    beyond_h = torch.arange(width, device=device)[None, :] >= row_hidden[:, None]  # [T, W]
    assert (out[beyond_h] == 0).all()
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


NO_TRITON = pytest.mark.skipif(fused_moe_module.triton is None, reason="triton is not installed")
FNS = [pytest.param(fused_moe, id="triton", marks=NO_TRITON), pytest.param(fused_moe_torch, id="torch")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_two_models_in_one_launch(fn: Callable[..., torch.Tensor], dtype: torch.dtype, top_k: int) -> None:
    torch.manual_seed(top_k)
    check_fused_moe(fn, [MODEL_A, MODEL_B], [5, 4], top_k, width=48, dtype=dtype)


# (models, tokens per model, top_k, width, strided): H > BLOCK_K and two N tiles of H; I > BLOCK_N;
# > BLOCK_M pairs per slot; non-contiguous hidden states; three models; the prefill block size.
SIZES = [
    ([(4, 16, 32)], [3], 2, 16, False),
    ([(6, 72, 40)], [10], 2, 80, True),
    ([(2, 24, 136)], [40], 1, 24, False),
    ([(2, 24, 136), (3, 72, 40), (4, 16, 32)], [6, 3, 5], 2, 72, True),
    ([(3, 16, 24), (2, 32, 16)], [300, 220], 2, 32, False),  # >= 1024 pairs: 64-row blocks
]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SIZES)))
def test_sizes(fn: Callable[..., torch.Tensor], dtype: torch.dtype, case: int) -> None:
    torch.manual_seed(100 + case)
    models, tokens, top_k, width, strided = SIZES[case]
    check_fused_moe(fn, models, tokens, top_k, width, dtype, strided=strided)


def test_reference_matches_unpacked_weights() -> None:
    """The reference reads the arena as documented: gate rows first, then up, then W2."""
    torch.manual_seed(7)
    pool = build_pool([MODEL_A, MODEL_B], torch.float64, "cpu")
    hidden_states, topk_ids, topk_weights = route(pool, [3, 3], 2, width=40)
    expected = torch.zeros_like(hidden_states)  # [T, W]
    for t in range(topk_ids.shape[0]):
        for k in range(topk_ids.shape[1]):
            w13, w2 = pool.weights[int(topk_ids[t, k])]
            gate, up = w13.chunk(2, dim=0)  # [I, H] each
            x = hidden_states[t, : w13.shape[1]]
            y = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), w2)
            expected[t, : w13.shape[1]] += topk_weights[t, k] * y
    ref = fused_moe_ref(hidden_states, topk_ids, topk_weights, *pool.tables())
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_m", [4, 16, 64])
def test_align_pairs_to_slots(block_m: int) -> None:
    torch.manual_seed(block_m)
    num_slots, num_tokens, top_k = 9, 37, 3
    topk_ids = torch.randint(0, num_slots - 2, (num_tokens, top_k))  # the last two slots unused
    sorted_pair_ids, block_slot = align_pairs_to_slots(topk_ids, num_slots, block_m)
    num_pairs = topk_ids.numel()
    flat = topk_ids.flatten()
    real = sorted_pair_ids < num_pairs
    assert sorted(sorted_pair_ids[real].tolist()) == list(range(num_pairs))  # each pair once
    used = block_slot >= 0
    assert used[: int(used.sum())].all()  # used blocks come first
    slot_of_row = block_slot.repeat_interleave(block_m)  # [NB * block_m]
    assert (flat[sorted_pair_ids[real].long()] == slot_of_row[real]).all()  # pairs sit in their slot's blocks
    blocks_needed = (
        torch.bincount(flat, minlength=num_slots).add(block_m - 1).div(block_m, rounding_mode="floor")
    )
    assert torch.equal(torch.bincount(block_slot[used].long(), minlength=num_slots), blocks_needed)


def test_rejects_bad_inputs() -> None:
    torch.manual_seed(3)
    pool = build_pool([MODEL_A], torch.float32, "cpu")
    hidden_states, topk_ids, topk_weights = route(pool, [4], 2, width=40)
    with pytest.raises(TypeError):
        fused_moe(hidden_states.half(), topk_ids, topk_weights, *pool.tables())
    with pytest.raises(ValueError, match="past the arena"):
        fused_moe(hidden_states, topk_ids, topk_weights, pool.arena[:-500], *pool.tables()[1:])
    with pytest.raises(ValueError, match="width"):
        fused_moe(hidden_states[:, :32], topk_ids, topk_weights, *pool.tables())
    with pytest.raises(IndexError):
        fused_moe(hidden_states, topk_ids + 5, topk_weights, *pool.tables())


def import_without_triton(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> ModuleType:
    """A fresh copy of `module` imported as if triton were not installed."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location(f"{module.__name__}_without_triton", module.__file__)
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


def test_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module imports and its torch path works without triton; the Triton wrapper says what to use."""
    torch.manual_seed(4)
    module = import_without_triton(monkeypatch, fused_moe_module)
    assert module.triton is None
    check_fused_moe(module.fused_moe_torch, [MODEL_A], [4], 2, width=40, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="fused_moe_torch"):
        check_fused_moe(module.fused_moe, [MODEL_A], [4], 2, width=40, dtype=torch.float32)
