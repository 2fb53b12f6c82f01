"""The attention side's handle on its FFN workers: start them, ship a layer's FFN, collect it.

With N workers every request is split into N contiguous token ranges (each
worker holds the whole weights pool; a token's FFN does not depend on the other
tokens, so the concatenated halves equal one launch). A worker that dies shows
up as a failed receive ("connection closed by peer") within milliseconds, a hung
one as a timed-out receive; either way `FFNWorkerError` says which worker and
why, the other workers are stopped and every later call fails at once.
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from crosspool_sgl.disagg.ffn_worker import WorkerSpec, dtype_name
from crosspool_sgl.disagg.transport import (
    Channel,
    PendingReply,
    backend_for,
    connect,
    free_port,
    post_request,
    post_stop,
)
from crosspool_sgl.server_args import DisaggArgs

logger = logging.getLogger(__name__)


class FFNWorkerError(RuntimeError):
    """An FFN worker died or stopped answering; requests on this engine can't be served."""


@dataclass
class PendingFFN:
    """One layer's FFN for one micro-batch, in flight on one or more workers."""

    parts: list[tuple[int, PendingReply]]  # (worker index, its share)
    worker_times: list[tuple[float, float]] | None = None  # filled by wait: (inputs in, FFN done)


class RemoteFFN:
    """Starts the FFN worker processes and talks to them over one process group."""

    def __init__(
        self,
        args: DisaggArgs,
        models: list[tuple[str, str]],
        dtype: torch.dtype,
        attn_device: torch.device,
        log_level: str = "warning",
    ) -> None:
        self.args = args
        self.num_workers = args.ffn_workers
        self.timeout_s = args.ffn_timeout_s
        self.failure: str | None = None
        self.devices = self._worker_devices(args, attn_device)
        self.backend = backend_for([attn_device, *self.devices])
        self.procs = self._spawn(models, dtype, log_level)
        try:
            self.group = connect(self.backend, self.port, 0, self.num_workers + 1, 120.0, attn_device)
        except Exception as e:
            self.close()
            raise FFNWorkerError(f"FFN workers did not join the process group: {e}") from e
        io_device = attn_device if self.backend == "nccl" else torch.device("cpu")
        self.channels = [Channel(self.group, rank, io_device) for rank in range(1, self.num_workers + 1)]
        atexit.register(self.close)

    # ---- start-up -------------------------------------------------------------------------
    @staticmethod
    def _worker_devices(args: DisaggArgs, attn_device: torch.device) -> list[torch.device]:
        names = list(args.ffn_devices) or [str(attn_device)]
        if len(names) == 1:
            names = names * args.ffn_workers
        if len(names) != args.ffn_workers:
            raise ValueError(f"--ffn-devices lists {len(names)} devices for {args.ffn_workers} FFN workers")
        return [torch.device(n) for n in names]

    def _spawn(self, models: list[tuple[str, str]], dtype: torch.dtype, log_level: str) -> list:
        self.port = free_port()
        procs = []
        for rank, device in enumerate(self.devices, start=1):
            spec = WorkerSpec(
                rank=rank,
                world_size=self.num_workers + 1,
                port=self.port,
                backend=self.backend,
                device=str(device),
                dtype=dtype_name(dtype),
                models=models,
                num_threads=self.args.ffn_num_threads,
                log_level=log_level,
            )
            cmd = [sys.executable, "-m", "crosspool_sgl.disagg.ffn_worker", spec.to_json()]
            procs.append(subprocess.Popen(cmd))
        return procs

    def wait_ready(self, num_slots: int, timeout_s: float = 600.0) -> None:
        """Block until every worker has loaded its weights; their slot count must equal ours."""
        for i, ch in enumerate(self.channels):
            got = torch.zeros(2, dtype=torch.int64, device=ch.device)
            try:
                ch.recv(got, timeout_s)
            except Exception as e:
                raise self._fail(i, e) from e
            worker_slots, used = got.tolist()
            if worker_slots != num_slots:
                self.close()
                raise FFNWorkerError(
                    f"FFN worker {i} numbered {worker_slots} slots, the attention side {num_slots}"
                )
            logger.info("FFN worker %d ready on %s: %.1f MiB of weights", i, self.devices[i], used / 2**20)

    # ---- per layer ------------------------------------------------------------------------
    def submit(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> PendingFFN:
        """x [T, H], slots/weights [T, K] -> a handle; split over the workers by token ranges."""
        self.check_alive()
        now = time.perf_counter()
        bounds = torch.linspace(0, x.shape[0], self.num_workers + 1).round().long().tolist()
        parts = []
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if hi > lo:
                parts.append((i, post_request(self.channels[i], x[lo:hi], slots[lo:hi], weights[lo:hi], now)))
        return PendingFFN(parts)

    def wait(self, pending: PendingFFN, device: torch.device) -> torch.Tensor:
        """The FFN output [T, H] on `device`; raises FFNWorkerError on a dead or silent worker."""
        outs, times = [], []
        for i, reply in pending.parts:
            try:
                out, t = reply.wait(self.timeout_s)
            except Exception as e:
                raise self._fail(i, e) from e
            outs.append(out)
            times.append(t)
        pending.worker_times = times
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(device, non_blocking=True)

    def check_alive(self) -> None:
        if self.failure is None:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise self._fail(i, None)
        if self.failure is not None:
            raise FFNWorkerError(self.failure)

    # ---- failure and shutdown -------------------------------------------------------------
    def _fail(self, worker: int, cause: Exception | None) -> FFNWorkerError:
        """Record why the FFN side is unusable, stop what is left of it, and build the error."""
        if self.failure is None:
            time.sleep(0.05)  # a dying worker's exit code lands a moment after its socket closes
            code = self.procs[worker].poll()
            if code is not None:
                self.failure = (
                    f"FFN worker {worker} (pid {self.procs[worker].pid}) died with exit code {code}"
                )
            elif cause is not None and "Timed out" in str(cause):
                self.failure = f"FFN worker {worker} did not answer within {self.timeout_s:.0f}s"
            else:
                self.failure = f"FFN worker {worker} failed: {str(cause).splitlines()[0] if cause else cause}"
            logger.error("%s; the FFN side is down, requests will be aborted", self.failure)
            self._stop_procs()
        return FFNWorkerError(self.failure)

    def _stop_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        """Ask the workers to stop, then make sure they did."""
        if self.failure is None and hasattr(self, "channels"):
            self.failure = "the FFN workers were shut down"
            for ch in self.channels:
                try:
                    post_stop(ch)
                except Exception:  # a dead peer: _stop_procs below handles it
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.02)
        self._stop_procs()
