"""A consumer joins its group once the broker can coordinate it: a fresh broker's start-up opens with no
library errors, and a broker lost later still shows as the library's WARNING/ERROR lines (nothing muted)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time

import pytest

from services.kernel import readiness, topics
from services.kernel.errors import ConfigError
from services.kernel.processing.pipeline import ConsumerLoop
from services.kernel.producer import Producer
from tests import stack

COORDINATOR_TROUBLE = re.compile(r"coordinator|heartbeat", re.IGNORECASE)


class Nothing:
    async def process(self, events):
        return []


def _library_lines(caplog, since: int = 0) -> list[logging.LogRecord]:
    """aiokafka's records at WARNING or above (as they reach the root handler: their levels untouched)."""
    return [r for r in caplog.records[since:] if r.name.startswith("aiokafka") and r.levelno >= logging.WARNING]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_fresh_broker_starts_quietly_and_a_lost_coordinator_still_logs_at_warning(settings, tmp_path, caplog):
    if not stack.managed_kafka():
        pytest.skip("needs the local stack's Kafka scripts and jars")
    broker = stack.OwnKafka(tmp_path)      # fresh: no __consumer_offsets yet, the case that used to be noisy
    await asyncio.to_thread(broker.start)
    try:
        s = broker.settings(settings, as_admin=True)
        await topics.ensure(s, (topics.Topic("ready.events", "tests", "-", "-", 2),
                                topics.Topic("ready.dead-letter", "tests", "-", "-", 1)))
        producer = Producer(s)
        await producer.start()
        stop = asyncio.Event()
        loop = ConsumerLoop(s, producer, name="ready", topics=[s.topic("ready.events")], handler=Nothing(),
                            dead_letter_topic=s.topic("ready.dead-letter"))
        task = asyncio.create_task(loop.run(stop))
        try:
            await asyncio.wait_for(loop.ready.wait(), 60)
            await asyncio.sleep(2)          # a heartbeat or two: anything still settling would show now
            noise = _library_lines(caplog)
            assert not noise, f"start-up logged library errors: {[r.getMessage() for r in noise]}"
            assert logging.getLogger("aiokafka").getEffectiveLevel() <= logging.WARNING

            pid = broker.pid()
            mark = len(caplog.records)
            await asyncio.to_thread(broker.stop)
            assert _gone(pid), "the broker is still running"
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                seen = [r for r in _library_lines(caplog, mark) if COORDINATOR_TROUBLE.search(r.getMessage())]
                if seen:
                    break
                await asyncio.sleep(0.5)
            assert seen, ("the lost coordinator left no aiokafka line at WARNING or above: "
                          f"{[(r.name, r.levelname, r.getMessage()) for r in caplog.records[mark:]]}")
        finally:
            stop.set()
            # aiokafka's stop() with its broker gone can end in its fetcher's CancelledError
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 20)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)
    finally:
        await asyncio.to_thread(broker.stop)


async def test_a_broker_that_never_coordinates_is_one_clear_config_error(settings):
    """Nothing listens on the port: the wait is bounded and ends in one line naming the setting."""
    s = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{stack.free_port()}",
                                    "kafka_security_protocol": "PLAINTEXT"})
    started = time.monotonic()
    with pytest.raises(ConfigError, match="BUBUH_KAFKA_READY_TIMEOUT_S") as err:
        await readiness.wait_for_group_coordinator(s, s.group("never"), timeout_s=2)
    assert time.monotonic() - started < 10
    assert "cannot coordinate consumer group" in str(err.value)


async def test_a_group_the_principal_may_not_use_is_refused_at_once_not_waited_for(settings):
    """Waiting cannot fix an ACL: the platform principal asking for a group outside its grants stops at once."""
    if settings.kafka_security_protocol.upper() == "PLAINTEXT":
        pytest.skip("needs the secured broker (ACLs)")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="refuses consumer group nobody-"):
        await readiness.wait_for_group_coordinator(settings, f"nobody-{os.getpid()}", timeout_s=30)
    assert time.monotonic() - started < 10
