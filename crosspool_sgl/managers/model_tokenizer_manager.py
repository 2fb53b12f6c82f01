"""SGLang's `TokenizerManager`, one instance per hosted model, all in the HTTP process.

SGLang's manager does the work: `GenerateReqInput` normalisation, tokenisation, `SamplingParams`
building and checks, n > 1 (a prompt-only request first, so the samples share its cached pages),
batches, streaming, abort on disconnect, the result dicts, and its control communicators. The
subclass changes only what several managers in one process need:
- `__init__`: built under the model's own SGLang runtime context (`create_context` +
  `use_context`), so `assert_published` and the per-model config (model config, tokenizer,
  context length) are that model's; what the manager reads at request time is model-independent
  and comes from the one context the process published;
- `init_ipc_channels`: it *connects* its PUSH to our scheduler process (which binds one address
  for every manager) and binds its own PULL at a per-model address; that address is stamped on
  everything it sends (`http_worker_ipc`, as SGLang's managers do with `tokenizer_worker_num > 1`),
  so the scheduler and the detokenizer send each reply to the manager that asked;
- `tokenized_generate_req_type`: our `MultiModelTokenizedGenerateReqInput`, SGLang's struct with
  the model added;
- `auto_create_handle_loop`: starts the receive loop only. SGLang's also installs SIGTERM/SIGQUIT
  loop handlers (one per instance, the last one wins) and a watchdog that kills the process tree
  on shutdown; the launcher and uvicorn own shutdown here.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from sglang.srt.managers.tokenizer_manager import TokenizerManager, print_exception_wrapper
from sglang.srt.runtime_context import create_context, use_context
from sglang.srt.server_args import PortArgs, ServerArgs
from sglang.srt.utils import get_or_create_event_loop
from sglang.srt.utils.network import get_zmq_socket

from crosspool_sgl.managers.io_struct import MultiModelTokenizedGenerateReqInput

__all__ = ["ModelAddresses", "ModelTokenizerManager", "model_port_args", "model_server_args"]


@dataclass(frozen=True)
class ModelAddresses:
    """Where one model's manager sends (the scheduler's one input) and receives (its own)."""

    scheduler: str
    own: str


def model_server_args(name: str, path: str, **overrides: Any) -> ServerArgs:
    """The SGLang config one model's manager is built from (its path and served name)."""
    return ServerArgs(model_path=path, device="cpu", served_model_name=name, **overrides)


def model_port_args(addresses: ModelAddresses) -> PortArgs:
    """Only the two names `init_ipc_channels` reads are meaningful."""
    return PortArgs(
        tokenizer_ipc_name=addresses.own,
        scheduler_input_ipc_name=addresses.scheduler,
        detokenizer_ipc_name="",
        nccl_port=0,
        rpc_ipc_name="",
        metrics_ipc_name="",
        tokenizer_worker_ipc_name=None,
        decoupled_spec_ipc_config=None,
    )


class ModelTokenizerManager(TokenizerManager):
    """SGLang's TokenizerManager for one of several models served by one scheduler process."""

    def __init__(self, model: str, server_args: ServerArgs, addresses: ModelAddresses) -> None:
        self.model = model
        # The scheduler process routes by this field (managers/scheduler_process.py).
        self.tokenized_generate_req_type = functools.partial(MultiModelTokenizedGenerateReqInput, model=model)
        # Synchronous and before any request: no coroutine sees the swapped context.
        with use_context(create_context(server_args, role="tokenizer")):
            super().__init__(server_args, model_port_args(addresses), start_pd_bootstrap_service=False)

    def init_ipc_channels(self, port_args: PortArgs) -> None:
        # The process's one asyncio context, not one per manager as SGLang's: a manager dropped
        # without close() (a failed start) otherwise hung the process in its context's __del__
        # (zmq_term waits for sockets the garbage collector had not closed yet).
        context = zmq.asyncio.Context.instance()
        self.recv_from_detokenizer = get_zmq_socket(context, zmq.PULL, port_args.tokenizer_ipc_name, True)
        self.send_to_scheduler = get_zmq_socket(context, zmq.PUSH, port_args.scheduler_input_ipc_name, False)
        # SGLang's `_dispatch_to_scheduler` stamps this on every request and control message.
        self.tokenizer_ipc_name = port_args.tokenizer_ipc_name
        self.load_snapshot_reader = None  # DP load reports (/v1/loads): our scheduler writes none

    def auto_create_handle_loop(self) -> None:
        if self.event_loop is not None:
            return
        loop = get_or_create_event_loop()
        self.asyncio_tasks.add(loop.create_task(print_exception_wrapper(self.handle_loop)))
        self.event_loop = loop

    async def close(self) -> None:
        """Stop the receive loop and close the sockets (the launcher stops the other processes)."""
        tasks = list(self.asyncio_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.asyncio_tasks.clear()
        self.event_loop = None
        for sock in (self.recv_from_detokenizer, self.send_to_scheduler):
            sock.close(linger=0)
