"""Overload: beyond --max-pending-requests the tokenizer side answers 429 without sending anything."""

from __future__ import annotations

import pytest

from crosspool_sgl.managers.tokenizer_manager import (
    GenerateInput,
    ModelInfo,
    MultiModelTokenizerManager,
    RequestError,
)


class _FakeSender:
    def __init__(self) -> None:
        self.sent: list = []

    def send_pyobj(self, obj) -> None:
        self.sent.append(obj)


def test_requests_beyond_the_limit_get_429(tiny_models):
    from transformers import AutoTokenizer

    path = str(tiny_models["llama"])
    info = ModelInfo("llama", path, context_len=4096, vocab_size=512, architecture="LlamaForCausalLM")
    tm = MultiModelTokenizerManager(
        {"llama": info},
        {"llama": AutoTokenizer.from_pretrained(path)},
        "ipc://unused",
        "ipc://unused",
        max_pending_requests=3,
    )
    tm.sender = _FakeSender()
    for i in range(3):
        tm.submit(GenerateInput(model="llama", text=f"hello {i}", sampling_params={"max_new_tokens": 4}))
    with pytest.raises(RequestError) as err:
        tm.submit(GenerateInput(model="llama", text="one too many"))
    assert err.value.status_code == 429 and "overloaded" in err.value.message
    assert len(tm.sender.sent) == 3  # the rejected request never reached the scheduler
    tm.rid_to_state.pop(next(iter(tm.rid_to_state)))  # one finishes: room again
    tm.submit(GenerateInput(model="llama", text="now it fits"))
    assert len(tm.sender.sent) == 4
