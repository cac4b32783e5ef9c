-- The fold's statements plan like any session's: the worker's own session discourages sorts and
-- sequential scans for its claim queries (session.sql), which the fold's aggregates need.
SET LOCAL enable_sort = on;
SET LOCAL enable_seqscan = on
