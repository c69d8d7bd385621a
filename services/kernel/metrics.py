"""Prometheus metrics of the kernel (consumers, outbox, HTTP) and the ``/metrics`` endpoint.

Names are ``bubuh_*`` with the unit in the name. Each service declares its domain metrics in its
own package; they all land in the default registry and are served by the same endpoint.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

CONSUMED = Counter("bubuh_consumer_records_total", "Records handled by a consumer, by outcome",
                   ["consumer", "topic", "outcome"])
HANDLE_SECONDS = Histogram("bubuh_consumer_handle_seconds", "Time to handle one record",
                           ["consumer", "topic"],
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
BATCH_RECORDS = Histogram("bubuh_consumer_batch_records", "Records of one partition handled as one batch",
                          ["consumer"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
LAG = Gauge("bubuh_consumer_lag_records", "Records between the committed offset and the end of a partition",
            ["consumer", "topic", "partition"])
DEAD_LETTERED = Counter("bubuh_dead_letter_records_total", "Records sent to a dead-letter topic, by reason",
                        ["consumer", "reason"])
OUTAGE_PAUSES = Counter("bubuh_consumer_outage_pauses_total", "Times a consumer paused for a dependency outage",
                        ["consumer"])
FAILURES = Counter("bubuh_failures_total", "Failures seen by consumers and doors, by classified kind and SQLSTATE",
                   ["component", "kind", "sqlstate"])
PAUSED_PARTITIONS = Gauge("bubuh_consumer_paused_partitions", "Partitions a consumer holds paused for an outage",
                          ["consumer"])
DEAD_LETTER_TOPIC_RECORDS = Gauge("bubuh_dead_letter_topic_records",
                                  "Records a dead-letter topic holds (end minus start offsets over its "
                                  "partitions), read from Kafka by the processes running the owning service",
                                  ["topic"])
CONSUMER_STOPPED = Gauge("bubuh_consumer_stopped", "1 while a consumer is stopped by its dead-letter limit",
                         ["consumer", "reason"])
CRASH_RETRIES = Counter("bubuh_consumer_crash_retries_total",
                        "Records whose handler crashed, scheduled again through the durable retry path", ["consumer"])
UNDECODABLE = Counter("bubuh_consumer_undecodable_batches_total",
                      "Fetched batches that could not be decoded (dead-lettered as markers)", ["consumer", "topic"])
INBOX_PRUNED = Counter("bubuh_inbox_pruned_rows_total", "Inbox claims deleted after their retention", ["service"])
OUTBOX_PUBLISHED = Counter("bubuh_outbox_published_records_total", "Outbox rows published to Kafka", ["schema"])
OUTBOX_LAG_SECONDS = Histogram("bubuh_outbox_lag_seconds", "Age of the oldest row of a published outbox batch",
                               ["schema"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
LEADING = Gauge("bubuh_leader", "1 while this process holds the named leadership lock (kernel/leadership.py: an "
                "outbox's relay, quota's expiry sweep), else 0", ["lock"])
PRODUCER_RENEWALS = Counter("bubuh_kafka_producer_renewals_total",
                            "Kafka producers replaced after a fatal idempotence error", ["client"])
HTTP_REQUESTS = Counter("bubuh_http_requests_total", "HTTP requests by route and status", ["route", "status"])
# a route's admission bound (kernel/http.py, BodyLimits): callers given a place in line, and what their
# tickets met when they came back: "issued", "honoured" (let in at their time), "early" (told to wait on),
# "full" (their time, but the route was full even for them), "invalid" (forged, another request's, expired)
QUEUE_TICKETS = Counter("bubuh_http_queue_tickets_total", "Bubuh-Queue-Tickets by route and outcome",
                        ["route", "outcome"])
DOOR_FIRST = Gauge("bubuh_stamp_yielding_to_door", "1 while this stamping worker runs at a lower CPU priority because "
                   "the front door on its box is busy (kernel/door_pressure.py), else 0")
HTTP_SECONDS = Histogram("bubuh_http_request_seconds", "HTTP request latency by route", ["route"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))


def set_snapshot(gauge: Gauge, values: dict[tuple[str, ...], float], shown: set[tuple[str, ...]]) -> None:
    """Set a labelled gauge from one complete reading (label values -> value): label sets of an earlier
    reading that are gone now show 0 rather than their last value (a drained queue reads 0, not stale)."""
    for labels in shown - set(values):
        gauge.labels(*labels).set(0)
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    shown.update(values)        # in place: the caller keeps this set between readings


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
