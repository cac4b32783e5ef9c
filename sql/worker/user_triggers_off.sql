-- While recording one outcome whose user trigger failed: user triggers are off (the worker's own
-- statements run as they would; session_replication_role needs the superuser the worker is).
SET LOCAL session_replication_role = replica
