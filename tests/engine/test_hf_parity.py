"""Every architecture, all loaded in one Engine, against Hugging Face transformers (fp32).

The MoE families of issue 13 ride along: DeepSeek-V2 (MLA without q LoRA, yarn mscale,
group-limited greedy), DeepSeek-V3 (q LoRA, interleaved rope, sigmoid routing with a non-zero
correction bias), GLM-4 MoE (partial rotary, qk norm, biases) and gpt-oss (sinks, a 16-token
window shorter than the prompts, biased clamped-SwiGLU experts) — see tools/make_tiny_models.py.

Requests of all models are interleaved in the same batches; greedy tokens must
be identical to `transformers` `generate(do_sample=False)` for 32 new tokens and
prompt/output logprobs must agree within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from crosspool_sgl import Engine
from tests.conftest import ALL_ARCHS as BASE_ARCHS

NEW_FAMILIES = ("deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")
ALL_ARCHS = (*BASE_ARCHS, *NEW_FAMILIES)

PROMPTS = [
    "Hello world, this is a test of",
    "The quick brown fox",
    # long enough (with 32 new tokens) to cross Mixtral's (48) and Qwen2's (40) sliding windows;
    # gpt-oss's (16) is shorter than this prompt alone
    "a b c d e f g h i j k l m n o p q r s t u v w x y z and then some more text to cross the window",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def engine_outputs(tiny_models):
    eng = Engine(
        models={n: str(tiny_models[n]) for n in ALL_ARCHS}, show_progress=False, chunked_prefill_size=64
    )
    prompts = [p for p in PROMPTS for _ in ALL_ARCHS]
    models = [n for _ in PROMPTS for n in ALL_ARCHS]
    outs = eng.generate(
        prompt=prompts,
        model=models,
        sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,  # the prompt's logprobs too (SGLang's default -1 gives output logprobs only)
    )
    used_after = (eng.scheduler.request_pages(), eng.runtime.kv_pool.used_pages())
    eng.scheduler.flush_cache()
    used_after += (eng.runtime.kv_pool.used_pages(), eng.runtime.kv_pool.snapshot().num_free_chunks)
    num_chunks = eng.runtime.kv_pool.num_chunks
    eng.shutdown()
    return {(p, m): o for p, m, o in zip(prompts, models, outs, strict=True)}, used_after + (num_chunks,)


def _hf_reference(model_dir, prompt):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    ids = tok(prompt, return_tensors="pt").input_ids
    seq = hf.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    with torch.no_grad():
        logp = torch.log_softmax(hf(seq).logits[0].float(), dim=-1)
    n = ids.shape[1]
    new = seq[0, n:].tolist()
    out_lp = [logp[n - 1 + i, t].item() for i, t in enumerate(new)]
    in_lp = [logp[i - 1, ids[0, i]].item() for i in range(1, n)]
    return ids[0].tolist(), new, in_lp, out_lp


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_tokens_and_logprobs_match_transformers(arch, tiny_models, engine_outputs):
    outputs, _ = engine_outputs
    for prompt in PROMPTS:
        prompt_ids, ref_ids, ref_in, ref_out = _hf_reference(tiny_models[arch], prompt)
        ours = outputs[(prompt, arch)]
        assert ours["meta_info"]["prompt_tokens"] == len(prompt_ids)
        assert ours["output_ids"] == ref_ids, f"{arch}: greedy tokens differ for {prompt!r}"
        assert len(ref_ids) == NEW_TOKENS
        out_lp = [lp for lp, _, _ in ours["meta_info"]["output_token_logprobs"]]
        in_lp = [lp for lp, _, _ in ours["meta_info"]["input_token_logprobs"]]
        assert in_lp[0] is None  # the first prompt token has no logprob
        torch.testing.assert_close(torch.tensor(out_lp), torch.tensor(ref_out), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(in_lp[1:]), torch.tensor(ref_in), atol=1e-4, rtol=0)


def test_pool_empty_after_all_requests(engine_outputs):
    """Requests hold no pages afterwards; only the prefix cache does, and a flush returns every chunk."""
    _, (by_requests, allocated, after_flush, free_chunks, num_chunks) = engine_outputs
    assert by_requests == 0
    assert allocated > 0  # the finished requests' full pages stayed cached
    assert after_flush == 0 and free_chunks == num_chunks
