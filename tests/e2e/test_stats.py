"""email.stats end to end (DESIGN.md "Events out"): on a hand-built fixture, every column of every
row equals figures worked out by hand and written here literally. The fixture is inserted by SQL
into the worker-less database `api` (the `api` fixture empties the outbox first), as the worker,
the provider webhooks and the listener would have written it, in the order they would have, in
several statements; its messages go through two transports of their own (STATS, STATS2) and the
rows are read by transport. The session's TimeZone is Asia/Tokyo throughout: days and hours are UTC
all the same.

Definitions these tests take as given (sql/finalize.sql, "Engagement statistics"):
  - sent: the message has a 'sent' receipt (messages.sent_at), or was refused at send as a bad
    address (the worker's 'bounced' receipt: source 'worker', bounce_type NULL, RFC 3463 5.1.x).
    Its day is the UTC day of messages.sent_at, else of that refusal; its later events count there.
  - bounced: a 'bounced' receipt with bounce_type 'hard', or that refusal at send; soft and block
    bounces and 'failed' receipts (a 5.7.1 refusal at send) do not count.
  - opened / clicked: a receipt with machine IS NOT TRUE; a click does not imply an open.
  - Each message once per figure; under each distinct tag (a repeated tag once), NULL untagged.
  - Rates: figure / sent, double precision.
  - email._engagement has one row per sent message (day, hour: the UTC hour as timestamptz,
    transport, template, tags, and the six booleans).
  - email._stats_fold() and email._stats_rebuild(), when they exist, change nothing email.stats
    says (it is exact before and after a fold)."""
import datetime
import uuid

STATS = f"stats_{uuid.uuid4().hex[:8]}"
STATS2 = f"stats2_{uuid.uuid4().hex[:8]}"
D1, D2, D3 = "2024-02-28", "2024-02-29", "2024-03-01"
COLUMNS = ["day", "transport", "template", "tag", "sent", "delivered", "bounced", "complained", "opened", "clicked",
           "unsubscribed", "delivery_rate", "bounce_rate", "complaint_rate", "open_rate", "click_rate"]

# The messages: (key, transport, status, template, tags, sent_at at the start).
MESSAGES = [
    ("m1", STATS, "delivered", "welcome", ["a", "b"], f"{D1} 10:00:00+00"),
    ("m2", STATS, "delivered", "welcome", ["a"], f"{D1} 23:30:00+00"),      # Tokyo: already the 29th
    ("m3", STATS, "bounced", "welcome", None, f"{D1} 12:00:00+00"),
    ("m4", STATS, "delivered", None, [], f"{D1} 13:00:00+00"),              # an empty array: untagged
    ("m5", STATS, "bounced", "welcome", ["b"], None),                       # refused at send as a bad address
    ("m6", STATS, "failed", "welcome", ["a"], None),                        # refused at send for policy: not counted
    ("m7", STATS, "queued", "welcome", ["a"], None),                        # never sent: not counted
    ("m8", STATS, "sending", "welcome", ["a", "b", "a"], None),             # sent in stage 3
    ("m9", STATS, "delivered", "receipt", ["b"], f"{D2} 15:00:00+00"),
    ("m10", STATS, "sent", "welcome", ["a"], f"{D2} 16:00:00+00"),
    ("m11", STATS2, "delivered", "welcome", ["a"], f"{D1} 14:00:00+00"),
    ("m12", STATS, "queued", "receipt", ["c"], None),                       # one recipient refused, one sent later
]


def insert_messages(db):
    ids = {}
    for key, transport, status, template, tags, sent_at in MESSAGES:
        rcpts = [f"{key}@stats.example"] + ([f"{key}-y@stats.example"] if key == "m12" else [])
        ids[key] = db.val("""INSERT INTO email.messages (status, transport, sender, recipients, subject, body, template,
                                                         tags, message_id, created_at, sent_at)
                             VALUES (%s::email.status, %s, 'Stats <stats@example.org>', %s, 'Hello', 'Hello', %s, %s,
                                     %s, %s::timestamptz - interval '1 minute', %s)
                             RETURNING id""",
                          status, transport, rcpts, template, tags, f"<{key}.{uuid.uuid4().hex}@stats.example>",
                          sent_at or f"{D1} 00:00:00+00", sent_at)
    return ids


def receipts(db, ids, rows):
    """Stores rows (key, event, at, source, bounce_type, machine, recipient suffix, smtp_code,
    enhanced_code) in one statement, as one batch of the worker or the listener would."""
    values, args = [], []
    transport = {key: t for key, t, *_ in MESSAGES}
    for key, event, at, source, bounce_type, machine, suffix, code, enhanced in rows:
        values.append("(%s, %s::timestamptz, %s, %s, %s, %s, %s, %s, %s, %s)")
        args += [ids[key], at, event, transport[key], source, bounce_type, machine,
                 f"{key}{suffix}@stats.example" if suffix is not None else None, code, enhanced]
    db.all("INSERT INTO email.receipts (message_id, at, event, transport, source, bounce_type, machine, recipient, "
           "smtp_code, enhanced_code) VALUES " + ", ".join(values), *args)


def exists(db, function):
    return db.val("SELECT count(*) > 0 FROM pg_proc WHERE pronamespace = 'email'::regnamespace AND proname = %s",
                  function)


def fold(db):
    """What the delivery worker does every few seconds, when the rollup is folded asynchronously."""
    if exists(db, "_stats_fold"):
        while db.val("SELECT email._stats_fold()") != 0:
            pass


def rebuild(db):
    if exists(db, "_stats_rebuild"):
        db.val("SELECT email._stats_rebuild()")


def stats(db, transport=STATS):
    return db.all("""SELECT day::text, template, tag, sent, delivered, bounced, complained, opened, clicked,
                            unsubscribed, delivery_rate, bounce_rate, complaint_rate, open_rate, click_rate
                     FROM email.stats WHERE transport = %s
                     ORDER BY day, template NULLS FIRST, tag NULLS FIRST""", transport)


# Stage 1: the worker's outcomes at send (and the other transport's send).
AT_SEND = [
    ("m1", "sent", f"{D1} 10:00:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m2", "sent", f"{D1} 23:30:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m3", "sent", f"{D1} 12:00:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m4", "sent", f"{D1} 13:00:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m5", "deferred", f"{D1} 08:00:00+00", "worker", None, None, None, 451, "4.7.1"),
    ("m5", "bounced", f"{D1} 09:00:00+00", "worker", None, None, "", 550, "5.1.1"),
    ("m6", "failed", f"{D1} 11:00:00+00", "worker", None, None, None, 550, "5.7.1"),
    ("m9", "sent", f"{D2} 15:00:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m10", "sent", f"{D2} 16:00:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m11", "sent", f"{D1} 14:00:00+00", "worker", None, None, None, 250, "2.0.0"),
    ("m12", "bounced", f"{D1} 22:00:00+00", "worker", None, None, "", 550, "5.1.1"),
    ("m12", "deferred", f"{D1} 22:00:00+00", "worker", None, None, "-y", 451, "4.2.0"),
]
# Stage 2: provider webhooks and tracking minutes later; m8's delivery report comes before the
# worker has recorded its send.
WEBHOOKS = [
    ("m8", "delivered", f"{D2} 00:10:05+00", "webhook", None, False, "", 250, None),
    ("m1", "opened", f"{D1} 10:00:01+00", "tracking", None, True, "", None, None),   # a privacy proxy
    ("m1", "delivered", f"{D1} 10:00:30+00", "webhook", None, False, "", 250, None),
    ("m2", "delivered", f"{D1} 23:30:20+00", "webhook", None, False, "", 250, None),
    ("m2", "opened", f"{D1} 23:30:02+00", "tracking", None, True, "", None, None),   # machine only
    ("m2", "clicked", f"{D1} 23:30:03+00", "tracking", None, True, "", None, None),  # a link scanner
    ("m3", "bounced", f"{D1} 12:05:00+00", "webhook", "hard", False, "", 550, "5.1.1"),
    ("m4", "bounced", f"{D1} 13:05:00+00", "webhook", "soft", False, "", 452, "4.2.2"),
    ("m9", "delivered", f"{D2} 15:00:40+00", "webhook", None, False, "", 250, None),
    ("m10", "bounced", f"{D2} 16:02:00+00", "webhook", "block", False, "", 550, "5.7.1"),
    ("m11", "delivered", f"{D1} 14:00:30+00", "webhook", None, False, "", 250, None),
]
# Stage 4: people, hours and days later (after stage 3 sent m8 and m12).
LATER = [
    ("m1", "opened", f"{D2} 08:00:00+00", "tracking", None, False, "", None, None),
    ("m1", "opened", f"{D2} 09:00:00+00", "tracking", None, False, "", None, None),
    ("m1", "clicked", f"{D2} 08:01:00+00", "tracking", None, False, "", None, None),
    ("m1", "clicked", f"{D2} 08:02:00+00", "tracking", None, False, "", None, None),
    ("m1", "clicked", f"{D3} 10:00:00+00", "tracking", None, False, "", None, None),
    ("m2", "complained", f"{D3} 09:00:00+00", "webhook", None, False, "", None, None),
    ("m4", "delivered", f"{D1} 15:00:00+00", "webhook", None, False, "", 250, None),
    ("m8", "opened", f"{D2} 07:00:00+00", "tracking", None, False, "", None, None),
    ("m8", "unsubscribed", f"{D2} 07:05:00+00", "tracking", None, False, "", None, None),
    ("m9", "clicked", f"{D2} 18:00:00+00", "tracking", None, False, "", None, None),
    ("m11", "opened", f"{D1} 15:00:00+00", "tracking", None, False, "", None, None),
]

# After stages 1 and 2: m12 counts on the day of its refusal (not sent yet), m8 not at all.
# (day, template, tag, sent, delivered, bounced, complained, opened, clicked, unsubscribed, rates)
EARLY = [
    (D1, None, None, 1, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0),             # m4 (soft bounce)
    (D1, "receipt", "c", 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),         # m12 refused for one recipient
    (D1, "welcome", None, 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),        # m3 hard bounce
    (D1, "welcome", "a", 2, 2, 0, 0, 0, 0, 0, 1.0, 0.0, 0.0, 0.0, 0.0),         # m1, m2: machine opens only
    (D1, "welcome", "b", 2, 1, 1, 0, 0, 0, 0, 0.5, 0.5, 0.0, 0.0, 0.0),         # m1, m5 refused at send
    (D2, "receipt", "b", 1, 1, 0, 0, 0, 0, 0, 1.0, 0.0, 0.0, 0.0, 0.0),         # m9
    (D2, "welcome", "a", 1, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0),         # m10 (block bounce)
]
# Everything.
FINAL = [
    (D1, None, None, 1, 1, 0, 0, 0, 0, 0, 1.0, 0.0, 0.0, 0.0, 0.0),             # m4: delivered after a soft bounce
    (D1, "welcome", None, 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),        # m3
    (D1, "welcome", "a", 2, 2, 0, 1, 1, 1, 0, 1.0, 0.0, 0.5, 0.5, 0.5),         # m1 (opened twice, clicked 3 times
                                                                                # the next days), m2 (complained)
    (D1, "welcome", "b", 2, 1, 1, 0, 1, 1, 0, 0.5, 0.5, 0.0, 0.5, 0.5),         # m1, m5
    (D2, "receipt", "b", 1, 1, 0, 0, 0, 1, 0, 1.0, 0.0, 0.0, 0.0, 1.0),         # m9: a click without an open
    (D2, "receipt", "c", 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),         # m12: its day is that of sent_at
    (D2, "welcome", "a", 2, 1, 0, 0, 1, 0, 1, 0.5, 0.0, 0.0, 0.5, 0.0),         # m8 (tag a twice), m10
    (D2, "welcome", "b", 1, 1, 0, 0, 1, 0, 1, 1.0, 0.0, 0.0, 1.0, 0.0),         # m8
]
FINAL2 = [(D1, "welcome", "a", 1, 1, 0, 0, 1, 0, 0, 1.0, 0.0, 0.0, 1.0, 0.0)]  # m11, the other transport


def build(db):
    """The fixture, stage by stage, with folds between some stages (none after the last)."""
    db.all("SET TimeZone = 'Asia/Tokyo'")
    ids = insert_messages(db)
    receipts(db, ids, AT_SEND)
    fold(db)
    receipts(db, ids, WEBHOOKS)
    fold(db)
    early = stats(db)
    # Stage 3: the worker sends m8 and, on a second attempt, m12's other recipient: the outcome and
    # the receipt in one transaction.
    db.all(f"""BEGIN;
               UPDATE email.messages SET status = 'sent', sent_at = '{D2} 00:10:00+00' WHERE id = {ids['m8']};
               UPDATE email.messages SET status = 'sent', sent_at = '{D2} 01:00:00+00' WHERE id = {ids['m12']};
               INSERT INTO email.receipts (message_id, at, event, transport, source, smtp_code, enhanced_code)
               VALUES ({ids['m8']}, '{D2} 00:10:00+00', 'sent', '{STATS}', 'worker', 250, '2.0.0'),
                      ({ids['m12']}, '{D2} 01:00:00+00', 'sent', '{STATS}', 'worker', 250, '2.0.0');
               COMMIT""")
    receipts(db, ids, LATER)
    return ids, early


def test_stats_columns_and_figures_equal_the_hand_counts(api):
    ids, early = build(api)
    assert [r[0] for r in api.all("""SELECT column_name FROM information_schema.columns
                                      WHERE table_schema = 'email' AND table_name = 'stats'
                                      ORDER BY ordinal_position""")] == COLUMNS
    assert early == EARLY
    # Read with receipts not folded yet, after a fold, and after a rebuild from the receipts.
    assert stats(api) == FINAL
    assert stats(api, STATS2) == FINAL2
    fold(api)
    assert stats(api) == FINAL
    assert stats(api, STATS2) == FINAL2
    rebuild(api)
    assert stats(api) == FINAL
    assert stats(api, STATS2) == FINAL2
    # A month's query by day finds the same rows (the day predicate goes to the rollup).
    assert api.all("""SELECT day::text, template, tag, sent, delivered, bounced, complained, opened, clicked,
                             unsubscribed, delivery_rate, bounce_rate, complaint_rate, open_rate, click_rate
                      FROM email.stats WHERE day >= '2024-02-01' AND day < '2024-03-01' AND transport = %s
                      ORDER BY day, template NULLS FIRST, tag NULLS FIRST""", STATS) == FINAL
    assert api.all("SELECT count(*) FROM email.stats WHERE day = %s AND transport = %s", D3, STATS) == [(0,)]


def test_engagement_counts_each_message_once_per_day_and_hour(api):
    ids, _ = build(api)
    totals = """count(*), count(*) FILTER (WHERE delivered), count(*) FILTER (WHERE bounced),
                count(*) FILTER (WHERE complained), count(*) FILTER (WHERE opened), count(*) FILTER (WHERE clicked),
                count(*) FILTER (WHERE unsubscribed)"""
    by_day = f"SELECT day::text, {totals} FROM email._engagement WHERE transport = %s GROUP BY day ORDER BY day"
    # D1: m1, m2, m3, m4, m5; D2: m8, m9, m10, m12 - each once, whatever its tags.
    expected = [(D1, 5, 3, 2, 1, 1, 1, 0), (D2, 4, 2, 1, 0, 1, 1, 1)]
    assert api.all(by_day, STATS) == expected
    fold(api)
    assert api.all(by_day, STATS) == expected
    by_hour = (f"SELECT (hour AT TIME ZONE 'UTC')::text, {totals} FROM email._engagement "
               "WHERE transport = %s AND day = %s GROUP BY hour ORDER BY hour")
    assert api.all(by_hour, STATS, D1) == [
        ("2024-02-28 09:00:00", 1, 0, 1, 0, 0, 0, 0),    # m5, refused at send
        ("2024-02-28 10:00:00", 1, 1, 0, 0, 1, 1, 0),    # m1
        ("2024-02-28 12:00:00", 1, 0, 1, 0, 0, 0, 0),    # m3
        ("2024-02-28 13:00:00", 1, 1, 0, 0, 0, 0, 0),    # m4
        ("2024-02-28 23:00:00", 1, 1, 0, 1, 0, 0, 0),    # m2
    ]
    m8 = api.one("""SELECT day::text, hour AT TIME ZONE 'UTC', template, tags, delivered, bounced, complained, opened,
                           clicked, unsubscribed
                    FROM email._engagement WHERE message_id = %s""", ids["m8"])
    assert m8 == (D2, datetime.datetime(2024, 2, 29, 0, 0), "welcome", ["a", "b", "a"], True, False, False, True, False,
                  True)
    # Messages never sent, or refused at send for policy, have no row.
    assert api.all("SELECT count(*) FROM email._engagement WHERE message_id = ANY (%s)",
                   [ids[k] for k in ("m6", "m7")]) == [(0,)]


def test_deleted_messages_leave_the_stats(api):
    ids, _ = build(api)
    fold(api)
    api.all("DELETE FROM email.messages WHERE id IN (%s, %s)", ids["m9"], ids["m1"])
    assert stats(api) == [
        (D1, None, None, 1, 1, 0, 0, 0, 0, 0, 1.0, 0.0, 0.0, 0.0, 0.0),
        (D1, "welcome", None, 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),
        (D1, "welcome", "a", 1, 1, 0, 1, 0, 0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),     # m2
        (D1, "welcome", "b", 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),     # m5
        (D2, "receipt", "c", 1, 0, 1, 0, 0, 0, 0, 0.0, 1.0, 0.0, 0.0, 0.0),
        (D2, "welcome", "a", 2, 1, 0, 0, 1, 0, 1, 0.5, 0.0, 0.0, 0.5, 0.0),
        (D2, "welcome", "b", 1, 1, 0, 0, 1, 0, 1, 1.0, 0.0, 0.0, 1.0, 0.0),
    ]
    rebuild(api)
    assert len(stats(api)) == 7
    api.all("TRUNCATE email.messages CASCADE")
    assert stats(api) == [] and stats(api, STATS2) == []
