"""Document work in child processes that can be killed: every PDF the platform opens is opened here.

A PDF is hostile input: a 60 KB form can make a parser spend minutes of CPU, a 0.6 MB file can
inflate to gigabytes. A thread cannot be stopped, a process can. So intake checks, signing and
verification each run in their own small pool of pre-forked children, each child with
- an address-space limit (``RLIMIT_AS``) set once: an allocation past it fails in the child
  (``MemoryError``), never in the API process;
- a CPU budget per task (a profiling timer, ``ITIMER_PROF``, armed with the budget before each task):
  past it the kernel ends the child with SIGPROF, even inside C++ (qpdf) code. Until 5 December this
  was ``RLIMIT_CPU``'s soft limit moved to "CPU used so far + budget", but the kernel checks that
  limit against its own tick-sampled count of the process's CPU time, while ``getrusage`` reads a
  total adjusted to the precise runtime, and in a long-lived child the two can drift apart by more
  than the budget: after 39 minutes of a surge both signing children were ended within 23 s of each
  other while signing the one-page letter, "needs more than 10 s of CPU" (make surge-sustained, 5
  December). The timer counts the task's CPU from the task's start, on the kernel's own clock;
- a wall-clock limit per task, enforced by the parent: past it the child is killed. That one is
  not a verdict on the document (a saturated box is slow for everyone): it is a retryable
  ``PROCESSING_TIMEOUT``; CPU and memory budgets are ``PDF_TOO_COMPLEX``.
A child that died is replaced; one that lives keeps its state, such as the signing key or the
PKCS#11 session opened once by its ``setup``. Children come from a fork server whose parent
loaded the PDF libraries once, so a replacement costs a fork, not an import.

The pool size bounds the concurrency (callers wait for an idle child); ``max_waiting`` bounds the
line (beyond it: ``BUSY``, retryable), so a flood of one kind of work cannot queue without end.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from services.kernel import errors, logs
from services.kernel.waiting import Pause
from services.stamping.metrics import SANDBOX_OUTCOMES, SANDBOX_SECONDS

log = logs.get(__name__)

# loaded once in the fork server, inherited by every child
# (this module too: every child unpickles its entry point, ``_serve``, from here)
# ``services`` first: its import silences cryptography's DSA warning at pyhanko's import (services/__init__.py)
PRELOAD = ["services", "pikepdf", "pyhanko.sign", "pyhanko.sign.validation", "services.stamping.document.inspection",
           "services.stamping.document.signature_validation", "services.stamping.signing.engine",
           "services.stamping.sandbox"]
_START_TIMEOUT_S = 60.0
# A child's end that says nothing about its document: a hang-up or a stop meant for the process (the child
# ignores SIGTERM and SIGINT, but another may come), or an exit nobody can know: multiprocessing reports 255
# when the fork server, which holds the children's exit codes, is gone (a stop of the whole process group).
# The request is retryable (UNAVAILABLE), not PDF_MALFORMED. A crash (abort, segfault) is the document's.
_STOPPED = frozenset({-signal.SIGHUP, -signal.SIGTERM, -signal.SIGINT, 255})
# A task or an answer up to this size crosses on the event loop: the task in one write that cannot block
# (the child waits in ``recv``, and a Unix socket's buffer holds several times this), the answer read as
# its parts arrive. Larger ones (a 10 MiB upload, a signed scan) go through a thread as before. Each
# thread hop waited for a pool thread and for the GIL: in a surge, an intake check of 0.3 ms of CPU took
# 20 ms to come back, and uploads queued behind the two children for 200 ms on average.
_ON_LOOP_BYTES = 64 * 1024
_HEADER = struct.Struct("!i")    # multiprocessing's framing: a message's length, then its bytes
_LONG_HEADER = struct.Struct("!Q")    # after a length of -1: the length of a message of 2 GiB or more


@dataclass(frozen=True)
class ProcessLimits:
    cpu_s: float           # CPU seconds one task may use (the kernel counts whole seconds: up to one more)
    memory_bytes: int      # address space of a child (0: unlimited)
    wall_s: float          # elapsed seconds one task may take, waiting included (a TSA, an HSM)

    @classmethod
    def of(cls, cpu_s: float, wall_s: float, memory_mib: int) -> ProcessLimits:
        return cls(cpu_s=cpu_s, memory_bytes=memory_mib * 1024 * 1024, wall_s=wall_s)


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + _main_module())
    return ctx


def _main_module() -> list[str]:
    """The program's own module (``services.operator.cli`` under ``python -m``): multiprocessing runs it
    again in every child to rebuild ``__main__``; loaded once in the fork server, that costs each child nothing."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return [name] if name and not name.endswith("__main__") else []


def start_fork_server() -> None:
    """Start the fork server now: it loads the PDF libraries (seconds of imports) while the caller
    goes on loading its own, instead of after. The first pool to start then only waits for the rest."""
    _context()
    multiprocessing.forkserver.ensure_running()


def _serve(conn: Connection, setup: Callable[..., Any] | None, setup_args: tuple, memory_bytes: int,
           nice: int, idle: bool = False) -> None:
    """The child: set its limits, build its state once, then run tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is the parent's; it stops us
    # so is a stop sent to the whole process group (`bubuh down`, systemd's cgroup): the parent finishes
    # the task in hand, then stops us; dying here failed a paid stamp as a crash of the reader
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGPROF, signal.SIG_DFL)         # past the task's CPU budget: the kernel ends us
    # a hang-up ends us (the parent reads it as a stop: retryable), whatever our launcher set: under nohup
    # the fork server inherited SIGHUP ignored and handed that on, and a hung-up child ran its task to the end
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if nice:
        os.nice(nice)
    if idle:
        # SCHED_IDLE: runs on what CPU nothing else wants, and any other task that wakes takes the core at
        # once (at nice 10 a waking task could still wait out the child's slice: intake's hops each did)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        state = setup(*setup_args) if setup is not None else None
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which refuses to start
        conn.send(("setup-failed", f"{type(exc).__name__}: {exc}"[:1000]))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return                                         # the parent is gone
        if task is None:
            return
        fn, args, cpu_s = task
        signal.setitimer(signal.ITIMER_PROF, cpu_s)       # this task's CPU (user and system), from now
        try:
            reply = ("ok", fn(state, *args))
        except MemoryError:
            conn.send(("memory", ""))
            return                                         # a fresh child takes over
        except errors.BubuhError as exc:
            reply = ("bubuh", (exc.code.code, exc.detail))
        except RecursionError:
            reply = ("bubuh", (errors.PDF_MALFORMED.code, "object nesting is too deep"))
        except BaseException as exc:  # noqa: BLE001 - the task's failure, reported as such
            reply = ("error", f"{type(exc).__name__}: {exc}"[:1000])
        signal.setitimer(signal.ITIMER_PROF, 0)            # disarmed between tasks
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory", ""))
            return


class _Child:
    def __init__(self, process, conn: Connection, pid: int) -> None:
        self.process = process
        self.conn = conn
        self.pid = pid
        # the same socket (``Pipe()`` is a socket pair), read here frame by frame in multiprocessing's framing
        self._socket = socket.socket(fileno=os.dup(conn.fileno()))

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> int | None:
        """The child's exit code once it is gone (negative: the signal that ended it)."""
        self.process.join(timeout=5)
        for end in (self.conn, self._socket):
            try:
                end.close()
            except OSError:
                pass
        return self.process.exitcode

    def send_now(self, payload: bytes) -> bool:
        """Send a small task from a callback, without waiting: False when it is large (or the child is gone),
        and the caller's own ``exchange`` sends it."""
        if len(payload) > _ON_LOOP_BYTES:
            return False
        try:
            self.conn.send_bytes(payload)
        except OSError:
            return False              # the caller's exchange meets the same end and reports it
        return True

    async def exchange(self, payload: bytes, *, sent: bool = False) -> tuple[str, Any]:
        """Send the pickled task (unless it was ``sent`` already), return the child's answer: on the event
        loop when each is small."""
        if not sent and not self.send_now(payload):
            await asyncio.to_thread(self.conn.send_bytes, payload)
        size = _HEADER.unpack(await self._read_on_loop(_HEADER.size))[0]
        if size == -1:                                     # multiprocessing's mark for 2 GiB and more
            size = _LONG_HEADER.unpack(await self._read_on_loop(_LONG_HEADER.size))[0]
        if size <= _ON_LOOP_BYTES:
            answer = await self._read_on_loop(size)
        else:
            answer = await asyncio.to_thread(self._read_waiting, size)
        return ForkingPickler.loads(answer)

    async def _read_on_loop(self, size: int) -> bytes:
        """Exactly ``size`` bytes, read as they arrive: the child may write a frame in two parts, and a
        reader woken by the first waits for the second instead of falling back to a thread."""
        got = bytearray()
        while len(got) < size:
            try:
                self._read_part(got, size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await _readable(self._socket.fileno())
        return bytes(got)

    def _read_waiting(self, size: int) -> bytes:
        """Exactly ``size`` bytes in a thread, waiting in ``recv``: for the large answers."""
        got = bytearray()
        while len(got) < size:
            self._read_part(got, size, 0)
        return bytes(got)

    def _read_part(self, got: bytearray, size: int, flags: int) -> None:
        """Adds to ``got`` what has arrived of the ``size`` bytes (at most 1 MiB at a time)."""
        part = self._socket.recv(min(size - len(got), 1 << 20), flags)
        if not part:
            raise EOFError("the child closed its end")
        got += part


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
        # uvloop's watcher made the socket non-blocking (libuv's uv_poll_init), and the flag belongs to the
        # socket, not to the watcher: a large answer's ``recv`` in a thread then failed with EAGAIN midway
        os.set_blocking(fd, True)


@dataclass(eq=False)
class _Waiter:
    """A caller waiting for a child, with its task ready to send."""
    payload: bytes
    child: asyncio.Future[_Child | None]     # None: the sandbox stopped
    sent: bool = False                       # the child that freed up has the task already


class Sandbox:
    def __init__(self, name: str, *, size: int, budget: ProcessLimits, setup: Callable[..., Any] | None = None,
                 setup_args: tuple = (), nice: int = 0, idle: bool = False, max_waiting: int | None = None) -> None:
        self.name = name
        self.size = size
        self.budget = budget
        self._setup = setup
        self._setup_args = setup_args
        self._nice = nice
        self._sched_idle = idle
        self._max_waiting = max_waiting
        self._idle: collections.deque[_Child] = collections.deque()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._children: set[_Child] = set()
        self._closed = False
        self._replacing: set[asyncio.Task] = set()

    async def start(self) -> Sandbox:
        """Start every child; raises ``RuntimeError`` with the child's words when its setup failed."""
        children = await asyncio.gather(*(asyncio.to_thread(self._spawn) for _ in range(self.size)))
        for child in children:
            self._children.add(child)
            self._release(child)
        return self

    def _spawn(self) -> _Child:
        parent_end, child_end = multiprocessing.Pipe()
        process = _context().Process(target=_serve, name=f"bubuh-{self.name}",
                                     args=(child_end, self._setup, self._setup_args, self.budget.memory_bytes,
                                           self._nice, self._sched_idle), daemon=True)
        process.start()
        child_end.close()
        if not parent_end.poll(_START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"{self.name}: a child did not start within {_START_TIMEOUT_S:g} s")
        try:
            kind, value = parent_end.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: a child died while starting (exit {process.exitcode})") from None
        if kind != "ready":
            process.join(timeout=5)
            raise RuntimeError(f"{self.name}: {value}")
        return _Child(process, parent_end, value)

    @property
    def stopping(self) -> bool:
        """``stop`` has begun: a task that fails from now on failed because of it, not of its document."""
        return self._closed

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(state, *args)`` in an idle child, within the budget. ``fn`` is a module-level function."""
        if self._closed:
            raise errors.BubuhError(errors.UNAVAILABLE, f"{self.name}: shutting down")
        payload = ForkingPickler.dumps((fn, args, self.budget.cpu_s))
        sent = False
        if self._idle:
            child: _Child | None = self._idle.popleft()
        else:
            child, sent = await self._wait_for_child(payload)
        if child is None:                    # ``stop`` wakes those waiting for a child that will not come
            raise errors.BubuhError(errors.UNAVAILABLE, f"{self.name}: shutting down")
        started = time.perf_counter()
        try:
            kind, value = await asyncio.wait_for(child.exchange(payload, sent=sent), self.budget.wall_s)
        except TimeoutError:
            child.kill()
            self._replace(child)
            SANDBOX_OUTCOMES.labels(self.name, "timeout").inc()
            raise errors.BubuhError(errors.PROCESSING_TIMEOUT,
                                    f"{self.name}: not done within {self.budget.wall_s:g} s") from None
        except (EOFError, OSError) as exc:
            raise self._died(child, started) from exc
        except BaseException:
            child.kill()                     # cancelled mid-exchange: the child's answer would be out of step
            self._replace(child)
            raise
        finally:
            SANDBOX_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        if kind == "memory":
            self._replace(child)
            SANDBOX_OUTCOMES.labels(self.name, "memory").inc()
            raise errors.BubuhError(errors.PDF_TOO_COMPLEX, f"needs more than {self._mib} MiB of memory")
        self._release(child)
        if kind == "ok":
            SANDBOX_OUTCOMES.labels(self.name, "ok").inc()
            return value
        if kind == "bubuh":
            code, detail = value
            SANDBOX_OUTCOMES.labels(self.name, "refused").inc()
            raise errors.BubuhError(errors.lookup(code), detail)
        SANDBOX_OUTCOMES.labels(self.name, "error").inc()
        raise RuntimeError(f"{self.name}: {value}")

    async def _wait_for_child(self, payload: bytes) -> tuple[_Child | None, bool]:
        if self._max_waiting is not None and len(self._waiters) >= self._max_waiting:
            SANDBOX_OUTCOMES.labels(self.name, "busy").inc()
            raise errors.BubuhError(errors.BUSY, f"{self.name}: {len(self._waiters)} documents already wait")
        waiter = _Waiter(payload, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            return await waiter.child, waiter.sent
        except asyncio.CancelledError:
            # still in line: the caller's cancel cancelled its future too (so it was ``done``, and it kept its
            # place, counted against ``max_waiting``, until a child came free)
            if waiter.child.cancelled() or not waiter.child.done():
                self._waiters.remove(waiter)
            elif (child := waiter.child.result()) is not None:     # handed over as the caller went away
                if waiter.sent:
                    self._replace(child)     # it works on a task nobody will read: its answer would be out of step
                else:
                    self._release(child)
            raise

    def _release(self, child: _Child) -> None:
        """A free child goes to the first caller waiting, with that caller's task sent at once: the child
        starts on it now, not once the caller's turn on the event loop comes (in a surge, a turn of the
        loop took longer than the check itself, and the children sat idle between tasks)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.child.done():
                continue
            waiter.sent = child.send_now(waiter.payload)
            waiter.child.set_result(child)
            return
        self._idle.append(child)

    @property
    def _mib(self) -> int:
        return self.budget.memory_bytes // (1024 * 1024)

    def _died(self, child: _Child, started: float) -> errors.BubuhError:
        exit_code = child.reap()
        self._replace(child, reaped=True)
        if self._closed or exit_code in _STOPPED:     # ``stop`` kills busy children: not the document either
            SANDBOX_OUTCOMES.labels(self.name, "stopped").inc()
            log.warning("document reader stopped mid-task; the request is worth trying again", sandbox=self.name,
                        exit_code=exit_code)
            return errors.BubuhError(errors.UNAVAILABLE, f"{self.name}: the reader was stopped (exit {exit_code}), "
                                                         "not by the document; try again")
        if exit_code == -signal.SIGPROF:
            SANDBOX_OUTCOMES.labels(self.name, "cpu").inc()
            return errors.BubuhError(errors.PDF_TOO_COMPLEX, f"needs more than {self.budget.cpu_s:g} s of CPU")
        if exit_code == -signal.SIGKILL:        # not ours (we only kill on timeout): the kernel's OOM killer
            SANDBOX_OUTCOMES.labels(self.name, "memory").inc()
            return errors.BubuhError(errors.PDF_TOO_COMPLEX, "the reader was killed for its memory use")
        SANDBOX_OUTCOMES.labels(self.name, "crashed").inc()
        log.warning("document reader crashed", sandbox=self.name, exit_code=exit_code,
                    seconds=round(time.perf_counter() - started, 3))
        return errors.BubuhError(errors.PDF_MALFORMED, f"the document crashed the reader (exit {exit_code})")

    def _replace(self, child: _Child, *, reaped: bool = False) -> None:
        self._children.discard(child)
        if not reaped:
            child.kill()
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(child.reap))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._respawn())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _respawn(self) -> None:
        pause = Pause()
        while not self._closed:
            try:
                child = await asyncio.to_thread(self._spawn)
            except Exception as exc:  # noqa: BLE001 - e.g. the HSM is away: keep trying, slower
                log.warning("document sandbox child did not start; retrying", sandbox=self.name, error=str(exc))
                await asyncio.sleep(pause.next())
                continue
            if self._closed:
                child.kill()
                await asyncio.to_thread(child.reap)
                return
            self._children.add(child)
            self._release(child)
            return

    async def stop(self) -> None:
        """Idle children are told to stop; busy ones (a task in flight) are killed."""
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        idle = list(self._idle)
        self._idle.clear()
        while self._waiters:                # each waiting caller gets its answer now, not a cancel at the end
            if not (waiter := self._waiters.popleft()).child.done():
                waiter.child.set_result(None)
        busy = [c for c in self._children if c not in idle]
        self._children = set()
        for child in idle:
            try:
                child.conn.send(None)
            except OSError:
                pass
        for child in busy:
            child.kill()

        def finish(child: _Child) -> None:
            child.process.join(timeout=3)
            if child.process.exitcode is None:
                child.kill()
            child.reap()
        # a busy child's socket is its caller's to close, once it has read the end there (``_died``): closed
        # here, under the caller's wait for it to turn readable, that wait never ended (the loop stops
        # watching a closed socket), and the caller hung until its wall-clock budget
        await asyncio.gather(*(asyncio.to_thread(finish, c) for c in idle),
                             *(asyncio.to_thread(c.process.join, 3) for c in busy))

    async def serve(self, stop: asyncio.Event) -> None:
        """A runtime task: the children live until ``stop``."""
        await stop.wait()
        await self.stop()

    def pids(self) -> list[int]:
        return sorted(c.pid for c in self._children)
