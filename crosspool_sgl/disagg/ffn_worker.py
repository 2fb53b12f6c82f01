"""The FFN worker process: holds the weights pool of every model and runs `run_ffn` on request.

    python -m crosspool_sgl.disagg.ffn_worker '<json WorkerSpec>'

Started by the attention side (`RemoteFFN`) with `subprocess`, because the
server's scheduler is a daemonic multiprocessing child and may not fork
multiprocessing children of its own. It joins the process group, loads the FFN
weights (attention weights are read once and dropped), reports its slot count,
then answers requests until a stop message. It exits on its own when its
parent disappears (a watchdog thread), so a killed server leaves no orphan.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch

from crosspool_sgl.disagg.transport import ATTN_RANK, Channel, connect, recv_request, send_reply
from crosspool_sgl.layers.moe import run_ffn
from crosspool_sgl.mem.weight_pool import WeightPool

logger = logging.getLogger("crosspool_sgl.disagg.ffn_worker")

_PARENT_POLL_S = 0.5
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, passed as JSON on its command line."""

    rank: int
    world_size: int
    port: int
    backend: str
    device: str
    dtype: str  # a key of _DTYPES
    models: list[tuple[str, str]]  # (name, HF directory), in the attention side's load order
    connect_timeout_s: float = 120.0
    num_threads: int | None = None
    log_level: str = "warning"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        raw["models"] = [tuple(m) for m in raw["models"]]
        return cls(**raw)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


def load_weight_pool(models: list[tuple[str, str]], device: torch.device, dtype: torch.dtype) -> WeightPool:
    """The same load order as the attention side, so both number the slots alike."""
    from crosspool_sgl.layers.attention import create_attention_backend
    from crosspool_sgl.models.loader import load_model

    pool = WeightPool(dtype, device)
    attn = create_attention_backend(device, "torch")
    for name, path in models:
        load_model(name, path, pool, attn, device, dtype, show_progress=False)  # the model is dropped
    return pool


def serve(ch: Channel, pool: WeightPool, dtype: torch.dtype, device: torch.device) -> None:
    """Answer FFN requests in order until a stop message."""
    hidden_cols = None
    while True:
        req = recv_request(ch, dtype)
        if req is None:
            return
        payload, slots = req
        t_in = time.perf_counter()
        hidden_cols = payload.shape[1] - slots.shape[1]
        payload = payload.to(device)
        x = payload[:, :hidden_cols].contiguous()  # [T, H]
        weights = payload[:, hidden_cols:].contiguous()  # [T, K]
        out = run_ffn(pool, x, slots.to(device), weights)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        send_reply(ch, out, (t_in, time.perf_counter()))


def watch_parent(parent_pid: int) -> None:
    """Exit when the attention side is gone (re-parented), even while blocked in a receive."""
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_json(argv[0])
    logging.basicConfig(
        level=spec.log_level.upper(), format=f"[ffn-worker {spec.rank}] %(asctime)s %(levelname)s %(message)s"
    )
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    device, dtype = torch.device(spec.device), _DTYPES[spec.dtype]
    group = connect(spec.backend, spec.port, spec.rank, spec.world_size, spec.connect_timeout_s, device)
    ch = Channel(group, ATTN_RANK, device if spec.backend == "nccl" else torch.device("cpu"))
    pool = load_weight_pool(spec.models, device, dtype)
    num_slots = len(pool.expert_to_slot)
    ready = torch.tensor([num_slots, pool.used_bytes], dtype=torch.int64, device=ch.device)
    ch.isend(ready).wait()
    logger.info("ready: %d slots, %.1f MiB of FFN weights", num_slots, pool.used_bytes / 2**20)
    with torch.inference_mode():
        serve(ch, pool, dtype, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
