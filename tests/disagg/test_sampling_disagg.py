"""Grammars and penalties through the disaggregated runner (FFN on a worker process): the same
sampling path as colocated mode, so constraints hold and seeded penalised outputs are identical."""

from __future__ import annotations

import re

from disagg_helpers import build, close, generate

from crosspool_sgl.core.req import Req
from crosspool_sgl.sampling_params import SamplingParams
from crosspool_sgl.server_args import DisaggArgs

NAMES = ("qwen3_moe", "llama")
REGEX = r"(red|blue) [0-9]{2,3}"


def _reqs() -> list[Req]:
    reqs = []
    for n in NAMES:
        for j in range(3):
            grammar = {"temperature": 1.0, "max_new_tokens": 24, "regex": REGEX}
            pen = {"temperature": 1.0, "seed": j, "max_new_tokens": 10, "ignore_eos": True}
            pen |= {"frequency_penalty": 1.0, "repetition_penalty": 1.5, "logit_bias": {"3": 5.0}}
            reqs.append(Req(f"{n}-g{j}", n, [5, 17, 42 + j], SamplingParams.from_dict(grammar)))
            reqs.append(Req(f"{n}-p{j}", n, [7, 8, j], SamplingParams.from_dict(pen)))
    return reqs


def test_grammar_and_penalties_through_the_disaggregated_runner(tiny_models):
    colocated = build(tiny_models, NAMES, DisaggArgs())
    want = generate(colocated, _reqs())
    rt = build(tiny_models, NAMES, DisaggArgs(ffn_workers=1, micro_batches=2))
    try:
        reqs = _reqs()
        got = generate(rt, reqs)
        tok = rt.tokenizers[NAMES[0]]
    finally:
        close(rt)
    for r in reqs:
        if "-g" in r.rid:
            assert re.fullmatch(REGEX, tok.decode(r.output_ids, skip_special_tokens=True)), r.output_ids
        else:
            assert got[r.rid] == want[r.rid]  # seeded: same penalised samples as colocated
