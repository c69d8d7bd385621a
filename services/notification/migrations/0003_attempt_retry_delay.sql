-- The delivery log says, for each failed attempt, how long the backoff made the next one wait
-- (the scheduled delay, before any queueing of ours). NULL when the attempt delivered, ended the
-- delivery, or was written before this column existed.
ALTER TABLE delivery_attempts ADD COLUMN IF NOT EXISTS retry_in_ms double precision;
