-- Claims up to $1 due messages for worker slot $3 with a lease of $2 milliseconds.
-- SKIP LOCKED lets several workers share the queue; the materialized CTE locks exactly the rows
-- it picks, best priority first, through the partial index messages_due.
-- The statement continues with claim_update.sql.
WITH due AS MATERIALIZED (
    SELECT id FROM email.messages
    WHERE status = 'queued' AND next_attempt_at <= now()
    ORDER BY priority DESC, next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
