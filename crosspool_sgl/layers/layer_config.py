"""How a layer rotates and routes, as plain frozen dataclasses: the models' configs hold them and the
layers compute with them. Kept free of torch so that parsing a model's config (the launcher checks
every model before it starts anything) imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # default | linear | llama3 | yarn
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer picks its experts and weighs them, as each transformers family does.

    kind: "softmax" (softmax, top-k, optional renorm: Qwen/Mixtral/OLMoE, DeepSeek-V2 "greedy"),
    "group_limited_greedy" (DeepSeek-V2: softmax, best `topk_group` groups by their max, top-k),
    "sigmoid_grouped" (DeepSeek-V3/GLM-4 MoE: sigmoid + correction bias to choose, groups ranked
    by the sum of their top-2, weights are the uncorrected sigmoid scores),
    "topk_softmax" (gpt-oss: biased logits, top-k, softmax over the k chosen).
    """

    kind: str = "softmax"
    top_k: int = 0
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0  # routed_scaling_factor
    has_bias: bool = False  # gpt-oss router bias
    has_correction_bias: bool = False  # e_score_correction_bias
    fp32_logits: bool = False  # DeepSeek/GLM compute router logits from fp32 casts of x and the weight
