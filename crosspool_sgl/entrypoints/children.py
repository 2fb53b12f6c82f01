"""The launcher's child processes: the scheduler and the detokenizer (spawned, ZMQ over ipc), and the
FFN workers the scheduler starts in disaggregated mode. Start, wait until ready, list what the
watchdog polls, stop (no orphans, even of a scheduler that was killed)."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from crosspool_sgl.server_args import ServerArgs


class StartupError(RuntimeError):
    """The server can't start; the message names the culprit."""


class ChildProcesses:
    """The scheduler and detokenizer processes: start, wait until ready, stop (no orphans)."""

    def __init__(self, args: ServerArgs, ipc_dir: str) -> None:
        from crosspool_sgl.managers.detokenizer_process import run_detokenizer_process
        from crosspool_sgl.managers.scheduler_process import run_scheduler_process

        self.scheduler_addr = f"ipc://{ipc_dir}/scheduler"
        self.detokenizer_addr = f"ipc://{ipc_dir}/detokenizer"
        self.tokenizer_addr = f"ipc://{ipc_dir}/tokenizer"
        ctx = mp.get_context("spawn")
        paths = {s.name: s.path for s in args.engine.models}
        self.pipes: dict[str, Any] = {}
        self.procs: dict[str, Any] = {}
        self.ffn_pids: list[int] = []
        for name, target, targs in (
            ("scheduler", run_scheduler_process, (args.engine, self.scheduler_addr, self.detokenizer_addr)),
            ("detokenizer", run_detokenizer_process, (paths, self.detokenizer_addr, self.tokenizer_addr)),
        ):
            reader, writer = ctx.Pipe(duplex=False)
            kwargs = {"log_level": args.log_level}
            if name == "scheduler":
                kwargs["num_threads"] = args.num_threads
            self.procs[name] = ctx.Process(
                target=target, args=(*targs, writer), kwargs=kwargs, name=f"crosspool-{name}", daemon=True
            )
            self.pipes[name] = reader
        for p in self.procs.values():
            p.start()

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until both children report ready; raise StartupError with the child's message if not."""
        deadline = time.monotonic() + timeout_s
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
                    msg = pipe.recv()
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
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        for p in self.procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        _kill_leftovers(self.ffn_pids)


def _kill_leftovers(pids: list[int]) -> None:
    """FFN workers left behind by a scheduler that was killed (they would exit on their own, later)."""
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
