-- Where each applied event was read (topic, partition, offset), so an event's path can be traced.
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS topic text;
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS "partition" integer;
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS "offset" bigint;
