"""The launcher's child processes: the scheduler and the detokenizer (ZMQ over ipc), and the FFN
workers the scheduler starts in disaggregated mode. Start, wait until ready, list what the watchdog
polls, stop (no orphans, even of a scheduler that was killed).

Both children import the same ~9 s of SGLang and torch. On CPU they are forked from one fork server
that imported those modules once (`forkserver` with a preload); with a GPU they are spawned, each
importing for itself, because CUDA cannot be used in a process forked from one that queried the
devices, and SGLang's imports do. The children are started from a thread: starting the first one
waits for the fork server's imports, and the launcher has its own to do meanwhile."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import threading
import time
from typing import Any

from crosspool_sgl.managers.process_liveness import process_running
from crosspool_sgl.server_args import ServerArgs

# The children's entry points, named rather than imported: importing them here would import SGLang
# in the launcher before any child starts (the fork server imports them instead).
_SCHEDULER_ENTRY = "crosspool_sgl.managers.scheduler_process:run_scheduler_process"
_DETOKENIZER_ENTRY = "crosspool_sgl.managers.detokenizer_process:run_detokenizer_process"
_PRELOAD = [e.partition(":")[0] for e in (_SCHEDULER_ENTRY, _DETOKENIZER_ENTRY)]
_START_JOIN_S = 60.0  # longest wait in stop() for a start still in progress (the fork server's imports)


def start_context(args: ServerArgs) -> Any:
    """forkserver (children share one import of their modules) when every device is a CPU, else spawn."""
    devices = (args.engine.device, *args.engine.disagg.ffn_devices)
    if not all(d.split(":")[0] == "cpu" for d in devices):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_child(entry: str, *args: Any, **kwargs: Any) -> None:
    """A child's first call (pickled by name): leave the launcher's process group, import
    `module:function` and run it.

    Own process group: a signal sent to the launcher's whole group (systemd's default
    `KillMode=control-group`, `kill -TERM -<pgid>`, Ctrl-C in a terminal) reaches only the launcher,
    which drains in-flight requests and then stops the children in order. Before, the scheduler
    stopped at once with the launcher, the in-flight requests failed and the watchdog logged its
    death as an error. The children still exit with the launcher when it dies (they watch it)."""
    os.setpgrp()
    module, _, function = entry.partition(":")
    getattr(importlib.import_module(module), function)(*args, **kwargs)


class StartupError(RuntimeError):
    """The server can't start; the message names the culprit."""


class ChildProcesses:
    """The scheduler and detokenizer processes: start, wait until ready, stop (no orphans)."""

    def __init__(self, args: ServerArgs, ipc_dir: str) -> None:
        self.scheduler_addr = f"ipc://{ipc_dir}/scheduler"
        self.detokenizer_addr = f"ipc://{ipc_dir}/detokenizer"
        self.ipc_dir = ipc_dir
        ctx = start_context(args)
        paths = {s.name: s.path for s in args.engine.models}
        self.pipes: dict[str, Any] = {}
        self.procs: dict[str, Any] = {}
        self.ffn_pids: list[int] = []
        for name, target, targs in (
            ("scheduler", _SCHEDULER_ENTRY, (args.engine, self.scheduler_addr, self.detokenizer_addr)),
            ("detokenizer", _DETOKENIZER_ENTRY, (paths, self.detokenizer_addr)),
        ):
            reader, writer = ctx.Pipe(duplex=False)
            kwargs = {"log_level": args.log_level}
            if name == "scheduler":
                kwargs["num_threads"] = args.num_threads
            self.procs[name] = ctx.Process(
                target=run_child,
                args=(target, *targs, writer),
                kwargs=kwargs,
                name=f"crosspool-{name}",
                daemon=True,
            )
            self.pipes[name] = reader
        self.start_error: BaseException | None = None
        self.starter = threading.Thread(target=self._start_all, name="crosspool-start-children", daemon=True)
        self.starter.start()

    def tokenizer_addr_of(self, index: int) -> str:
        """Where the `index`-th model's TokenizerManager receives its outputs (by index: model names
        need not be path-safe)."""
        return f"ipc://{self.ipc_dir}/tokenizer-{index}"

    def _start_all(self) -> None:
        try:
            for p in self.procs.values():
                p.start()
        except BaseException as e:  # re-raised by wait_ready
            self.start_error = e

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until both children report ready; raise StartupError with the child's message if not."""
        deadline = time.monotonic() + timeout_s
        self.starter.join(timeout_s)
        if self.start_error is not None or self.starter.is_alive():
            raise StartupError(f"could not start the child processes: {self.start_error or 'timed out'}")
        ready: dict[str, Any] = {}
        while len(ready) < len(self.procs):
            if time.monotonic() > deadline:
                raise StartupError(
                    f"children not ready after {timeout_s:.0f}s: waiting for {set(self.procs) - set(ready)}"
                )
            for name, pipe in self.pipes.items():
                if name in ready:
                    continue
                if pipe.poll(0.2):
                    try:
                        msg = pipe.recv()
                    except EOFError:  # it died before reporting (its traceback is in the log above)
                        self.procs[name].join(5)
                        code = self.procs[name].exitcode
                        raise StartupError(f"{name} process exited with code {code} while starting") from None
                    if msg.get("status") != "ready":
                        raise StartupError(f"{name} failed to start: {msg.get('message')}")
                    ready[name] = msg
                elif not self.procs[name].is_alive():
                    raise StartupError(f"{name} process exited with code {self.procs[name].exitcode}")
        self.ffn_pids = list(ready["scheduler"].get("ffn_worker_pids", []))
        return ready

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs.values())

    def probes(self) -> list[Any]:
        """What the watchdog polls: both children, then every FFN worker of the scheduler."""
        from crosspool_sgl.entrypoints.watchdog import mp_probe, pid_probe

        out = [mp_probe(name, p) for name, p in self.procs.items()]
        return out + [pid_probe(f"FFN worker {i}", pid) for i, pid in enumerate(self.ffn_pids)]

    def stop(self) -> None:
        self.starter.join(_START_JOIN_S)
        started = [p for p in self.procs.values() if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        # a join returns at once when the fork server is gone (see watchdog.mp_probe): ask the OS
        _kill_leftovers([p.pid for p in started if process_running(p.pid)] + self.ffn_pids)


def _kill_leftovers(pids: list[int]) -> None:
    """Children still running after stop() (FFN workers of a scheduler that was killed; children of
    a fork server that died): they would exit on their own, later."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        p.kill()
