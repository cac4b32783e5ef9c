-- The dashboard's workers: every delivery worker slot and the listener, as email.worker_status()
-- reports them.
SELECT kind, coalesce(worker, 0) AS slot, pid, state, in_flight::int8 AS in_flight, sent, failed,
       to_char(last_activity AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"') AS last_activity
FROM email.worker_status()
ORDER BY kind, worker
