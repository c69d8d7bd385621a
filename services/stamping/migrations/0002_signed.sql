-- 'signed': the worker made and stored the stamp, the ledger has not posted its unit yet. The
-- stamp is released ('completed') only once the unit is posted; if the ledger refuses (the
-- reservation was voided meanwhile) the request fails and the stamp is withheld.
ALTER TABLE requests DROP CONSTRAINT requests_status_check;
ALTER TABLE requests ADD CONSTRAINT requests_status_check
    CHECK (status IN ('queued', 'reserved', 'stamping', 'signed', 'completed', 'failed', 'dead_lettered'));
DROP INDEX requests_open;
CREATE INDEX requests_open ON requests (accepted_at) WHERE status IN ('queued', 'reserved', 'stamping', 'signed');
