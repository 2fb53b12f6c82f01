"""The attention side's stand-in for the weights pool: slot ids without the weights.

In disaggregated mode the loader still walks every model's FFN tensors (to learn
their shapes and number the slots exactly as the FFN workers do) but this pool
keeps none of them, so the attention device's memory goes to the KV pool.
Routers and shared-expert gates are attention-side tensors and stay with the model.
"""

from __future__ import annotations

import torch

from crosspool_sgl.mem.weight_pool import expert_shape


class SlotTablePool:
    """Numbers FFN slots in load order, as `WeightPool.add_expert` does, and stores no bytes."""

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.expert_to_slot: dict[tuple[str, int, int], int] = {}
        self.model_to_slots: dict[str, list[int]] = {}
        self.model_bytes: dict[str, int] = {}  # bytes these models hold on the FFN workers
        self.model_resident_bytes: dict[str, int] = {}  # on this side: none
        self._num_slots = 0

    def reserve(self, num_elements: int) -> None:
        """Nothing to reserve here: the weights live on the FFN workers."""

    def add_expert(
        self,
        model: str,
        layer: int,
        expert: int,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        biases: tuple[torch.Tensor, ...] | None = None,
        activation: object = None,  # the workers' pools keep it; slot numbering does not depend on it
    ) -> int:
        inter, hidden = expert_shape(f"{model} layer {layer} expert {expert}", gate, up, down)
        slot = self._num_slots
        self._num_slots += 1
        self.expert_to_slot[(model, layer, expert)] = slot
        self.model_to_slots.setdefault(model, []).append(slot)
        nbytes = (
            3 * inter * hidden + (2 * inter + hidden if biases is not None else 0)
        ) * gate.element_size()
        self.model_bytes[model] = self.model_bytes.get(model, 0) + nbytes
        self.model_resident_bytes.setdefault(model, 0)
        return slot

    def slots(self, model: str, layer: int, num_experts: int) -> list[int]:
        return [self.expert_to_slot[(model, layer, e)] for e in range(num_experts)]

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def used_bytes(self) -> int:
        return 0

    @property
    def capacity_bytes(self) -> int:
        return 0
