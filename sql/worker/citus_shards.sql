-- When Citus distributes the outbox (email.distribute()): this node's group id and the names of
-- the email.messages shards placed on it (none on a coordinator without shards); no row when
-- email.messages is an ordinary table. Read again every poll interval, since a rebalance moves
-- shards between nodes.
SELECT (SELECT groupid FROM pg_dist_local_group)::int AS node,
       coalesce(array_agg(shard_name(s.logicalrelid, s.shardid)::text ORDER BY s.shardid)
                    FILTER (WHERE p.shardid IS NOT NULL), '{}') AS shards
FROM pg_dist_partition d
JOIN pg_dist_shard s ON s.logicalrelid = d.logicalrelid
LEFT JOIN pg_dist_placement p ON p.shardid = s.shardid AND p.groupid = (SELECT groupid FROM pg_dist_local_group)
WHERE d.logicalrelid = 'email.messages'::regclass AND d.partmethod = 'h'
HAVING count(*) > 0
