"""``bubuh serve`` runs on the loop BUBUH_EVENT_LOOP names; a wrong name is a one-line ConfigError."""

import asyncio

import pytest
import uvloop

from services.kernel import event_loop
from services.kernel.errors import ConfigError
from services.kernel.settings import Settings


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default() -> None:
    assert Settings().event_loop == "uvloop"
    assert event_loop.run(_loop_type(), "uvloop") is uvloop.Loop


def test_the_standard_loop_on_request() -> None:
    assert not issubclass(event_loop.run(_loop_type(), "asyncio"), uvloop.Loop)


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected uvloop or asyncio"):
        event_loop.factory("trio")
