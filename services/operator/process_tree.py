"""The local process tree, read from /proc: what descends from a process, and who is in a process group.

For what runs beside the platform on one box: the benchmarks count a worker's fork server and its
signing children with it, the fault tests follow a process's connections into its children and wait
for a stopped worker's whole group to end. Linux only (``/proc/<pid>/stat``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path


def _stats() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process; one that ends meanwhile is left out."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()     # after the command name, which may hold anything
        yield int(d.name), fields[0], int(fields[1]), int(fields[2])


def descendants(pids: Iterable[int]) -> set[int]:
    """Every process below ``pids`` (children, their children, ...), not ``pids`` themselves."""
    children: dict[int, list[int]] = {}
    for pid, _, ppid, _ in _stats():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def group(pgid: int) -> list[int]:
    """The live members of process group ``pgid`` (zombies, already ended, left out)."""
    return [pid for pid, state, _, pgrp in _stats() if pgrp == pgid and state != "Z"]
