-- Webhook claims and answers are committed without waiting for the WAL flush: a crash can lose
-- only the last few (a lease, a `sent`), and the delivery is then sent again with the same
-- webhook-id, which receivers deduplicate on. Mail's own transactions keep synchronous commit.
-- Their statements are prepared once and run with one generic plan (they run many times a
-- second; a custom plan would be planned anew each time). A generic plan does not know how
-- few rows a claim takes, and was seen hashing whole tables: every row they touch is found by
-- its key, so nested loops over index scans are what they must use.
SET LOCAL synchronous_commit = off;
SET LOCAL plan_cache_mode = force_generic_plan;
SET LOCAL enable_hashjoin = off;
SET LOCAL enable_mergejoin = off;
SET LOCAL enable_bitmapscan = off
