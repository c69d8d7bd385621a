"""The worked example of docs/channels.md, read from the document itself, so tests check what a reader sees."""

from __future__ import annotations

import re

from services.kernel.settings import REPO_ROOT

DOC = REPO_ROOT / "docs" / "channels.md"


def value(name: str) -> str:
    """A ``name = value`` line of the example's blocks."""
    m = re.search(rf"^{re.escape(name)}\s*=\s*(\S+)\s*$", DOC.read_text(), re.M)
    assert m, f"docs/channels.md has no '{name} = ...' line in its worked example"
    return m.group(1)


def block(title: str) -> str:
    """The body of the fenced block that follows the line starting with ``title``."""
    m = re.search(rf"^{re.escape(title)}[^\n]*\n+```[a-z]*\n(.*?)```", DOC.read_text(), re.S | re.M)
    assert m, f"docs/channels.md has no block after '{title}'"
    return m.group(1)


def record_value() -> bytes:
    return bytes.fromhex(re.sub(r"\s", "", block("The record value, in full")))
