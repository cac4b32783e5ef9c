-- On Citus: milliseconds until the earliest queued message in this worker's local shards is due
-- (0 when one is due now; NULL when they hold none), as next_due_ms.sql. The line holding
-- {shard} is repeated for each shard, as in citus_due.sql.
SELECT greatest(extract(epoch FROM min(next_at) - now()) * 1000, 0)::float8 FROM (
    (SELECT min(next_attempt_at) AS next_at FROM {shard} WHERE status = 'queued')
) due
