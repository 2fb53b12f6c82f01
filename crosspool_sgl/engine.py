"""The offline Engine: like `sglang.Engine`, plus a `model=` argument and many models at once.

    eng = Engine(models={"a": "/path/a", "b": "/path/b"}, device="cpu")
    eng.generate(prompt=["hi", "yo"], model=["a", "b"], sampling_params={"temperature": 0})
    eng.shutdown()

Requests of every model go through one MultiModelScheduler in this process, so
calls batch across models exactly as the server does.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from crosspool_sgl.core.req import Req, ReqOutput
from crosspool_sgl.mem.residency_manager import models_with_requests
from crosspool_sgl.result_format import LogprobLists, format_result, ids_to_decode, trim_stop
from crosspool_sgl.runtime import Runtime, build_runtime
from crosspool_sgl.sampling_params import InvalidRequestError, SamplingParams
from crosspool_sgl.server_args import (
    EngineArgs,
    GrammarArgs,
    KVPoolArgs,
    ModelSpec,
    SchedulerArgs,
    StaticDecodeArgs,
    WeightPoolArgs,
)


class Engine:
    def __init__(
        self,
        models: dict[str, str | dict],
        device: str = "cpu",
        dtype: str = "auto",
        kv_pool_bytes: int | None = None,
        page_tokens: int = 16,
        kv_chunk_bytes: int | None = None,
        attention_backend: str = "auto",
        max_running_requests: int = 64,
        chunked_prefill_size: int = 1024,
        kv_partition: str = "shared",
        prefix_cache: bool = True,
        max_resident_bytes: int | None = None,
        keep_alive_s: float | None = None,
        page_in_bytes_per_step: int | None = 64 << 20,
        show_progress: bool = True,
        prefill_lane: bool | None = None,
        grammar: GrammarArgs | None = None,
        static_decode: str | StaticDecodeArgs = "auto",
    ) -> None:
        """`models` maps a name to an HF directory, or to a dict of ModelSpec fields
        (path, kv_floor_bytes, kv_ceiling_bytes, ttft_ms, tbt_ms, keep_alive_s)."""
        if not models:
            raise ValueError("Engine needs at least one model: models={'name': '/path/to/hf_dir'}")
        self.args = EngineArgs(
            models=tuple(_model_spec(n, v) for n, v in models.items()),
            device=device,
            dtype=dtype,
            attention_backend=attention_backend,
            kv_pool=KVPoolArgs(kv_pool_bytes, page_tokens, kv_chunk_bytes, kv_partition, prefix_cache),
            scheduler=SchedulerArgs(max_running_requests, chunked_prefill_size, prefill_lane=prefill_lane),
            weight_pool=WeightPoolArgs(max_resident_bytes, keep_alive_s, page_in_bytes_per_step),
            show_progress=show_progress,
            grammar=grammar or GrammarArgs(),
            static_decode=static_decode
            if isinstance(static_decode, StaticDecodeArgs)
            else StaticDecodeArgs(mode=static_decode),
        )
        self.runtime: Runtime = build_runtime(self.args)
        self.scheduler = self.runtime.scheduler
        self.default_model = self.args.models[0].name
        self._rid = itertools.count()

    # ---- public API -----------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        model: str | list[str] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] = 0,
        return_text_in_logprobs: bool = False,
    ) -> dict | list[dict]:
        """Run to completion; a single prompt gives a dict, a batch a list of dicts. As SGLang's
        Engine, logprob entries are [logprob, token id, its text or None (`return_text_in_logprobs`)]."""
        single = isinstance(prompt, str) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        if prompt is None and input_ids is None:
            raise InvalidRequestError("either prompt or input_ids is required")
        batch = _as_list(prompt if prompt is not None else input_ids, single)
        n = len(batch)
        fields = {
            "sampling_params": _broadcast(sampling_params, n, single),
            "model": _broadcast(model, n, single),
            "return_logprob": _broadcast(return_logprob, n, single),
            "logprob_start_len": _broadcast(logprob_start_len, n, single),
            "top_logprobs_num": _broadcast(top_logprobs_num, n, single),
        }
        reqs = [
            self._make_req(batch[i], prompt is not None, **{k: v[i] for k, v in fields.items()})
            for i in range(n)
        ]
        for r in reqs:
            self.scheduler.add_request(r)
        results = self._run_until_done(reqs, return_text_in_logprobs)
        return results[0] if single else results

    def shutdown(self) -> None:
        for req in list(self.scheduler.waiting) + list(self.scheduler.running):
            self.scheduler.abort(req.rid)
        self.scheduler.close()

    def poll_residency(self) -> set[str]:
        """Between steps: expire keep-alives, evict/page in experts; returns the models ready to run."""
        sched = self.scheduler
        return self.runtime.residency.poll(models_with_requests(sched.running, sched.waiting))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_server_info(self) -> dict[str, Any]:
        snap = self.runtime.kv_pool.snapshot()
        return {
            "models": list(self.runtime.models),
            "kv_pool": {
                "total_bytes": snap.total_bytes,
                "free_bytes": snap.free_bytes,
                "used_pages": snap.used_pages,
                "used_bytes": snap.used_bytes,
            },
            "weight_pool": {
                "used_bytes": self.runtime.weight_pool.used_bytes,
                "model_bytes": dict(self.runtime.weight_pool.model_bytes),
                **self.runtime.residency.snapshot(),
            },
        }

    # ---- internals ------------------------------------------------------------------------
    def _make_req(
        self, item, is_text, sampling_params, model, return_logprob, logprob_start_len, top_logprobs_num
    ):
        model = model or self.default_model
        if model not in self.runtime.tokenizers:
            raise InvalidRequestError(
                f"model {model!r} is not hosted (hosted: {', '.join(self.runtime.models)})"
            )
        ids = self.runtime.tokenizers[model].encode(item) if is_text else list(item)
        if logprob_start_len is None:  # SGLang's default: output logprobs only
            logprob_start_len = -1
        return Req(
            rid=f"engine-{next(self._rid)}",
            model=model,
            input_ids=ids,
            params=SamplingParams.from_dict(sampling_params),
            return_logprob=bool(return_logprob),
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num or 0,
        )

    def _run_until_done(self, reqs: list[Req], logprob_texts: bool = False) -> list[dict]:
        start = time.monotonic()
        pending = {r.rid for r in reqs}
        while pending:
            outputs: list[ReqOutput] = self.scheduler.step()
            pending -= {o.rid for o in outputs if o.finished}
        return [self._result(r, time.monotonic() - start, logprob_texts) for r in reqs]

    def _result(self, req: Req, latency: float, logprob_texts: bool = False) -> dict:
        tok = self.runtime.tokenizers[req.model]
        ids = req.output_ids
        shown = ids_to_decode(ids, req.finish_reason, req.params.no_stop_trim)
        text = tok.decode(shown, skip_special_tokens=req.params.skip_special_tokens)
        meta = {
            "id": req.rid,
            "model": req.model,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(ids),
            "finish_reason": req.finish_reason,
            "num_retractions": req.num_retractions,
            "cached_tokens": req.cached_tokens,
            "e2e_latency": latency,
        }
        logprobs = None
        if req.return_logprob:
            tops = req.top_logprobs_num > 0
            logprobs = LogprobLists(
                req.output_logprobs,
                req.input_logprobs,
                req.output_top_logprobs if tops else None,
                req.input_top_logprobs if tops else None,
            )
        text = trim_stop(text, req.finish_reason, req.params.no_stop_trim)
        decode = (lambda t: tok.decode([t])) if logprob_texts else None  # as SGLang: each id alone
        return format_result(text, ids, meta, logprobs, decode)


def _model_spec(name: str, value: str | dict) -> ModelSpec:
    if isinstance(value, dict):
        return ModelSpec(name, str(value["path"]), **{k: v for k, v in value.items() if k != "path"})
    return ModelSpec(name, str(value))


def _as_list(x, single: bool) -> list:
    return [x] if single else list(x)


def _broadcast(x, n: int, single: bool) -> list:
    if isinstance(x, list) and not single:
        if len(x) != n:
            raise InvalidRequestError(f"expected {n} values, got {len(x)}")
        return x
    return [x] * n
