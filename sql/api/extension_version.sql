-- The version of pg_email installed in this database.
SELECT extversion FROM pg_extension WHERE extname = 'pg_email'
