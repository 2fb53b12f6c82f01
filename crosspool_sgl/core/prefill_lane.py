"""The prefill lane: one long prefill chunk at a time on a worker thread, beside the scheduler's steps.

Why: a long prompt's prefill and the running decodes compete for the same step. Inside one step
the choice is bad either way — a big chunk stalls every decode (TBT), a small one leaves the long
prompt crawling (TTFT) — and one thread leaves the other cores idle (the scheduler used one core
of two while one-server-per-model deployments used both). The lane runs the long prompt's chunk
on its own thread and core while the step loop keeps decoding; torch releases the GIL inside its
kernels, so the two overlap wherever the work is in kernels rather than Python.

Safety: the lane's request is invisible to the policy while its chunk runs (not decoded, not
retracted); its pages were allocated before the chunk started and are released only after it
ends, even if the request is aborted meanwhile. Both lanes write KV of disjoint pages and read
shared weights. A lane chunk never reaches the prompt's last token, so nothing is sampled there
(per-model penalty tables and grammar matchers are touched by the step thread only). Only
backends without per-step state (`AttentionBackend.thread_safe`) use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from crosspool_sgl.core.req import Req

Items = list[tuple[Req, int]]


def _init_thread(num_threads: int) -> None:
    torch.set_num_threads(num_threads)  # per-thread in OpenMP: the lane's ops use `num_threads`


class PrefillLane:
    """Runs `run(items)` for one batch at a time on a worker thread; polled by the scheduler."""

    def __init__(self, run: Callable[[Items], dict], num_threads: int = 1) -> None:
        self._run_items = run
        self._pool = ThreadPoolExecutor(1, "prefill-lane", initializer=_init_thread, initargs=(num_threads,))
        self.items: Items = []
        self._future = None
        self._started = 0.0
        self.num_chunks = 0

    @property
    def busy(self) -> bool:
        return self._future is not None

    def holds(self, req: Req) -> bool:
        return any(r is req for r, _ in self.items)

    def submit(self, items: Items) -> None:
        assert not self.busy, "the prefill lane runs one batch at a time"
        self.items = items
        self._started = time.perf_counter()
        self._future = self._pool.submit(self._run, items)
        self.num_chunks += 1

    def _run(self, items: Items) -> dict:
        with torch.inference_mode():  # thread-local in torch: the step loop's mode does not carry over
            return self._run_items(items)

    def poll(self, wait_s: float | None = 0.0) -> tuple[Items, dict, float] | None:
        """(items, results, elapsed ms) once the running batch is done; None while it runs
        (`wait_s` None: wait for it).

        An exception raised by the batch is raised here, in the scheduler's thread.
        """
        if self._future is None:
            return None
        try:
            results = self._future.result(timeout=wait_s)
        except FutureTimeout:
            return None
        finally:
            if self._future is not None and self._future.done():
                items, self.items, self._future = self.items, [], None
        return items, results, (time.perf_counter() - self._started) * 1e3

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
