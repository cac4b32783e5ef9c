-- The version of pg_email installed in the worker's database (no row: not installed).
SELECT extversion FROM pg_extension WHERE extname = 'pg_email'
