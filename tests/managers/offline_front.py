"""Per-model SGLang TokenizerManagers (`HostedModels`) with no scheduler behind them: what they send
is recorded, nothing ever answers. For admission, deadline and disconnect tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FakeSender:
    """Stands in for a manager's PUSH socket (SGLang's sock_send pickles by default)."""

    def __init__(self) -> None:
        self.sent: list = []

    def send_pyobj(self, obj: Any, **kwargs: Any) -> None:
        self.sent.append(obj)

    def send(self, data: Any, **kwargs: Any) -> None:
        self.sent.append(data)

    def close(self, linger: int = 0) -> None:
        pass


@dataclass
class OfflineFront:
    hosted: Any  # HostedModels
    loop: asyncio.AbstractEventLoop
    context: Any

    def run(self, coro: Any, timeout_s: float = 30) -> Any:
        from sglang.srt.runtime_context import use_context

        with use_context(self.context):
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    def sent(self, model: str, kind: type) -> list:
        return [m for m in self.hosted.managers[model].send_to_scheduler.sent if isinstance(m, kind)]


@contextmanager
def offline_front(
    model_path: str, ipc_dir: Path, models: tuple[str, ...] = ("llama",), **hosted_kw: Any
) -> Iterator[OfflineFront]:
    from sglang.srt.runtime_context import create_context, use_context

    from crosspool_sgl.managers.hosted_models import HostedModels
    from crosspool_sgl.managers.model_tokenizer_manager import ModelInfo, model_server_args

    infos = {
        m: ModelInfo(m, model_path, context_len=4096, vocab_size=512, architecture="llama") for m in models
    }
    hosted = HostedModels(infos, **hosted_kw)
    context = create_context(model_server_args(models[0], model_path), role="tokenizer")
    loop = asyncio.new_event_loop()
    with use_context(context):
        hosted.connect(
            f"ipc://{ipc_dir}/no-scheduler", lambda i: f"ipc://{ipc_dir}/tokenizer-{i}", publish=False
        )
    for tm in hosted.managers.values():
        tm.send_to_scheduler.close(linger=0)
        tm.send_to_scheduler = FakeSender()
    front = OfflineFront(hosted, loop, context)
    try:
        yield front
    finally:
        front.run(hosted.close())
        loop.close()
