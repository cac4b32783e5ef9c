-- Deletes finished messages created longer ago than $1 (their receipts, attachments and
-- captures go with them through ON DELETE CASCADE), and inbound mail received longer ago;
-- returns how many messages went.
WITH gone AS (
    DELETE FROM email.messages
    WHERE email._is_finished(status) AND created_at < now() - $1
    RETURNING 1
), inbound AS (
    DELETE FROM email.inbound WHERE received_at < now() - $1
)
SELECT count(*) FROM gone
