"""Watchdog over the server's child processes (scheduler, detokenizer, FFN workers).

Without it a dead child left every in-flight and new request hanging (no error
event), /health turned 503 only after its 10 s control timeout and the launcher
kept running. Here the first death found fails every request with 503 at once,
turns /health unhealthy, and asks the launcher to exit non-zero naming the child.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from crosspool_sgl.managers.process_liveness import process_running

logger = logging.getLogger(__name__)

POLL_S = 0.1  # a death is seen within this; polling is a waitpid/stat per child, no I/O


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


class ProcessProbe:
    """One child to watch: a name and a callable that says why it is gone (None while it lives)."""

    def __init__(self, name: str, gone: Callable[[], str | None]) -> None:
        self.name, self.gone = name, gone


def mp_probe(name: str, proc: Any) -> ProcessProbe:
    """A multiprocessing child of this process.

    `is_alive()` alone is not the child's state when it was forked by a fork server: the status
    comes over the fork server's pipe (see managers/process_liveness.py), so the OS is asked too.
    """

    def gone() -> str | None:
        if proc.is_alive() or process_running(proc.pid):
            return None
        return f"the {name} process (pid {proc.pid}) {describe_exit(proc.exitcode)}"

    return ProcessProbe(name, gone)


def pid_probe(name: str, pid: int) -> ProcessProbe:
    """A grandchild (an FFN worker of the scheduler): not ours to wait on, so ask psutil."""
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return ProcessProbe(name, lambda: f"the {name} (pid {pid}) is gone")

    def gone() -> str | None:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return f"the {name} (pid {pid}) died"

    return ProcessProbe(name, gone)


class ChildWatchdog:
    """Polls the probes on the event loop; on the first death calls `on_death(reason)` once."""

    def __init__(self, probes: Sequence[ProcessProbe], on_death: Callable[[str], None]) -> None:
        self.probes = list(probes)
        self.on_death = on_death
        self.reason: str | None = None
        self.task: asyncio.Task | None = None

    def check(self) -> str | None:
        for probe in self.probes:
            reason = probe.gone()
            if reason is not None:
                return reason
        return None

    def start(self) -> None:
        """Call inside the server's event loop (its lifespan startup)."""
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while self.reason is None:
            reason = self.check()
            if reason is not None:
                self.reason = reason
                logger.error("%s; failing every request with 503 and stopping the server", reason)
                self.on_death(reason)
                return
            await asyncio.sleep(POLL_S)
