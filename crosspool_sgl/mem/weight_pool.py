"""The shared weights pool: one arena per device holding every model's FFN/expert weights.

Every FFN matrix of every hosted model lives in one flat ``arena`` tensor;
models only hold views into it. Experts (and dense MLPs, which are a
one-expert MoE with weight 1) are addressed through *slots*::

    slot -> (w13_offset, w2_offset, hidden_size, inter_size)

w13 is row-major [2I, H] (gate rows first, then up rows) and w2 is [H, I].
The indirection table ``(model, layer, expert) -> slot`` lets one fused-MoE
launch serve tokens of several models, and lets the residency manager move an
expert without the model noticing: slot ids never change, only a slot's
offsets (``unmap_slot`` frees its arena block, ``map_slot`` gives it a new one).
Each slot owns one contiguous block ``[w13 | w2]`` of 3*I*H elements — plus
``[b13 (2I) | b2 (H)]`` for experts with biases (gpt-oss) — taken first-fit from
a free list; ``max_bytes`` bounds the arena (``--max-resident-bytes``). Each slot
also says what it computes (`SlotActivation`: silu(g) * u, or gpt-oss's clamped
SwiGLU with its alpha and limit), so one fused-MoE launch can mix them.

Legend: H = hidden size, I = expert intermediate size, E = experts of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Activation codes of kernels/fused_moe.py (which imports nothing from here; a test keeps them equal).
ACT_SILU = 0  # silu(gate) * up
ACT_SWIGLU_CLAMPED = (
    1  # gpt-oss: g = min(gate, limit), u = clamp(up, +-limit), (u + 1) * g * sigmoid(alpha * g)
)


@dataclass(frozen=True)
class SlotActivation:
    """The activation of one slot, as the fused-MoE kernel's per-slot tables encode it."""

    kind: int = ACT_SILU
    alpha: float = 1.0
    limit: float = 0.0


SILU = SlotActivation()


def expert_shape(name: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[int, int]:
    """(I, H) of an expert whose gate [I, H], up [I, H] and down [H, I] fit together, else ValueError."""
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter):
        raise ValueError(
            f"{name}: gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)} "
            "do not fit together"
        )
    return inter, hidden


class WeightPoolFullError(RuntimeError):
    """The arena can't hold the block even after compaction and growth up to ``max_bytes``."""


@dataclass(frozen=True)
class SlotTables:
    """Device tensors that kernels read: per-slot offsets and sizes, [S] each."""

    w13_offset: torch.Tensor  # int64
    w2_offset: torch.Tensor  # int64
    hidden_size: torch.Tensor  # int32
    inter_size: torch.Tensor  # int32
    bias_offset: torch.Tensor  # int64: offset of [b13 (2I) | b2 (H)], -1 for a slot without biases
    act_kind: torch.Tensor  # int32: ACT_SILU or ACT_SWIGLU_CLAMPED
    act_alpha: torch.Tensor  # float32
    act_limit: torch.Tensor  # float32
    has_extras: bool = False  # some slot has biases or a non-silu activation
    max_inter: int = 0  # the largest I of any slot (host int: sizes fused_moe's buffer without a sync)

    @property
    def ffn_kwargs(self) -> dict[str, torch.Tensor]:
        """The fused-MoE keyword arguments for biases and activations ({} when every slot is plain)."""
        if not self.has_extras:
            return {}
        return {
            "bias_offset": self.bias_offset,
            "act_kind": self.act_kind,
            "act_alpha": self.act_alpha,
            "act_limit": self.act_limit,
        }


class WeightPool:
    """An arena of FFN weights with a (model, layer, expert) -> slot table and a block allocator.

    Weights are registered at load time and the arena is sized up front for them
    (``reserve`` then ``add_expert``), so loading never copies twice.
    """

    def __init__(
        self, dtype: torch.dtype, device: str | torch.device = "cpu", max_bytes: int | None = None
    ) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.arena = torch.empty(0, dtype=dtype, device=self.device)
        elem = self.arena.element_size()
        self.max_elements = None if max_bytes is None else max_bytes // elem
        self._reserved = 0
        self._allocated = 0
        self._free: list[tuple[int, int]] = []  # (offset, elements), sorted by offset, coalesced
        self._slot_rows: list[tuple[int, int, int, int]] = []  # (w13_off, w2_off, H, I)
        self._slot_has_bias: list[bool] = []
        self._slot_act: list[SlotActivation] = []
        self._slot_resident: list[bool] = []
        self._slot_model: list[str] = []
        self._slot_layer: list[int] = []
        self.expert_to_slot: dict[tuple[str, int, int], int] = {}
        self.model_to_slots: dict[str, list[int]] = {}  # in load order: layer, then expert
        self.model_bytes: dict[str, int] = {}  # every expert, resident or not
        self.model_resident_bytes: dict[str, int] = {}
        self._tables: SlotTables | None = None

    # ---- building -------------------------------------------------------------------------
    def reserve(self, num_elements: int) -> None:
        """Make room for ``num_elements`` more before a model's experts are added (offsets stay valid)."""
        if num_elements <= 0 or self._largest_free() >= num_elements:
            return
        if self._free:
            self.compact()  # the free space becomes one block at the tail, which growth extends
        self._grow(num_elements - self.free_elements)

    def add_expert(
        self,
        model: str,
        layer: int,
        expert: int,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        activation: SlotActivation = SILU,
    ) -> int:
        """Copy one expert's gate [I, H], up [I, H] and down [H, I] into the arena; returns its slot.

        `biases` are (gate [I], up [I], down [H]) when the expert has them.
        """
        inter, hidden = expert_shape(f"{model} layer {layer} expert {expert}", gate, up, down)
        if biases is not None and tuple(b.shape for b in biases) != ((inter,), (inter,), (hidden,)):
            raise ValueError(
                f"{model} layer {layer} expert {expert}: biases {[tuple(b.shape) for b in biases]} "
                f"do not fit I={inter}, H={hidden}"
            )
        slot = len(self._slot_rows)
        self._slot_rows.append((0, 0, hidden, inter))
        self._slot_has_bias.append(biases is not None)
        self._slot_act.append(activation)
        self._slot_resident.append(False)
        self._slot_model.append(model)
        self._slot_layer.append(layer)
        self.expert_to_slot[(model, layer, expert)] = slot
        self.model_to_slots.setdefault(model, []).append(slot)
        self.model_bytes[model] = self.model_bytes.get(model, 0) + self.slot_bytes(slot)
        self.model_resident_bytes.setdefault(model, 0)
        off = self.map_slot(slot, grow=True)
        w13 = self.w13(slot)
        w13[:inter].copy_(gate)
        w13[inter:].copy_(up)
        self.arena[off + 2 * inter * hidden : off + 3 * inter * hidden].view(hidden, inter).copy_(down)
        if biases is not None:
            b = off + 3 * inter * hidden
            self.arena[b : b + 2 * inter + hidden].copy_(torch.cat(biases))
        return slot

    # ---- residency: give a slot an arena block or take it away ----------------------------
    def slot_model(self, slot: int) -> str:
        return self._slot_model[slot]

    def slot_layer(self, slot: int) -> int:
        return self._slot_layer[slot]

    def slot_elements(self, slot: int) -> int:
        _, _, hidden, inter = self._slot_rows[slot]
        return 3 * hidden * inter + (2 * inter + hidden if self._slot_has_bias[slot] else 0)

    def slot_bytes(self, slot: int) -> int:
        return self.slot_elements(slot) * self.arena.element_size()

    def is_resident(self, slot: int) -> bool:
        return self._slot_resident[slot]

    def block(self, slot: int) -> torch.Tensor:
        """The slot's whole [w13 | w2] block, flat (what the store copies)."""
        off = self._slot_rows[slot][0]
        return self.arena[off : off + self.slot_elements(slot)]

    def map_slot(self, slot: int, grow: bool = False) -> int:
        """Give a non-resident slot an arena block; returns its offset. Raises WeightPoolFullError."""
        assert not self._slot_resident[slot], f"slot {slot} is already resident"
        n = self.slot_elements(slot)
        off = self._alloc(n)
        if off is None and self.free_elements >= n:
            self.compact()
            off = self._alloc(n)
        if off is None and grow:  # unplanned growth: amortised doubling, within the bound
            limit = self.max_elements if self.max_elements is not None else 1 << 62
            tail = self._free[-1][1] if self._free and sum(self._free[-1]) == self._reserved else 0
            self._grow(max(n - tail, min(self._reserved // 2, limit - self._reserved)))
            off = self._alloc(n)
        if off is None:
            raise WeightPoolFullError(
                f"weights pool full: {n * self.arena.element_size()} bytes wanted, "
                f"{self.free_bytes} free of {self.capacity_bytes} (max {self.max_bytes})"
            )
        _, _, hidden, inter = self._slot_rows[slot]
        self._slot_rows[slot] = (off, off + 2 * inter * hidden, hidden, inter)
        self._set_resident(slot, True)
        return off

    def unmap_slot(self, slot: int) -> None:
        """Free a resident slot's block (its contents must have been saved); the slot id stays valid."""
        assert self._slot_resident[slot], f"slot {slot} is not resident"
        off, _, hidden, inter = self._slot_rows[slot]
        self._release(off, self.slot_elements(slot))
        self._slot_rows[slot] = (0, 0, hidden, inter)  # harmless address until it is mapped again
        self._set_resident(slot, False)

    def compact(self) -> None:
        """Slide resident blocks down to the arena's start so the free space is one block.

        Only for fragmentation; blocks of different models have different sizes.
        Callers on GPU must have no copy into the arena in flight.
        """
        cursor = 0
        for slot in sorted((s for s, r in enumerate(self._slot_resident) if r), key=self._offset):
            off, n = self._offset(slot), self.slot_elements(slot)
            if off != cursor:
                self.arena[cursor : cursor + n].copy_(self.arena[off : off + n].clone())
                _, _, hidden, inter = self._slot_rows[slot]
                self._slot_rows[slot] = (cursor, cursor + 2 * inter * hidden, hidden, inter)
            cursor += n
        self._free = [(cursor, self._reserved - cursor)] if cursor < self._reserved else []
        self._tables = None

    # ---- reading --------------------------------------------------------------------------
    def slots(self, model: str, layer: int, num_experts: int) -> list[int]:
        return [self.expert_to_slot[(model, layer, e)] for e in range(num_experts)]

    def w13(self, slot: int) -> torch.Tensor:
        """[2I, H] view of a slot's gate+up rows."""
        w13_off, _, hidden, inter = self._slot_rows[slot]
        return self.arena[w13_off : w13_off + 2 * inter * hidden].view(2 * inter, hidden)

    def w2(self, slot: int) -> torch.Tensor:
        """[H, I] view of a slot's down projection."""
        _, w2_off, hidden, inter = self._slot_rows[slot]
        return self.arena[w2_off : w2_off + hidden * inter].view(hidden, inter)

    def biases(self, slot: int) -> torch.Tensor | None:
        """[2I + H] view of a slot's gate, up and down biases, or None."""
        if not self._slot_has_bias[slot]:
            return None
        w13_off, _, hidden, inter = self._slot_rows[slot]
        b = w13_off + 3 * inter * hidden
        return self.arena[b : b + 2 * inter + hidden]

    def tables(self) -> SlotTables:
        """Slot tables on the pool's device (rebuilt lazily after the table changes)."""
        if self._tables is None:
            rows = torch.tensor(self._slot_rows or [(0, 0, 0, 0)], dtype=torch.int64)
            has_bias = torch.tensor(self._slot_has_bias or [False])
            acts = self._slot_act or [SILU]
            bias_offset = torch.where(has_bias, rows[:, 0] + 3 * rows[:, 2] * rows[:, 3], -1)
            self._tables = SlotTables(
                w13_offset=rows[:, 0].to(self.device),
                w2_offset=rows[:, 1].to(self.device),
                hidden_size=rows[:, 2].to(torch.int32).to(self.device),
                inter_size=rows[:, 3].to(torch.int32).to(self.device),
                bias_offset=bias_offset.to(self.device),
                act_kind=torch.tensor([a.kind for a in acts], dtype=torch.int32, device=self.device),
                act_alpha=torch.tensor([a.alpha for a in acts], dtype=torch.float32, device=self.device),
                act_limit=torch.tensor([a.limit for a in acts], dtype=torch.float32, device=self.device),
                has_extras=any(self._slot_has_bias) or any(a != SILU for a in acts),
                max_inter=max(r[3] for r in self._slot_rows or [(0, 0, 0, 0)]),
            )
        return self._tables

    @property
    def used_bytes(self) -> int:
        """Bytes of resident expert blocks."""
        return self._allocated * self.arena.element_size()

    @property
    def capacity_bytes(self) -> int:
        return self._reserved * self.arena.element_size()

    @property
    def free_elements(self) -> int:
        return self._reserved - self._allocated

    @property
    def free_bytes(self) -> int:
        return self.free_elements * self.arena.element_size()

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_elements is None else self.max_elements * self.arena.element_size()

    # ---- the block allocator --------------------------------------------------------------
    def _offset(self, slot: int) -> int:
        return self._slot_rows[slot][0]

    def _set_resident(self, slot: int, resident: bool) -> None:
        self._slot_resident[slot] = resident
        model = self.slot_model(slot)
        sign = 1 if resident else -1
        self.model_resident_bytes[model] += sign * self.slot_bytes(slot)
        self._tables = None

    def _largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def _grow(self, num_elements: int) -> None:
        """Extend the arena at its tail (copying what is there), bounded by ``max_elements``."""
        if num_elements <= 0:
            return
        if self.max_elements is not None and self._reserved + num_elements > self.max_elements:
            raise WeightPoolFullError(
                f"weights pool would grow to {(self._reserved + num_elements) * self.arena.element_size()}"
                f" bytes, over its max of {self.max_bytes} (--max-resident-bytes)"
            )
        grown = torch.empty(self._reserved + num_elements, dtype=self.dtype, device=self.device)
        grown[: self._reserved].copy_(self.arena[: self._reserved])
        self.arena = grown
        self._release(self._reserved, num_elements, allocated=False)
        self._reserved += num_elements

    def _alloc(self, n: int) -> int | None:
        """First fit; None when no free block is large enough."""
        for i, (off, size) in enumerate(self._free):
            if size >= n:
                if size == n:
                    del self._free[i]
                else:
                    self._free[i] = (off + n, size - n)
                self._allocated += n
                return off
        return None

    def _release(self, off: int, n: int, allocated: bool = True) -> None:
        """Return a block to the free list, merging with its neighbours."""
        if allocated:
            self._allocated -= n
        blocks = sorted([*self._free, (off, n)])
        merged: list[tuple[int, int]] = []
        for o, s in blocks:
            if merged and sum(merged[-1]) == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        self._free = merged
