-- email.subscriptions.subscribed for (address $1, topic $2): probe.rs's lookup on Citus, where
-- the table is a reference table whose rows live in each node's copy, not in the table itself.
SELECT subscribed FROM email.subscriptions WHERE address = $1 AND topic = $2
