-- The oids of email.status's 'queued' and 'suppressed', which the outbox's INSERT trigger
-- writes into rows directly (read once per backend).
SELECT (SELECT e.oid FROM pg_catalog.pg_enum e
        WHERE e.enumtypid = 'email.status'::pg_catalog.regtype AND e.enumlabel = 'queued') AS queued,
       (SELECT e.oid FROM pg_catalog.pg_enum e
        WHERE e.enumtypid = 'email.status'::pg_catalog.regtype AND e.enumlabel = 'suppressed') AS suppressed
