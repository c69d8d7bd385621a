"""The README tables the benchmarks rewrite: everything between a pair of markers is replaced."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path


def update_readme(readme: Path, table: str, generated_at: str, *, begin: str, end: str, source: str) -> None:
    """Replace the table between ``begin`` and ``end``, so the README always shows the latest run."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: markers {begin!r} / {end!r} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\nLatest run: {generated_at}, `{source}`.\n\n{table}\n{end}{tail}")


def publish(result: dict, table: str, out: Path, readme: Path | None, *, begin: str, end: str) -> None:
    """A benchmark's result: its JSON at ``out``, its table printed and, with ``readme``, put between the markers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table)
    if readme:
        update_readme(readme, table, result["generated_at"], begin=begin, end=end, source=str(out))


def measure_and_publish(measure: Callable[..., Awaitable[dict]], markdown: Callable[[dict], str], args, *,
                        begin: str, end: str) -> int:
    """A benchmark's ``main`` after its arguments: measure, publish, and exit 1 unless every verdict holds."""
    result = asyncio.run(measure(args, dict(os.environ)))
    publish(result, markdown(result), args.out, args.readme, begin=begin, end=end)
    return 0 if all(result["verdict"].values()) else 1
