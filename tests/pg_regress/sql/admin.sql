-- email.cancel, email.retry and email.purge: argument errors, and what each returns.
\pset format unaligned
\pset tuples_only on
SELECT email.add_transport('cap', 'capture://', is_default => true);
SELECT refused($$SELECT email.cancel(NULL)$$);
SELECT refused($$SELECT email.retry(NULL)$$);
SELECT refused($$SELECT email.purge(NULL)$$);
SELECT refused($$SELECT email.purge(interval '-1 day')$$);
\pset format aligned
\pset tuples_only off
-- an id that does not exist is not an error: nothing changes
SELECT email.cancel(-1) AS cancelled, email.retry(-1) AS retried;
-- This database has no worker: the message stays queued until cancelled.
SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b') AS id \gset
SELECT email.cancel(:id) AS cancelled;
SELECT email.cancel(:id) AS cancelled_again;
SELECT email.retry(:id) AS retried_cancelled;
SELECT status, attempts FROM email.messages WHERE id = :id;
SELECT event, response FROM email.receipts WHERE message_id = :id;
UPDATE email.messages SET status = 'failed', attempts = 3 WHERE id = :id;
SELECT email.retry(:id) AS retried_failed;
SELECT status, attempts FROM email.messages WHERE id = :id;
UPDATE email.messages SET status = 'sent', created_at = now() - interval '10 days' WHERE id = :id;
SELECT email.purge(interval '7 days') AS purged;
SELECT count(*) AS left FROM email.messages WHERE id = :id;
