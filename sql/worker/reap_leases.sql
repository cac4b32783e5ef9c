-- Makes rows whose lease expired (a worker that died mid-send) due again, and, at start-up,
-- the rows a previous process of this same worker slot ($1; -1 for none) left claimed.
-- Returns how many rows were requeued.
WITH reaped AS (
    UPDATE email.messages
    SET status = 'queued', lease_until = NULL, claimed_by = NULL, next_attempt_at = now(), updated_at = now()
    WHERE status = 'sending' AND (lease_until < now() OR claimed_by = $1)
    RETURNING 1
)
SELECT count(*) FROM reaped
