-- Folds up to 1000 pending receipt rows into the email.stats rollup (email._stats_fold; one
-- fold at a time in the database: NULL when another is running, 0 when nothing is pending).
SELECT email._stats_fold(1000)
