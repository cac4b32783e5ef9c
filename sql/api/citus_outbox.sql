-- When Citus distributes email.messages (email.distribute()): the hash ranges of its shards
-- placed on this node (none on a coordinator without shards) and the oid of its id sequence.
-- No row when email.messages is an ordinary table. Run only where Citus is installed.
SELECT coalesce(array_agg(s.shardminvalue::int ORDER BY s.shardid) FILTER (WHERE p.shardid IS NOT NULL), '{}') AS mins,
       coalesce(array_agg(s.shardmaxvalue::int ORDER BY s.shardid) FILTER (WHERE p.shardid IS NOT NULL), '{}') AS maxs,
       'email.messages_id_seq'::regclass::oid AS sequence,
       (SELECT relowner FROM pg_class WHERE oid = 'email.messages_id_seq'::regclass) AS owner
FROM pg_dist_partition d
JOIN pg_dist_shard s ON s.logicalrelid = d.logicalrelid
LEFT JOIN pg_dist_placement p ON p.shardid = s.shardid AND p.groupid = (SELECT groupid FROM pg_dist_local_group)
WHERE d.logicalrelid = 'email.messages'::regclass AND d.partmethod = 'h'
HAVING count(*) > 0
