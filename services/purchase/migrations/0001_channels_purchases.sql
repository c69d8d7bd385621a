CREATE TABLE channels (
    channel_id            text        PRIMARY KEY,
    name                  text        NOT NULL,
    status                text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    default_profile       text        NOT NULL DEFAULT 'standard',
    api_key_sha256        text        NOT NULL UNIQUE,
    hmac_secret_sealed    bytea       NOT NULL,
    previous_secret_sealed bytea,
    previous_secret_valid_until timestamptz,
    webhook_url           text        NOT NULL DEFAULT '',
    version               bigint      NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE purchases (
    purchase_id       text        PRIMARY KEY,
    channel_id        text        NOT NULL,
    channel_order_id  text        NOT NULL,
    account_id        text        NOT NULL,
    quantity          bigint      NOT NULL,
    amount            bigint      NOT NULL,
    paid_at           timestamptz,
    payment_ref       text        NOT NULL DEFAULT '',
    body_sha256       text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('accepted', 'confirmed', 'rejected')),
    code              text,
    detail            text,
    accepted_at       timestamptz NOT NULL DEFAULT now(),
    decided_at        timestamptz
);
-- The channel's order id is its idempotency key: at most one live (not rejected) purchase per order.
CREATE UNIQUE INDEX purchases_one_live_per_order ON purchases (channel_id, channel_order_id)
    WHERE status <> 'rejected';
CREATE INDEX purchases_by_order ON purchases (channel_id, channel_order_id);
