"""`bubuh status` in either local layout: which processes run, and whether the API answers."""

from __future__ import annotations

import os
import socket

import pytest

from services.kernel.settings import Settings
from services.operator import local_processes


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout, api", [("shared", "bubuh"), ("tiers", "api-1")])
def test_status_names_each_process_and_an_api_that_does_not_answer(tmp_path, capsys, layout, api):
    settings = Settings(local_dir=tmp_path, local_layout=layout, http_host="127.0.0.1", http_port=_closed_port())
    assert local_processes.status(settings) is False          # nothing runs
    out = capsys.readouterr().out
    assert all(f"bubuh: {name} stopped" in out for name in local_processes.processes(settings)), out
    (tmp_path / "run" / f"{api}.pid").write_text(str(os.getpid()))   # an API process alive, its port closed
    assert local_processes.status(settings) is False
    out = capsys.readouterr().out
    assert f"bubuh: {api} running (pid {os.getpid()})" in out
    assert "running but the API does not answer" in out
