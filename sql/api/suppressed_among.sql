-- Which of the addresses $1 (bare, lower-cased) are on the suppression list.
SELECT coalesce(array_agg(s.address), '{}') AS suppressed
FROM email.suppressions s
WHERE s.address = ANY ($1)
