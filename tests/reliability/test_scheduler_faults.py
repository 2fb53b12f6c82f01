"""The scheduler process treats an exception while admitting or running a request as that request's
error: it answers it, frees its pages and keeps serving the others (it used to end the process)."""

from __future__ import annotations

import pytest

from crosspool_sgl.managers.io_struct import (
    BatchTokenIDOutput,
    MultiModelBatchTokenIDOutput,
    MultiModelTokenizedGenerateReqInput,
    SamplingParams,
    with_unset_fields,
)
from crosspool_sgl.managers.scheduler_process import SchedulerServer
from crosspool_sgl.runtime import build_runtime
from crosspool_sgl.server_args import EngineArgs, KVPoolArgs, ModelSpec


class _FakeSender:
    def __init__(self) -> None:
        self.sent: list = []

    def send_pyobj(self, obj, **kwargs) -> None:  # SGLang's sock_send (pickle, its default)
        self.sent.append(obj)

    def finals(self) -> dict[str, dict]:
        """rid -> finish reason of every finished row the scheduler sent (SGLang's BatchTokenIDOutput)."""
        out = {}
        for b in self.sent:
            if isinstance(b, BatchTokenIDOutput):
                assert isinstance(b, MultiModelBatchTokenIDOutput) and len(b.rids) == len(b.finished_reasons)
                out.update({r: f for r, f in zip(b.rids, b.finished_reasons, strict=True) if f is not None})
        return out


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    args = EngineArgs(
        models=(ModelSpec("llama", str(tiny_models["llama"])), ModelSpec("mix", str(tiny_models["mixtral"]))),
        kv_pool=KVPoolArgs(total_bytes=16 << 20),
        show_progress=False,
    )
    d = tmp_path_factory.mktemp("ipc")
    srv = SchedulerServer(build_runtime(args), f"ipc://{d}/in", f"ipc://{d}/out")
    yield srv
    srv.context.destroy(linger=0)


def msg(
    rid: str, model: str = "llama", ids=(5, 6, 7), sp=None, **params
) -> MultiModelTokenizedGenerateReqInput:
    """SGLang's request as a sender that skipped our validation could send it (nothing checked)."""
    if sp is None:
        sp = SamplingParams(**{"max_new_tokens": 4, "temperature": 0, **params})
    return with_unset_fields(
        MultiModelTokenizedGenerateReqInput,
        rid=rid,
        model=model,
        input_ids=list(ids),
        sampling_params=sp,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        stream=False,
    )


def run_until_idle(srv: SchedulerServer, limit: int = 200) -> None:
    for _ in range(limit):
        if not srv.scheduler.has_work():
            return
        srv.send_outputs(srv.safe_step())
    raise AssertionError("scheduler did not go idle")


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (
            msg("seed-abc", sampling_seed="abc"),
            400,
        ),  # the tokenizer side validates; the scheduler must not trust it
        (msg("seed-huge", sampling_seed=2**70), 400),
        (msg("top-k-float", top_k=2.5, temperature=0.7), 400),  # greedy would set SGLang's top_k to 1
        (msg("ids-str", ids=("a", "b")), 400),
        (msg("unknown-model", model="ghost"), 400),
        (msg("params-list", ids=[5], sp=[1, 2]), 400),
    ],
)
def test_bad_admission_fails_that_request_only(server, bad, status):
    server.sender = _FakeSender()
    server.handle(msg("good"))
    server.handle(bad)
    run_until_idle(server)
    finals = server.sender.finals()
    assert finals[bad.rid].get("status_code") == status, finals
    assert finals["good"]["type"] == "length"
    assert server.scheduler.request_pages() == 0


def test_unexpected_admission_error_is_a_500_for_that_request(server, monkeypatch):
    server.sender = _FakeSender()
    real_add = server.scheduler.add_request

    def add(req):
        if req.rid == "boom":
            raise RuntimeError("injected")
        real_add(req)

    monkeypatch.setattr(server.scheduler, "add_request", add)
    server.handle(msg("boom"))
    server.handle(msg("fine"))
    run_until_idle(server)
    finals = server.sender.finals()
    assert finals["boom"]["status_code"] == 500 and "injected" in finals["boom"]["message"]
    assert finals["fine"]["type"] == "length"


def test_exception_inside_a_step_fails_its_batch_and_the_loop_goes_on(server, monkeypatch):
    server.sender = _FakeSender()
    real_run = server.scheduler.runner.run
    failed: list[str] = []

    def flaky(items):
        # the first step where "a" decodes (pages held); which other requests share that step
        # depends on the step cost model's budget, so the test records them instead of assuming
        if not failed and any(req.rid == "a" and n == 1 for req, n in items):
            failed.extend(req.rid for req, _ in items)
            raise RuntimeError("injected fault")
        return real_run(items)

    monkeypatch.setattr(server.scheduler.runner, "run", flaky)
    server.handle(msg("a"))
    server.handle(msg("b", model="mix"))
    run_until_idle(server)
    finals = server.sender.finals()
    assert "a" in failed
    for rid in ("a", "b"):
        if rid in failed:
            assert finals[rid]["status_code"] == 500 and "injected fault" in finals[rid]["message"]
        else:
            assert finals[rid]["type"] == "length"
    assert server.scheduler.request_pages() == 0
    server.handle(msg("after"))  # the loop serves on
    run_until_idle(server)
    assert server.sender.finals()["after"]["type"] == "length"


def test_exception_during_admission_fails_the_waiting_requests(server, monkeypatch):
    server.sender = _FakeSender()

    def broken(*a, **k):
        raise ValueError("policy bug")

    monkeypatch.setattr(server.scheduler.policy, "next_batch", broken)
    server.handle(msg("w"))
    server.send_outputs(server.safe_step())
    assert server.sender.finals()["w"]["status_code"] == 500
    assert not server.scheduler.has_work()


def test_unknown_message_is_dropped(server):
    server.handle(object())  # logged, not raised
