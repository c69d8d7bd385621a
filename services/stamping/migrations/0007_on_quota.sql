-- bubuh:no-transaction
-- Built concurrently: a plain CREATE INDEX would stop every write to requests (intake, the workers) for the
-- build, and this migration runs while the previous version serves (kernel/migrations.py).
-- The requests still on quota (accepted, not yet reserved), per channel in order of acceptance. Positions
-- count them (services/stamping/fair_queue.py's queue order, once a second per API process; queue.py's
-- count of a channel's earlier ones, per status read of such a request). Both read the open requests'
-- index and filtered it by status: with 30,000 requests queued behind a surge, 29,000 heap pages for the
-- 20 on quota, 130-430 ms a read on the loaded box (make surge-sustained, 5 December). Few requests wait
-- for their reservation at any moment, so this index stays small whatever the backlog.
CREATE INDEX CONCURRENTLY IF NOT EXISTS requests_on_quota ON requests (channel_id, accepted_at) WHERE status = 'queued';
