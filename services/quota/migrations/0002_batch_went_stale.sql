-- A batch applied by one statement (ledger.apply_at_once) writes its rows first and locks its accounts
-- last, so that another member waits for the lock only while the accounts are updated and the
-- statement commits. If an account changed between the statement's snapshot and that lock, the rows
-- already written must go: this function is called then, and its error undoes the whole statement.
-- The batch is read again and worked out again (ledger.STALE_SQLSTATE).
CREATE FUNCTION batch_went_stale() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'an account of the batch changed while its statement ran' USING ERRCODE = 'BQ409';
END
$$;
