"""Upgrades: a database created at the released 0.1.0 and holding data of every kind is updated
with ALTER EXTENSION pg_email UPDATE; every row is kept, the catalog then equals a fresh install
of the current version object for object, and the updated database works."""
import json
import os
import subprocess
import time

import psycopg2
import pytest
from psycopg2.extras import Json

from conftest import E2E_DIR, PORT, ROOT, Db, connect

OLD = "0.1.0"

# Every object of schema email, one line each, in a form that differs exactly when the objects
# differ: columns with types, defaults and comments; constraints; indexes; functions with a
# digest of their full definition, their ACL and comment; triggers; policies; relations with
# RLS, ACL, options and comment; views; types; the extension's members and pg_dump tables.
CATALOG = """
SELECT 'column ' || c.relname || '.' || a.attname || ' #' || a.attnum || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
       || coalesce(' -- ' || col_description(c.oid, a.attnum), '')
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = 'email'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v')
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'email'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace = 'email'::regnamespace
UNION ALL
SELECT 'function ' || p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid))
       || ' acl=' || coalesce(array_to_string(p.proacl, ','), 'default')
       || coalesce(' -- ' || obj_description(p.oid, 'pg_proc'), '')
FROM pg_proc p WHERE p.pronamespace = 'email'::regnamespace AND p.prokind <> 'a'
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'email'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'policy ' || tablename || ' ' || policyname || ' ' || cmd || ' ' || coalesce(qual, '') || ' / ' || coalesce(with_check, '')
FROM pg_policies WHERE schemaname = 'email'
UNION ALL
SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' rls=' || c.relrowsecurity::text
       || ' acl=' || coalesce(array_to_string(c.relacl, ','), 'default')
       || ' options=' || coalesce(array_to_string(c.reloptions, ','), '')
       || coalesce(' -- ' || obj_description(c.oid, 'pg_class'), '')
FROM pg_class c WHERE c.relnamespace = 'email'::regnamespace
UNION ALL
SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid)
FROM pg_class c WHERE c.relnamespace = 'email'::regnamespace AND c.relkind = 'v'
UNION ALL
SELECT 'type ' || t.typname || coalesce(' -- ' || obj_description(t.oid, 'pg_type'), '')
       || coalesce(' labels=' || (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                                  FROM pg_enum e WHERE e.enumtypid = t.oid), '')
FROM pg_type t WHERE t.typnamespace = 'email'::regnamespace AND t.typtype IN ('e', 'c', 'd', 'b')
UNION ALL
SELECT 'dump ' || x::regclass::text
FROM pg_extension e, unnest(e.extconfig) AS x WHERE e.extname = 'pg_email'
UNION ALL
SELECT 'member ' || pg_describe_object(classid, objid, objsubid)
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_email')
ORDER BY 1
"""

# Each table's rows as text, minus columns the update is allowed to change.
TABLES = {
    # Columns 0.2.0 added (NULL on old rows) are left out: the rows must keep what they had.
    "messages": "SELECT string_agg((to_jsonb(t) - 'request_hash' - 'track_opens' - 'track_clicks' - 'list_unsubscribe' - 'topic' - 'raw')::text, E'\\n' ORDER BY id) FROM email.messages t",
    "receipts": "SELECT string_agg(concat_ws('|', id, message_id, event, transport, recipient, response), E'\\n' ORDER BY id) FROM email.receipts",
    "attachments": "SELECT string_agg(t::text, E'\\n' ORDER BY message_id, position) FROM email.attachments t",
    "templates": "SELECT string_agg(t::text, E'\\n' ORDER BY name) FROM email.templates t",
    "template_versions": "SELECT string_agg(t::text, E'\\n' ORDER BY name, version) FROM email.template_versions t",
    "suppressions": "SELECT string_agg(t::text, E'\\n' ORDER BY address) FROM email.suppressions t",
    "transport_secrets": "SELECT string_agg(t::text, E'\\n' ORDER BY name) FROM email.transport_secrets t",
    "captured": "SELECT string_agg(t::text, E'\\n' ORDER BY id) FROM email.captured t",
}


@pytest.fixture
def databases(cluster):
    admin = Db(connect("postgres"))
    for name in ("upg_old", "upg_new"):
        admin.all(f"DROP DATABASE IF EXISTS {name}")
        admin.all(f"CREATE DATABASE {name}")
    old, new = Db(connect("upg_old")), Db(connect("upg_new"))
    yield old, new
    old.conn.close()
    new.conn.close()
    for name in ("upg_old", "upg_new"):
        admin.all(f"DROP DATABASE IF EXISTS {name}")
    admin.conn.close()


def transport(db, name, masked, dsn, is_default=False, fallback=None):
    """A transport as 0.1.0's add_transport stored it (this library's add_transport takes
    arguments 0.1.0's SQL definition does not pass)."""
    kind = dsn.split(":")[0].replace("+api", "")
    db.all("INSERT INTO email.transports (name, kind, dsn, is_default, fallback) VALUES (%s, %s, %s, %s, %s)",
           name, kind, masked, is_default, fallback)
    db.all("INSERT INTO email.transport_secrets (name, dsn) VALUES (%s, %s)", name, dsn)


def fill(db):
    """Data of every kind a 0.1.0 database holds, written as 0.1.0 stored it. Transports and
    messages are inserted directly: this library's email.send refuses to run on a 0.1.0 schema."""
    transport(db, "cap", "capture://", "capture://", is_default=True)
    transport(db, "spare", "capture://", "capture://")
    transport(db, "smtp", "smtp://user:***@mail.example.org:587", "smtp://user:hunter22@mail.example.org:587", fallback="spare")
    db.all("INSERT INTO email.templates (name, subject, body) VALUES ('welcome', 'Hi {{ name }}', 'v1 {{ name }}')")
    db.all("UPDATE email.templates SET body = 'v2 {{ name }}' WHERE name = 'welcome'")
    db.all("INSERT INTO email.suppressions (address, reason) VALUES ('gone@x.org', 'bounced')")

    def message(**cols):
        cols = {"transport": "cap", "sender": "me@x.org", "recipients": ["a@x.org"], **cols}
        cols["message_id"] = f"<{db.val('SELECT count(*) FROM email.messages') + 1}.upgrade@x.org>"
        names = ", ".join(cols)
        return db.val(f"INSERT INTO email.messages ({names}) VALUES ({', '.join(['%s'] * len(cols))}) RETURNING id", *cols.values())

    first = message(subject="plain", body="b", tags=["t"], metadata=Json({"k": 1}))
    partly = message(subject="partly suppressed", html="<p>h</p>")
    db.all("INSERT INTO email.receipts (message_id, event, transport, recipient, response) "
           "VALUES (%s, 'suppressed', 'cap', 'gone@x.org', 'recipient is on the suppression list')", partly)
    message(subject="all suppressed", body="b", recipients=["gone@x.org"], status="suppressed")
    message(subject="keyed", body="b", idempotency_key="k1")
    files = message(subject="file", body="b", attachment_count=1)
    db.all("INSERT INTO email.attachments (message_id, position, filename, content_type, content) "
           "VALUES (%s, 0, 'a.txt', 'text/plain', 'hello')", files)
    message(template="welcome", template_version=2, data=Json({"name": "Ann"}))
    cancelled = message(subject="cancel me", body="b", status="cancelled")
    db.all("INSERT INTO email.receipts (message_id, event, transport, response) "
           "VALUES (%s, 'cancelled', 'cap', 'cancelled by postgres')", cancelled)
    # Receipts as 0.1.0's worker wrote them for provider transports: the provider's own code in
    # enhanced_code (moved by the update), next to a real RFC 3463 code (kept).
    db.all("INSERT INTO email.receipts (message_id, event, transport, smtp_code, enhanced_code, response) VALUES "
           "(%s, 'failed', 'cap', 422, 'validation_error', 'HTTP 422: bad'), "
           "(%s, 'deferred', 'cap', 451, '4.7.1', 'try later')", first, first)


def snapshot(db):
    return {name: db.val(q) for name, q in TABLES.items()}


def test_update_from_0_1_0_keeps_every_row_and_matches_a_fresh_install(databases):
    old, new = databases
    old.all(f"CREATE EXTENSION pg_email VERSION '{OLD}'")
    assert old.val("SELECT extversion FROM pg_extension WHERE extname = 'pg_email'") == OLD
    fill(old)
    before = snapshot(old)
    counts = {t: old.val(f"SELECT count(*) FROM email.{t}") for t in TABLES}

    old.all("ALTER EXTENSION pg_email UPDATE")
    new.all("CREATE EXTENSION pg_email")
    current = new.val("SELECT extversion FROM pg_extension WHERE extname = 'pg_email'")
    assert current != OLD
    assert old.val("SELECT extversion FROM pg_extension WHERE extname = 'pg_email'") == current

    # Every row is still there, unchanged.
    assert snapshot(old) == before
    assert {t: old.val(f"SELECT count(*) FROM email.{t}") for t in TABLES} == counts
    # Provider codes moved out of enhanced_code; RFC 3463 codes stayed.
    assert old.all("SELECT enhanced_code, provider_code FROM email.receipts WHERE smtp_code IS NOT NULL ORDER BY id") == [
        (None, "validation_error"), ("4.7.1", None)]
    # Old receipts say where they came from: the SQL functions wrote suppressed and cancelled.
    assert set(old.all("SELECT event, source FROM email.receipts")) <= {
        ("suppressed", "api"), ("cancelled", "api"), ("sent", "worker"), ("deferred", "worker"),
        ("failed", "worker"), ("bounced", "worker")}
    assert old.val("SELECT count(DISTINCT source) FROM email.receipts") == 2

    # The catalog equals a fresh install's, object for object.
    got = [r[0] for r in old.all(CATALOG)]
    want = [r[0] for r in new.all(CATALOG)]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, "after update, missing:\n" + "\n".join(missing) + "\nextra:\n" + "\n".join(extra)


def test_an_updated_database_works(databases):
    old, _ = databases
    old.all(f"CREATE EXTENSION pg_email VERSION '{OLD}'")
    fill(old)
    old.all("ALTER EXTENSION pg_email UPDATE")
    mid = old.val("SELECT email.send(recipients => 'b@x.org', subject => 'after', body => 'b', sender => 'me@x.org')")
    assert old.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "queued"
    # INSERT INTO email.messages is an API after the update: checked and filled like email.send.
    ins = old.val("INSERT INTO email.messages (recipients, subject, body, sender) "
                  "VALUES (ARRAY['C@X.org'], 'inserted', 'b', 'me@x.org') RETURNING id")
    assert old.one("SELECT status::text, recipients, message_id LIKE '%%@x.org>' FROM email.messages WHERE id = %s", ins) == (
        "queued", ["C@X.org"], True)
    code, _ = old.error("INSERT INTO email.messages (recipients, subject, body) VALUES (ARRAY['a@x.org, b@x.org'], 's', 'b')")
    assert code == "22023"
    # The template upsert that failed on 0.1.0 records one new version.
    upsert = ("INSERT INTO email.templates (name, subject, body) VALUES ('welcome', 'Hi {{ name }}', %s) "
              "ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body")
    old.all(upsert, "v3 {{ name }}")
    old.all(upsert, "v3 {{ name }}")
    assert old.all("SELECT version, body FROM email.template_versions WHERE name = 'welcome' ORDER BY version") == [
        (1, "v1 {{ name }}"), (2, "v2 {{ name }}"), (3, "v3 {{ name }}")]
    # Events heard back land in the updated tables (a tracking hit of an old message).
    first = old.val("SELECT min(id) FROM email.messages")
    assert old.val("SELECT email._record_events(%s::jsonb)",
                   json.dumps([{"source": "tracking", "event": "opened", "pg_email_id": first, "single": True}])) == 1
    assert old.val("SELECT count(*) FROM email.receipts WHERE source = 'tracking' AND message_id = %s", first) == 1
    assert old.val("SELECT count(*) FROM email.tracking_keys") == 1
    # The fallback is now a foreign key: deleting the fallback clears it.
    old.all("DELETE FROM email.transports WHERE name = 'spare'")
    assert old.val("SELECT fallback FROM email.transports WHERE name = 'smtp'") is None


def test_the_worker_waits_for_the_update_then_delivers_what_was_queued(cluster):
    """A server restarted with the new library on a database still at 0.1.0: the worker claims
    nothing and says why; mail queued meanwhile is delivered once the database is updated."""
    cluster_dir, port, dbname = os.path.join(E2E_DIR, "pg-upgrade"), PORT + 7, "old"
    script = os.path.join(ROOT, "scripts/cluster.sh")
    subprocess.run(["bash", script, "start", cluster_dir, str(port), dbname, "pg_email.poll_interval = '100ms'"], check=True)
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, dbname=dbname, user="postgres")
        conn.autocommit = True
        db = Db(conn)
        db.all(f"CREATE EXTENSION pg_email VERSION '{OLD}'")
        transport(db, "cap", "capture://", "capture://", is_default=True)
        # This library refuses to queue on the old schema, saying what to do.
        code, msg = db.error("SELECT email.send(recipients => 'a@x.org', subject => 'waiting', body => 'b', sender => 'me@x.org')")
        assert code == "55000" and "this database has pg_email 0.1.0" in msg
        # Mail queued before the restart (as 0.1.0 stored it) waits for the update.
        mid = db.val("INSERT INTO email.messages (transport, sender, recipients, subject, body, message_id) "
                     "VALUES ('cap', 'me@x.org', '{a@x.org}', 'waiting', 'b', '<waiting@x.org>') RETURNING id")
        db.wait("SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'pg_email worker' "
                "AND query LIKE '%waiting for ALTER EXTENSION pg_email UPDATE (installed 0.1.0%'", timeout=60)
        time.sleep(1.0)  # several polls: still nothing claimed
        assert db.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "queued"
        db.all("ALTER EXTENSION pg_email UPDATE")
        db.wait("SELECT status::text FROM email.messages WHERE id = %s", mid, expect="sent", timeout=60)
        assert db.val("SELECT count(*) FROM email.captured WHERE message_id = %s", mid) == 1
        after = db.val("SELECT email.send(recipients => 'a@x.org', subject => 'after', body => 'b', sender => 'me@x.org')")
        db.wait("SELECT status::text FROM email.messages WHERE id = %s", after, expect="sent", timeout=60)
        with open(os.path.join(cluster_dir, "server.log"), errors="replace") as f:
            assert "waiting for ALTER EXTENSION pg_email UPDATE (installed 0.1.0, library" in f.read()
        conn.close()
    finally:
        subprocess.run(["bash", script, "stop", cluster_dir], check=False)
