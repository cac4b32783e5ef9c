-- Whether Citus is installed in this database (its catalog exists): only then is
-- citus_shards.sql run.
SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL
