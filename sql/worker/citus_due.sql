-- On Citus: the ids of up to $1 due messages in this worker's local shards of email.messages,
-- best priority first across them. The line holding {shard} is repeated for each shard (joined
-- by UNION ALL; shard names come from Citus' catalog). Shard tables are ordinary tables here,
-- so this runs locally through each shard's messages_due index; claim_ids.sql then claims the
-- rows through the distributed table. Each worker slot has shards of its own, so no two
-- workers ever contend for a row and no row lock is needed before the claim.
SELECT coalesce(array_agg(id), '{}') FROM (
    SELECT id FROM (
        (SELECT id, priority, next_attempt_at FROM {shard} WHERE status = 'queued' AND next_attempt_at <= now() ORDER BY priority DESC, next_attempt_at LIMIT $1)
    ) c
    ORDER BY priority DESC, next_attempt_at
    LIMIT $1
) due
