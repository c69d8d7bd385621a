"""Module-level tasks for the sandbox tests (a child imports them by name)."""

from __future__ import annotations

import os
import time

from services.kernel import errors


def opened(label: str) -> dict:
    return {"label": label, "pid": os.getpid(), "opened_at": time.time()}


def whoami(state) -> dict:
    return state


def spin(state) -> None:
    while True:
        pass


def burn(state, cpu_s: float) -> float:
    """Spends ``cpu_s`` of this process's CPU, then answers its CPU time so far."""
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass
    return time.process_time()


def allocate(state, n: int) -> int:
    return len(bytearray(n))


def sleep(state, s: float) -> str:
    time.sleep(s)
    return "slept"


def refuse(state) -> None:
    raise errors.BubuhError(errors.PDF_MALFORMED, "not a PDF at all")


def crash(state) -> None:
    os.abort()


def cannot_open(label: str) -> None:
    raise OSError(f"no key at {label}")


def scheduling(state) -> tuple[int, int]:
    """The child's scheduling policy and nice value."""
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)


def echo(state, data: bytes) -> bytes:
    return data


def started_at(state) -> float:
    """When the child began this task (the parent's clock too: one machine)."""
    return time.time()
