"""The detokenizer process: SGLang's `DetokenizerManager`, holding one tokenizer per model.

SGLang's manager does the work: incremental detokenisation with read/surrogate offsets
(`DecodeStatus`, a window of the last step's tokens, so the cost per token does not grow with the
output), held-back incomplete UTF-8, stop-string and stop-token trimming, and its event loop.
The subclass overrides only what several models need:
- `init_tokenizer`: a `{model: tokenizer}` map instead of one tokenizer from the ServerArgs;
- `handle_batch_token_id_out`: picks the tokenizer of the message's model (the scheduler sends one
  `MultiModelBatchTokenIDOutput` per model per step), and fails that message's requests with a 500
  instead of ending the process when decoding raises;
- `init_request_dispatcher`: control replies (`FlushCacheReqOutput`, `GetInternalStateReqOutput`)
  pass through to the tokenizer side unchanged.

Outputs go back by SGLang's multi-HTTP-worker machinery: the published config has
`tokenizer_worker_num > 1`, so the manager opens no default tokenizer socket and its
`multi_http_worker_event_loop` sends each output to the `http_worker_ipc` its message names (each
model's `ModelTokenizerManager` binds its own address and stamps it on what it sends; the
scheduler sends one message per model and destination per step, so a message is never split).

Its constructor needs a published SGLang config (role "detokenizer", model-independent serving
flags) and a `PortArgs`, of which only the scheduler-side socket name is read: we build one with it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from array import array
from typing import Any

from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.io_struct import BatchStrOutput
from sglang.srt.server_args import PortArgs, ServerArgs

from crosspool_sgl.managers.io_struct import MultiModelBatchTokenIDOutput, with_unset_fields
from crosspool_sgl.managers.process_liveness import LauncherWatch

logger = logging.getLogger(__name__)


class MultiModelDetokenizerManager(DetokenizerManager):
    """SGLang's detokenizer with a tokenizer per hosted model."""

    def __init__(self, server_args: ServerArgs, port_args: PortArgs, tokenizers: dict[str, Any]) -> None:
        self.tokenizers = tokenizers
        self.vocab_sizes = {name: _vocab_size(tok) for name, tok in tokenizers.items()}
        super().__init__(server_args, port_args)

    def init_tokenizer(self, server_args: ServerArgs) -> None:
        # `self.tokenizer` is the current message's model's (see handle_batch_token_id_out); the first
        # model's until then, for init_running_status (tool-call close tokens: none, no parser is set).
        self.use_model(next(iter(self.tokenizers)))

    def init_request_dispatcher(self) -> None:
        super().init_request_dispatcher()
        self._request_dispatcher.add_fallback_fn(lambda msg: msg)  # control replies: forward as they are

    def use_model(self, model: str) -> None:
        self.tokenizer = self.tokenizers[model]
        self.vocab_size = self.vocab_sizes[model]

    def handle_batch_token_id_out(self, recv_obj: MultiModelBatchTokenIDOutput) -> BatchStrOutput:
        try:
            self.use_model(recv_obj.model)
            return super().handle_batch_token_id_out(recv_obj)
        except Exception as e:  # one model's bad batch must not end the process every model depends on
            logger.exception(
                "detokenizing %d requests of %s failed", len(recv_obj.rids or []), recv_obj.model
            )
            return self.failed_batch(recv_obj, f"detokenization failed: {type(e).__name__}: {e}")

    def failed_batch(self, recv_obj: MultiModelBatchTokenIDOutput, message: str) -> BatchStrOutput:
        """Finish every request of the message with a 500 (their decode states are dropped)."""
        rids = list(recv_obj.rids or [])
        for rid in rids:
            self.decode_status.pop(rid, None)
        n = len(rids)
        reason = {"type": "abort", "message": message, "status_code": 500}
        return with_unset_fields(
            BatchStrOutput,
            rids=rids,
            http_worker_ipcs=list(recv_obj.http_worker_ipcs or [None] * n),
            finished_reasons=[dict(reason) for _ in rids],
            output_strs=[""] * n,
            output_ids=[array("q") for _ in rids],
            prompt_tokens=list(recv_obj.prompt_tokens),
            completion_tokens=[0] * n,
            reasoning_tokens=[0] * n,
            cached_tokens=list(recv_obj.cached_tokens),
        )


def _vocab_size(tokenizer: Any) -> int | None:
    """As SGLang's init_tokenizer: ids at or beyond it are clamped before decoding."""
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def detokenizer_server_args(model_paths: dict[str, str]) -> ServerArgs:
    """The SGLang config the manager reads (serving flags only): SGLang's defaults, first model's path,
    and its multi-HTTP-worker mode (one tokenizer manager per model, each with its own address)."""
    return ServerArgs(model_path=next(iter(model_paths.values())), device="cpu", tokenizer_worker_num=2)


def detokenizer_port_args(recv_addr: str) -> PortArgs:
    """The manager binds `detokenizer_ipc_name` (from the scheduler); outputs go to each message's
    `http_worker_ipc`, so there is no tokenizer socket to name."""
    return PortArgs(
        tokenizer_ipc_name="",
        scheduler_input_ipc_name="",
        detokenizer_ipc_name=recv_addr,
        nccl_port=0,
        rpc_ipc_name="",
        metrics_ipc_name="",
        tokenizer_worker_ipc_name=None,
        decoupled_spec_ipc_config=None,
    )


def exit_with_launcher() -> None:
    """Exit when the launcher does. prctl's parent-death signal (SGLang's `kill_itself_when_parent_died`)
    follows the OS parent, which is the fork server when the children are forked from one
    (entrypoints/children.py): watch the launcher itself, by pid (managers/process_liveness.py)."""
    launcher = LauncherWatch()
    if launcher.pid is None:
        return

    def watch() -> None:
        while launcher.alive():
            time.sleep(launcher.period_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def run_detokenizer_process(
    model_paths: dict[str, str],
    recv_addr: str,
    pipe_writer: Any,
    log_level: str = "info",
) -> None:
    """Process entry (top level for `spawn`): recv from the scheduler, send to each tokenizer manager.

    Like SGLang's `run_detokenizer_process`: publish the config, build the manager, run its loop,
    and die with the parent (prctl). SIGINT is the launcher's (it drains first); SIGTERM ends us."""
    logging.basicConfig(level=log_level.upper(), format="[detokenizer] %(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from sglang.srt.runtime_context import publish
    from sglang.srt.utils import kill_itself_when_parent_died
    from transformers import AutoTokenizer

    launcher = mp.parent_process()
    if launcher is None or os.getppid() == launcher.pid:
        kill_itself_when_parent_died()  # the OS parent is the launcher (spawned, not forked by a server)
    exit_with_launcher()
    try:
        server_args = detokenizer_server_args(model_paths)
        publish(server_args, role="detokenizer")
        # The same loader as the tokenizer side (launch_server.load_tokenizers), so both decode alike.
        tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in model_paths.items()}
        manager = MultiModelDetokenizerManager(server_args, detokenizer_port_args(recv_addr), tokenizers)
    except Exception as e:
        logger.exception("detokenizer failed to start")
        pipe_writer.send({"status": "error", "message": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from e
    pipe_writer.send({"status": "ready"})
    manager.multi_http_worker_event_loop()
