"""Every Kafka client of the platform is built here: one place for options, credentials and timeouts
(the consumer group's fetch sizes, the producer's durability, the admin client's timeout).

``build_consumer`` for the pipeline's sources, the channel view, replay and the tools that read a
topic; ``build_producer`` for ``kernel/producer.Producer`` (acks=all, idempotent); ``build_admin`` for
topic creation, readiness and the dead-letter sizes. Authentication comes from ``kafka_auth``.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from services.kernel import kafka_auth, partitioning
from services.kernel.settings import Settings


def build_consumer(settings: Settings, *topics: str, group_id: str | None, client_id: str,
                   max_poll_records: int = 500, credential: tuple[str, str] | None = None,
                   **overrides) -> AIOKafkaConsumer:
    """Every Kafka consumer of the platform is built here (one place for its settings and credentials)."""
    options = dict(
        **kafka_auth.aiokafka_options(settings, credential),
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records,
        request_timeout_ms=settings.kafka_request_timeout_ms * 2,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=2_000,
        max_poll_interval_ms=300_000,
        metadata_max_age_ms=30_000,
        # let a fetch gather up to consumer_fetch_min_bytes (64 KiB) for at most
        # consumer_fetch_max_wait_ms (100 ms): under load, batches (one transaction each) grow
        # instead of the consumer committing a transaction per handful of records, and a consumer
        # that keeps up fetches a few times a second, not fifty (at 20 ms the fetches were most of
        # the notification intake's CPU); the price is at most that wait per hop while traffic is light
        fetch_min_bytes=settings.consumer_fetch_min_bytes,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def build_producer(settings: Settings, *, client_id: str) -> AIOKafkaProducer:
    """The platform's producer: acks=all and idempotent, always (a guarantee, not a setting)."""
    return AIOKafkaProducer(
        **kafka_auth.aiokafka_options(settings),
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.producer_linger_ms,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        max_request_size=16 * 1024 * 1024,
        partitioner=partitioning.partitioner,     # Kafka's default partitioner, cheaper
    )


def build_admin(settings: Settings, *, client_id: str = "bubuh-admin", as_admin: bool = False,
                credential: tuple[str, str] | None = None) -> AIOKafkaAdminClient:
    """An admin client: the service's own principal, the broker admin (``as_admin``, for
    ``bubuh kafka setup``), or the given credential."""
    options = (kafka_auth.aiokafka_options(settings, admin=True) if as_admin
               else kafka_auth.aiokafka_options(settings, credential))
    return AIOKafkaAdminClient(**options, client_id=client_id, request_timeout_ms=settings.kafka_request_timeout_ms)
