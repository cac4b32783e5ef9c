-- Which of the addresses $1 (bare, lower-cased) are suppressed: listed themselves, or their
-- whole domain listed as '*@domain'. Two primary-key lookups per address.
SELECT coalesce(array_agg(a), '{}') AS suppressed
FROM unnest($1::text[]) AS a
WHERE EXISTS (SELECT 1 FROM email.suppressions s WHERE s.address IN (a, '*@' || split_part(a, '@', 2)))
