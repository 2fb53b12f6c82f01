"""The tokenizer -> scheduler wire is SGLang's: a checked request becomes SGLang's
`TokenizedGenerateReqInput` (its `SamplingParams`, normalised as SGLang's TokenizerManager sends it,
plus the model), crosses either SGLang wire format, and the scheduler side turns it back into the
same parsed parameters; what the core does not serve is refused, not ignored."""

from __future__ import annotations

import pickle

import pytest
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput, msgpack_decode, msgpack_encode
from transformers import AutoTokenizer

from crosspool_sgl.managers.errors import RequestError
from crosspool_sgl.managers.io_struct import (
    AbortReq,
    FlushCacheReqInput,
    GetInternalStateReq,
    MultiModelTokenizedGenerateReqInput,
    SamplingParams,
    with_unset_fields,
)
from crosspool_sgl.managers.scheduler_process import core_request
from crosspool_sgl.managers.tokenizer_manager import GenerateInput
from crosspool_sgl.managers.validation import check_request, tokenized_request
from crosspool_sgl.sampling_params import InvalidRequestError

PARAMS = [
    {"temperature": 0, "max_new_tokens": 5},
    {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 2**64 - 1},
    {"stop": ["\n\n", "END"], "stop_token_ids": [1, 3], "ignore_eos": True, "no_stop_trim": True},
    {"frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.2, "min_new_tokens": 2},
    {"logit_bias": {"7": 2.5, "11": -100}, "skip_special_tokens": False},
    {"json_schema": {"type": "object"}, "spaces_between_special_tokens": False},
    {"regex": "[ab]+", "max_new_tokens": 0},
    {"ebnf": 'root ::= "x"'},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["llama"]))


def _wire(obj, wire: str):
    """What the scheduler gets with SGLang's sock_send/sock_recv in that mode."""
    if wire == "pickle":
        return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return msgpack_decode(msgpack_encode(obj))


def _request(tokenizer, sampling: dict, **kw) -> tuple[GenerateInput, MultiModelTokenizedGenerateReqInput]:
    obj = GenerateInput(model="llama", text="hi there", sampling_params=sampling, rid="r1", **kw)
    params = check_request(obj, 512)
    ids = tokenizer.encode(obj.text)
    return obj, tokenized_request(obj, ids, params, tokenizer)


@pytest.mark.parametrize("sampling", PARAMS)
@pytest.mark.parametrize("wire", ["pickle", "msgpack"])
def test_sampling_params_survive_sglang_struct_and_wire(tokenizer, sampling, wire):
    obj, msg = _request(tokenizer, dict(sampling), stream=True)
    assert isinstance(msg.sampling_params, SamplingParams) and msg.sampling_params.is_normalized
    got = _wire(msg, wire)
    assert type(got) is MultiModelTokenizedGenerateReqInput and got.model == "llama" and got.stream
    req = core_request(got, "other")
    expected = check_request(obj, 512)
    assert req.params == expected
    assert (req.rid, req.model, list(req.input_ids)) == ("r1", "llama", tokenizer.encode("hi there"))


def test_greedy_is_spelled_as_sglang_spells_it(tokenizer):
    _, msg = _request(tokenizer, {"temperature": 0, "stop": "x"})
    sp = msg.sampling_params
    assert (sp.temperature, sp.top_k, sp.stop_strs, sp.stop) == (1.0, 1, ["x"], None)
    assert core_request(msg, "llama").params.greedy


def test_logprob_start_defaults_to_the_last_prompt_position(tokenizer):
    _, msg = _request(tokenizer, {}, return_logprob=True, top_logprobs_num=2)
    assert msg.logprob_start_len == len(msg.input_ids) - 1 and msg.top_logprobs_num == 2


def test_more_stop_strings_than_sglang_allows_is_a_400(tokenizer):
    with pytest.raises(RequestError) as e:
        _request(tokenizer, {"stop": [f"s{i}" for i in range(33)]})
    assert e.value.status_code == 400


def _plain(**fields) -> TokenizedGenerateReqInput:
    base = {
        "rid": "p",
        "input_ids": [5, 6],
        "sampling_params": SamplingParams(max_new_tokens=3),
        "return_logprob": False,
        "logprob_start_len": -1,
        "top_logprobs_num": 0,
        "stream": False,
    }
    return with_unset_fields(TokenizedGenerateReqInput, **{**base, **fields})


def test_sglang_request_without_a_model_is_for_the_default_model():
    req = core_request(_plain(), "first")
    assert (req.model, req.params.max_new_tokens, req.params.top_k) == ("first", 3, -1)


def test_one_of_n_samples_is_one_request():
    """SGLang's TokenizerManager sends each of n samples alone with `n` as given; its scheduler
    ignores `n`, so must we (the old tokenizer side drops it before sending)."""
    req = core_request(_plain(sampling_params=SamplingParams(n=2, max_new_tokens=3)), "first")
    assert (req.rid, req.params.max_new_tokens) == ("p", 3)


@pytest.mark.parametrize(
    "fields",
    [
        {"lora_id": "adapter"},
        {"session_id": "s"},
        {"input_embeds": [[0.0]]},
        {"custom_logit_processor": "x"},
        {"token_ids_logprob": [1]},
        {"return_hidden_states": True},
        {"sampling_params": SamplingParams(stop_regex="a+")},
        {"sampling_params": SamplingParams(custom_params={"k": 1})},
        {"sampling_params": {"max_new_tokens": 3}},
    ],
)
def test_what_the_core_does_not_serve_is_refused(fields):
    with pytest.raises(InvalidRequestError):
        core_request(_plain(**fields), "first")


@pytest.mark.parametrize("wire", ["pickle", "msgpack"])
def test_control_messages_are_sglangs_and_cross_both_wires(wire):
    for msg in (AbortReq(rid="a"), FlushCacheReqInput(rid="f"), GetInternalStateReq(rid="i")):
        assert _wire(msg, wire) == msg
