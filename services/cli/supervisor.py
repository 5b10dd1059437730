"""A small process supervisor for `switchyard up`: start in dependency order, wait for
readiness, prefix log lines, restart crashes with backoff, stop in a fixed order.

Each process runs in its own process group, so a Ctrl-C in the terminal reaches only the
supervisor, which then stops the processes in order (router first, Redis last), each with
SIGTERM (the services drain on it) and SIGKILL after `stop_timeout_s`. Where util-linux's
`setpriv` exists, children are started through it with a parent-death signal, so they are told
to stop even when the supervisor itself is killed. (Not with a preexec_fn: that forces fork()
instead of vfork(), and forking while this process's gRPC health probes run trips gRPC's fork
handlers: the child aborted with "epoll_wait error: Bad file descriptor".)

A process that exits before it was ever ready fails the start-up (a bad model path should not
crash-loop for 15 minutes); one that crashes after it was ready is restarted, after
`restart_backoff_s` doubling up to `max_restart_backoff_s` (reset once it stays up for
`stable_after_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from services.cli.config import SupervisorSpec

Probe = Callable[[], Awaitable[bool]]
"""Answers whether a process is ready (a gRPC health check, a Redis PING)."""

_COLORS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92")


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process."""

    name: str
    argv: tuple[str, ...]
    ready: Probe
    env: Mapping[str, str] = field(default_factory=dict)
    """The whole environment of the process."""
    needs: tuple[str, ...] = ()
    """Processes that must be ready before this one starts."""


class StartupFailed(RuntimeError):
    """A process exited before it was ready, or was not ready in time."""


class LogSink:
    """Writes each process's lines behind its name, and the supervisor's own lines."""

    def __init__(self, out: TextIO, names: Sequence[str], color: bool | None = None):
        self.out = out
        self.width = max([len(n) for n in names] + [2])
        use_color = out.isatty() if color is None else color
        self.colors = {n: _COLORS[i % len(_COLORS)] for i, n in enumerate(names)} \
            if use_color else {}

    def line(self, name: str, text: str) -> None:
        tag = f"{name:<{self.width}} |"
        if name in self.colors:
            tag = f"\x1b[{self.colors[name]}m{tag}\x1b[0m"
        self.out.write(f"{tag} {text}\n")
        self.out.flush()

    def info(self, text: str) -> None:
        self.line("up", text)


def _with_parent_death_signal(argv: tuple[str, ...]) -> tuple[str, ...]:
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "TERM", "--", *argv) if setpriv else argv


def describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


class Managed:
    """One process under supervision: spawn, log, probe, restart, stop."""

    def __init__(self, spec: ProcessSpec, policy: SupervisorSpec, log: LogSink):
        self.spec, self.policy, self.log = spec, policy, log
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.ever_ready = asyncio.Event()
        self.exited_unready = asyncio.Event()
        self.restarts = 0
        self.started_at = 0.0
        self.stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.spec.name}")

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *_with_parent_death_signal(self.spec.argv), env=dict(self.spec.env),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, process_group=0, limit=1 << 20)
        self.started_at = time.monotonic()
        self.ready = False

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line longer than the buffer: pass it on in pieces
                line = await proc.stdout.read(1 << 16)
            if not line:
                return
            self.log.line(self.spec.name, line.decode(errors="replace").rstrip())

    async def _watch_ready(self) -> None:
        """Probes until ready (the process may die meanwhile: the caller cancels us)."""
        while True:
            with contextlib.suppress(Exception):
                if await self.spec.ready():
                    break
            await asyncio.sleep(0.25)
        self.ready = True
        took = time.monotonic() - self.started_at
        self.log.info(f"{self.spec.name} ready ({took:.1f} s)" + (
            f" after restart {self.restarts}" if self.restarts else ""))
        self.ever_ready.set()

    async def _supervise(self) -> None:
        backoff = self.policy.restart_backoff_s
        while not self.stopping:
            try:
                await self._spawn()
            except OSError as exc:
                self.log.info(f"{self.spec.name} could not start: {exc}")
                self.exited_unready.set()
                return
            proc = self.proc
            if self.stopping:  # stop() came while we were spawning: it saw no process
                self._signal(signal.SIGTERM)
            pump = asyncio.create_task(self._pump(proc))
            watch = asyncio.create_task(self._watch_ready())
            rc = await proc.wait()
            await pump
            watch.cancel()
            self.ready = False
            if self.stopping:
                return
            ran = time.monotonic() - self.started_at
            if not self.ever_ready.is_set():
                self.log.info(f"{self.spec.name} exited ({describe_exit(rc)}) before it was "
                              "ready")
                self.exited_unready.set()
                return
            if ran >= self.policy.stable_after_s:
                backoff = self.policy.restart_backoff_s
            self.restarts += 1
            self.log.info(f"{self.spec.name} crashed ({describe_exit(rc)}); restarting in "
                          f"{backoff:.1f} s (restart {self.restarts})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(backoff * 2, self.policy.max_restart_backoff_s)

    async def wait_ready(self, deadline: float) -> None:
        """Returns once ready; raises StartupFailed if the process dies first or time runs out."""
        ready = asyncio.create_task(self.ever_ready.wait())
        died = asyncio.create_task(self.exited_unready.wait())
        try:
            await asyncio.wait({ready, died}, timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            died.cancel()
        if self.ever_ready.is_set():
            return
        if self.exited_unready.is_set():
            raise StartupFailed(f"{self.spec.name} exited before it was ready (see its log)")
        raise StartupFailed(f"{self.spec.name} was not ready after "
                            f"{self.policy.ready_timeout_s:.0f} s")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the group: helpers the process started, too

    async def stop(self) -> None:
        """SIGTERM (the service drains), SIGKILL after stop_timeout_s; no more restarts."""
        self.stopping = True
        self._wake.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.policy.stop_timeout_s)
            except TimeoutError:
                self.log.info(f"{self.spec.name} did not stop in "
                              f"{self.policy.stop_timeout_s:.0f} s; killing it")
                self._signal(signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def kill(self) -> None:
        self.stopping = True
        self._wake.set()
        self._signal(signal.SIGKILL)


class Supervisor:
    """Starts processes once what they need is ready; stops them group by group."""

    def __init__(self, specs: Sequence[ProcessSpec], policy: SupervisorSpec,
                 stop_order: Sequence[Sequence[str]], out: TextIO = sys.stdout,
                 progress_every_s: float = 5.0):
        names = [s.name for s in specs]
        missing = {n for s in specs for n in s.needs} - set(names)
        if missing:
            raise ValueError(f"unknown dependencies {sorted(missing)}")
        self.log = LogSink(out, names)
        self.procs = {s.name: Managed(s, policy, self.log) for s in specs}
        self.policy = policy
        self.stop_order = [list(group) for group in stop_order]
        unordered = set(names) - {n for g in self.stop_order for n in g}
        if unordered:  # anything not named stops first
            self.stop_order.insert(0, sorted(unordered))
        self.progress_every_s = progress_every_s

    async def _start_one(self, m: Managed, deadline: float) -> None:
        for need in m.spec.needs:
            await self.procs[need].wait_ready(deadline)
        m.start()
        await m.wait_ready(deadline)

    async def start(self) -> None:
        """Starts everything; returns when all are ready. Raises StartupFailed."""
        deadline = time.monotonic() + self.policy.ready_timeout_s
        began = time.monotonic()
        tasks = [asyncio.create_task(self._start_one(m, deadline)) for m in self.procs.values()]
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=self.progress_every_s,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()  # raises StartupFailed
                if pending:
                    self._progress(time.monotonic() - began)
        finally:
            for t in pending:
                t.cancel()

    def _progress(self, elapsed: float) -> None:
        waiting = [f"{m.spec.name} ({'loading' if m.proc else 'queued'})"
                   for m in self.procs.values() if not m.ever_ready.is_set()]
        if waiting:
            self.log.info(f"waiting {elapsed:.0f} s for: {', '.join(waiting)}")

    async def stop(self) -> None:
        """Stops group by group (each group's processes together)."""
        for group in self.stop_order:
            running = [self.procs[n] for n in group if n in self.procs]
            if running:
                self.log.info(f"stopping {', '.join(m.spec.name for m in running)}")
                await asyncio.gather(*(m.stop() for m in running))
        self.log.info("all processes stopped")

    def kill_all(self) -> None:
        for m in self.procs.values():
            m.kill()
