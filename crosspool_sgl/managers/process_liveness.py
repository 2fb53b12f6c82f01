"""Is a process alive — asked of the OS by pid, not of multiprocessing's pipes.

On CPU the children are forked by a fork server (entrypoints/children.py). Then multiprocessing's
view of liveness goes through that server: a child's `is_alive()`/`exitcode` come over its pipe and
a child's `parent_process()` sentinel closes with it. A fork server that died (a SIGTERM to the
launcher's process group kills it) read as every child having exited with code 255 and, in the
children, as the launcher being gone, so a drain turned into 503s. The pid is the truth.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import psutil


def process_running(pid: int | None) -> bool:
    """Is the process `pid` alive (not gone, not a zombie), whoever its parent is?"""
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LauncherWatch:
    """Whether the process that started this one still runs; asked at most every `period_s`
    (a psutil call costs tens of microseconds: too much for every scheduler step)."""

    def __init__(self, period_s: float = 0.5) -> None:
        parent = mp.parent_process()
        self.pid = parent.pid if parent is not None else None
        self.period_s = period_s
        self._next = 0.0
        self._alive = True

    def alive(self) -> bool:
        if self.pid is None:
            return True
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.period_s
            self._alive = process_running(self.pid)
        return self._alive
