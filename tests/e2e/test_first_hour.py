"""The first hour of a real user (issue "the ten things that hurt"): each test replays a step of
the 0.1.0 walkthrough that went wrong (../shared/research/newuser_walkthrough.md, step numbers
in the docstrings) and asserts what happens now."""
import email as pyemail
import os
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import E2E_DIR, Db, connect, send, server_log, wait_status, worker_pids


def notices(db):
    """The NOTICEs the connection received since the last call, as text."""
    text = "".join(db.conn.notices)
    del db.conn.notices[:]
    return text


def test_replacing_a_transport_keeps_its_default_and_fallback(api):
    """Steps 5 and 61: rotating the password of the default transport must not take the default
    (or the fallback) away, or every email.send without transport => fails."""
    api.all("SELECT email.add_transport('spare', 'capture://')")
    notices(api)
    api.all("SELECT email.add_transport('main', 'smtp://user:old@127.0.0.1:2525?tls=none', is_default => true, fallback => 'spare')")
    assert 'transport "main" is now the default instead of "cap"' in notices(api)
    api.all("SELECT email.add_transport('main', 'smtp://user:new@127.0.0.1:2525?tls=none')")
    assert api.one("SELECT is_default, fallback FROM email.transports WHERE name = 'main'") == (True, "spare")
    assert api.val("SELECT dsn FROM email.transport_secrets WHERE name = 'main'").startswith("smtp://user:new@")
    mid = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')")
    assert api.val("SELECT transport FROM email.messages WHERE id = %s", mid) == "main"
    # Flags change without restating the DSN; '' removes a fallback, NULL keeps.
    api.all("SELECT email.update_transport('main', fallback => '')")
    assert api.one("SELECT is_default, fallback FROM email.transports WHERE name = 'main'") == (True, None)
    api.all("SELECT email.update_transport('cap', is_default => true)")
    assert 'transport "cap" is now the default instead of "main"' in notices(api)
    assert api.all("SELECT name FROM email.transports WHERE is_default") == [("cap",)]
    code, msg = api.error("SELECT email.update_transport('nope', is_default => true)")
    assert code == "42704" and 'transport "nope" does not exist' in msg
    code, msg = api.error("SELECT email.update_transport('main', fallback => 'nope')")
    assert code == "42704" and "nope" in msg


def test_the_worker_uses_a_transport_change_at_once(mail):
    """Steps 6 and 7: a message queued right after a transport was replaced goes through the new
    DSN on its first attempt, not through the old one until the next poll."""
    mail.all("ALTER SYSTEM SET pg_email.poll_interval = '60s'")
    mail.all("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)
        mail.all("SELECT email.add_transport('switch', 'smtp://127.0.0.1:26990?tls=none&timeout=2s')")
        dead = send(mail, "switch", subject="to the dead port")
        mail.wait("SELECT count(*) > 0 FROM email.receipts WHERE message_id = %s", dead, timeout=60)  # the worker built it
        mail.all("SELECT email.cancel(%s)", dead)
        mail.all("SELECT email.add_transport('switch', 'capture://')")
        mid = send(mail, "switch", subject="after the switch")
        wait_status(mail, mid, "sent")
        assert mail.all("SELECT event, transport, attempt FROM email.receipts WHERE message_id = %s", mid) == [("sent", "switch", 1)]
        assert mail.val("SELECT count(*) FROM email.captured WHERE message_id = %s", mid) == 1
    finally:
        mail.all("ALTER SYSTEM RESET pg_email.poll_interval")
        mail.all("SELECT pg_reload_conf()")


def test_a_failing_user_trigger_cannot_make_the_worker_redeliver(mail):
    """Step 22: a trigger on email.messages that raises when a message is marked sent made the
    worker crash-loop and deliver the same message 7 times. Now the outcome is recorded anyway
    (with user triggers off for that row), the message is delivered once and shows its true
    status, the receipt and the server log say why, and the worker keeps running."""
    tag = f"trig-{uuid.uuid4().hex[:6]}"
    mail.all("SELECT email.add_transport('trig', 'capture://')")
    mail.all("""CREATE OR REPLACE FUNCTION buggy_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF NEW.status = 'sent' AND NEW.subject = 'explode' THEN
                     RAISE EXCEPTION 'buggy user trigger';
                   END IF;
                   RETURN NEW;
                 END $$""")
    mail.all("CREATE TRIGGER buggy AFTER UPDATE ON email.messages FOR EACH ROW EXECUTE FUNCTION buggy_trigger()")
    try:
        pids = sorted(worker_pids(mail))
        bad = send(mail, "trig", subject="explode", tags=[tag])
        good = send(mail, "trig", subject="fine", tags=[tag])
        wait_status(mail, bad, "sent")
        wait_status(mail, good, "sent")
        time.sleep(2.0)  # a crash-looping worker would have re-sent by now
        assert mail.val("SELECT count(*) FROM email.captured WHERE message_id = %s", bad) == 1
        assert mail.val("SELECT attempts FROM email.messages WHERE id = %s", bad) == 1
        response = mail.val("SELECT response FROM email.receipts WHERE message_id = %s AND event = 'sent'", bad)
        assert "recorded with user triggers off: a trigger failed: buggy user trigger" in response
        assert "user triggers off" not in mail.val("SELECT response FROM email.receipts WHERE message_id = %s", good)
        assert f"recording the outcome of message {bad} failed in a user trigger: buggy user trigger" in server_log()
        assert sorted(worker_pids(mail)) == pids, "a worker restarted"
    finally:
        mail.all("DROP TRIGGER IF EXISTS buggy ON email.messages")


def test_transport_mistakes_are_refused_at_once_with_the_real_cause(api, mail):
    """Steps 11 and 12: a missing ca= file or file:// directory was accepted, then the message
    failed as "does not exist or cannot be built" (or was retried for hours)."""
    code, msg = api.error("SELECT email.add_transport('bad_ca', 'smtp://127.0.0.1:25?ca=/nonexistent/ca.pem')")
    assert code == "22023" and "cannot read ca=/nonexistent/ca.pem" in msg
    code, msg = api.error("SELECT email.add_transport('bad_ca', 'smtp://127.0.0.1:25?ca=/dev/zero')")
    assert code == "22023" and "not a regular file" in msg
    code, msg = api.error("SELECT email.add_transport('bad_dir', 'file:///nonexistent/dir')")
    assert code == "22023" and "cannot write to the directory /nonexistent/dir" in msg
    assert api.val("SELECT count(*) FROM email.transports WHERE name IN ('bad_ca', 'bad_dir')") == 0

    # A directory that goes away after the transport was added: the message fails at once.
    out = os.path.join(E2E_DIR, f"gone-{uuid.uuid4().hex[:6]}")
    os.makedirs(out)
    shutil.chown(out, "postgres")
    mail.all("SELECT email.add_transport('gone', %s)", f"file://{out}")
    os.rmdir(out)
    mid = send(mail, "gone")
    wait_status(mail, mid, "failed")
    assert mail.val("SELECT attempts FROM email.messages WHERE id = %s", mid) == 1
    assert "check the directory of the file:// transport" in mail.val("SELECT last_error FROM email.messages WHERE id = %s", mid)

    # A CA file that goes away: the receipt names the cause, not "does not exist".
    ca_dir = os.path.join(E2E_DIR, f"ca-{uuid.uuid4().hex[:6]}")
    os.makedirs(ca_dir)
    ca = os.path.join(ca_dir, "ca.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", os.path.join(ca_dir, "k.pem"),
                    "-out", ca, "-days", "1", "-subj", "/CN=test ca"], check=True, capture_output=True)
    os.chmod(ca_dir, 0o755)
    os.chmod(ca, 0o644)
    mail.all("SELECT email.add_transport('ca_gone', %s)", f"smtp://127.0.0.1:26991?ca={ca}")
    os.remove(ca)
    mail.all("UPDATE email.transports SET updated_at = now() WHERE name = 'ca_gone'")  # the worker rebuilds it
    mid = send(mail, "ca_gone")
    wait_status(mail, mid, "failed")
    assert f'transport "ca_gone" cannot be used: cannot read ca={ca}' in mail.val("SELECT last_error FROM email.messages WHERE id = %s", mid)


@pytest.mark.on_citus
def test_idempotency_keys_are_scoped_to_the_role_and_to_the_content(api):
    """Steps 14 and 45: a key another role used swallowed this role's mail (and returned an id
    it cannot see); the same key with different content was accepted silently."""
    for r in ("pge_tenant_a", "pge_tenant_b"):
        if api.val("SELECT 1 FROM pg_roles WHERE rolname = %s", r):
            api.all(f"DROP OWNED BY {r} CASCADE")
            api.all(f"DROP ROLE {r}")
        api.all(f"CREATE ROLE {r} LOGIN")
        api.all(f"GRANT USAGE ON SCHEMA email TO {r}")
        api.all(f"GRANT EXECUTE ON FUNCTION email.send TO {r}")
        api.all(f"GRANT SELECT ON email.messages TO {r}")
    a, b = Db(connect("api", user="pge_tenant_a")), Db(connect("api", user="pge_tenant_b"))
    call = "SELECT email.send(recipients => %s, subject => 'Welcome', body => 'Hello', idempotency_key => 'welcome-1')"
    first_a = a.val(call, "ann@x.org")
    first_b = b.val(call, "bob@x.org")
    assert first_a != first_b, "one tenant's key swallowed the other's mail"
    assert b.val("SELECT recipients FROM email.messages WHERE id = %s", first_b) == ["bob@x.org"]
    assert a.val(call, "ann@x.org") == first_a  # the same call again: the same id, nothing queued
    assert api.val("SELECT count(*) FROM email.messages WHERE idempotency_key = 'welcome-1'") == 2
    code, msg = a.error(call, "someone-else@x.org")
    assert code == "22023"
    assert f'invalid idempotency_key: "welcome-1" was already used for message {first_a} with different content' in msg
    a.conn.close()
    b.conn.close()


def test_retries_last_about_a_day_and_recover_without_suppressed_recipients(api):
    """Steps 41 and 54: the default retry series gave up after about an hour; email.retry
    re-sent to addresses suppressed meanwhile; there was no bulk retry and no "retry now"."""
    boot = dict(api.all("SELECT name, boot_val FROM pg_settings WHERE name IN "
                        "('pg_email.max_attempts', 'pg_email.retry_base', 'pg_email.retry_max')"))
    attempts, base, cap = int(boot["pg_email.max_attempts"]), int(boot["pg_email.retry_base"]), int(boot["pg_email.retry_max"])
    budget_ms = sum(min(base * 2 ** (n - 1), cap) for n in range(1, attempts))  # delays between attempts
    assert 20 * 3600e3 <= budget_ms <= 30 * 3600e3, f"the default retry series lasts {budget_ms / 3600e3:.1f} h"

    def failed(recipients, transport="cap"):
        mid = api.val("SELECT email.send(recipients => %s, subject => 's', body => 'b', sender => 'me@x.org', transport => %s)", recipients, transport)
        api.all("UPDATE email.messages SET status = 'failed', attempts = 30, last_error = 'gave up' WHERE id = %s", mid)
        return mid

    both = failed("a@x.org, Bo <B@X.org>")
    only_b = failed("b@x.org")
    assert api.val("SELECT email.suppress('B@X.ORG', 'complained')") is True
    assert api.val("SELECT email.retry(%s)", both) is True
    assert api.one("SELECT status::text, attempts, pending_recipients FROM email.messages WHERE id = %s", both) == ("queued", 0, ["a@x.org"])
    assert api.all("SELECT recipient FROM email.receipts WHERE message_id = %s AND event = 'suppressed'", both) == [("b@x.org",)]
    del api.conn.notices[:]
    assert api.val("SELECT email.retry(%s)", only_b) is False
    assert api.val("SELECT status::text FROM email.messages WHERE id = %s", only_b) == "suppressed"
    assert "every recipient is on the suppression list" in "".join(api.conn.notices)

    # Retry now: a deferred message waiting for its next attempt becomes due; a scheduled one does not.
    deferred = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org')")
    api.all("UPDATE email.messages SET attempts = 3, next_attempt_at = now() + interval '1 hour' WHERE id = %s", deferred)
    scheduled = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org', send_at => now() + interval '1 hour')")
    assert api.val("SELECT email.retry(%s)", deferred) is True
    assert api.val("SELECT next_attempt_at <= now() FROM email.messages WHERE id = %s", deferred) is True
    assert api.val("SELECT email.retry(%s)", scheduled) is False

    # Bulk recovery after an outage of one transport.
    api.all("SELECT email.add_transport('relay', 'capture://')")
    outage = [failed("a@x.org", "relay") for _ in range(3)]
    other = failed("a@x.org")
    assert api.val("SELECT email.retry_all(transport => 'relay')") == 3
    assert {r[0] for r in api.all("SELECT status::text FROM email.messages WHERE id = ANY(%s)", outage)} == {"queued"}
    assert api.val("SELECT status::text FROM email.messages WHERE id = %s", other) == "failed"
    assert api.val("SELECT email.retry_all(since => now() - interval '1 minute')") == 1
    code, msg = api.error("SELECT email.retry_all(status => 'sent')")
    assert code == "22023" and "invalid status" in msg


@pytest.mark.on_citus
def test_suppressions_take_any_case_a_default_reason_and_whole_domains(api):
    """Step 19: mixed case failed with a raw check violation, reason had no default, and a
    '*@domain' row was accepted but never matched."""
    api.all("INSERT INTO email.suppressions (address) VALUES ('Someone@Example.org')")
    assert api.one("SELECT address, reason FROM email.suppressions") == ("someone@example.org", "manual")
    assert api.val("SELECT email.suppress('*@Competitor.example')") is True
    assert api.val("SELECT email.suppress('*@competitor.example')") is False
    mid = api.val("SELECT email.send(recipients => 'spy@competitor.example, ok@x.org', subject => 's', body => 'b', sender => 'me@x.org')")
    assert api.val("SELECT recipients FROM email.messages WHERE id = %s", mid) == ["ok@x.org"]
    gone = api.val("SELECT email.send(recipients => 'SOMEONE@example.org', subject => 's', body => 'b', sender => 'me@x.org')")
    assert api.val("SELECT status::text FROM email.messages WHERE id = %s", gone) == "suppressed"
    for bad in ["nobody", "a*b@x.org", "two@@x.org", "*@"]:
        code, msg = api.error("SELECT email.suppress(%s)", bad)
        assert code == "22023" and "invalid address" in msg, bad
    assert api.val("SELECT email.unsuppress('*@COMPETITOR.example')") is True
    assert api.val("SELECT email.unsuppress('*@competitor.example')") is False


def test_a_database_no_worker_serves_says_so(api, mail):
    """Steps 2 and 59: email.send in a database the worker does not serve succeeded silently,
    and worker_status() there showed the other database's worker as idle."""
    fresh_api = Db(connect("api"))
    fresh_api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org')")
    fresh_api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org')")
    warned = [n for n in fresh_api.conn.notices if 'will not be sent' in n]
    assert len(warned) == 1, fresh_api.conn.notices  # once per session
    assert 'mail queued in database "api" will not be sent: no worker serves this database (pg_email.database is "mail")' in warned[0]
    assert fresh_api.all("SELECT worker, pid, state, database FROM email.worker_status()") == [
        (None, None, 'no worker serves this database (pg_email.database is "mail")', "api")]
    fresh_api.conn.close()
    rows = mail.all("SELECT worker, state, database FROM email.worker_status() WHERE kind = 'delivery' ORDER BY worker")
    assert [r[0] for r in rows] == [0, 1] and {r[2] for r in rows} == {"mail"}
    assert not [n for n in mail.conn.notices if 'will not be sent' in n]


def test_worker_status_shows_paused(mail):
    """Step 47: worker_status said idle while pg_email.paused was on."""
    mail.all("ALTER SYSTEM SET pg_email.paused = on")
    mail.all("SELECT pg_reload_conf()")
    try:
        mail.wait("SELECT bool_and(state = 'paused') FROM email.worker_status() WHERE kind = 'delivery'", timeout=60)
    finally:
        mail.all("ALTER SYSTEM RESET pg_email.paused")
        mail.all("SELECT pg_reload_conf()")
    mail.wait("SELECT bool_and(state <> 'paused') FROM email.worker_status() WHERE kind = 'delivery'", timeout=60)


README_TEMPLATES = """
INSERT INTO email.templates (name, subject, body, html) VALUES
  ('layout', '[Shop] {% block subject %}{% endblock %}',
             E'{% block body %}{% endblock %}\\n-- {% include "footer" %}',
             '<html><body>{% block body %}{% endblock %}{% include "footer" %}</body></html>'),
  ('footer', '-', 'The Shop, 1 Main St', '<footer>The Shop, 1 Main St</footer>'),
  ('order_confirmation',
   '{% extends "layout" %}{% block subject %}Order {{ order.id }}{% endblock %}',
   '{% extends "layout" %}{% block body %}Hi {{ name }}, thanks for order {{ order.id }}.{% endblock %}',
   '{% extends "layout" %}{% block body %}<p>Hi {{ name }}, thanks for order {{ order.id }}.</p>{% endblock %}')
ON CONFLICT (name) DO UPDATE SET subject = EXCLUDED.subject, body = EXCLUDED.body, html = EXCLUDED.html
"""


def test_templated_mail_shows_what_was_rendered_and_the_readme_trigger_works(mail):
    """Steps 30, 31 and 33: the outbox showed no subject or body for template mail, the README's
    trigger snippet did not fit its own template, and HTML-only mail had no text part."""
    mail.all(README_TEMPLATES)
    mail.all("SELECT email.add_transport('shop', 'capture://')")
    mail.all("DROP TABLE IF EXISTS orders CASCADE")
    mail.all("CREATE TABLE orders (id serial PRIMARY KEY, customer_name text, customer_email text)")
    mail.all("""CREATE FUNCTION order_confirmation() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM email.send_template('order_confirmation', NEW.customer_email,
                        jsonb_build_object('name', NEW.customer_name, 'order', to_jsonb(NEW)), transport => 'shop');
                    RETURN NEW;
                END $$""")
    mail.all("CREATE TRIGGER order_confirmation AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION order_confirmation()")
    try:
        oid = mail.val("INSERT INTO orders (customer_name, customer_email) VALUES ('Ada', 'ada@x.org') RETURNING id")
        mid = mail.val("SELECT max(id) FROM email.messages WHERE template = 'order_confirmation'")
        assert mail.val("SELECT subject FROM email.messages WHERE id = %s", mid) == f"[Shop] Order {oid}"
        wait_status(mail, mid, "sent")
        body, html = mail.one("SELECT body, html FROM email.messages WHERE id = %s", mid)
        assert body.startswith(f"Hi Ada, thanks for order {oid}.") and "The Shop, 1 Main St" in body
        assert f"<p>Hi Ada, thanks for order {oid}.</p>" in html
    finally:
        mail.all("DROP TABLE orders CASCADE")
        mail.all("DROP FUNCTION order_confirmation()")

    mid = send(mail, "shop", subject="html only", body=None, html="<h1>Sale</h1><p>Everything <b>half</b> price.</p>")
    wait_status(mail, mid, "sent")
    raw = bytes(mail.val("SELECT raw FROM email.captured WHERE message_id = %s", mid))
    parts = {p.get_content_type(): p.get_payload(decode=True).decode() for p in pyemail.message_from_bytes(raw).walk() if not p.is_multipart()}
    assert set(parts) == {"text/plain", "text/html"}
    assert "Everything half price." in parts["text/plain"].replace("*", "")


@pytest.mark.on_citus
def test_template_mistakes_are_refused_when_saved(api):
    """Step 28: an unknown filter and a missing extends target were saved fine and failed only
    when mail was rendered."""
    code, msg = api.error("INSERT INTO email.templates (name, subject, body) VALUES ('f', 'Hi', E'Hello\\n{{ name | nosuchfilter }}')")
    assert code == "42601" and 'template "f", body part, line 2, column 11: unknown filter "nosuchfilter"' in msg
    code, msg = api.error("INSERT INTO email.templates (name, subject, body) VALUES ('t', '{% if x is shiny %}{% endif %}', 'b')")
    assert code == "42601" and 'unknown test "shiny"' in msg
    code, msg = api.error("""INSERT INTO email.templates (name, subject, body) VALUES ('child', 'Hi', '{% extends "nolayout" %}')""")
    assert code == "42704" and 'template "child" uses template "nolayout", which does not exist' in msg
    assert api.val("SELECT count(*) FROM email.templates") == 0
    # Within one transaction the order does not matter: the check runs at commit.
    conn = connect("api", autocommit=False)
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO email.templates (name, subject, body) VALUES ('child', 'Hi', '{% extends "base" %}{% block b %}child{% endblock %}')""")
        cur.execute("""INSERT INTO email.templates (name, subject, body) VALUES ('base', 'Hi', '[{% block b %}{% endblock %}]')""")
    conn.commit()
    conn.close()
    assert api.one("SELECT body FROM email.render('child')") == ("[child]",)


def test_test_transport_says_what_works_without_real_mail(mail):
    """Step 12 and friction 10: the only way to validate a DSN was to queue real mail and read
    receipts. email.test_transport checks the DSN, the machine, a connection, and can queue a
    test message."""
    from servers import SmtpSink
    with SmtpSink(26995, os.path.join(E2E_DIR, f"sink-test-{uuid.uuid4().hex[:6]}")) as sink:
        mail.all("SELECT email.add_transport('probe_ok', 'smtp://127.0.0.1:26995?tls=none&timeout=5s')")
        rows = mail.all("SELECT step, ok, detail FROM email.test_transport('probe_ok', 'probe@x.test')")
        assert [(r[0], r[1]) for r in rows] == [("dsn", True), ("local", True), ("connect", True), ("send", True)]
        assert rows[0][2] == "smtp://127.0.0.1:26995?tls=none&timeout=5s"
        assert rows[2][2].startswith("127.0.0.1:26995 greeted with: 220")
        mid = int(rows[3][2].split()[3].rstrip(";"))
        assert mail.val("SELECT subject FROM email.messages WHERE id = %s", mid) == 'pg_email test of transport "probe_ok"'
        wait_status(mail, mid, "sent")
        assert sink.message_ids()
    mail.all("SELECT email.add_transport('probe_down', 'smtp://user:S3cretPw@127.0.0.1:26996?tls=none&timeout=2s')")
    rows = mail.all("SELECT step, ok, detail FROM email.test_transport('probe_down', 'probe@x.test')")
    assert [(r[0], r[1]) for r in rows] == [("dsn", True), ("local", True), ("connect", False)]
    assert rows[0][2] == "smtp://user:***@127.0.0.1:26996?tls=none&timeout=2s"
    assert rows[2][2].startswith("cannot connect to 127.0.0.1:26996")
    assert not any("S3cretPw" in r[2] for r in rows)
    code, msg = mail.error("SELECT * FROM email.test_transport('nope')")
    assert code == "42704"


def test_a_secret_passed_as_a_parameter_never_reaches_the_server_log(api):
    """Step 60: a mistyped argument name (PostgreSQL refuses the call before add_transport runs)
    wrote the whole DSN, password included, into the server log's STATEMENT line. With the
    secret as its own argument, bound as a parameter (psycopg 3 binds server-side), the log
    shows $n where the secret was."""
    import psycopg
    from conftest import PORT
    first, typo = f"Pw-{uuid.uuid4().hex}", f"Pw-{uuid.uuid4().hex}"
    with psycopg.connect(host="127.0.0.1", port=PORT, dbname="api", user="postgres", autocommit=True) as c:
        c.execute("SELECT email.add_transport('sec', 'smtp://user@127.0.0.1:2525?tls=none', secret => %s)", [first])
        try:
            c.execute("SELECT email.add_transport('sec', 'smtp://user@127.0.0.1:2525?tls=none', is_defualt => true, secret => %s)", [typo])
            raise AssertionError("a misspelt argument name was accepted")
        except psycopg.errors.UndefinedFunction:
            pass
    log = server_log()
    assert "is_defualt => true, secret => $1" in log
    assert first not in log and typo not in log
    assert api.val("SELECT dsn FROM email.transport_secrets WHERE name = 'sec'") == f"smtp://user:{first}@127.0.0.1:2525?tls=none"
    assert api.val("SELECT dsn FROM email.transports WHERE name = 'sec'") == "smtp://user:***@127.0.0.1:2525?tls=none"
    code, msg = api.error("SELECT email.add_transport('sec2', 'smtp://user:inline@127.0.0.1:2525', secret => 'other')")
    assert code == "22023" and "not both" in msg and "other" not in msg


def test_drop_extension_refuses_while_mail_is_queued(cluster):
    """Step 64: DROP EXTENSION deleted 4 queued messages without a word."""
    admin = Db(connect("postgres"))
    admin.all("DROP DATABASE IF EXISTS dropguard")
    admin.all("CREATE DATABASE dropguard")
    db = Db(connect("dropguard"))
    try:
        db.all("CREATE EXTENSION pg_email")
        db.all("SELECT email.add_transport('cap', 'capture://', is_default => true)")
        db.all("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org')")
        code, msg = db.error("DROP EXTENSION pg_email")
        assert code == "2BP01" and "pg_email still has 1 messages queued or being sent" in msg
        db.all("SET pg_email.drop_with_queued_mail = on")
        db.all("DROP EXTENSION pg_email")
        db.all("RESET pg_email.drop_with_queued_mail")
        db.all("CREATE EXTENSION pg_email")
        db.all("DROP EXTENSION pg_email")  # nothing queued: no question asked
        assert db.val("SELECT count(*) FROM pg_extension WHERE extname = 'pg_email'") == 0
    finally:
        db.conn.close()
        admin.all("DROP DATABASE IF EXISTS dropguard")
        admin.conn.close()


def test_error_texts_say_what_is_wrong(api):
    """Steps 11, 15 and 16: "invalid recipients: is required", a semicolon reported as white
    space, a trailing comma reported as an empty address."""
    cases = [
        ("recipients => NULL", "recipients is required (it is NULL or missing)"),
        ("recipients => 'a@x.org; b@x.org'", 'invalid recipients: "a@x.org; b@x.org" is not a valid address: addresses are separated by commas, not semicolons'),
        ("recipients => 'a@x.org,'", 'is not a valid address: an empty entry (a trailing or doubled comma?)'),
        ("recipients => 'a@x.org b@y.org'", 'is not a valid address: two addresses without a comma between them?'),
    ]
    for args, want in cases:
        code, msg = api.error(f"SELECT email.send({args}, subject => 's', body => 'b')")
        assert code == "22023" and want in msg, (args, msg)
    code, msg = api.error("SELECT email.add_transport('x', NULL)")
    assert code == "22023" and "dsn is required (it is NULL or missing)" in msg
