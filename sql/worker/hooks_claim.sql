-- Claims due webhook deliveries for one worker: per enabled webhook ($6, from hooks_enabled.sql)
-- at most $3 minus what this worker already has in flight for it ($1 names, $2 counts), $5 in
-- all, under a lease of $4 milliseconds (an attempt whose worker died is claimed again when it
-- expires). SKIP LOCKED lets the workers share the queue. The attempt is counted when it is
-- recorded; hooks_events.sql then reads what each POST needs.
WITH picked AS MATERIALIZED (
    SELECT d.id
    FROM unnest($6::text[]) AS w(name)
    LEFT JOIN unnest($1::text[], $2::int[]) AS busy(name, n) ON busy.name = w.name
    CROSS JOIN LATERAL (
        SELECT d.id FROM email.webhook_deliveries d
        WHERE d.webhook = w.name AND d.status = 'queued' AND d.next_attempt_at <= now()
          AND (d.lease_until IS NULL OR d.lease_until < now())
        ORDER BY d.next_attempt_at, d.id
        LIMIT greatest($3 - coalesce(busy.n, 0), 0)
        FOR UPDATE OF d SKIP LOCKED
    ) d
    LIMIT $5
)
UPDATE email.webhook_deliveries d
SET lease_until = now() + $4 * interval '1 millisecond'
FROM picked
WHERE d.id = picked.id
RETURNING d.id, d.webhook, d.attempts, d.receipt_id
