"""The shared weights pool: one arena per device holding every model's FFN/expert weights.

Every FFN matrix of every hosted model lives in one flat ``arena`` tensor;
models only hold views into it. Experts (and dense MLPs, which are a
one-expert MoE with weight 1) are addressed through *slots*::

    slot -> (w13_offset, w2_offset, hidden_size, inter_size)

w13 is row-major [2I, H] (gate rows first, then up rows) and w2 is [H, I].
The indirection table ``(model, layer, expert) -> slot`` lets one fused-MoE
launch serve tokens of several models, and lets the residency manager move an
expert without the model noticing (only the table changes).

Legend: H = hidden size, I = expert intermediate size, E = experts of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotTables:
    """Device tensors that kernels read: per-slot offsets and sizes, [S] each."""

    w13_offset: torch.Tensor  # int64
    w2_offset: torch.Tensor  # int64
    hidden_size: torch.Tensor  # int32
    inter_size: torch.Tensor  # int32


class WeightPool:
    """A bump-allocated arena of FFN weights with a (model, layer, expert) -> slot table.

    Weights are registered once at load time and the arena is sized exactly for
    them (``reserve`` then ``add_expert``), so loading never copies twice.
    """

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.arena = torch.empty(0, dtype=dtype, device=self.device)
        self._reserved = 0
        self._used = 0
        self._slot_rows: list[tuple[int, int, int, int]] = []  # (w13_off, w2_off, H, I)
        self.expert_to_slot: dict[tuple[str, int, int], int] = {}
        self.model_bytes: dict[str, int] = {}
        self._tables: SlotTables | None = None

    # ---- building -------------------------------------------------------------------------
    def reserve(self, num_elements: int) -> None:
        """Grow the arena before a model's experts are added (keeps offsets stable)."""
        if num_elements <= 0:
            return
        grown = torch.empty(self._reserved + num_elements, dtype=self.dtype, device=self.device)
        grown[: self._used].copy_(self.arena[: self._used])
        self.arena = grown
        self._reserved += num_elements

    def add_expert(
        self, model: str, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> int:
        """Copy one expert's gate [I, H], up [I, H] and down [H, I] into the arena; returns its slot."""
        inter, hidden = gate.shape
        if up.shape != (inter, hidden) or down.shape != (hidden, inter):
            raise ValueError(
                f"{model} layer {layer} expert {expert}: gate {tuple(gate.shape)}, "
                f"up {tuple(up.shape)}, down {tuple(down.shape)} do not fit together"
            )
        w13_off = self._take(2 * inter * hidden)
        w13 = self.arena[w13_off : w13_off + 2 * inter * hidden].view(2 * inter, hidden)
        w13[:inter].copy_(gate)
        w13[inter:].copy_(up)
        w2_off = self._take(hidden * inter)
        self.arena[w2_off : w2_off + hidden * inter].view(hidden, inter).copy_(down)
        slot = len(self._slot_rows)
        self._slot_rows.append((w13_off, w2_off, hidden, inter))
        self.expert_to_slot[(model, layer, expert)] = slot
        elem = self.arena.element_size()
        self.model_bytes[model] = self.model_bytes.get(model, 0) + 3 * inter * hidden * elem
        self._tables = None
        return slot

    def _take(self, n: int) -> int:
        if self._used + n > self._reserved:
            self.reserve(max(n, self._reserved // 2))  # unplanned growth: amortised doubling
        off = self._used
        self._used += n
        return off

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

    def tables(self) -> SlotTables:
        """Slot tables on the pool's device (rebuilt lazily after the table changes)."""
        if self._tables is None:
            rows = torch.tensor(self._slot_rows or [(0, 0, 0, 0)], dtype=torch.int64)
            self._tables = SlotTables(
                w13_offset=rows[:, 0].to(self.device),
                w2_offset=rows[:, 1].to(self.device),
                hidden_size=rows[:, 2].to(torch.int32).to(self.device),
                inter_size=rows[:, 3].to(torch.int32).to(self.device),
            )
        return self._tables

    @property
    def used_bytes(self) -> int:
        return self._used * self.arena.element_size()

    @property
    def capacity_bytes(self) -> int:
        return self._reserved * self.arena.element_size()
