"""Fixtures of the integration tier."""

from __future__ import annotations

import pytest

from tests import stack
from tests.javaproducer import JavaKafkaUnavailable, java_and_libs


@pytest.fixture
def java_kafka(settings):
    """Java and Kafka's client jars, for the tests that publish with Kafka's own Java client."""
    try:
        java_and_libs(settings)
    except JavaKafkaUnavailable as exc:
        if stack.managed_kafka():
            raise       # the local stack fetched these jars and needs java itself: missing is a failure
        pytest.skip(f"Kafka's Java client is unavailable next to the external broker: {exc}")
