"""make bench row: one month of email.stats at 10 million receipts (issue #13: under 200 ms).

stats_month_ms(conn) generates the fixture of bench/stats_gen.sql into an emptied outbox, folds the
rollup, and times
    SELECT * FROM email.stats WHERE day >= '2025-06-01' AND day < '2025-07-01'
(every row fetched) REPS times, interleaved with the same-run baseline: a count(*) of that
month's receipts (an index-only scan of receipts_at, about 830,000 entries), the cheapest look
at the month's raw events. bench/bench.py row 17 calls it; `python3 stats_bench.py [port] [db]
[scale]` runs it alone against a cluster that has the extension."""
import os
import statistics
import sys
import time

import psycopg2

REPS = int(os.environ.get("BENCH_REPS", "3"))
STATS_GEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stats_gen.sql")
STATS_MONTH = "SELECT * FROM email.stats WHERE day >= '2025-06-01' AND day < '2025-07-01'"
STATS_BASE = "SELECT count(*) FROM email.receipts WHERE at >= '2025-06-01' AND at < '2025-07-01'"


def stats_month_ms(conn, scale=1.0, reps=None):
    """Generates the fixture (about 10 million receipts at scale 1), then returns
    (median ms of the month's email.stats, median ms of the baseline, extra figures)."""
    reps = reps or max(REPS, 5)
    conn.autocommit = True
    cur = conn.cursor()

    def q(s, *a):
        cur.execute(s, a or None)
        return cur.fetchall() if cur.description else None

    def ms(s):
        t = time.perf_counter()
        rows = q(s)
        return (time.perf_counter() - t) * 1000, rows

    q("TRUNCATE email.messages, email.receipts, email.unmatched_events RESTART IDENTITY CASCADE")
    q("SET stats_gen.scale = %s", str(scale))
    t = time.monotonic()
    with open(STATS_GEN) as f:
        for stmt in f.read().split("\n-- @@\n"):
            if any(line.strip() and not line.strip().startswith("--") for line in stmt.splitlines()):
                q(stmt)
    gen_s = time.monotonic() - t
    receipts = q("SELECT count(*) FROM email.receipts")[0][0]
    folds = q("SELECT to_regprocedure('email._stats_fold(integer)') IS NOT NULL")[0][0]

    def fold():
        # what the delivery worker does every few seconds: nothing is left pending
        while folds and q("SELECT email._stats_fold()")[0][0] != 0:
            pass

    fold()
    q("CHECKPOINT")
    first, rows = ms(STATS_MONTH)
    ours, base = [], []
    for _ in range(reps):
        ours.append(ms(STATS_MONTH)[0])
        base.append(ms(STATS_BASE)[0])
    month_receipts = q(STATS_BASE)[0][0]
    sent = q("SELECT count(*) FROM email._engagement "
             "WHERE sent_at >= '2025-06-01 00:00:00+00' AND sent_at < '2025-07-01 00:00:00+00'")[0][0]
    # the same query while 10,000 receipts wait for the next fold (read through the pending rows)
    q("""INSERT INTO email.receipts (message_id, event, transport, source, machine)
         SELECT m.id, CASE WHEN g % 3 = 0 THEN 'clicked' ELSE 'opened' END, m.transport, 'tracking', false
         FROM generate_series(1, 10000) g
         JOIN email.messages m ON m.id = (SELECT min(id) FROM email.messages) + g * 97""")
    pending = statistics.median(ms(STATS_MONTH)[0] for _ in range(3))
    t = time.perf_counter()
    fold()
    fold_ms = (time.perf_counter() - t) * 1000
    return statistics.median(ours), statistics.median(base), {
        "first_ms": round(first, 1), "rows": len(rows), "sent_in_month": sent, "receipts": receipts,
        "month_receipts": month_receipts, "generate_s": round(gen_s), "with_10k_pending_ms": round(pending, 1),
        "fold_10k_ms": round(fold_ms, 1)}


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5493
    db = sys.argv[2] if len(sys.argv) > 2 else "stats"
    scale = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    c = psycopg2.connect(host="127.0.0.1", port=port, dbname=db, user="postgres")
    o, b, extra = stats_month_ms(c, scale)
    print(f"email.stats month: {o:.1f} ms median (baseline count(*) of the month's receipts {b:.1f} ms); {extra}")
