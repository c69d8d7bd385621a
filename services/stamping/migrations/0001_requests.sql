-- One row per accepted stamp request: its status as channels read it, and the outcome.
CREATE TABLE requests (
    request_id      text        PRIMARY KEY,
    channel_id      text        NOT NULL,
    account_id      text        NOT NULL,
    idempotency_key text,
    idempotency_fingerprint text,
    document_sha256 text        NOT NULL DEFAULT '',
    status          text        NOT NULL CHECK (status IN ('queued', 'reserved', 'stamping', 'completed', 'failed',
                                                          'dead_lettered')),
    code            text,
    detail          text,
    sn              text        UNIQUE,          -- issued once, before signing; reused on redelivery
    output_ref      text,
    output_sha256   text,
    deliveries      int         NOT NULL DEFAULT 0,   -- times a worker started signing it (crash guard)
    accepted_at     timestamptz NOT NULL DEFAULT now(),
    reserved_at     timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE UNIQUE INDEX requests_idempotency ON requests (channel_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- the queue: what is not finished, in order of acceptance
CREATE INDEX requests_open ON requests (accepted_at) WHERE status IN ('queued', 'reserved', 'stamping');
CREATE INDEX requests_finished ON requests (finished_at) WHERE status IN ('completed', 'failed');

-- Every attempt at a request that failed transiently, for the dead-letter entry's history.
CREATE TABLE attempts (
    request_id text        NOT NULL,
    attempt    int         NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    code       text        NOT NULL,
    detail     text,
    PRIMARY KEY (request_id, attempt)
);
