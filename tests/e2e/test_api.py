"""The SQL API: validation at enqueue, idempotency, rollback, suppression, privileges, RLS,
secrets and pg_dump. Runs in database `api`, which has no worker."""
import base64
import json
import os
import subprocess
import threading
import time
import uuid

import psycopg2
import pytest

from conftest import CITUS, E2E_DIR, PGBIN, PORT, Db, connect, server_log, status

B64 = base64.b64encode(b"hello").decode()

# (call, SQLSTATE, text the message must contain)
BAD_CALLS = [
    ("email.send(recipients => 'not-an-address', subject => 's', body => 'b')", "22023", "not-an-address"),
    ("email.send(recipients => '', subject => 's', body => 'b')", "22023", "recipients"),
    ("email.send(recipients => NULL, subject => 's', body => 'b')", "22023", "recipients"),
    ("email.send(recipients => 'a@x.org,', subject => 's', body => 'b')", "22023", "recipients"),
    ("email.send(recipients => 'a@x.org b@y.org', subject => 's', body => 'b')", "22023", "recipients"),
    ("email.send(recipients => 'Bo <b@y.org', subject => 's', body => 'b')", "22023", "recipients"),
    ("email.send(recipients => 'a@x.org', cc => 'bad@', subject => 's', body => 'b')", "22023", "cc"),
    ("email.send(recipients => 'a@x.org', bcc => '@bad', subject => 's', body => 'b')", "22023", "bcc"),
    ("email.send(recipients => 'a@x.org', reply_to => 'nope', subject => 's', body => 'b')", "22023", "reply_to"),
    ("email.send(recipients => 'a@x.org', sender => 'x@y.org, z@y.org', subject => 's', body => 'b')", "22023", "sender"),
    ("email.send(recipients => 'a@x.org', sender => 'broken', subject => 's', body => 'b')", "22023", "sender"),
    ("email.send(recipients => 'a@x.org', subject => E'hi\\r\\nBcc: evil@z.org', body => 'b')", "22023", "subject"),
    ("email.send(recipients => E'a@x.org\\nBcc: evil@z.org', subject => 's', body => 'b')", "22023", "recipients"),
    ("email.send(recipients => 'a@x.org', sender => E'x@y.org\\r\\n', subject => 's', body => 'b')", "22023", "sender"),
    ("email.send(recipients => 'a@x.org', subject => NULL, body => 'b')", "22023", "subject"),
    ("email.send(recipients => 'a@x.org', subject => 's')", "22023", "body"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"Subject\": \"x\"}')", "22023", "Subject"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"From\": \"x\"}')", "22023", "From"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"Content-Type\": \"x\"}')", "22023", "Content-Type"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"Message-ID\": \"x\"}')", "22023", "Message-ID"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"X Bad\": \"x\"}')", "22023", "X Bad"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"X-A\": \"a\\r\\nBcc: e@z.org\"}')", "22023", "X-A"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '{\"X-A\": 1}')", "22023", "X-A"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', headers => '[1]')", "22023", "headers"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '{}')", "22023", "attachments"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '[{\"content\": \"aGk=\"}]')", "22023", "attachments[0].filename"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '[{\"filename\": \"a\", \"content\": \"%%%\"}]')", "22023", "attachments[0].content"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => '[{\"filename\": \"a\", \"content\": \"aGk=\", \"content_type\": \"nonsense\"}]')", "22023", "content_type"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', tags => ARRAY[''])", "22023", "tags"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', metadata => '[1]')", "22023", "metadata"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => '')", "22023", "idempotency_key"),
    ("email.send(recipients => 'a@x.org', subject => 's', body => 'b', transport => 'nope')", "42704", "nope"),
    ("email.send_template(template => 'nope', recipients => 'a@x.org')", "42704", "nope"),
    ("email.send_template(template => NULL, recipients => 'a@x.org')", "22023", "template"),
    ("email.add_transport('t1', 'gopher://x')", "22023", "unknown DSN scheme"),
    ("email.add_transport('t1', 'smtp://u:p@h:25?tls=maybe')", "22023", "tls"),
    ("email.add_transport('t1', 'smtp://u:p@h:25?colour=blue')", "22023", "colour"),
    ("email.add_transport('t1', 'mailgun+api://k@default')", "22023", "domain"),
    ("email.add_transport('bad name!', 'capture://')", "22023", "name"),
    ("email.add_transport('t1', 'capture://', fallback => 'missing')", "42704", "missing"),
    ("email.cancel(NULL)", "22023", "id"),
    ("email.purge(interval '-1 day')", "22023", "older_than"),
]


@pytest.mark.on_citus
@pytest.mark.parametrize("call,state,text", BAD_CALLS, ids=[c[0][:70] for c in BAD_CALLS])
def test_bad_input_is_refused_with_sqlstate_and_field(api, call, state, text):
    code, msg = api.error(f"SELECT {call}")
    assert code == state, msg
    assert text in msg, msg
    assert api.val("SELECT count(*) FROM email.messages") == 0


@pytest.mark.on_citus
def test_valid_addresses_are_accepted_and_normalised(api):
    mid = api.val("""SELECT email.send(recipients => '"Doe, Jane" <j@x.org>, a@x.org, Jörg <jörg@bücher.de>',
                                       cc => '"john doe"@x.org', bcc => 'user@münchen.de',
                                       reply_to => 'Help <help@x.org>', subject => 'Grüße', body => 'b')""")
    row = api.one("SELECT recipients, cc, bcc, reply_to, sender, status::text FROM email.messages WHERE id = %s", mid)
    assert row[0] == ['"Doe, Jane" <j@x.org>', 'a@x.org', 'Jörg <jörg@bücher.de>']
    assert row[1] == ['"john doe"@x.org'] and row[2] == ['user@münchen.de']
    assert row[3] == 'Help <help@x.org>'
    assert row[4] == 'pg_email tests <tests@example.org>'
    assert row[5] == 'queued'


@pytest.mark.on_citus
def test_too_many_recipients(api):
    many = ", ".join(f"r{i}@x.org" for i in range(40))
    more = ", ".join(f"c{i}@x.org" for i in range(11))
    code, msg = api.error("SELECT email.send(recipients => %s, cc => %s, subject => 's', body => 'b')", many, more)
    assert code == "22023" and "51 recipients" in msg and "max_recipients" in msg
    assert api.val("SELECT email.send(recipients => %s, subject => 's', body => 'b') > 0", many)


@pytest.mark.on_citus
def test_message_size_limit_counts_attachments(api):
    big = base64.b64encode(b"x" * (2 * 1024 * 1024)).decode()
    att = json.dumps([{"filename": "big.bin", "content": big}])
    with api.conn.cursor() as cur:
        cur.execute("SET pg_email.max_message_size = '1MB'")
    code, msg = api.error("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => %s)", att)
    assert code == "22023" and "max_message_size" in msg and "attachments" in msg
    with api.conn.cursor() as cur:
        cur.execute("RESET pg_email.max_message_size")
    mid = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', attachments => %s)", att)
    assert api.val("SELECT length(content) FROM email.attachments WHERE message_id = %s", mid) == 2 * 1024 * 1024


@pytest.mark.on_citus
def test_stored_row_has_every_field(api):
    att = json.dumps([{"filename": "a.txt", "content_type": "text/plain", "content": B64},
                      {"filename": "logo.png", "content_type": "image/png", "content": B64, "content_id": "logo"}])
    mid = api.val("""SELECT email.send(recipients => 'a@x.org', subject => 'S', body => 'B', html => '<p>H</p>',
        sender => 'Me <me@mine.org>', headers => '{"X-Campaign": "spring"}', attachments => %s,
        tags => ARRAY['t1','t2'], metadata => '{"order": 7}', priority => 5,
        send_at => now() + interval '1 hour')""", att)
    r = api.one("""SELECT sender, subject, body, html, headers, tags, metadata, priority,
                   send_at > now() + interval '59 minutes', next_attempt_at = send_at, transport,
                   message_id, created_by, attempts FROM email.messages WHERE id = %s""", mid)
    assert r[0] == "Me <me@mine.org>" and r[1:4] == ("S", "B", "<p>H</p>")
    assert r[4] == {"X-Campaign": "spring"} and r[5] == ["t1", "t2"] and r[6] == {"order": 7} and r[7] == 5
    assert r[8] is True and r[9] is True and r[10] == "cap"
    assert r[11].startswith("<") and r[11].endswith("@mine.org>")
    assert r[12] == "postgres" and r[13] == 0
    atts = api.all("SELECT position, filename, content_type, content_id, convert_from(content, 'UTF8') FROM email.attachments WHERE message_id = %s ORDER BY 1", mid)
    assert atts == [(0, "a.txt", "text/plain", None, "hello"), (1, "logo.png", "image/png", "logo", "hello")]


@pytest.mark.on_citus
def test_message_ids_are_unique(api):
    api.all("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b') FROM generate_series(1, 200)")
    assert api.val("SELECT count(DISTINCT message_id) FROM email.messages") == 200


@pytest.mark.on_citus
def test_sender_comes_from_argument_transport_or_setting(api):
    api.all("SELECT email.add_transport('withfrom', %s)", 'capture://?from=Shop%20%3Cshop%40x.org%3E')
    mid = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', transport => 'withfrom')")
    assert api.val("SELECT sender FROM email.messages WHERE id = %s", mid) == "Shop <shop@x.org>"
    c = connect("api")
    db = Db(c)
    with c.cursor() as cur:
        cur.execute("SET pg_email.default_sender = ''")
    code, msg = db.error("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')")
    assert code == "22023" and "sender" in msg
    c.close()


@pytest.mark.on_citus
def test_no_default_transport(api):
    api.all("DELETE FROM email.transports")
    code, msg = api.error("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')")
    assert code == "42704" and "default transport" in msg


@pytest.mark.on_citus
def test_rollback_leaves_no_row(api):
    c = connect("api", autocommit=False)
    with c.cursor() as cur:
        cur.execute("SELECT email.send(recipients => 'a@x.org', subject => 'rolled back', body => 'b')")
    c.rollback()
    c.close()
    assert api.val("SELECT count(*) FROM email.messages WHERE subject = 'rolled back'") == 0


@pytest.mark.on_citus
def test_idempotency_key_returns_existing_id(api):
    """The same call with the same key again returns the first id and queues nothing (a key
    reused with other content is refused: test_first_hour.py)."""
    a = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => 'k1')")
    b = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => 'k1')")
    assert a == b
    assert api.val("SELECT count(*) FROM email.messages") == 1


@pytest.mark.on_citus
def test_idempotency_under_two_concurrent_sessions(api):
    first = connect("api", autocommit=False)
    second = connect("api", autocommit=False)
    with first.cursor() as cur:
        cur.execute("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => 'race')")
        id1 = cur.fetchone()[0]
    result = {}

    def run():
        with second.cursor() as cur:
            cur.execute("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', idempotency_key => 'race')")
            result["id"] = cur.fetchone()[0]
        second.commit()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "the second call must wait for the first transaction"
    first.commit()
    t.join(10)
    assert result["id"] == id1
    assert api.val("SELECT count(*) FROM email.messages WHERE idempotency_key = 'race'") == 1
    first.close(); second.close()


@pytest.mark.on_citus
def test_suppressed_recipients_are_dropped(api):
    api.all("INSERT INTO email.suppressions (address, reason) VALUES ('gone@x.org', 'bounced')")
    mid = api.val("SELECT email.send(recipients => 'Gone <GONE@x.org>, ok@x.org', subject => 's', body => 'b')")
    row = api.one("SELECT status::text, recipients FROM email.messages WHERE id = %s", mid)
    assert row == ("queued", ["ok@x.org"])
    assert api.all("SELECT event, recipient FROM email.receipts WHERE message_id = %s", mid) == [("suppressed", "gone@x.org")]
    mid2 = api.val("SELECT email.send(recipients => 'gone@x.org', subject => 's', body => 'b')")
    assert status(api, mid2) == "suppressed"
    assert api.val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'suppressed'", mid2) == 1


@pytest.mark.on_citus
def test_cancel_retry_purge(api):
    mid = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')")
    assert api.val("SELECT email.cancel(%s)", mid) is True
    assert api.val("SELECT email.cancel(%s)", mid) is False
    assert status(api, mid) == "cancelled"
    assert api.val("SELECT event FROM email.receipts WHERE message_id = %s", mid) == "cancelled"
    assert api.val("SELECT email.retry(%s)", mid) is False
    api.all("UPDATE email.messages SET status = 'failed', attempts = 3 WHERE id = %s", mid)
    assert api.val("SELECT email.retry(%s)", mid) is True
    assert api.one("SELECT status::text, attempts FROM email.messages WHERE id = %s", mid) == ("queued", 0)
    api.all("UPDATE email.messages SET status = 'sent', created_at = now() - interval '10 days' WHERE id = %s", mid)
    keep = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')")
    assert api.val("SELECT email.purge(interval '7 days')") == 1
    assert api.val("SELECT count(*) FROM email.receipts WHERE message_id = %s", mid) == 0
    assert api.val("SELECT count(*) FROM email.messages WHERE id = %s", keep) == 1


@pytest.mark.on_citus
def test_retry_skips_recipients_who_left_the_topic_since(api):
    topic = f"retry-{uuid.uuid4().hex[:8]}"
    api.all("INSERT INTO email.topics (name, default_subscribed) VALUES (%s, true)", topic)
    mid = api.val("SELECT email.send(recipients => 'stay@x.org, Leave@X.org', subject => 's', body => 'b', topic => %s)", topic)
    api.all("UPDATE email.messages SET status = 'failed', attempts = 3 WHERE id = %s", mid)
    api.all("SELECT email.unsubscribe('leave@x.org', %s)", topic)
    assert api.val("SELECT email.retry(%s)", mid) is True
    assert api.one("SELECT status::text, pending_recipients FROM email.messages WHERE id = %s", mid) == ("queued", ["stay@x.org"])
    [(event, recipient, response)] = api.all("SELECT event, recipient, response FROM email.receipts WHERE message_id = %s", mid)
    assert (event, recipient) == ("suppressed", "leave@x.org") and topic in response
    # Nobody left: the message is suppressed, not retried.
    api.all("UPDATE email.messages SET status = 'failed' WHERE id = %s", mid)
    api.all("SELECT email.unsubscribe('stay@x.org', %s)", topic)
    assert api.val("SELECT email.retry(%s)", mid) is False
    assert api.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "suppressed"


@pytest.mark.on_citus
def test_add_transport_replaces_and_keeps_one_default(api):
    api.all("SELECT email.add_transport('a', 'capture://', is_default => true)")
    api.all("SELECT email.add_transport('b', 'smtp://u:pw@mail.x.org:587', is_default => true, fallback => 'a')")
    assert api.all("SELECT name FROM email.transports WHERE is_default") == [("b",)]
    # Replacing the DSN keeps the default and the fallback (NULL arguments keep).
    api.all("SELECT email.add_transport('b', 'smtps://u:pw2@mail.x.org')")
    assert api.one("SELECT kind, dsn, is_default, fallback FROM email.transports WHERE name = 'b'") == \
        ("smtp", "smtps://u:***@mail.x.org:465", True, "a")
    api.all("SELECT email.add_transport('b', 'smtps://u:pw2@mail.x.org', is_default => false, fallback => '')")
    assert api.one("SELECT is_default, fallback FROM email.transports WHERE name = 'b'") == (False, None)


SECRET = "Sup3rS3cretValue"


def test_secrets_never_shown(api):
    dsns = [f"smtp://user:{SECRET}@mail.x.org:587", f"sendgrid+api://{SECRET}@default",
            f"postmark+api://{SECRET}@default", f"resend+api://{SECRET}@default",
            f"mailgun+api://{SECRET}:mg.x.org@default", f"ses+api://AKIAEXAMPLE:{SECRET}@default?region=eu-west-1"]
    for i, dsn in enumerate(dsns):
        api.all("SELECT email.add_transport(%s, %s)", f"t{i}", dsn)
    shown = json.dumps(api.all("SELECT * FROM email.transports"), default=str)
    assert SECRET not in shown and "***" in shown
    # bad DSNs with the secret in them: the error never repeats it, nor does the server log
    for bad in [f"smtp://user:{SECRET}@mail.x.org:587?tls=bogus", f"sendgrid+api://{SECRET}:x@default",
                f"smtp://user:{SECRET}@:25", f"ftp://user:{SECRET}@x"]:
        code, msg = api.error("SELECT email.add_transport('bad', %s)", bad)
        assert code == "22023" and SECRET not in msg, msg
    time.sleep(0.3)
    assert SECRET not in server_log()


@pytest.fixture
def app_roles(api):
    admin = Db(connect("api"))
    for r in ("pge_app", "pge_app2", "pge_nobody"):
        admin.all(f"DROP OWNED BY {r} CASCADE" if admin.val("SELECT 1 FROM pg_roles WHERE rolname = %s", r) else "SELECT 1")
        admin.all(f"DROP ROLE IF EXISTS {r}")
        admin.all(f"CREATE ROLE {r} LOGIN")
    for r in ("pge_app", "pge_app2"):
        admin.all(f"GRANT USAGE ON SCHEMA email TO {r}")
        admin.all(f"GRANT EXECUTE ON FUNCTION email.send, email.send_template, email.cancel TO {r}")
        admin.all(f"GRANT SELECT ON email.messages, email.receipts, email.queue_summary TO {r}")
        if CITUS:  # grants by hand do not reach the worker nodes' functions (README, Citus)
            admin.all("SELECT email.grant_send(%s)", r)
    yield admin
    admin.conn.close()


@pytest.mark.on_citus
def test_nothing_granted_to_public(api, app_roles):
    nobody = Db(connect("api", user="pge_nobody"))
    for q in ["SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')",
              "SELECT * FROM email.messages", "SELECT * FROM email.transports"]:
        code, _ = nobody.error(q)
        assert code == "42501", q
    assert api.val("""SELECT count(*) FROM information_schema.role_table_grants
                      WHERE table_schema = 'email' AND grantee = 'PUBLIC'""") == 0
    assert api.val("""SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname = 'email' AND has_function_privilege('pge_nobody', p.oid, 'EXECUTE')""") == 0
    nobody.conn.close()


@pytest.mark.on_citus
def test_rls_each_role_sees_its_own(api, app_roles):
    app, app2 = Db(connect("api", user="pge_app")), Db(connect("api", user="pge_app2"))
    mine = app.val("SELECT email.send(recipients => 'a@x.org', subject => 'mine', body => 'b')")
    theirs = app2.val("SELECT email.send(recipients => 'a@x.org', subject => 'theirs', body => 'b')")
    assert api.val("SELECT created_by FROM email.messages WHERE id = %s", mine) == "pge_app"
    assert app.all("SELECT id FROM email.messages") == [(mine,)]
    assert app2.all("SELECT id FROM email.messages") == [(theirs,)]
    assert app.val("SELECT sum(messages) FROM email.queue_summary") == 1
    assert app.val("SELECT email.cancel(%s)", theirs) is False
    assert app.val("SELECT email.cancel(%s)", mine) is True
    assert app.all("SELECT message_id FROM email.receipts") == [(mine,)]
    for q in ["SELECT * FROM email.transport_secrets", "UPDATE email.messages SET status = 'sent'",
              "DELETE FROM email.messages", "SELECT email.add_transport('x', 'capture://')", "SELECT email.purge('1 day')"]:
        code, _ = app.error(q)
        assert code == "42501", q
    app.conn.close(); app2.conn.close()


def test_pg_dump_keeps_transports_templates_and_messages(api):
    api.all("SELECT email.add_transport('dumped', 'smtp://u:pw@mail.x.org:587')")
    api.all("INSERT INTO email.templates (name, subject, body) VALUES ('welcome', 'Hi', 'Hello')")
    api.all("UPDATE email.templates SET body = 'Hello again' WHERE name = 'welcome'")
    mid = api.val("SELECT email.send(recipients => 'a@x.org', subject => 'kept', body => 'b')")
    keys = {r[0] for r in api.all("SELECT kid FROM email.tracking_keys")}
    out = subprocess.run([f"{PGBIN}/pg_dump", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "api"], check=True, capture_output=True, text=True).stdout
    admin = Db(connect("postgres"))
    admin.all("DROP DATABASE IF EXISTS api_restored")
    admin.all("CREATE DATABASE api_restored")
    r = subprocess.run([f"{PGBIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "api_restored"],
                       input=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    restored = Db(connect("api_restored"))
    assert restored.one("SELECT dsn FROM email.transports WHERE name = 'dumped'") == ("smtp://u:***@mail.x.org:587",)
    assert restored.val("SELECT dsn FROM email.transport_secrets WHERE name = 'dumped'") == "smtp://u:pw@mail.x.org:587"
    assert restored.one("SELECT body, version FROM email.templates WHERE name = 'welcome'") == ("Hello again", 2)
    assert restored.val("SELECT count(*) FROM email.template_versions WHERE name = 'welcome'") == 2
    assert restored.val("SELECT subject FROM email.messages WHERE id = %s", mid) == "kept"
    # Tracking links signed before the dump still verify: every key is back (beside the one
    # CREATE EXTENSION made).
    assert keys <= {r[0] for r in restored.all("SELECT kid FROM email.tracking_keys")}
    nid = restored.val("SELECT email.send(recipients => 'a@x.org', subject => 'new', body => 'b', transport => 'dumped')")
    assert nid > mid
    restored.conn.close()
    admin.all("DROP DATABASE api_restored")


def test_refuses_to_load_without_preload(cluster):
    d = os.path.join(E2E_DIR, "nopreload")
    subprocess.run(["bash", "-c", f"""
        rm -rf {d} && mkdir -p {d} && chown postgres {d} &&
        runuser -u postgres -- {PGBIN}/initdb -D {d}/data -U postgres -A trust >/dev/null &&
        echo "port = {PORT + 1}" >> {d}/data/postgresql.conf &&
        echo "unix_socket_directories = '{d}'" >> {d}/data/postgresql.conf &&
        runuser -u postgres -- {PGBIN}/pg_ctl -D {d}/data -l {d}/log -w start >/dev/null"""], check=True)
    try:
        c = psycopg2.connect(host="127.0.0.1", port=PORT + 1, dbname="postgres", user="postgres")
        c.autocommit = True
        code, msg = Db(c).error("CREATE EXTENSION pg_email")
        assert "shared_preload_libraries" in msg
        c.close()
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", f"{d}/data", "-m", "immediate", "stop"], capture_output=True)
