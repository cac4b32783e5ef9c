"""The delivery worker, end to end: SQL → worker → real SMTP servers (Postfix, aiosmtpd), with
retries, bounces, TLS, AUTH, timeouts, SIGTERM and the commit wake-up. Crashes are in
test_faults.py."""
import base64
import email
import email.policy
import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest

from conftest import E2E_DIR, connect, fresh, send, server_log, status, wait_status, wait_until, worker_pids
from servers import AioSmtp, Blackhole, HeldReplies, Postfix, make_ca


def transport(db, name, dsn, fallback=None):
    db.all("SELECT email.add_transport(%s, %s, fallback => %s)", name, dsn, fallback)


def subject_of(db, mid):
    return db.val("SELECT subject FROM email.messages WHERE id = %s", mid)


def receipts(db, mid):
    return db.all("SELECT event, recipient, smtp_code, enhanced_code, response, transport FROM email.receipts WHERE message_id = %s ORDER BY id", mid)


@pytest.fixture(scope="module")
def postfix(cluster):
    pf = Postfix(os.path.join(E2E_DIR, "postfix"), 26525,
                 reject={"busy@example.test": "450 4.2.0 Mailbox busy, try later",
                         "nouser@example.test": "550 5.1.1 No such user here"})
    pf.start()
    yield pf
    pf.stop()


@pytest.fixture(scope="module")
def certs(cluster):
    return make_ca(os.path.join(E2E_DIR, "ca"))


def by_subject(pf, subject, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in pf.messages() if m["subject"] == subject]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no message with subject {subject!r} reached Postfix")


def test_delivered_to_postfix_and_parsed_back(mail, postfix):
    transport(mail, "pf", "smtp://127.0.0.1:26525?tls=none")
    att = json.dumps([{"filename": "report.csv", "content_type": "text/csv", "content": base64.b64encode(b"a,b\n1,2\n").decode()},
                      {"filename": "logo.png", "content_type": "image/png", "content": base64.b64encode(b"\x89PNG...").decode(), "content_id": "logo"}])
    subject = f"Grüße aus Köln ✓ {uuid.uuid4().hex[:6]}"
    mid = send(mail, "pf", recipients='"Doe, Jane" <ok@example.test>', cc="cc@x.test", subject=subject,
               body="Plain text part", html='<p>HTML <b>part</b><img src="cid:logo"></p>',
               headers='{"X-Campaign": "spring"}', attachments=att, sender="Zoë Sender <zoe@example.test>")
    wait_status(mail, mid, "sent")
    msgs = by_subject(postfix, subject)
    m = msgs[0]
    stored_id = mail.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    assert m["Message-ID"] == stored_id
    assert m["X-Campaign"] == "spring"
    assert "Zoë Sender" in str(m["From"]) and "Doe, Jane" in str(m["To"])
    assert m.get_body(("plain",)).get_content().strip() == "Plain text part"
    assert "HTML <b>part</b>" in m.get_body(("html",)).get_content()
    files = {p.get_filename(): p.get_content() for p in m.iter_attachments()}
    assert files["report.csv"].replace("\r\n", "\n") == "a,b\n1,2\n"
    inline = [p for p in m.walk() if p["Content-ID"] == "<logo>"]
    assert inline and inline[0].get_content() == b"\x89PNG..."
    r = receipts(mail, mid)
    assert [x[0] for x in r] == ["sent"] and r[0][2] == 250 and r[0][5] == "pf"
    assert mail.val("SELECT attempts FROM email.messages WHERE id = %s", mid) == 1


def test_file_transport_writes_eml(mail):
    out = os.path.join(E2E_DIR, "files")
    os.makedirs(out, exist_ok=True)
    subprocess.run(["chown", "postgres", out], check=True)
    transport(mail, "files", f"file://{out}")
    mid = send(mail, "files")
    subject = subject_of(mail, mid)
    wait_status(mail, mid, "sent")
    mid_header = mail.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    path = os.path.join(out, mid_header.strip("<>") + ".eml")
    with open(path, "rb") as f:
        parsed = email.message_from_bytes(f.read(), policy=email.policy.default)
    assert parsed["subject"] == subject and parsed["Message-ID"] == mid_header


def test_capture_keeps_the_bytes(mail):
    transport(mail, "cap", "capture://")
    mid = send(mail, "cap", recipients="a@x.test, b@x.test", bcc="hidden@x.test")
    subject = subject_of(mail, mid)
    wait_status(mail, mid, "sent")
    row = mail.one("SELECT envelope_to, raw FROM email.captured WHERE message_id = %s", mid)
    assert row[0] == ["a@x.test", "b@x.test", "hidden@x.test"]
    parsed = email.message_from_bytes(bytes(row[1]), policy=email.policy.default)
    assert parsed["subject"] == subject and parsed["Bcc"] is None


def test_commit_wakes_the_worker_despite_long_poll(mail, postfix):
    transport(mail, "pf", "smtp://127.0.0.1:26525?tls=none")
    mail.all("ALTER SYSTEM SET pg_email.poll_interval = '60s'")
    mail.all("SELECT pg_reload_conf()")
    time.sleep(1.0)  # let the worker take the new setting and go to sleep
    try:
        times = []
        for _ in range(3):
            time.sleep(0.3)
            start = time.monotonic()
            mid = send(mail, "pf")
            wait_status(mail, mid, "sent", timeout=5)
            times.append(time.monotonic() - start)
        assert max(times) < 1.0, times
    finally:
        mail.all("ALTER SYSTEM RESET pg_email.poll_interval")
        mail.all("SELECT pg_reload_conf()")


def test_rolled_back_send_is_never_delivered(mail, postfix):
    transport(mail, "pf", "smtp://127.0.0.1:26525?tls=none")
    c = connect("mail", autocommit=False)
    subject = f"rolled-back-{uuid.uuid4().hex[:8]}"
    with c.cursor() as cur:
        cur.execute("SELECT email.send(recipients => 'ok@example.test', subject => %s, body => 'x', transport => 'pf')", (subject,))
    c.rollback()
    c.close()
    marker = send(mail, "pf")  # a later committed send is delivered; the rolled-back one never is
    wait_status(mail, marker, "sent")
    time.sleep(0.5)
    assert not [m for m in postfix.messages() if m["subject"] == subject]
    assert mail.val("SELECT count(*) FROM email.messages WHERE subject = %s", subject) == 0


def test_450_is_deferred_then_delivered(mail, postfix):
    transport(mail, "pf", "smtp://127.0.0.1:26525?tls=none")
    mid = send(mail, "pf", recipients="busy@example.test")
    subject = subject_of(mail, mid)
    mail.wait("SELECT count(*) > 0 FROM email.receipts WHERE message_id = %s AND event = 'deferred'", mid)
    r = receipts(mail, mid)[0]
    assert r[2] == 450 and r[3] == "4.2.0" and "busy" in r[4]
    assert status(mail, mid) == "queued"
    postfix.set_reject({"nouser@example.test": "550 5.1.1 No such user here"})
    try:
        wait_status(mail, mid, "sent")
        by_subject(postfix, subject)
        events = [x[0] for x in receipts(mail, mid)]
        assert events[0] == "deferred" and events[-1] == "sent"
        assert mail.val("SELECT attempts FROM email.messages WHERE id = %s", mid) >= 2
    finally:
        postfix.set_reject({"busy@example.test": "450 4.2.0 Mailbox busy, try later",
                            "nouser@example.test": "550 5.1.1 No such user here"})


def test_550_for_one_recipient_bounces_it_and_delivers_the_other(mail, postfix):
    transport(mail, "pf", "smtp://127.0.0.1:26525?tls=none")
    mail.all("DELETE FROM email.suppressions WHERE address = 'nouser@example.test'")
    mid = send(mail, "pf", recipients="nouser@example.test, other@example.test")
    subject = subject_of(mail, mid)
    wait_status(mail, mid, "sent")
    got = by_subject(postfix, subject)
    assert len(got) == 1
    ev = {(x[0], x[1]) for x in receipts(mail, mid)}
    assert ("sent", None) in ev and ("bounced", "nouser@example.test") in ev
    bounced = [x for x in receipts(mail, mid) if x[0] == "bounced"][0]
    assert bounced[2] == 550 and bounced[3] == "5.1.1"
    assert mail.one("SELECT reason, message_id FROM email.suppressions WHERE address = 'nouser@example.test'") == ("bounced", mid)
    # the next message to that address is suppressed at enqueue
    mid2 = send(mail, "pf", recipients="nouser@example.test")
    assert status(mail, mid2) == "suppressed"


def test_all_recipients_bounced(mail, postfix):
    transport(mail, "pf", "smtp://127.0.0.1:26525?tls=none")
    mail.all("DELETE FROM email.suppressions WHERE address = 'nouser@example.test'")
    mid = send(mail, "pf", recipients="nouser@example.test")
    wait_status(mail, mid, "bounced")


def test_wrong_auth_password_fails_with_the_server_reply(mail, certs):
    with AioSmtp(26526, auth=("mailer", "right-password")) as srv:
        transport(mail, "authbad", "smtp://mailer:wrong-password@127.0.0.1:26526?tls=none")
        transport(mail, "authok", "smtp://mailer:right-password@127.0.0.1:26526?tls=none")
        bad = send(mail, "authbad")
        ok = send(mail, "authok")
        wait_status(mail, bad, "failed")
        wait_status(mail, ok, "sent")
        r = receipts(mail, bad)
        assert r[-1][0] == "failed" and r[-1][2] == 535 and "5.7.8" in r[-1][4]
        assert "wrong-password" not in json.dumps(r)
        assert srv.messages[-1]["auth_user"] == "mailer"


def test_tls_unknown_ca_fails_unless_ca_is_given(mail, certs):
    with AioSmtp(26527, tls="starttls", cert=(certs["cert"], certs["key"])) as srv:
        transport(mail, "tls_default", "smtp://127.0.0.1:26527")
        transport(mail, "tls_ca", f"smtp://127.0.0.1:26527?ca={certs['ca']}")
        bad = send(mail, "tls_default")
        ok = send(mail, "tls_ca")
        wait_status(mail, bad, "failed")
        wait_status(mail, ok, "sent")
        resp = receipts(mail, bad)[-1][4]
        assert "TLS" in resp and ("Unknown" in resp or "certificate" in resp), resp
        assert len(srv.messages) == 1
    with AioSmtp(26528, tls="implicit", cert=(certs["cert"], certs["key"])) as srv:
        transport(mail, "smtps_ca", f"smtps://127.0.0.1:26528?ca={certs['ca']}")
        ok = send(mail, "smtps_ca")
        wait_status(mail, ok, "sent")
        assert len(srv.messages) == 1


def test_plaintext_server_is_refused_when_starttls_is_required(mail):
    with AioSmtp(26529) as srv:
        transport(mail, "needtls", "smtp://127.0.0.1:26529")
        mid = send(mail, "needtls")
        wait_status(mail, mid, "failed")
        assert "STARTTLS" in receipts(mail, mid)[-1][4]
        assert srv.messages == []


def test_server_down_then_up_delivers_everything(mail):
    transport(mail, "later", "smtp://127.0.0.1:26530?tls=none&timeout=2s")
    ids = [send(mail, "later") for _ in range(10)]
    mail.wait("SELECT count(DISTINCT message_id) FROM email.receipts WHERE message_id = ANY(%s) AND event = 'deferred'", ids, expect=10)
    time.sleep(30 - 2)
    assert mail.val("SELECT count(*) FROM email.messages WHERE id = ANY(%s) AND status = 'sent'", ids) == 0
    with AioSmtp(26530) as srv:
        mail.wait("SELECT count(*) FROM email.messages WHERE id = ANY(%s) AND status = 'sent'", ids, expect=10, timeout=30)
        assert len(srv.messages) == 10
    deferrals = mail.val("SELECT count(*) FROM email.receipts WHERE message_id = ANY(%s) AND event = 'deferred'", ids)
    assert deferrals >= 10
    assert "connect" in mail.val("SELECT response FROM email.receipts WHERE message_id = %s AND event = 'deferred' LIMIT 1", ids[0])



def test_silent_server_times_out_others_keep_going_and_sigterm_is_prompt(mail):
    with Blackhole(26531):
        transport(mail, "silent", "smtp://127.0.0.1:26531?tls=none&timeout=2s")
        transport(mail, "cap", "capture://")
        stuck = send(mail, "silent")
        # The silent server holds a send (and the worker is up: alone, this test can start
        # before the workers do, which the timing below must not count).
        wait_status(mail, stuck, "sending")
        start = time.monotonic()
        fast = send(mail, "cap")
        wait_status(mail, fast, "sent", timeout=5)
        assert time.monotonic() - start < 1.0, "another transport is not held up by the silent server"
        mail.wait("SELECT count(*) > 0 FROM email.receipts WHERE message_id = %s AND event = 'deferred'", stuck, timeout=6)
        assert "timed out" in receipts(mail, stuck)[0][4]
        # a fresh stuck send, then SIGTERM while it is in flight
        mail.all("UPDATE email.messages SET next_attempt_at = now() + interval '1 hour' WHERE id = %s", stuck)
        stuck2 = send(mail, "silent")
        wait_status(mail, stuck2, "sending")
        pids = worker_pids(mail)
        assert pids
        t0 = time.monotonic()
        for p in pids:
            os.kill(p, signal.SIGTERM)
        while any(os.path.exists(f"/proc/{p}") for p in pids):
            assert time.monotonic() - t0 < 5.0, "worker did not stop within 5 s of SIGTERM"
            time.sleep(0.05)
        # released, not lost: the row is queued again and the restarted worker picks it up
        mail.wait("SELECT status::text IN ('queued', 'sending') FROM email.messages WHERE id = %s", stuck2)
        mail.wait("SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'pg_email worker'", timeout=10)
        mail.all("UPDATE email.messages SET status = 'cancelled' WHERE id IN (%s, %s)", stuck, stuck2)


def test_a_message_deleted_while_it_is_sent_is_left_out_of_the_record(mail):
    """A row deleted while its send is in flight: the worker's write-back no longer has it. It
    used to take that for a failing user trigger and write the receipts with triggers off,
    leaving receipts of a message that no longer exists."""
    gate = threading.Event()
    srv = AioSmtp(26533)
    srv.hold = gate
    with srv:
        transport(mail, "held", "smtp://127.0.0.1:26533?tls=none")
        gone = send(mail, "held", subject="deleted while sent")
        wait_until(lambda: srv.held >= 1, "the send waits for its DATA reply")
        mail.all("DELETE FROM email.messages WHERE id = %s", gone)
        gate.set()
        kept = send(mail, "held", subject="sent after it")
        wait_status(mail, kept, "sent")
        wait_until(lambda: f"message {gone} was deleted while it was being sent" in server_log(),
                   "the worker logs that the outcome is left out")
    assert [m["rcpt_tos"] for m in srv.messages] == [["ok@example.test"], ["ok@example.test"]]
    assert mail.val("SELECT count(*) FROM email.receipts WHERE message_id = %s", gone) == 0
    assert mail.val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'sent'", kept) == 1
    assert f"recording the outcome of message {gone} failed" not in server_log()


def test_the_write_back_planned_once_finds_its_batch_by_primary_key(mail):
    """The worker prepares the write-back of outcomes once and runs one generic plan for every
    batch. That plan must find the batch by primary key, as a plan made for the batch does: one
    that walked the partial index of leased rows (which statistics taken at a quiet moment show as
    empty) would cost every write-back the whole lease set. Planned here as the worker plans it:
    its session settings (sql/worker/session.sql) and a generic plan."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "sql", "worker", "session.sql")) as f:
        settings = [line.rstrip(";") for line in f.read().splitlines() if line.startswith("SET ")]
    with open(os.path.join(root, "sql", "worker", "record_outcomes.sql")) as f:
        record = f.read()
    d = fresh()
    try:
        wait_until(lambda: d.val("SELECT count(*) FROM email.messages WHERE status = 'sending'") == 0, "no message being sent")
        d.all("ANALYZE email.messages")
        for s in settings + ["SET plan_cache_mode = force_generic_plan"]:
            d.all(s)
        d.all(f"PREPARE record_outcomes(jsonb, bigint[]) AS {record}")
        plan = "\n".join(r[0] for r in d.all("EXPLAIN EXECUTE record_outcomes('[]', '{}')"))
        assert "Index Cond: (id = ANY ($2))" in plan and "messages_pkey" in plan, plan
        assert "messages_leased" not in plan, plan
    finally:
        d.conn.close()


def held_transport(db, name, port):
    # A short timeout: a client that waited for MAIL's reply before RCPT would time out.
    transport(db, name, f"smtp://127.0.0.1:{port}?tls=none&timeout=5s")


def test_commands_are_pipelined_where_offered_and_each_recipient_keeps_its_reply(mail):
    """A server offering PIPELINING gets MAIL, the RCPTs and DATA before it answers any of them
    (HeldReplies answers nothing until DATA), and each RCPT reply still lands on its recipient."""
    with HeldReplies(26534, reject={"nouser@held.test": "550 5.1.1 No such user here",
                                    "busy@held.test": "450 4.2.0 Mailbox busy"}) as srv:
        held_transport(mail, "held", 26534)
        mail.all("DELETE FROM email.suppressions WHERE address LIKE '%%@held.test'")
        mid = send(mail, "held", recipients="nouser@held.test, ok@held.test, busy@held.test")
        wait_status(mail, mid, "queued")
        mail.wait("SELECT count(*) > 0 FROM email.receipts WHERE message_id = %s AND event = 'sent'", mid)
        assert len(srv.messages) == 1
        sender, rcpts, data = srv.messages[0]
        assert rcpts == ["ok@held.test"] and subject_of(mail, mid).encode() in data
        ev = {(x[0], x[1]): x for x in receipts(mail, mid)}
        assert ev[("bounced", "nouser@held.test")][2:4] == (550, "5.1.1")
        assert ev[("deferred", "busy@held.test")][2:4] == (450, "4.2.0")
        assert ev[("sent", None)][2] == 250 and "queued as H1" in ev[("sent", None)][4]
        # The deferred recipient is all that is left to send.
        assert mail.val("SELECT pending_recipients FROM email.messages WHERE id = %s", mid) == ["busy@held.test"]
        verbs = [c.split(":")[0].split(" ")[0].upper() for c in srv.commands]
        assert verbs[verbs.index("MAIL"):verbs.index("MAIL") + 5] == ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
        mail.all("UPDATE email.messages SET status = 'cancelled' WHERE id = %s AND status = 'queued'", mid)


def test_a_pipelined_message_refused_at_mail_or_with_no_recipient_sends_nothing(mail):
    """MAIL refused: its reply fails the message, the RCPT and DATA replies that follow (503)
    are read, and the connection goes on to deliver the next message. No recipient taken while
    the server opens DATA anyway: an empty message ends it (refused), then RSET; nothing is
    delivered. Then a good message goes through on the same server."""
    with HeldReplies(26535, reject={"refused-sender@held.test": "550 5.7.1 Sender refused",
                                    "nouser@held.test": "550 5.1.1 No such user here"},
                     open_data_anyway=True) as srv:
        held_transport(mail, "held2", 26535)
        mail.all("DELETE FROM email.suppressions WHERE address LIKE '%%@held.test'")
        refused = send(mail, "held2", sender="refused-sender@held.test", recipients="ok@held.test")
        wait_status(mail, refused, "failed")
        r = receipts(mail, refused)[-1]
        assert r[2] == 550 and "Sender refused" in r[4]
        nobody = send(mail, "held2", recipients="nouser@held.test")
        wait_status(mail, nobody, "bounced")
        assert srv.messages == []
        after_data = srv.commands[srv.commands.index("DATA", srv.commands.index("RCPT TO:<nouser@held.test>")):]
        assert after_data[1:3] == [".", "RSET"], after_data
        good = send(mail, "held2", recipients="ok@held.test")
        wait_status(mail, good, "sent")
        assert [m[1] for m in srv.messages] == [["ok@held.test"]]
