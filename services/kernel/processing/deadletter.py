"""Dead letters: the record, its reason, and the limit that stops a consumer dead-lettering a healthy topic.

A dead-letter entry is the original record, unchanged, with ``bubuh-dlq-*`` headers saying why,
where from, which consumer and when, so ``bubuh replay`` can send it back as it was. An undecodable
stretch of a partition has no record to keep: its entry is a *marker* (no payload, the offset range
in ``bubuh-dlq-source``, ``bubuh-dlq-marker: 1``), which replay skips.

``DlqLimit`` (after arroyo's): a consumer that dead-letters too much in a row, or too large a share
of a window, stops and says so, because a bug or a bad deploy would otherwise drain a healthy topic
into the dead-letter topic. Codes a consumer expects from hostile input (a forged channel event)
can be exempted, so a hostile channel cannot stop crediting for everybody.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass

from services.kernel.events import Outgoing
from services.kernel.processing.source import Record, Undecodable
from services.kernel.settings import Settings

DLQ_REASON = "bubuh-dlq-reason"
DLQ_DETAIL = "bubuh-dlq-detail"
DLQ_SOURCE = "bubuh-dlq-source"
DLQ_CONSUMER = "bubuh-dlq-consumer"
DLQ_AT = "bubuh-dlq-at"
DLQ_MARKER = "bubuh-dlq-marker"
UNDECODABLE = "EVENT_UNDECODABLE"


def dead_letter_headers(headers, *, code: str, detail: str, source: str, consumer: str,
                        extra: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The original headers (minus earlier ``bubuh-dlq-*``) with the reason, where from, who, when."""
    kept = [(k, v) for k, v in headers if not k.startswith("bubuh-dlq-")]
    return kept + [
        (DLQ_REASON, code.encode()),
        (DLQ_DETAIL, detail[:2000].encode()),
        (DLQ_SOURCE, source.encode()),
        (DLQ_CONSUMER, consumer.encode()),
        (DLQ_AT, dt.datetime.now(dt.UTC).isoformat().encode()),
    ] + (extra or [])


def dead_letter_record(record: Record, dlq_topic: str, consumer: str, code: str, detail: str) -> Outgoing:
    """The original record, unchanged, with the reason in ``bubuh-dlq-*`` headers (replayable as is)."""
    headers = dead_letter_headers(record.headers or (), code=code, detail=detail, consumer=consumer,
                                  source=f"{record.topic}/{record.partition}/{record.offset}")
    return Outgoing(topic=dlq_topic, key=record.key, value=record.value or b"", headers=headers)


def marker_record(stretch: Undecodable, dlq_topic: str, consumer: str, code: str) -> Outgoing:
    """A marker for a stretch that could not be decoded: where it was and why; no payload."""
    tp = stretch.tp
    headers = dead_letter_headers((), code=code, detail=stretch.reason, consumer=consumer,
                                  source=f"{tp.topic}/{tp.partition}/{stretch.start}-{stretch.end - 1}",
                                  extra=[(DLQ_MARKER, b"1")])
    return Outgoing(topic=dlq_topic, key=f"{tp.topic}/{tp.partition}/{stretch.start}".encode(), value=b"",
                    headers=headers)


@dataclass(frozen=True)
class DlqLimit:
    max_consecutive: int = 200     # 0: no limit
    max_ratio: float = 0.5         # 0: no limit
    window_s: float = 60.0
    min_records: int = 200

    @classmethod
    def from_settings(cls, s: Settings) -> DlqLimit:
        return cls(s.consumer_dlq_max_consecutive, s.consumer_dlq_max_ratio, s.consumer_dlq_window_s,
                   s.consumer_dlq_min_records)


class DlqWatch:
    """Counts handled and dead-lettered records; says when one more dead letter would break the limit.

    The window is kept as one-second buckets, so counting a batch of handled records costs the same
    as counting one.
    """

    def __init__(self, limit: DlqLimit, clock=time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._consecutive = 0
        self._buckets: deque[list] = deque()    # [second, handled, dead-lettered]
        self._handled = 0
        self._dead = 0

    def _bucket(self) -> list:
        now = self._clock()
        second = int(now)
        while self._buckets and now - self._buckets[0][0] > self._limit.window_s:
            _, handled, dead = self._buckets.popleft()
            self._handled -= handled
            self._dead -= dead
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def handled(self, n: int = 1) -> None:
        if n <= 0:
            return
        self._consecutive = 0
        if self._limit.max_ratio:
            self._bucket()[1] += n
            self._handled += n

    def would_exceed(self) -> str | None:
        """Why one more dead letter breaks the limit, or None."""
        lim = self._limit
        if lim.max_consecutive and self._consecutive + 1 > lim.max_consecutive:
            return f"{self._consecutive + 1} dead letters in a row (limit {lim.max_consecutive})"
        if lim.max_ratio:
            self._bucket()
            dead = self._dead + 1
            total = self._handled + dead
            if total >= lim.min_records and dead / total > lim.max_ratio:
                return (f"{dead} of the last {total} records dead-lettered within {lim.window_s:g} s "
                        f"(limit {lim.max_ratio:.0%})")
        return None

    def dead_lettered(self) -> None:
        self._consecutive += 1
        if self._limit.max_ratio:
            self._bucket()[2] += 1
            self._dead += 1
