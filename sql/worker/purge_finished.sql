-- Deletes up to 10,000 finished messages created longer ago than $1 seconds
-- (pg_email.retention), and up to 10,000 inbound messages received longer ago; returns how many
-- messages went. Bounded, so one run never holds locks for long.
WITH gone AS (
    DELETE FROM email.messages
    WHERE id IN (SELECT id FROM email.messages
                 WHERE email._is_finished(status) AND created_at < now() - $1 * interval '1 second'
                 LIMIT 10000)
    RETURNING 1
), inbound AS (
    DELETE FROM email.inbound
    WHERE id IN (SELECT id FROM email.inbound WHERE received_at < now() - $1 * interval '1 second' LIMIT 10000)
)
SELECT count(*) FROM gone
