-- The ledger. Transfers are facts and are never updated; account balances are maintained by the
-- same transaction that inserts a transfer (as TigerBeetle does) and checked by constraints.
CREATE TABLE accounts (
    channel_id text   NOT NULL,
    account_id text   NOT NULL,
    credited   bigint NOT NULL DEFAULT 0 CHECK (credited >= 0),
    pending    bigint NOT NULL DEFAULT 0 CHECK (pending >= 0),
    committed  bigint NOT NULL DEFAULT 0 CHECK (committed >= 0),
    PRIMARY KEY (channel_id, account_id),
    CONSTRAINT available_never_negative CHECK (credited - committed - pending >= 0)
);

-- kind: credit (id = purchase id), pending (id = stamp request id), post / void (id = request id
-- + ':post' / ':void', pending_id = the request id), rejected (a refused reservation, kept so a
-- redelivered request gets the same answer).
CREATE TABLE transfers (
    id          text        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('credit', 'pending', 'post', 'void', 'rejected')),
    channel_id  text        NOT NULL,
    account_id  text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount >= 0),
    pending_id  text        UNIQUE,          -- one resolution (post or void) per pending transfer
    deadline    timestamptz,
    code        text,
    event_id    text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transfers_by_account ON transfers (channel_id, account_id);

-- Pending transfers not yet posted or voided, for the expiry sweep.
CREATE TABLE open_reservations (
    request_id text        PRIMARY KEY,
    channel_id text        NOT NULL,
    account_id text        NOT NULL,
    deadline   timestamptz NOT NULL
);
CREATE INDEX open_reservations_deadline ON open_reservations (deadline);
