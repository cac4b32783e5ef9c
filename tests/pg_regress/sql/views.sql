-- The operator views and email.worker_status(): their columns, and what the views show for a
-- known set of rows (ids, timestamps and pids are left out: they differ from run to run).
SET timezone = 'UTC';
\pset null '(null)'
\d email.queue_summary
\d email.daily_stats
-- email.worker_status() returns one row per worker slot, with these columns
SELECT a.name, format_type(a.type, NULL) AS type
FROM pg_proc p, unnest(p.proargnames, p.proallargtypes, p.proargmodes) WITH ORDINALITY AS a(name, type, mode, n)
WHERE p.oid = 'email.worker_status'::regproc AND a.mode = 't'
ORDER BY a.n;
-- This database has no worker, so queued rows stay queued.
SELECT email.add_transport('cap', 'capture://', is_default => true);
SELECT email.add_transport('later', 'capture://');
INSERT INTO email.suppressions (address, reason) VALUES ('gone@x.org', 'manual');
SELECT count(*) AS queued FROM (SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b') FROM generate_series(1, 3)) s;
SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', transport => 'later', send_at => now() + interval '1 day') > 0 AS queued;
SELECT email.send(recipients => 'gone@x.org', subject => 's', body => 'b') > 0 AS queued;
SELECT email.cancel(max(id)) FROM email.messages WHERE status = 'queued' AND transport = 'cap';
SELECT status, transport, messages, due, oldest_due_age IS NOT NULL AS has_oldest_due_age,
       last_change IS NOT NULL AS has_last_change
FROM email.queue_summary ORDER BY status, transport;
-- Receipts at known times, as the worker and providers would write them.
INSERT INTO email.receipts (message_id, at, event, transport, attempt, duration_ms)
SELECT (SELECT min(id) FROM email.messages), at::timestamptz, event, transport, 1, duration_ms
FROM (VALUES ('2001-03-01 08:00', 'sent', 'cap', 10.0),
             ('2001-03-01 09:00', 'sent', 'cap', 20.5),
             ('2001-03-01 10:00', 'deferred', 'cap', NULL),
             ('2001-03-01 11:00', 'failed', 'later', NULL),
             ('2001-03-01 12:00', 'suppressed', 'cap', NULL),
             ('2001-03-01 23:59', 'bounced', 'cap', NULL),
             ('2001-03-02 00:00', 'delivered', 'cap', NULL),
             ('2001-03-02 01:00', 'opened', 'cap', NULL),
             ('2001-03-02 02:00', 'clicked', 'cap', NULL)) AS r(at, event, transport, duration_ms);
SELECT * FROM email.daily_stats WHERE day < '2001-03-03' ORDER BY day, transport;
