-- Requeues the messages $1 (from citus_leased.sql) that are still 'sending' under an expired
-- lease or claimed by $2; returns how many.
WITH reaped AS (
    UPDATE email.messages
    SET status = 'queued', lease_until = NULL, claimed_by = NULL, next_attempt_at = now(), updated_at = now()
    WHERE id = ANY ($1) AND status = 'sending' AND (lease_until < now() OR claimed_by = $2)
    RETURNING 1
)
SELECT count(*) FROM reaped
