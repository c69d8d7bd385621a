-- Kernel tables present in every service's schema.

-- The inbox: the events a consumer has applied, written in the same transaction as the effect,
-- so a redelivered event is recognised and skipped (invariant 4).
CREATE TABLE inbox (
    consumer   text        NOT NULL,
    event_id   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- The outbox: what a transaction wants published, written with the effect and relayed to Kafka
-- afterwards. `available_at` in the future makes a row a durable delayed retry: the relay
-- publishes it when it falls due (the one backoff mechanism of every service).
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event_id     text        NOT NULL,
    topic        text        NOT NULL,
    key          bytea,
    value        bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '[]',
    available_at timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_due ON outbox (available_at, id);
