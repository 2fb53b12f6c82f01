"""Attention <-> FFN transport: torch.distributed point-to-point, no home-made socket protocol.

Rank 0 is the attention side (the scheduler process); ranks 1..N are FFN workers.
Rendezvous is a loopback ``TCPStore`` on a free port; the process group is built
directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL``), not as torch's global
default group, so one process can hold several engines (tests do).

One FFN request, attention -> worker, all on tag 0 so the pair stays FIFO::

    header  int64 [4]        (op, T, K, H)
    payload dtype [T, H + K] x and slot weights side by side (one message, not two)
    slots   int64 [T, K]     weights-pool slot ids

The reply, worker -> attention: ``out`` dtype [T, H] and ``timing`` float64 [2]
(perf_counter when the inputs had arrived, when the FFN was done; CLOCK_MONOTONIC
is one clock for every process of the machine, so the trace can line them up).

Legend: T = tokens, K = slots per token, H = hidden size.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

ATTN_RANK = 0
OP_FFN, OP_STOP = 1, 2
HEADER_LEN = 4
# Gloo fails a receive that waits longer than the group's timeout; a worker may idle for days
# between requests, so the group's own timeout is long and the attention side passes its short
# per-layer timeout to every wait instead.
GROUP_TIMEOUT = timedelta(days=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(devices: list[torch.device]) -> str:
    """NCCL when every side is on a GPU, gloo otherwise (CPU tensors)."""
    return "nccl" if all(d.type == "cuda" for d in devices) else "gloo"


def connect(
    backend: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device | None = None
) -> dist.ProcessGroup:
    """Join the group through the loopback store (rank 0 hosts it); blocks until every rank joined."""
    store = dist.TCPStore(
        "127.0.0.1", port, world_size, is_master=rank == ATTN_RANK, timeout=timedelta(seconds=timeout_s)
    )
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, GROUP_TIMEOUT)
    if device is not None:
        torch.cuda.set_device(device)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = GROUP_TIMEOUT
    return dist.ProcessGroupNCCL(store, rank, world_size, opts)


class Channel:
    """One peer of a process group; every message on tag 0, so order is the protocol."""

    def __init__(self, group: dist.ProcessGroup, peer: int, device: torch.device) -> None:
        self.group = group
        self.peer = peer
        self.device = device  # where tensors must live for this backend (cpu for gloo)

    def isend(self, t: torch.Tensor) -> dist.Work:
        return self.group.send([t], self.peer, 0)

    def irecv(self, t: torch.Tensor) -> dist.Work:
        return self.group.recv([t], self.peer, 0)

    def recv(self, t: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        work = self.irecv(t)
        if timeout_s is None:
            work.wait()
        else:
            work.wait(timedelta(seconds=timeout_s))
        return t


@dataclass
class PendingReply:
    """An FFN request in flight: the posted receives (and the sends, kept alive until done)."""

    works: list[dist.Work]
    out: torch.Tensor  # [T, H]
    timing: torch.Tensor  # [2] float64
    sent_at: float

    def wait(self, timeout_s: float) -> tuple[torch.Tensor, tuple[float, float]]:
        for w in self.works:
            w.wait(timedelta(seconds=timeout_s))
        t = self.timing.tolist()
        return self.out, (t[0], t[1])


def post_request(
    ch: Channel, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, sent_at: float
) -> PendingReply:
    """Post a request's sends and its reply's receives; returns at once."""
    num_tokens, hidden = x.shape
    k = slots.shape[1]
    header = torch.tensor([OP_FFN, num_tokens, k, hidden], dtype=torch.int64, device=ch.device)
    payload = torch.cat([x, weights.to(x.dtype)], dim=1).to(ch.device)  # [T, H + K]
    ids = slots.to(device=ch.device, dtype=torch.int64).contiguous()
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=ch.device)
    timing = torch.zeros(2, dtype=torch.float64, device=ch.device)
    # Receives are posted right behind the sends: NCCL serialises a pair's p2p on one stream,
    # so a later request's sends must not queue ahead of this reply (that would deadlock).
    works = [ch.isend(header), ch.isend(payload), ch.isend(ids), ch.irecv(out), ch.irecv(timing)]
    return PendingReply(works[3:] + works[:3], out, timing, sent_at)


def post_stop(ch: Channel) -> dist.Work:
    return ch.isend(torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.int64, device=ch.device))


def recv_request(ch: Channel, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Worker side: block for the next request; None on a stop message. -> (payload, slots)."""
    header = ch.recv(torch.empty(HEADER_LEN, dtype=torch.int64, device=ch.device)).tolist()
    op, num_tokens, k, hidden = header
    if op == OP_STOP:
        return None
    payload = torch.empty(num_tokens, hidden + k, dtype=dtype, device=ch.device)
    slots = torch.empty(num_tokens, k, dtype=torch.int64, device=ch.device)
    works = [ch.irecv(payload), ch.irecv(slots)]
    for w in works:
        w.wait()
    return payload, slots


def send_reply(ch: Channel, out: torch.Tensor, timing: tuple[float, float]) -> None:
    t = torch.tensor(timing, dtype=torch.float64, device=ch.device)
    works = [ch.isend(out.to(ch.device).contiguous()), ch.isend(t)]
    for w in works:
        w.wait()
