-- Records finished webhook attempts ($1: jsonb array from worker/hooks.rs `row`): the status
-- decided in Rust (sent, queued for another attempt after delay_ms, failed), the answer's status
-- and error. A row changes only while it is still this attempt's (its attempts one less), so a
-- late answer never overwrites a newer one. Returns the webhooks to disable (a 410), for
-- hooks_disable.sql.
WITH u AS (
    SELECT * FROM jsonb_to_recordset($1) AS u(id bigint, attempt int, status text, response_status int,
                                              last_error text, delay_ms float8, disable text)
), done AS (
    UPDATE email.webhook_deliveries d
    SET status = u.status, attempts = u.attempt, response_status = u.response_status, last_error = u.last_error,
        next_attempt_at = CASE WHEN u.status = 'queued' THEN now() + u.delay_ms * interval '1 millisecond'
                               ELSE d.next_attempt_at END,
        sent_at = CASE WHEN u.status = 'sent' THEN now() END,
        lease_until = NULL
    FROM u
    WHERE d.id = u.id AND d.status = 'queued' AND d.attempts = u.attempt - 1
    RETURNING d.webhook, u.disable
)
SELECT webhook, disable FROM done WHERE disable IS NOT NULL
