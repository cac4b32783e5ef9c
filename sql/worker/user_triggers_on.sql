-- Turns user triggers back on after user_triggers_off.sql.
SET LOCAL session_replication_role = origin
