"""Event envelopes: building, encoding and decoding the records that travel on Kafka.

The record value is a ``bubuh.v1.Envelope`` whose payload is the domain message; the headers
repeat the type, the event id and a W3C ``traceparent`` for tools that only read headers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError, Message

from services.contracts.bubuh.v1 import (
    channel_door_pb2,
    channel_pb2,
    envelope_pb2,
    notification_pb2,
    purchase_pb2,
    quota_pb2,
    stamp_pb2,
)
from services.kernel import errors, tracing

# every file's own messages (a public import re-exports classes, not descriptors): the envelope's
# `type` is a full message name, and these names never change, so old records keep decoding
_MODULES = (channel_door_pb2, channel_pb2, purchase_pb2, quota_pb2, stamp_pb2, notification_pb2, envelope_pb2)
TYPES: dict[str, type[Message]] = {
    desc.full_name: getattr(mod, name)
    for mod in _MODULES
    for name, desc in mod.DESCRIPTOR.message_types_by_name.items()
}

HEADER_TYPE = "bubuh-event-type"
HEADER_EVENT_ID = "bubuh-event-id"
HEADER_TRACEPARENT = "traceparent"


@dataclass(frozen=True)
class Outgoing:
    """A record ready to publish: the unit an outbox row stores and a producer sends."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    event_id: str = ""


@dataclass(frozen=True)
class Event:
    """A decoded incoming record."""

    envelope: envelope_pb2.Envelope
    payload: Message
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes]
    raw: bytes
    appended_at_ms: int = 0    # the broker's append time, when the topic records it (see Record)

    def received_at(self) -> dt.datetime:
        """When the platform received the record: the broker's append time, else this clock's now
        (never a time the sender chose)."""
        if self.appended_at_ms:
            return dt.datetime.fromtimestamp(self.appended_at_ms / 1000, dt.UTC)
        return dt.datetime.now(dt.UTC)

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    @property
    def type(self) -> str:
        return self.envelope.type


def type_name(msg: Message | type[Message]) -> str:
    return msg.DESCRIPTOR.full_name


def envelope(payload: Message, *, producer: str, causation_id: str = "", event_id: str | None = None,
             trace_id: str | None = None, occurred_at: dt.datetime | None = None) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        event_id=event_id or tracing.new_event_id(),
        causation_id=causation_id,
        trace_id=trace_id or tracing.current() or tracing.new_trace_id(),
        producer=producer,
        type=type_name(payload),
        payload=payload.SerializeToString(),
    )
    env.occurred_at.FromDatetime(occurred_at or dt.datetime.now(dt.UTC))
    return env


def outgoing(topic: str, key: str | bytes | None, env: envelope_pb2.Envelope,
             extra_headers: list[tuple[str, bytes]] | None = None) -> Outgoing:
    headers = [
        (HEADER_TYPE, env.type.encode()),
        (HEADER_EVENT_ID, env.event_id.encode()),
        (HEADER_TRACEPARENT, tracing.traceparent(env.trace_id).encode()),
    ] + (extra_headers or [])
    k = key.encode() if isinstance(key, str) else key
    return Outgoing(topic=topic, key=k, value=env.SerializeToString(), headers=headers, event_id=env.event_id)


def decode(value: bytes | None) -> tuple[envelope_pb2.Envelope, Message]:
    """Parse a record value; a malformed one raises ``BubuhError`` with a catalogued code."""
    if not value:
        raise errors.BubuhError(errors.EVENT_MALFORMED, "empty record value")
    env = envelope_pb2.Envelope()
    try:
        env.ParseFromString(value)
    except (DecodeError, RuntimeWarning) as exc:
        raise errors.BubuhError(errors.EVENT_MALFORMED, f"not an Envelope: {exc}") from None
    if not env.event_id or not env.type:
        raise errors.BubuhError(errors.EVENT_MALFORMED, "envelope without event_id or type")
    cls = TYPES.get(env.type)
    if cls is None:
        raise errors.BubuhError(errors.EVENT_TYPE_UNKNOWN, f"unknown type {env.type!r}")
    payload = cls()
    try:
        payload.ParseFromString(env.payload)
    except (DecodeError, RuntimeWarning) as exc:
        raise errors.BubuhError(errors.EVENT_MALFORMED, f"payload is not a {env.type}: {exc}") from None
    return env, payload


def account_key(channel_id: str, account_id: str) -> str:
    """The Kafka key of everything about one account: its events stay in order on one partition."""
    return f"{channel_id}/{account_id}"
