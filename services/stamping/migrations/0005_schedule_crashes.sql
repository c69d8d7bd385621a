-- Times a taker's stamp of this request crashed (not an outage): after BUBUH_CONSUMER_CRASH_RETRIES it is
-- dead-lettered as HANDLER_CRASHED, so one poisoned request cannot hold the head of the fair queue.
ALTER TABLE schedule ADD COLUMN crashes int NOT NULL DEFAULT 0;
