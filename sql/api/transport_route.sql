-- The transport an email.send call uses ($1, or the default when $1 is NULL), its kind, its
-- default sender, and whether any suppression (or erased address) exists at all: when none does,
-- enqueue skips the lookup.
SELECT t.name, t.sender, t.kind,
       EXISTS (SELECT 1 FROM email.suppressions) OR EXISTS (SELECT 1 FROM email.forgotten) AS any_suppressed
FROM email.transports t
WHERE ($1::text IS NULL AND t.is_default) OR t.name = $1
