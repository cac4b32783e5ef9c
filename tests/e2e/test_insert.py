"""INSERT INTO email.messages as an API: every case runs through email.send (or send_template) and
through an INSERT, in one transaction (same now()), and the outcomes must be identical: the same
SQLSTATE and message, or the same stored row and receipts. Then what only the INSERT has:
worker columns, roles, bulk statements, triggers, the wake-up. Runs in database `api` (no worker)
except the delivery test."""
import psycopg2
import pytest

from conftest import CITUS, Db, connect, wait_status

S, B = "'s'", "'b'"


def lit(v):
    """A Python value as an SQL literal (strings are quoted; None is NULL)."""
    if v is None:
        return "NULL"
    return "'" + v.replace("'", "''") + "'"


def case(recipients=("a@x.org",), setup=(), **cols):
    """A case: recipients as list elements (the INSERT's array; email.send gets them joined by
    ', '), other arguments as SQL expressions, statements to run first."""
    return {"recipients": None if recipients is None else list(recipients), "setup": list(setup), "cols": cols}


BASE = {"subject": S, "body": B}
TEMPLATE = "INSERT INTO email.templates (name, subject, body) VALUES ('welcome', 'Hi {{ name }}', 'Body {{ name }}')"
TOPIC = "INSERT INTO email.topics (name, default_subscribed) VALUES ('news', false)"
SUBSCRIBED = "INSERT INTO email.subscriptions (address, topic, subscribed) VALUES ('a@x.org', 'news', true)"
KEYED = "SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => 'k1')"

CASES = {
    # refused: the e2e cases of test_api.py's BAD_CALLS that are columns of email.messages
    "not an address": case(["not-an-address"], **BASE),
    "empty recipient": case([""], **BASE),
    "NULL recipients": case(None, **BASE),
    "trailing comma": case(["a@x.org,"], **BASE),
    "two addresses without comma": case(["a@x.org b@y.org"], **BASE),
    "unclosed angle": case(["Bo <b@y.org"], **BASE),
    "bad cc": case(cc="ARRAY['bad@']", **BASE),
    "bad bcc": case(bcc="ARRAY['@bad']", **BASE),
    "bad reply_to": case(reply_to="'nope'", **BASE),
    "two senders": case(sender="'x@y.org, z@y.org'", **BASE),
    "broken sender": case(sender="'broken'", **BASE),
    "header injection in subject": case(subject="E'hi\\r\\nBcc: evil@z.org'", body=B),
    "header injection in recipients": case(["a@x.org\nBcc: evil@z.org"], **BASE),
    "CRLF in sender": case(sender="E'x@y.org\\r\\n'", **BASE),
    "NULL subject": case(subject="NULL", body=B),
    "no body": case(subject=S),
    "header Subject": case(headers="'{\"Subject\": \"x\"}'", **BASE),
    "header From": case(headers="'{\"From\": \"x\"}'", **BASE),
    "header Content-Type": case(headers="'{\"Content-Type\": \"x\"}'", **BASE),
    "header Message-ID": case(headers="'{\"Message-ID\": \"x\"}'", **BASE),
    "header name with space": case(headers="'{\"X Bad\": \"x\"}'", **BASE),
    "header value CRLF": case(headers="'{\"X-A\": \"a\\r\\nBcc: e@z.org\"}'", **BASE),
    "header value number": case(headers="'{\"X-A\": 1}'", **BASE),
    "headers not an object": case(headers="'[1]'", **BASE),
    "empty tag": case(tags="ARRAY['']", **BASE),
    "NULL tag": case(tags="ARRAY[NULL]::text[]", **BASE),
    "metadata not an object": case(metadata="'[1]'", **BASE),
    "empty idempotency key": case(idempotency_key="''", **BASE),
    "unknown transport": case(transport="'nope'", **BASE),
    "unknown template": case(template="'nope'"),
    "unknown topic": case(topic="'nope'", **BASE),
    "no sender anywhere": case(setup=["SET LOCAL pg_email.default_sender = ''"], **BASE),
    "too many recipients": case([f"r{i}@x.org" for i in range(51)], **BASE),
    "too big": case(subject=S, body="repeat('x', 2 * 1024 * 1024)", setup=["SET LOCAL pg_email.max_message_size = '1MB'"]),
    "template without the data it needs": case(template="'welcome'", setup=[TEMPLATE]),
    "template data not an object": case(template="'welcome'", data="'[1]'", setup=[TEMPLATE]),
    "idempotency key reused with other content": case(subject="'other'", body=B, idempotency_key="'k1'", setup=[KEYED]),
    # stored
    "plain": case(**BASE),
    "names and lists normalised": case(['"Doe, Jane" <j@x.org>', "A@X.org", "Jörg <jörg@bücher.de>"],
                                       cc="ARRAY['\"john doe\"@x.org']", bcc="ARRAY['user@münchen.de']",
                                       reply_to="'Help <help@x.org>, h2@x.org'", subject="'Grüße'", body=B),
    "every field": case(subject="'S'", body="'B'", html="'<p>H</p>'", sender="'Me <me@mine.org>'",
                        headers="'{\"X-Campaign\": \"spring\"}'", tags="ARRAY['t1','t2']", metadata="'{\"order\": 7}'",
                        priority="5", send_at="now() + interval '1 hour'", idempotency_key="'k-every'",
                        track_opens="false", track_clicks="false", list_unsubscribe="false"),
    "NULL priority": case(priority="NULL", **BASE),
    "tracking on": case(track_opens="true", track_clicks="true", html="'<a href=\"https://x.org\">x</a>'", subject=S),
    "sender from the transport": case(transport="'t2'", setup=["SELECT email.add_transport('t2', 'capture://?from=T2%20%3Ct2@t2.org%3E')"], **BASE),
    "one recipient suppressed": case(setup=["INSERT INTO email.suppressions (address) VALUES ('a@x.org')"], **BASE),
    "some recipients suppressed": case(["a@x.org", "b@x.org", "c@y.org"], cc="ARRAY['d@y.org']",
                                       setup=["INSERT INTO email.suppressions (address) VALUES ('b@x.org'), ('*@y.org')"], **BASE),
    "erased address": case(["gone@x.org", "a@x.org"], setup=["SELECT email.forget('gone@x.org')"], **BASE),
    "topic": case(["a@x.org", "b@x.org"], topic="'news'", setup=[TOPIC, SUBSCRIBED], **BASE),
    "topic nobody subscribed to": case(["b@x.org"], topic="'news'", setup=[TOPIC], **BASE),
    "template": case(template="'welcome'", data="'{\"name\": \"Ada\"}'", setup=[TEMPLATE]),
    "idempotency key reused with the same content": case(idempotency_key="'k1'", setup=[KEYED], **BASE),
}


NAMES = list(CASES)
KIND = {n: "error" if i < NAMES.index("plain") else "row" for i, n in enumerate(NAMES)}
KIND["idempotency key reused with the same content"] = "existing"


def send_sql(c):
    args = dict(c["cols"])
    fn = "email.send_template" if "template" in args else "email.send"
    recipients = None if c["recipients"] is None else ", ".join(c["recipients"])
    named = [f"recipients => {lit(recipients)}"]
    for k, v in args.items():
        if k in ("cc", "bcc"):
            v = v.replace("ARRAY[", "array_to_string(ARRAY[", 1) + ", ', ')"
        named.append(f"{k} => {v}")
    return f"SELECT {fn}({', '.join(named)})"


def insert_sql(c):
    cols = ["recipients"] + list(c["cols"])
    recipients = "NULL" if c["recipients"] is None else "ARRAY[" + ", ".join(lit(r) for r in c["recipients"]) + "]::text[]"
    values = [recipients] + list(c["cols"].values())
    return f"INSERT INTO email.messages ({', '.join(cols)}) VALUES ({', '.join(values)}) RETURNING id"


ROW = """SELECT status::text, transport, sender, recipients, cc, bcc, reply_to, subject, body, html, template,
                template_version, data, headers, tags, metadata, priority, send_at, next_attempt_at, idempotency_key,
                attempts, attachment_count, created_by, request_hash, track_opens, track_clicks, list_unsubscribe,
                topic, raw IS NULL, split_part(message_id, '@', 2), lease_until, sent_at, last_error
         FROM email.messages WHERE id = %s"""
RECEIPTS = "SELECT event, transport, recipient, response, source FROM email.receipts WHERE message_id = %s ORDER BY id"


def outcome(cur, sql, existing):
    """('error', sqlstate, message) or ('row', row, receipts) or ('existing',)."""
    cur.execute("SAVEPOINT c")
    try:
        cur.execute(sql)
        got = cur.fetchone()
        if got is None or got[0] in existing:
            return ("existing",)
        cur.execute(ROW, (got[0],))
        row = cur.fetchone()
        cur.execute(RECEIPTS, (got[0],))
        return ("row", row, cur.fetchall())
    except psycopg2.Error as e:
        # On Citus the INSERT's rules run on the row's shard, whose error says where it ran.
        return ("error", e.pgcode, "\n".join(l for l in e.pgerror.splitlines() if not l.startswith("CONTEXT:  while executing command on")))
    finally:
        cur.execute("ROLLBACK TO SAVEPOINT c")


@pytest.mark.on_citus
@pytest.mark.parametrize("name", list(CASES))
def test_insert_and_email_send_agree(api, name):
    c = CASES[name]
    if CITUS and "idempotency_key" in c["cols"] and c["cols"]["idempotency_key"] != "''":
        pytest.skip("on a distributed outbox an INSERT with an idempotency key is refused (README, Citus)")
    if CITUS and any(not s.startswith("SET LOCAL") for s in c["setup"]):
        pytest.skip("on a distributed outbox an INSERT's rules run on the shard's node, apart from "
                    "what the transaction changed before it (README, Citus)")
    conn = connect("api", autocommit=False)
    try:
        with conn.cursor() as cur:
            for s in c["setup"]:
                cur.execute(s)
            cur.execute("SELECT coalesce(array_agg(id), '{}') FROM email.messages")
            existing = set(cur.fetchone()[0])
            by_send = outcome(cur, send_sql(c), existing)
            by_insert = outcome(cur, insert_sql(c), existing)
        assert by_insert == by_send, f"{send_sql(c)}\n{insert_sql(c)}"
        assert by_send[0] == KIND[name], by_send
    finally:
        conn.rollback()
        conn.close()


def test_a_row_with_two_mailboxes_in_one_element_is_refused(api):
    code, msg = api.error("INSERT INTO email.messages (recipients, subject, body) VALUES (ARRAY['a@x.org, b@x.org'], 's', 'b')")
    assert code == "22023" and "recipients" in msg and "each element must be one mailbox" in msg, msg
    code, msg = api.error("INSERT INTO email.messages (recipients, cc, subject, body) VALUES (ARRAY['a@x.org'], ARRAY['c@x.org', NULL], 's', 'b')")
    assert code == "22023" and "cc" in msg and "element 2 is NULL" in msg, msg
    code, msg = api.error("INSERT INTO email.messages (recipients, template, subject) VALUES (ARRAY['a@x.org'], 'welcome', 's')")
    assert code == "22023" and "subject" in msg and "template" in msg, msg
    assert api.val("SELECT count(*) FROM email.messages") == 0


@pytest.fixture
def sender_role(api):
    admin = Db(connect("api"))
    for r in ("pge_ins", "pge_ins2"):
        if admin.val("SELECT 1 FROM pg_roles WHERE rolname = %s", r):
            admin.all(f"DROP OWNED BY {r} CASCADE")
        admin.all(f"DROP ROLE IF EXISTS {r}")
        admin.all(f"CREATE ROLE {r} LOGIN")
        admin.all("SELECT email.grant_send(%s)", r)
    yield admin
    admin.conn.close()


def test_grant_send_lets_a_role_insert_its_own_mail_only(api, sender_role):
    app, app2 = Db(connect("api", user="pge_ins")), Db(connect("api", user="pge_ins2"))
    mine = app.val("INSERT INTO email.messages (recipients, subject, body) VALUES (ARRAY['a@x.org'], 'mine', 'b') RETURNING id")
    theirs = app2.val("SELECT email.send(recipients => 'a@x.org', subject => 'theirs', body => 'b')")
    assert api.one("SELECT created_by, status::text, transport FROM email.messages WHERE id = %s", mine) == ("pge_ins", "queued", "cap")
    assert app.all("SELECT id FROM email.messages") == [(mine,)]
    assert app2.all("SELECT id FROM email.messages") == [(theirs,)]
    # Worker columns: not granted, and refused by the trigger even where a DBA granted them.
    for col, value in [("status", "'sent'"), ("attempts", "3"), ("message_id", "'<x@y>'"), ("created_by", "'pge_ins2'")]:
        code, msg = app.error(f"INSERT INTO email.messages (recipients, subject, body, {col}) VALUES (ARRAY['a@x.org'], 's', 'b', {value})")
        assert code == "42501", msg
    api.all("GRANT INSERT ON email.messages TO pge_ins")
    for col, value, text in [("status", "'sent'", "column status"), ("attempts", "3", "column attempts"),
                             ("message_id", "'<x@y>'", "column message_id"), ("sent_at", "now()", "column sent_at"),
                             ("next_attempt_at", "now() + interval '1 day'", "column next_attempt_at"),
                             ("created_by", "'pge_ins2'", "another role's name")]:
        code, msg = app.error(f"INSERT INTO email.messages (recipients, subject, body, {col}) VALUES (ARRAY['a@x.org'], 's', 'b', {value})")
        assert code == "42501" and text in msg, (col, msg)
    assert app.all("SELECT id FROM email.messages") == [(mine,)]
    api.all("SELECT email.revoke_send('pge_ins')")
    code, _ = app.error("INSERT INTO email.messages (recipients, subject, body) VALUES (ARRAY['a@x.org'], 's', 'b')")
    assert code == "42501"
    code, msg = api.error("SELECT email.grant_send('no_such_role')")
    assert code == "42704" and "no_such_role" in msg
    app.conn.close(); app2.conn.close()


def test_the_owner_stores_a_row_with_a_message_id_as_it_is(api):
    # pg_dump's restore and the owner's maintenance: worker columns kept, no rule applied.
    mid = api.val("""INSERT INTO email.messages (recipients, subject, body, transport, sender, message_id, status, attempts, sent_at)
                     VALUES (ARRAY['whatever'], 's', 'b', 'gone', 'x', '<m@x.org>', 'sent', 2, now()) RETURNING id""")
    assert api.one("SELECT recipients, transport, status::text, attempts FROM email.messages WHERE id = %s", mid) == (["whatever"], "gone", "sent", 2)


def test_bulk_insert_select_applies_suppressions_by_probe_and_by_set(api):
    api.all("INSERT INTO email.suppressions (address) SELECT 'u' || g || '@x.org' FROM generate_series(10, 1000, 10) g")
    api.all("INSERT INTO email.suppressions (address) VALUES ('*@blocked.org')")
    api.all("SELECT email.forget('u7@x.org')")
    api.all("SELECT email.forget('u707@x.org')")
    n = api.val("""WITH i AS (INSERT INTO email.messages (recipients, subject, body, tags)
                             SELECT ARRAY['u' || g || '@x.org'], 's', 'b', ARRAY['bulk'] FROM generate_series(1, 1000) g
                             RETURNING 1) SELECT count(*) FROM i""")
    assert n == 1000
    # rows 1-64 were probed one by one, the rest checked against the set read once
    expect = {f"u{g}@x.org" for g in range(10, 1001, 10)} | {"u7@x.org", "u707@x.org"}
    got = {r[0] for r in api.all("SELECT recipients[1] FROM email.messages WHERE status = 'suppressed'")}
    erased = {r[0] for r in api.all("SELECT recipient FROM email.receipts WHERE event = 'suppressed'")}
    assert len(got) == len(expect) == 102
    assert api.val("SELECT count(*) FROM email.receipts WHERE event = 'suppressed' AND source = 'api'") == 102
    assert api.val("SELECT count(*) FROM email.messages WHERE status = 'queued'") == 898
    assert got == expect and erased == expect
    # a domain suppression in a long statement
    api.all("""INSERT INTO email.messages (recipients, cc, subject, body)
               SELECT ARRAY['v' || g || '@y.org'], CASE WHEN g % 2 = 0 THEN ARRAY['w@blocked.org'] END, 's', 'b'
               FROM generate_series(1, 200) g""")
    assert api.val("SELECT count(*) FROM email.messages WHERE recipients[1] LIKE 'v%%' AND cc IS NULL AND status = 'queued'") == 200
    assert api.val("SELECT count(*) FROM email.receipts WHERE recipient = 'w@blocked.org'") == 100


def test_a_failed_statement_leaves_nothing_behind(api):
    api.all("INSERT INTO email.suppressions (address) VALUES ('s@x.org')")
    api.all("""DO $$ BEGIN
                 BEGIN
                   INSERT INTO email.messages (recipients, subject, body)
                   SELECT ARRAY[CASE WHEN g = 100 THEN 'broken' ELSE 's@x.org' END], 's', 'b' FROM generate_series(1, 100) g;
                 EXCEPTION WHEN invalid_parameter_value THEN NULL;
                 END;
                 INSERT INTO email.messages (recipients, subject, body) VALUES (ARRAY['s@x.org'], 'after', 'b');
               END $$""")
    assert api.all("SELECT subject, status::text FROM email.messages") == [("after", "suppressed")]
    assert api.val("SELECT count(*) FROM email.receipts") == 1


def test_a_trigger_on_the_outbox_may_call_email_send(api):
    api.all("""CREATE FUNCTION public.copy_to_archive() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.subject = 'copy me' THEN
                   PERFORM email.send(recipients => 'archive@x.org', subject => 'copy', body => 'b');
                 END IF;
                 RETURN NEW;
               END $$""")
    try:
        api.all("CREATE TRIGGER a_copy BEFORE INSERT ON email.messages FOR EACH ROW EXECUTE FUNCTION public.copy_to_archive()")
        api.all("INSERT INTO email.suppressions (address) VALUES ('s@x.org')")
        api.all("""INSERT INTO email.messages (recipients, subject, body)
                   VALUES (ARRAY['a@x.org'], 'copy me', 'b'), (ARRAY['s@x.org', 'a@x.org'], 'copy me', 'b')""")
        rows = api.all("SELECT subject, recipients FROM email.messages ORDER BY id")
        assert sorted(rows) == sorted([("copy", ["archive@x.org"]), ("copy me", ["a@x.org"]),
                                       ("copy", ["archive@x.org"]), ("copy me", ["a@x.org"])])
        assert api.all("SELECT recipient FROM email.receipts") == [("s@x.org",)]
    finally:
        api.all("DROP TRIGGER IF EXISTS a_copy ON email.messages")
        api.all("DROP FUNCTION IF EXISTS public.copy_to_archive()")


def test_an_inserted_message_is_delivered_at_commit(mail):
    mail.all("SELECT email.add_transport('inserted', 'capture://')")
    mid = mail.val("""INSERT INTO email.messages (recipients, subject, body, transport)
                      VALUES (ARRAY['ok@example.test'], 'inserted', 'hello', 'inserted') RETURNING id""")
    wait_status(mail, mid, "sent")


def test_three_thousand_hostile_rows_never_crash_the_server(api):
    """Hostile values in every column a role may insert, row by row and in multi-row statements
    (fixed seed): each statement is stored or refused with a documented SQLSTATE, the server never
    restarts, and every stored row passed the rules (a pg_email status, a Message-ID, a sender, one
    parsed mailbox per recipient element, and someone to send to: `recipients` is empty only when
    its one address was suppressed and cc or bcc remain, as email.send stores it)."""
    import random

    from conftest import server_log
    from test_faults import DOCUMENTED, hostile_json, hostile_strings

    api.all("INSERT INTO email.templates (name, subject, body) VALUES ('h_t', 'Hi {{ name }}', 'x')")
    api.all("INSERT INTO email.topics (name, default_subscribed) VALUES ('h_topic', true)")
    api.all("INSERT INTO email.suppressions (address) VALUES ('a@x.test')")
    start_time = api.val("SELECT pg_postmaster_start_time()")
    log_before = len(server_log())
    rng = random.Random(20261201)
    cols = ["recipients", "cc", "bcc", "sender", "reply_to", "subject", "body", "html", "template", "data", "headers",
            "tags", "metadata", "priority", "idempotency_key", "transport", "topic", "track_opens"]

    def value(col):
        if col in ("recipients", "cc", "bcc", "tags"):
            if col != "recipients" and rng.random() < 0.6:
                return None
            good = ["a@x.test", "b@x.test", "Bo <c@y.test>"] if col != "tags" else ["t1", "t2"]
            return [hostile_strings(rng) if rng.random() < 0.1 else rng.choice(good + [None] * (rng.random() < 0.02))
                    for _ in range(rng.randint(0 if rng.random() < 0.02 else 1, 3))]
        if col in ("data", "headers", "metadata"):
            return hostile_json(rng) if rng.random() < 0.08 else None
        if col == "template":
            return rng.choice(["h_t", hostile_strings(rng)]) if rng.random() < 0.15 else None
        if col == "topic":
            return rng.choice(["h_topic", hostile_strings(rng)]) if rng.random() < 0.1 else None
        if col == "transport":
            return rng.choice(["cap", hostile_strings(rng)]) if rng.random() < 0.1 else None
        if col == "priority":
            return rng.choice([None, 0, -5, 2**31 - 1])
        if col == "track_opens":
            return rng.choice([None, False])
        if col in ("subject", "body"):
            return hostile_strings(rng) if rng.random() < 0.2 else "ok"
        return hostile_strings(rng) if rng.random() < 0.1 else None

    casts = {"data": "::jsonb", "headers": "::jsonb", "metadata": "::jsonb", "recipients": "::text[]", "cc": "::text[]",
             "bcc": "::text[]", "tags": "::text[]"}
    row_sql = "(" + ", ".join(f"%s{casts.get(c, '')}" for c in cols) + ")"
    states, stored, statements = {}, 0, 0
    while statements < 3000:
        n = 1 if statements % 4 else rng.randint(2, 5)
        rows = [[value(c) for c in cols] for _ in range(n)]
        statements += 1
        try:
            got = api.all(f"INSERT INTO email.messages ({', '.join(cols)}) VALUES {', '.join([row_sql] * n)} RETURNING id",
                          *[v for r in rows for v in r])
            stored += len(got)
        except psycopg2.Error as e:
            states[e.pgcode] = states.get(e.pgcode, 0) + 1
            assert e.pgcode in DOCUMENTED | {"42501"}, f"statement {statements}: undocumented SQLSTATE {e.pgcode}: {e.pgerror}"
        except ValueError:
            pass  # a string psycopg2 itself refuses to send (NUL)
    print(f"hostile rows: {stored} stored, statements refused by SQLSTATE: {states}")
    assert sum(states.values()) > 1000 and stored > 100
    assert api.val("SELECT pg_postmaster_start_time()") == start_time
    new_log = server_log()[log_before:]
    assert "terminated by signal" not in new_log and "server process" not in new_log, new_log[-2000:]
    bad = api.all("""SELECT id, status::text, sender, recipients FROM email.messages
                     WHERE status NOT IN ('queued', 'suppressed') OR message_id IS NULL OR sender = ''
                        OR (cardinality(recipients) = 0 AND cc IS NULL AND bcc IS NULL) OR EXISTS (SELECT 1 FROM unnest(recipients) r WHERE r LIKE '%%,%%' AND r NOT LIKE '\"%%')""")
    assert bad == [], bad[:5]
    assert api.val("SELECT count(*) FROM email.messages WHERE recipients = ARRAY['a@x.test'] AND status <> 'suppressed'") == 0


def test_the_row_trigger_refuses_to_run_anywhere_else(api):
    api.all("DROP TABLE IF EXISTS public.not_the_outbox")
    api.all("CREATE TABLE public.not_the_outbox (x int)")
    try:
        api.all("CREATE TRIGGER t BEFORE INSERT ON public.not_the_outbox FOR EACH STATEMENT EXECUTE FUNCTION email._messages_insert()")
        code, msg = api.error("INSERT INTO public.not_the_outbox VALUES (1)")
        assert code == "39P01" and "FOR EACH ROW" in msg, msg
        api.all("DROP TRIGGER t ON public.not_the_outbox")
        api.all("CREATE TRIGGER t BEFORE INSERT ON public.not_the_outbox FOR EACH ROW EXECUTE FUNCTION email._messages_insert()")
        code, msg = api.error("INSERT INTO public.not_the_outbox VALUES (1)")
        assert code == "42703", msg
        assert api.val("SELECT count(*) FROM public.not_the_outbox") == 0
    finally:
        api.all("DROP TABLE public.not_the_outbox")


def test_two_sessions_inserting_one_new_key_the_second_waits_then_gets_23505(api):
    import threading
    import time

    first = connect("api", autocommit=False)
    second = connect("api", autocommit=False)
    try:
        with first.cursor() as c:
            c.execute("INSERT INTO email.messages (recipients, subject, body, idempotency_key) VALUES (ARRAY['a@x.org'], 's', 'b', 'race')")
            with second.cursor() as c2:
                c2.execute("SELECT pg_backend_pid()")
                pid = c2.fetchone()[0]
        result = {}

        def insert_again():
            try:
                with second.cursor() as c2:
                    c2.execute("INSERT INTO email.messages (recipients, subject, body, idempotency_key) VALUES (ARRAY['a@x.org'], 's', 'b', 'race')")
                second.commit()
                result["ok"] = True
            except psycopg2.Error as e:
                second.rollback()
                result["code"] = e.pgcode

        t = threading.Thread(target=insert_again)
        t.start()
        deadline = time.monotonic() + 60
        while api.val("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", pid) != "Lock":
            assert time.monotonic() < deadline, "the second INSERT never waited"
            time.sleep(0.02)
        first.commit()
        t.join(60)
        assert result == {"code": "23505"}, result
        assert api.val("SELECT count(*) FROM email.messages WHERE idempotency_key = 'race'") == 1
        # Once the first is committed, the same row again is skipped without error.
        assert api.all("INSERT INTO email.messages (recipients, subject, body, idempotency_key) "
                       "VALUES (ARRAY['a@x.org'], 's', 'b', 'race') RETURNING id") == []
    finally:
        first.close()
        second.close()
