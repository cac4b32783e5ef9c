-- Session settings for the worker's own queries. The claim must walk the partial index of
-- queued rows in order and stop after a batch; with statistics that lag behind a freshly
-- filled queue the planner may prefer a sequential scan and a sort of the whole queue (seen in
-- profiles: O(queue) per claim). Every worker query has an index that fits, so seq scans and
-- sorts are discouraged for this session; disabled plan types carry a huge cost, which would
-- otherwise trigger JIT compilation. Bitmap scans are off too: the write-back of outcomes
-- (`id = ANY(batch) AND status = 'sending'`) was planned as a BitmapAnd of the primary key and
-- the whole partial index of leased rows, and a bitmap scan never skips the dead entries that
-- every claim and write-back leaves there until vacuum: seen in profiles at 5-9 % of the
-- worker's time during a drain, growing with it.
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SET enable_sort = off;
SET jit = off;
SET application_name = 'pg_email worker';
