"""The core's ReqOutputs as SGLang's BatchTokenIDOutput (managers/token_id_output.py), through SGLang's
DetokenizerManager and read back per request (batch_str_rows.py, a reader of its BatchStrOutput):
logprobs, counts and finish reasons survive, on both of SGLang's wire formats (pickle, msgpack)."""

from __future__ import annotations

import pickle

import pytest
from batch_str_rows import OutputDelta
from detok_helpers import detokenizer
from sglang.srt.managers.io_struct import BatchStrOutput, msgpack_decode, msgpack_encode
from transformers import AutoTokenizer

from crosspool_sgl.core.req import ReqOutput
from crosspool_sgl.managers.io_struct import (
    FlushCacheReqOutput,
    GetInternalStateReqOutput,
    MultiModelBatchTokenIDOutput,
)
from crosspool_sgl.managers.token_id_output import DetokenizeOptions, TokenIdOutputs, ends_in_stop_prefix


def _out(rid, ids, finished=False, reason=None, **kw) -> ReqOutput:
    return ReqOutput(
        rid, "m", ids, kw.pop("lps", []), kw.pop("tops", []), finished, reason, 4, len(ids), **kw
    )


@pytest.mark.parametrize("wire", ["pickle", "msgpack"])
def test_logprobs_and_counts_survive_the_round_trip(tiny_models, tmp_path, wire):
    path = str(tiny_models["llama"])
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode("the cat reads")
    lps = [(-0.5 - i, t) for i, t in enumerate(ids)]
    tops = [[(-0.1, t), (-2.0, 7)] for t in ids]
    inputs = [(None, 1), (-1.25, 2)]
    input_tops = [None, [(-1.25, 2), (-3.0, 9)]]
    first = _out(
        "a", ids[:1], lps=lps[:1], tops=tops[:1], input_logprobs=inputs, input_top_logprobs=input_tops
    )
    rest = _out("a", ids[1:], True, {"type": "length", "length": len(ids)}, lps=lps[1:], tops=tops[1:])
    rest.completion_tokens, rest.cached_tokens, rest.num_retractions = len(ids), 2, 1
    plain = _out("b", ids, True, {"type": "abort", "message": "x", "status_code": 500})
    conv = TokenIdOutputs({})
    deltas: dict[str, list[OutputDelta]] = {"a": [], "b": []}
    with detokenizer({"m": tok}, tmp_path, path) as manager:
        for step in ([first], [rest, plain]):
            (msg,) = conv.convert(step)
            msg = _wire(msg, wire)
            assert isinstance(msg, MultiModelBatchTokenIDOutput) and msg.model == "m"
            batch = _wire(manager.handle_batch_token_id_out(msg), wire)
            assert isinstance(batch, BatchStrOutput)
            for i, rid in enumerate(batch.rids):
                deltas[rid].append(OutputDelta.of(batch, i))
    a0, a1 = deltas["a"]
    assert a0.text + a1.text == "the cat reads"
    assert a0.token_ids + a1.token_ids == ids
    assert a0.logprobs + a1.logprobs == lps
    assert a0.top_logprobs + a1.top_logprobs == tops
    assert a0.input_logprobs == inputs and a0.input_top_logprobs == input_tops and a1.input_logprobs is None
    assert a0.finish_reason is None and a1.finish_reason == {"type": "length", "length": len(ids)}
    assert (a1.prompt_tokens, a1.completion_tokens, a1.cached_tokens, a1.num_retractions) == (
        4,
        len(ids),
        2,
        1,
    )
    (b,) = deltas["b"]
    assert b.finish_reason["status_code"] == 500 and b.logprobs == [] and b.input_logprobs is None


def _wire(obj, wire: str):
    """What the receiving process gets with SGLang's sock_send/sock_recv in that mode."""
    if wire == "pickle":
        return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return msgpack_decode(msgpack_encode(obj))


def test_control_replies_cross_both_wires():
    info = {"kv_pool": {"used_pages": {"m": 3}}, "num_steps": 7, "ratio": 0.5}
    for msg in (
        GetInternalStateReqOutput(rid="i", internal_state=info),
        FlushCacheReqOutput(rid="f", success=True),
    ):
        for wire in ("pickle", "msgpack"):
            assert _wire(msg, wire) == msg


def test_one_message_per_model_in_order_of_appearance():
    outs = [
        ReqOutput("x", "m1", [1], [], [], False, None, 1, 1),
        ReqOutput("y", "m2", [2], [], [], False, None, 1, 1),
        ReqOutput("z", "m1", [3], [], [], True, {"type": "length"}, 1, 1),
    ]
    msgs = TokenIdOutputs({}).convert(outs)
    assert [(m.model, m.rids) for m in msgs] == [("m1", ["x", "z"]), ("m2", ["y"])]
    assert msgs[0].finished_reasons == [None, {"type": "length"}]


def test_held_tokens_are_sent_with_the_next_output():
    """'wo' may begin the stop 'world': held; then 'rk' shows it does not, and both go out together."""
    vocab = {1: "hello ", 2: "wo", 3: "rk", 4: "s"}
    conv = TokenIdOutputs({"m": lambda ids: "".join(vocab[i] for i in ids)})
    conv.add("r", DetokenizeOptions(stop=("world",)))
    sent = [
        conv.convert([ReqOutput("r", "m", [t], [(-1.0, t)], [], False, None, 1, k + 1)])
        for k, t in enumerate([1, 2, 3])
    ]
    assert [[list(m.decode_ids[0]) for m in step] for step in sent] == [[[1]], [], [[2, 3]]]
    assert sent[2][0].output_token_logprobs_idx == [[2, 3]] and sent[2][0].completion_tokens == [3]
    (last,) = conv.convert([ReqOutput("r", "m", [4], [], [], True, {"type": "length"}, 1, 4)])
    assert list(last.decode_ids[0]) == [4] and "r" not in conv.streams


@pytest.mark.parametrize(
    ("text", "held"),
    [
        ("say wor", True),
        ("say world", True),
        ("say w", True),
        ("say ok", False),
        ("say wo\ufffd", True),
        ("", False),
    ],
)
def test_stop_prefix_check(text, held):
    assert ends_in_stop_prefix(text, ("world", "zz")) is held


def test_outputs_are_grouped_by_destination_and_carry_it():
    """Each message names one `http_worker_ipc` (the manager that sent its requests), so SGLang's
    detokenizer fan-out forwards it whole (tests/managers/test_detokenizer_manager.py)."""
    outputs = TokenIdOutputs({})
    for rid, dest in (("a", "ipc://one"), ("b", None), ("c", "ipc://one"), ("d", "ipc://two")):
        outputs.add(rid, DetokenizeOptions(), dest)
    msgs = outputs.convert([_out(rid, [5]) for rid in "abcd"])
    assert [(m.rids, m.http_worker_ipcs) for m in msgs] == [
        (["a", "c"], ["ipc://one"] * 2),
        (["b"], [None]),
        (["d"], ["ipc://two"]),
    ]
