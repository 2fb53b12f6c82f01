"""SGLang's DetokenizerManager with a tokenizer per model (managers/detokenizer_process.py), fed by the
scheduler-side conversion (managers/token_id_output.py): the streamed text adds up to
`tokenizer.decode(all ids)` on byte-level and SentencePiece-like tokenizers, with the stop trimmed, and
decoding a token costs the same at the end of a long output as at the start."""

from __future__ import annotations

import pytest
from detok_helpers import CountingTokenizer, detokenizer, spm_tokenizer, stream
from transformers import AutoTokenizer

from crosspool_sgl.core.req import ReqOutput
from crosspool_sgl.managers.io_struct import FlushCacheReqOutput, GetInternalStateReqOutput
from crosspool_sgl.managers.token_id_output import DetokenizeOptions, TokenIdOutputs

TRICKY = "hello naïve café — 価格 😀 the cat reads a book again ok 🐈‍⬛ é"


@pytest.fixture(scope="module")
def tokenizers(tiny_models) -> dict:
    """The demo models' byte-level BPE and a Llama-style byte-fallback tokenizer."""
    return {"demo": AutoTokenizer.from_pretrained(str(tiny_models["llama"])), "spm": spm_tokenizer()}


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return str(tiny_models["llama"])


@pytest.fixture
def manager(tokenizers, tmp_path, model_path):
    with detokenizer(tokenizers, tmp_path, model_path) as m:
        yield m


def special_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens]


@pytest.mark.parametrize("model", ["demo", "spm"])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_text_is_the_decoded_ids(manager, tokenizers, model, step):
    tok = tokenizers[model]
    ids = tok.encode(TRICKY, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # multi-byte characters do split across tokens
    deltas = stream(manager, model, ids, step)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # an incomplete character is never sent
    assert not manager.decode_status  # a finished request leaves no state behind


@pytest.mark.parametrize("model", ["demo", "spm"])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens_skipped_or_kept(manager, tokenizers, model, skip, spaces):
    tok = tokenizers[model]
    a, b = tok.encode("hello wor", add_special_tokens=False), tok.encode("ld é ok", add_special_tokens=False)
    ids = a + special_ids(tok) + b
    opts = DetokenizeOptions(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    text = "".join(stream(manager, model, ids, options=opts))
    assert text == tok.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    assert any(t in text for t in tok.all_special_tokens) != skip


@pytest.mark.parametrize("model", ["demo", "spm"])
@pytest.mark.parametrize("no_stop_trim", [False, True])
@pytest.mark.parametrize("stop", ["wor", "ok 😀", "é"])
def test_stop_string_is_trimmed_and_never_streamed(manager, tokenizers, model, stop, no_stop_trim):
    """The core finishes at the token whose text completes the stop; what was streamed before must not
    hold any of it (the scheduler side holds such tokens back), so the deltas add up to the result."""
    tok = tokenizers[model]
    full = tok.encode("hello world é ok 😀 again ok 😀", add_special_tokens=False)
    n = next(k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k]))  # where the core stops
    ids = full[:n]
    decoded = tok.decode(ids)
    cut = decoded.index(stop) + (len(stop) if no_stop_trim else 0)

    def tail(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=False)

    opts = DetokenizeOptions(no_stop_trim=no_stop_trim, stop=(stop, "never-seen"))
    deltas = stream(
        manager, model, ids, options=opts, finish_reason={"type": "stop", "matched": stop}, tail_decoder=tail
    )
    assert "".join(deltas) == decoded[:cut]


@pytest.mark.parametrize("model", ["demo", "spm"])
@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_token_is_trimmed_as_sglang_does(manager, tokenizers, model, no_stop_trim):
    tok = tokenizers[model]
    ids = tok.encode("the cat é", add_special_tokens=False) + [tok.eos_token_id]
    opts = DetokenizeOptions(skip_special_tokens=False, no_stop_trim=no_stop_trim)
    reason = {"type": "stop", "matched": tok.eos_token_id}
    text = "".join(stream(manager, model, ids, options=opts, finish_reason=reason))
    assert text == tok.decode(ids if no_stop_trim else ids[:-1], skip_special_tokens=False)


def test_each_model_is_decoded_with_its_own_tokenizer(manager, tokenizers):
    """Two models' rows in one step: one message per model, each decoded by that model's tokenizer."""
    ids = {m: tokenizers[m].encode("the cat reads", add_special_tokens=False) for m in ("demo", "spm")}
    conv = TokenIdOutputs({})
    outs = [ReqOutput(f"r-{m}", m, ids[m], [], [], True, {"type": "length"}, 1, len(ids[m])) for m in ids]
    msgs = conv.convert(outs)
    assert [m.model for m in msgs] == ["demo", "spm"]
    texts = {b.rids[0]: b.output_strs[0] for b in map(manager.handle_batch_token_id_out, msgs)}
    assert texts == {"r-demo": "the cat reads", "r-spm": "the cat reads"}
    assert ids["demo"] != ids["spm"]


def test_control_replies_pass_through(manager):
    for msg in (
        FlushCacheReqOutput(rid="f", success=True),
        GetInternalStateReqOutput(rid="i", internal_state={"a": 1}),
    ):
        assert manager._request_dispatcher(msg) is msg


def test_a_batch_that_cannot_be_decoded_fails_its_requests_only(manager, tokenizers, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(tokenizers["spm"], "batch_decode", broken)
    outputs = TokenIdOutputs({})
    outputs.add("x", DetokenizeOptions(), "ipc://spm-front")
    (msg,) = outputs.convert([ReqOutput("x", "spm", [5], [], [], False, None, 1, 1)])
    out = manager.handle_batch_token_id_out(msg)
    assert out.finished_reasons[0]["status_code"] == 500 and "injected" in out.finished_reasons[0]["message"]
    assert out.http_worker_ipcs == ["ipc://spm-front"]  # the 500 goes back to the model's manager
    assert "x" not in manager.decode_status
    assert "".join(stream(manager, "demo", [5, 6, 7])) == tokenizers["demo"].decode([5, 6, 7])  # others go on


def decoded_per_token(tokenizers, tmp_path, model_path, model: str, n: int) -> float:
    """Token ids handed to the tokenizer per output token, streaming n tokens one per step."""
    tok = CountingTokenizer(tokenizers[model])
    words = tokenizers[model].encode(" the cat reads a book again and ok", add_special_tokens=False)
    ids = (words * (n // len(words) + 1))[:n]
    with detokenizer({model: tok}, tmp_path / str(n), model_path) as m:
        text = "".join(stream(m, model, ids))
    assert text == tokenizers[model].decode(ids)
    return tok.decoded_ids / n


@pytest.mark.parametrize("model", ["demo", "spm"])
def test_cost_per_token_does_not_grow_with_output_length(tokenizers, tmp_path, model_path, model):
    """Re-decoding the whole output every step (the old detokenizer) hands it ~n/2 ids per token: 32 at
    64 tokens, 512 at 1024. SGLang's window decodes the last step's tokens and the new ones."""
    (tmp_path / "64").mkdir()
    (tmp_path / "1024").mkdir()
    short, long = (
        decoded_per_token(tokenizers, tmp_path, model_path, model, 64),
        decoded_per_token(tokenizers, tmp_path, model_path, model, 1024),
    )
    assert long <= 1.1 * short and long < 8, (short, long)


def test_each_output_goes_whole_to_the_manager_that_sent_its_requests(manager, tokenizers):
    """The process runs SGLang's `multi_http_worker_event_loop` (no default tokenizer socket): it
    routes by the message's `http_worker_ipcs` and, one destination per message, sends the output
    whole, not one message per request (what it falls back to when an output cannot be split)."""
    from sglang.srt.managers.multi_tokenizer_mixin import _split_batch_by_key

    assert not hasattr(manager, "send_to_tokenizer")
    outputs = TokenIdOutputs({})
    for rid in ("a", "b", "c"):
        outputs.add(rid, DetokenizeOptions(), "ipc://demo-front")
    ids = tokenizers["demo"].encode("hello there", add_special_tokens=False)
    (msg,) = outputs.convert([ReqOutput(r, "demo", ids, [], [], False, None, 3, len(ids)) for r in "abc"])
    out = manager.handle_batch_token_id_out(msg)
    [(dest, whole)] = _split_batch_by_key(out, msg.http_worker_ipcs)
    assert dest == "ipc://demo-front" and whole.rids == ["a", "b", "c"]
    assert whole.output_strs == out.output_strs == [tokenizers["demo"].decode(ids)] * 3
