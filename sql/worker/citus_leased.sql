-- On Citus: the ids of messages in this worker's local shards whose lease expired, and, at
-- start-up, those its claimer $1 (-1 for none) left 'sending'; reap_ids.sql requeues them. The
-- line holding {shard} is repeated for each shard, as in citus_due.sql.
SELECT coalesce(array_agg(id), '{}') FROM (
    (SELECT id FROM {shard} WHERE status = 'sending' AND (lease_until < now() OR claimed_by = $1))
) leased
