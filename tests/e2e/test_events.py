"""Events out: NOTIFY email_events (DESIGN.md "Events out"). A psycopg2 session LISTENs and
reads the payloads: one per receipt, ids and the event only, sent at commit and never for a
rolled-back transaction; pg_email.notify = off stops them. The receipts come from every path
that writes them: the worker (sent), a provider webhook (delivered), the listener's open pixel
(opened), the SQL API (cancelled)."""
import email
import email.policy
import json
import re
import select
import time
import uuid

import pytest

from conftest import SLOW, connect, fresh, send, val_retry, wait_until
from test_consent import CAP, addr, cap, deliver, ingest_sg, listener, sendgrid, sg_event  # noqa: F401 (fixtures)
from test_tracking import http

KEYS = {"id", "message_id", "event"}


def listening():
    c = connect()
    c.cursor().execute("LISTEN email_events")
    return c


def read_until(conn, done, what, timeout=SLOW):
    """The payloads received on `conn` until done(payloads) holds."""
    got = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"waiting for {what}; received so far: {got}"
        if select.select([conn], [], [], 0.2)[0]:
            conn.poll()
            while conn.notifies:
                n = conn.notifies.pop(0)
                assert n.channel == "email_events"
                got.append(json.loads(n.payload))
    return got


def of(got, mid):
    return [p["event"] for p in got if p["message_id"] == mid]


def pixel_path(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    html = msg.get_body(("html",)).get_content()
    m = re.search(r'src="[^"]*?(/o/[^"]+)"', html)
    assert m, html
    return m.group(1)


def test_sent_delivered_opened_arrive_in_order_with_ids_only(mail, cap, sendgrid, listener):
    conn = listening()
    try:
        rcpt = addr("notify")
        sent = deliver(mail, [rcpt], html="<p>Hello</p>", track_opens=True)
        assert ingest_sg(mail, sendgrid, [sg_event("delivered", rcpt, mid=sent.mid)]) == 1
        # Later than the two-second window in which opens count as machine hits.
        time.sleep(2.5)
        assert http("GET", pixel_path(sent.raw)).status == 200
        got = read_until(conn, lambda g: of(g, sent.mid)[-1:] == ["opened"], "sent, delivered, opened")
        assert of(got, sent.mid) == ["sent", "delivered", "opened"], got
        ids = mail.all("SELECT id, event FROM email.receipts WHERE message_id = %s ORDER BY id", sent.mid)
        mine = [p for p in got if p["message_id"] == sent.mid]
        assert [(p["id"], p["event"]) for p in mine] == [tuple(r) for r in ids]
        for p in mine:
            assert set(p) == KEYS, p
        assert rcpt.split("@")[0] not in json.dumps(got)
    finally:
        conn.close()


def test_nothing_is_sent_for_a_rolled_back_transaction(mail, cap):
    conn = listening()
    tx = connect(autocommit=False)
    try:
        with tx.cursor() as cur:
            cur.execute("SELECT email.send(recipients => %s, subject => 'x', body => 'y', transport => %s, send_at => now() + interval '1 day')",
                        (addr("rollback"), CAP))
            gone = cur.fetchone()[0]
            cur.execute("SELECT email.cancel(%s)", (gone,))
            assert cur.fetchone()[0] is True
        tx.rollback()
        with tx.cursor() as cur:
            cur.execute("SELECT email.send(recipients => %s, subject => 'x', body => 'y', transport => %s, send_at => now() + interval '1 day')",
                        (addr("commit"), CAP))
            kept = cur.fetchone()[0]
            cur.execute("SELECT email.cancel(%s)", (kept,))
        tx.commit()
        got = read_until(conn, lambda g: of(g, kept) == ["cancelled"], "the committed cancellation")
        assert of(got, gone) == [], got
    finally:
        tx.close()
        conn.close()


def test_the_setting_turns_notifications_off(mail, cap):
    d = fresh()
    conn = listening()
    try:
        d.all("ALTER SYSTEM SET pg_email.notify = off")
        d.all("SELECT pg_reload_conf()")
        wait_until(lambda: val_retry("SHOW pg_email.notify") == "off", "pg_email.notify to be off", SLOW, every=0.1)
        quiet = fresh()
        silent = quiet.val("SELECT email.send(recipients => %s, subject => 'x', body => 'y', transport => %s, "
                           "send_at => now() + interval '1 day')", addr("off"), CAP)
        quiet.val("SELECT email.cancel(%s)", silent)
        quiet.conn.close()
        d.all("ALTER SYSTEM RESET pg_email.notify")
        d.all("SELECT pg_reload_conf()")
        wait_until(lambda: val_retry("SHOW pg_email.notify") == "on", "pg_email.notify to be on again", SLOW, every=0.1)
        loud = fresh()
        marker = loud.val("SELECT email.send(recipients => %s, subject => 'x', body => 'y', transport => %s, "
                          "send_at => now() + interval '1 day')", addr("on"), CAP)
        loud.val("SELECT email.cancel(%s)", marker)
        loud.conn.close()
        # Notifications arrive in commit order: once the marker's is here, the silent one's
        # would have been too.
        got = read_until(conn, lambda g: of(g, marker) == ["cancelled"], "the marker's cancellation")
        assert of(got, silent) == [], got
    finally:
        d.all("ALTER SYSTEM RESET pg_email.notify")
        d.all("SELECT pg_reload_conf()")
        d.conn.close()
        conn.close()


@pytest.mark.parametrize("n", [500])
def test_one_notification_per_receipt_of_a_bulk_statement(mail, cap, n):
    conn = listening()
    try:
        tag = uuid.uuid4().hex[:8]
        mail.all("SELECT count(email.cancel(email.send(recipients => 'bulk' || i || '-' || %s || '@example.test', "
                 "subject => 'x', body => 'y', transport => %s, send_at => now() + interval '1 day'))) "
                 "FROM generate_series(1, %s) i", tag, CAP, n)
        mids = {r[0] for r in mail.all("SELECT id FROM email.messages WHERE recipients[1] LIKE %s", f"%-{tag}@example.test")}
        assert len(mids) == n
        got = read_until(conn, lambda g: len([p for p in g if p["message_id"] in mids]) >= n, f"{n} notifications")
        mine = [p for p in got if p["message_id"] in mids]
        assert len(mine) == n and {p["event"] for p in mine} == {"cancelled"}
        assert len({p["id"] for p in mine}) == n
    finally:
        conn.close()


# --- outbound webhooks: the SQL surface (delivery by the worker comes later) -------------------


def test_add_webhook_returns_a_standard_webhooks_secret_and_validates(api):
    import base64

    import psycopg2.errors

    try:
        secret = api.val("SELECT email.add_webhook('hook1', 'https://app.example/hooks')")
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
        given = "whsec_" + base64.b64encode(bytes(range(24))).decode()
        assert api.val("SELECT email.add_webhook('hook2', 'http://127.0.0.1:9/x', ARRAY['bounced', 'opened'], %s)",
                       given) == given
        assert api.all("SELECT name, url, events, enabled FROM email.webhooks ORDER BY name") == [
            ("hook1", "https://app.example/hooks", None, True),
            ("hook2", "http://127.0.0.1:9/x", ["bounced", "opened"], True)]
        cols = [r[0] for r in api.all("SELECT attname FROM pg_attribute WHERE attrelid = 'email.webhooks'::regclass "
                                      "AND attnum > 0 AND NOT attisdropped")]
        assert not [c for c in cols if "secret" in c], cols
        for args, field in [(("bad name", "https://x.example/"), "name"), (("h", "ftp://x.example/"), "url"),
                            (("h", "https://u:p@x.example/"), "url"), (("h", "https://x.example/", ["nope"]), "events"),
                            (("h", "https://x.example/", None, "whsec_c2hvcnQ="), "secret"),
                            (("h", "https://x.example/", None, "not-a-secret"), "secret")]:
            q = "SELECT email.add_webhook(" + ", ".join(["%s"] * len(args)) + ")"
            with pytest.raises(psycopg2.errors.InvalidParameterValue) as e:
                api.val(q, *args)
            assert str(e.value).startswith(f"invalid {field}:"), e.value
            assert "c2hvcnQ" not in str(e.value) and "not-a-secret" not in str(e.value)
    finally:
        api.all("DELETE FROM email.webhooks")


def test_receipts_queue_one_delivery_per_matching_enabled_webhook(api):
    try:
        api.all("SELECT email.add_webhook('all', 'https://a.example/')")
        api.all("SELECT email.add_webhook('bounces', 'https://b.example/', ARRAY['bounced'])")
        api.all("SELECT email.add_webhook('cancels', 'https://c.example/', ARRAY['cancelled'])")
        api.all("UPDATE email.webhooks SET enabled = false WHERE name = 'cancels'")
        mid = api.val("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b')")
        assert api.val("SELECT email.cancel(%s)", mid) is True
        rid = api.val("SELECT id FROM email.receipts WHERE message_id = %s AND event = 'cancelled'", mid)
        assert api.all("SELECT webhook, status, attempts FROM email.webhook_deliveries WHERE receipt_id = %s", rid) == [
            ("all", "queued", 0)]
        # A rolled-back receipt queues nothing.
        tx = connect("api", autocommit=False)
        try:
            with tx.cursor() as cur:
                cur.execute("SELECT email.send(recipients => 'b@x.org', subject => 's', body => 'b')")
                other = cur.fetchone()[0]
                cur.execute("SELECT email.cancel(%s)", (other,))
            tx.rollback()
        finally:
            tx.close()
        assert api.val("SELECT count(*) FROM email.webhook_deliveries d JOIN email.receipts r ON r.id = d.receipt_id "
                       "WHERE r.message_id = %s", other) == 0
        assert api.val("SELECT email.remove_webhook('all')") is True
        assert api.val("SELECT email.remove_webhook('all')") is False
        assert api.val("SELECT count(*) FROM email.webhook_deliveries WHERE receipt_id = %s", rid) == 0
    finally:
        api.all("DELETE FROM email.webhooks")
