-- The notification service's durable schedule: one row per webhook delivery and per email, each
-- with its due time. The dispatchers claim due rows with a lease (leased_until + lease_token), so a
-- killed process's claims expire and the rows are retried by whoever comes next.

CREATE TABLE deliveries (
    delivery_id       text        PRIMARY KEY,          -- uuid5(event id, 'webhook'): one per event
    channel_id        text        NOT NULL,
    event_id          text        NOT NULL UNIQUE,
    event_type        text        NOT NULL,             -- quota.credited, stamp.completed, ...
    url               text        NOT NULL,             -- '' while the channel is unknown to this service
    endpoint          text        NOT NULL,             -- scheme://host:port: the unit of isolation
    body              text        NOT NULL,             -- the exact JSON sent (signed as is)
    status            text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts          integer     NOT NULL DEFAULT 0,   -- since creation or the last redeliver request
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    horizon_at        timestamptz NOT NULL,             -- retried until then, then dead-lettered
    leased_until      timestamptz,
    lease_token       text,
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    first_attempt_at  timestamptz,
    last_attempt_at   timestamptz,
    delivered_at      timestamptz
);
-- due work per endpoint (the dispatcher's claim) and overall (its next wake-up, the due gauge)
CREATE INDEX deliveries_due_by_endpoint ON deliveries (endpoint, next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_by_channel ON deliveries (channel_id, created_at);

-- The delivery log: every attempt, with its time, duration and answer.
CREATE TABLE delivery_attempts (
    id           bigserial        PRIMARY KEY,
    delivery_id  text             NOT NULL REFERENCES deliveries ON DELETE CASCADE,
    attempt      integer          NOT NULL,
    started_at   timestamptz      NOT NULL,
    duration_ms  double precision NOT NULL,
    status_code  integer,                               -- the HTTP status, when there was an answer
    error        text,                                  -- catalogued code and detail, when it failed
    outcome      text             NOT NULL CHECK (outcome IN ('delivered', 'failed', 'abandoned'))
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);

CREATE TABLE emails (
    email_id         text        PRIMARY KEY,           -- uuid5(event id, 'email'); also the Message-ID
    event_id         text        NOT NULL UNIQUE,
    event_type       text        NOT NULL,
    channel_id       text        NOT NULL,
    recipient        text        NOT NULL,
    locale           text        NOT NULL,
    subject          text        NOT NULL,
    body             text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    horizon_at       timestamptz NOT NULL,
    leased_until     timestamptz,
    lease_token      text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    sent_at          timestamptz
);
CREATE INDEX emails_due ON emails (next_attempt_at) WHERE status = 'pending';

-- rows past their horizon that nothing attempts any more (open circuit, no URL): the abandon sweep
CREATE INDEX deliveries_horizon ON deliveries (horizon_at) WHERE status = 'pending';
CREATE INDEX emails_horizon ON emails (horizon_at) WHERE status = 'pending';
