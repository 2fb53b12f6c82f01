"""The sampling surface through the offline Engine, on random-weight models (they satisfy a constraint
only when it is enforced): regex / json_schema / EBNF / structural_tag through SGLang's xgrammar backend,
grammar state across chunked prefill and retraction, min_new_tokens, logit_bias, penalties."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from crosspool_sgl import Engine
from crosspool_sgl.core.req import Req
from crosspool_sgl.sampling_params import SamplingParams
from crosspool_sgl.server_args import GrammarArgs

ARCHS = {"moe": "qwen3_moe", "llama": "llama"}  # two architectures
N = 20  # generations per constraint and model
REGEX = r"(cat|dog|bird) [0-9]{2,4}( [a-f]{1,3})?"
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "kind": {"enum": ["a", "b", "c"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "kind", "flags", "pos"],
    "additionalProperties": False,
}
EBNF = 'root ::= "(" num (op num)? (op num)? (op num)? ")"\nop ::= "+" | "*"\nnum ::= [1-9] [0-9]?'
EBNF_RE = r"\((?:[1-9][0-9]?)(?:[+*][1-9][0-9]?){0,3}\)"


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = Engine(
        models={n: str(tiny_models[a]) for n, a in ARCHS.items()},
        show_progress=False,
        grammar=GrammarArgs(json_max_whitespace_cnt=2),
    )
    yield eng
    eng.shutdown()


def _run(engine, params: dict) -> list[dict]:
    names = [m for m in ARCHS for _ in range(N)]
    outs = engine.generate(prompt=["Tell me something."] * len(names), model=names, sampling_params=params)
    for o in outs:  # a grammar ends its request (EOS accepted), never the length limit
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
    return outs


def test_regex_every_generation_matches(engine):
    outs = _run(engine, {"temperature": 1.0, "max_new_tokens": 64, "regex": REGEX})
    for o in outs:
        assert re.fullmatch(REGEX, o["text"]), o["text"]
    assert len({o["text"] for o in outs}) > N // 2  # sampled, not a fixed string


def test_json_schema_every_generation_validates(engine):
    outs = _run(engine, {"temperature": 1.0, "max_new_tokens": 256, "json_schema": json.dumps(SCHEMA)})
    for o in outs:
        jsonschema.validate(json.loads(o["text"]), SCHEMA)


def test_ebnf_every_generation_parses(engine):
    outs = _run(engine, {"temperature": 1.0, "max_new_tokens": 64, "ebnf": EBNF})
    for o in outs:
        assert re.fullmatch(EBNF_RE, o["text"]), o["text"]


def test_unconstrained_random_models_do_not_match_by_chance(engine):
    """The check above can fail: without the constraint the same models produce no match."""
    outs = engine.generate(
        prompt=["Tell me something."] * 8,
        model=["moe", "llama"] * 4,
        sampling_params={"temperature": 1.0, "max_new_tokens": 16},
    )
    assert not any(re.fullmatch(REGEX, o["text"]) for o in outs)


def test_structural_tag_wraps_the_json_it_triggers(engine):
    tag = {
        "type": "structural_tag",
        "structures": [{"begin": "<f>", "schema": {"enum": ["yes", "no"]}, "end": "</f>"}],
        "triggers": ["<f>"],
    }
    params = {
        "temperature": 1.0,
        "max_new_tokens": 32,
        "structural_tag": json.dumps(tag),
        "min_new_tokens": 0,
    }
    outs = engine.generate(prompt=["Hi"] * 6, model=["moe", "llama"] * 3, sampling_params=params)
    for o in outs:
        for body in re.findall(r"<f>(.*?)</f>", o["text"], flags=re.S):
            assert json.loads(body) in ("yes", "no")
        assert (
            o["text"].count("<f>") == o["text"].count("</f>")
            or o["meta_info"]["finish_reason"]["type"] == "length"
        )


@pytest.mark.parametrize(
    "field, spec",
    [("regex", "[0-9"), ("json_schema", '{"type": "nosuchtype"}'), ("ebnf", "root ::= ")],
)
def test_invalid_grammar_is_a_400_naming_the_field(engine, field, spec):
    out = engine.generate(prompt="Hi", sampling_params={field: spec})
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400 and reason["param"] == field
    assert field in reason["message"]
    assert engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["output_ids"]  # still serving


def test_grammar_survives_chunked_prefill_and_retraction(tiny_models):
    """Prompts prefill in chunks of 5 tokens; mid-generation every running request is retracted
    (pages freed, re-prefilled later from its prompt and output). Every output must still match."""
    eng = Engine(
        models={"moe": str(tiny_models["qwen3_moe"]), "llama": str(tiny_models["llama"])},
        show_progress=False,
        chunked_prefill_size=5,
    )
    sched = eng.runtime.scheduler
    regex = r"((ab|cd|ef) ){4,6}(end|fin)"
    reqs = []
    for i in range(6):
        model = ["moe", "llama"][i % 2]
        ids = eng.runtime.tokenizers[model].encode(f"prompt number {i} with several words")
        params = SamplingParams.from_dict({"temperature": 1.0, "max_new_tokens": 60, "regex": regex})
        reqs.append(Req(f"r{i}", model, ids, params))
        sched.add_request(reqs[-1])
    while sched.has_work():
        sched.step()
        for r in list(sched.running):
            if len(r.output_ids) >= 4 and not r.num_retractions:
                sched._retract(r)
    assert all(r.num_retractions == 1 for r in reqs)
    tok = eng.runtime.tokenizers["moe"]
    for r in reqs:
        text = tok.decode(r.output_ids, skip_special_tokens=True)
        assert r.finish_reason["type"] == "stop" and re.fullmatch(regex, text), text


# ---- min_new_tokens, logit_bias, penalties --------------------------------------------------


def test_min_new_tokens_never_ends_early(engine):
    """EOS is pushed to +100: without min_new_tokens the first token ends the request."""
    eos = engine.runtime.models["moe"].config.eos_token_ids[0]
    base = {"temperature": 1.0, "max_new_tokens": 30, "logit_bias": {str(eos): 100.0}}
    short = engine.generate(prompt=["Hi"] * 4, model="moe", sampling_params=base)
    assert all(len(o["output_ids"]) == 1 for o in short)
    for m in (5, 12):
        outs = engine.generate(prompt=["Hi"] * N, model="moe", sampling_params={**base, "min_new_tokens": m})
        for o in outs:
            assert len(o["output_ids"]) >= m
            assert eos not in o["output_ids"][:m]
            assert o["meta_info"]["finish_reason"]["type"] == "stop"


def test_min_new_tokens_also_holds_back_stop_token_ids(engine):
    stop = 100
    params = {
        "temperature": 1.0,
        "max_new_tokens": 20,
        "logit_bias": {str(stop): 100.0},
        "stop_token_ids": [stop],
    }
    outs = engine.generate(prompt=["Hi"] * 6, model="llama", sampling_params={**params, "min_new_tokens": 7})
    for o in outs:
        assert len(o["output_ids"]) == 8 and o["output_ids"][-1] == stop and stop not in o["output_ids"][:7]


def test_logit_bias_minus_100_keeps_a_token_out_of_200_samples(engine):
    """The most frequent token of an unbiased run (seeded, so its first step is the same) is banned."""
    params = {"temperature": 1.0, "max_new_tokens": 200, "ignore_eos": True, "seed": 7}
    probe = engine.generate(
        prompt="Tell me a story", model="llama", sampling_params={**params, "max_new_tokens": 1}
    )
    first = probe["output_ids"][0]  # the seeded first sample, the token most surely sampled
    ban = {"logit_bias": {str(first): -100}}
    free, biased = engine.generate(
        prompt=["Tell me a story"] * 2, model="llama", sampling_params=[params, {**params, **ban}]
    )
    assert free["output_ids"][0] == first and free["output_ids"].count(first) >= 1
    assert len(biased["output_ids"]) == 200 and first not in biased["output_ids"]


def test_logit_bias_outside_the_vocab_is_rejected(engine):
    from crosspool_sgl.sampling_params import InvalidRequestError

    vocab = engine.runtime.models["moe"].config.vocab_size
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.generate(prompt="Hi", model="moe", sampling_params={"logit_bias": {str(vocab): 1.0}})


def test_penalties_change_greedy_output_and_cut_repeats(engine):
    greedy = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    pens = [{}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}]
    outs = engine.generate(
        prompt=["the the the"] * 4, model="moe", sampling_params=[{**greedy, **p} for p in pens]
    )
    plain = outs[0]["output_ids"]
    for pen, out in zip(pens[1:], outs[1:], strict=True):
        assert out["output_ids"] != plain
        assert len(set(out["output_ids"])) > len(set(plain)), pen
    assert not engine.runtime.scheduler.runner.sampling_state.counts["moe"].slots  # released on finish


# ---- the scheduler side of grammars, with a fake compiler (no SGLang) ------------------------


class _OnlyToken:
    """Allows one token, then EOS; terminated once EOS is accepted."""

    def __init__(self, token: int, eos: int) -> None:
        self.token, self.eos, self.accepted = token, eos, []

    def accept_token(self, token: int) -> bool:
        want = self.token if not self.accepted else self.eos
        if token != want or self.is_terminated():
            return False
        self.accepted.append(token)
        return True

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        t = self.token if not self.accepted else self.eos
        bitmask[row, t // 32] = (1 << (t % 32)) - (1 << 32 if t % 32 == 31 else 0)

    def is_terminated(self) -> bool:
        return len(self.accepted) == 2

    def rollback(self, k: int) -> None:
        del self.accepted[len(self.accepted) - k :]


class _ManualCompiler:
    def __init__(self) -> None:
        self.futures: list[Future] = []

    def compile(self, model: str, field: str, spec: str) -> Future:
        fut: Future = Future()
        self.futures.append(fut)
        return fut


def test_a_compiling_grammar_waits_in_the_queue_without_blocking_others(engine):
    sched = engine.runtime.scheduler
    real = sched.grammar_compiler
    fake = sched.grammar_compiler = _ManualCompiler()
    try:
        eos = engine.runtime.models["moe"].config.eos_token_ids[0]
        ids = engine.runtime.tokenizers["moe"].encode("Hello")
        waiting = Req("g", "moe", ids, SamplingParams.from_dict({"regex": "x", "max_new_tokens": 10}))
        other = Req("o", "moe", ids, SamplingParams.from_dict({"max_new_tokens": 5, "ignore_eos": True}))
        sched.add_request(waiting)
        sched.add_request(other)
        while not other.finished:
            sched.step()
        assert not waiting.output_ids and waiting in sched.waiting  # still compiling, others ran
        fake.futures[0].set_result(_OnlyToken(42, eos))
        while not waiting.finished:
            sched.step()
        assert waiting.output_ids == [42, eos] and waiting.finish_reason["type"] == "stop"
    finally:
        sched.grammar_compiler = real
