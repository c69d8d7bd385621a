-- The fair queue (issue 12): reserved stamp requests wait here, and the workers take them in order of
-- their start tag, a virtual time kept per channel (start-time fair queueing, services/stamping/fair_queue.py),
-- not in order of arrival. A row is held (FOR UPDATE) by the worker signing it and deleted when it is done:
-- a killed worker's connection ends, its row is free again at once.
CREATE TABLE schedule (
    request_id  text        PRIMARY KEY,
    channel_id  text        NOT NULL,
    start_tag   float8      NOT NULL,
    seq         bigserial   NOT NULL,      -- equal tags: arrival order
    topic       text        NOT NULL,      -- the QuotaReserved record as it was read
    "partition" int         NOT NULL,
    "offset"    bigint      NOT NULL,
    record_key  bytea,
    headers     jsonb       NOT NULL,      -- {name: hex value}
    event       bytea       NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedule_order ON schedule (start_tag, seq);
CREATE INDEX schedule_channel ON schedule (channel_id, start_tag);
