"""`layers.moe.route` against transformers' own router modules, one per routing variant.

Each HF router gets random weights (and a non-zero correction bias); on many random tokens our
expert sets must be identical and the weights equal (fp32).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

from crosspool_sgl.layers.moe import route
from crosspool_sgl.models.config import UnsupportedModelError, load_model_config, parse_model_config

HIDDEN, TOKENS = 32, 256
CASES = {
    "v2_greedy": (
        "DeepseekV2Config",
        DeepseekV2TopkRouter,
        {"topk_method": "greedy", "routed_scaling_factor": 1.3},
    ),
    "v2_group_limited": (
        "DeepseekV2Config",
        DeepseekV2TopkRouter,
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
    ),
    "v3": (
        "DeepseekV3Config",
        DeepseekV3TopkRouter,
        {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
    ),
    "v3_no_renorm": (
        "DeepseekV3Config",
        DeepseekV3TopkRouter,
        {"n_group": 2, "topk_group": 1, "norm_topk_prob": False},
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        Glm4MoeTopkRouter,
        {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.8},
    ),
    "gpt_oss": ("GptOssConfig", GptOssTopKRouter, {}),
}
EXPERTS_KEY = {"GptOssConfig": "num_local_experts"}


@pytest.mark.parametrize("case", list(CASES))
def test_route_matches_transformers_router(case: str) -> None:
    config_cls, router_cls, extra = CASES[case]
    experts_key = EXPERTS_KEY.get(config_cls, "n_routed_experts")
    hf_cfg = getattr(transformers, config_cls)(
        hidden_size=HIDDEN, num_attention_heads=4, num_experts_per_tok=3, **{experts_key: 16}, **extra
    )
    hf_cfg.architectures = [config_cls.replace("Config", "ForCausalLM")]
    ours = parse_model_config(json.loads(hf_cfg.to_json_string())).router
    gen = torch.Generator().manual_seed(len(case))
    router = router_cls(hf_cfg)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0, generator=gen)
        bias = None
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.normal_(0.0, 0.1, generator=gen)
            bias = router.e_score_correction_bias
        if getattr(router, "bias", None) is not None:
            router.bias.normal_(0.0, 1.0, generator=gen)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    with torch.no_grad():
        _, want_w, want_ids = router(x)
    logits = torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None))
    got_w, got_ids = route(logits, ours, bias)
    # top-k order is unspecified (sorted=False in transformers): compare per token, sorted by expert
    want_ids, order = want_ids.sort(dim=-1)
    got_ids, got_order = got_ids.sort(dim=-1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w.gather(1, got_order), want_w.gather(1, order), rtol=1e-6, atol=1e-7)


def test_quantised_checkpoint_is_refused_naming_the_quantisation(tmp_path, tiny_models):
    cfg = json.loads((tiny_models["gpt_oss"] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="MXFP4"):
        load_model_config(tmp_path)


def test_unknown_deepseek_v2_topk_method_is_refused(tiny_models):
    cfg = json.loads((tiny_models["deepseek_v2"] / "config.json").read_text())
    cfg["topk_method"] = "noaux_tc"
    with pytest.raises(UnsupportedModelError, match="noaux_tc"):
        parse_model_config(cfg)
