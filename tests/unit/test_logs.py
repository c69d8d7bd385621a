"""Log format: JSON for machines, readable lines for a person at a terminal, one format per process."""

from __future__ import annotations

import io
import json
import logging

import pytest

from services.kernel import logs
from services.kernel.settings import Settings


class Terminal(io.StringIO):
    """A stream that says it is a terminal (as stderr under `make run`)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore():
    yield
    logs.configure("tests", level="warning", fmt="console")    # as tests/conftest.py has it


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def test_auto_is_console_on_a_terminal_and_json_elsewhere():
    assert logs.resolve_format("auto", Terminal()) == "console"
    assert logs.resolve_format("auto", io.StringIO()) == "json"
    assert logs.resolve_format("", io.StringIO()) == "json"


def test_an_explicit_format_wins_over_the_terminal_check():
    assert logs.resolve_format("json", Terminal()) == "json"
    assert logs.resolve_format("console", io.StringIO()) == "console"
    with pytest.raises(ValueError, match="BUBUH_LOG_FORMAT"):
        logs.resolve_format("xml", io.StringIO())


def test_the_default_setting_is_auto_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.delenv("BUBUH_LOG_FORMAT", raising=False)
    assert Settings().log_format == "auto"
    monkeypatch.setenv("BUBUH_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()


def test_not_a_terminal_our_lines_and_the_libraries_are_json():
    out = io.StringIO()
    assert logs.configure("svc", level="info", fmt="auto", stream=out) == "json"
    logs.get("bubuh.test").info("consumer started", consumer="smoke")
    logging.getLogger("aiokafka.consumer.group_coordinator").error("Group Coordinator Request failed: %s", "boom")
    ours, library = (json.loads(line) for line in _lines(out))
    assert ours["event"] == "consumer started" and ours["level"] == "info" and ours["service"] == "svc"
    assert library["event"] == "Group Coordinator Request failed: boom"
    assert library["level"] == "error" and library["logger"] == "aiokafka.consumer.group_coordinator"
    assert library["service"] == "svc" and "timestamp" in library


def test_on_a_terminal_lines_are_readable_and_coloured_for_ours_and_the_libraries():
    out = Terminal()
    assert logs.configure("svc", level="info", fmt="auto", stream=out) == "console"
    logs.get("bubuh.test").info("consumer started", consumer="smoke")
    logging.getLogger("aiokafka").warning("Heartbeat failed")
    ours, library = _lines(out)
    for line in (ours, library):
        assert not line.lstrip().startswith("{")
        assert "\x1b[" in line                           # ANSI colours
    assert "consumer started" in ours and "smoke" in ours
    assert "Heartbeat failed" in library and "aiokafka" in library


def test_console_into_a_file_has_no_colour_codes():
    out = io.StringIO()
    logs.configure("svc", level="info", fmt="console", stream=out)
    logs.get().warning("something")
    (line,) = _lines(out)
    assert "something" in line and "\x1b[" not in line


def test_library_warnings_show_at_info_and_their_info_chatter_does_not():
    out = io.StringIO()
    logs.configure("svc", level="info", fmt="json", stream=out)
    lib = logging.getLogger("aiokafka.consumer.group_coordinator")
    lib.info("(Re-)joining group")
    lib.warning("Heartbeat failed for group")
    assert [json.loads(line)["event"] for line in _lines(out)] == ["Heartbeat failed for group"]
    assert lib.level == logging.NOTSET          # the library's own level is never raised


def test_configuring_again_replaces_the_handler_instead_of_doubling_lines():
    first, second = io.StringIO(), io.StringIO()
    logs.configure("svc", fmt="json", stream=first)
    logs.configure("svc", fmt="json", stream=second)
    logging.getLogger("aiokafka").error("once")
    assert first.getvalue() == "" and len(_lines(second)) == 1


def test_a_library_repeating_itself_is_written_once_per_window_with_the_count_of_what_was_dropped():
    """A broker away made aiokafka write ~600 lines a second; ours are never dropped."""
    out = io.StringIO()
    logs.configure("tests", level="info", fmt="json", stream=out)
    now = [1000.0]
    repeats = next(f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, logs.Repeats))
    repeats.clock = lambda: now[0]
    lib = logging.getLogger("aiokafka.conn")
    for _ in range(500):
        lib.warning("Unable connect to node with id %s: %s", 1, "[Errno 111] Connection refused")
        logs.get("ours").warning("ours, every time")
    lib.warning("Unable to update metadata from %s", [1])          # another template: its own line
    now[0] += logs.REPEAT_WINDOW_S + 1
    lib.warning("Unable connect to node with id %s: %s", 1, "[Errno 111] Connection refused")
    lines = [json.loads(line) for line in _lines(out)]
    library = [x["event"] for x in lines if x.get("logger") == "aiokafka.conn"]
    assert library == ["Unable connect to node with id 1: [Errno 111] Connection refused",
                       "Unable to update metadata from [1]",
                       "Unable connect to node with id 1: [Errno 111] Connection refused "
                       "[499 more like this in 11 s]"]
    assert sum(x["event"] == "ours, every time" for x in lines) == 500
