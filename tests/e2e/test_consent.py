"""Consent end to end (DESIGN.md "Consent: topics, suppression, erasure", "One event model",
"Tracking and unsubscribe links"): topics and subscriptions at enqueue, the three ways a topic
message's recipient leaves its topic (the listener's one-click POST /u/<token>, mail to the
List-Unsubscribe mailto address, a provider's unsubscribe event), and email.forget. Messages go
through a capture:// transport of this module (`consentcap`); every address and topic is new.

Contract details these tests take as given beyond DESIGN.md (see the module's report):
  - A topic name like `topic-<hex>` is valid. email.subscribe upserts (address, topic) with
    subscribed = true and source 'api', also after an unsubscribe; email.subscribe and
    email.unsubscribe with a topic never touch email.suppressions; an invalid address is 22023
    for both, an unknown topic 42704 for both (nothing stored).
  - A recipient dropped for a topic gets one 'suppressed' receipt: recipient the bare lower-cased
    address, source 'api', response containing the topic's name; like a suppressed one, she is
    removed from the stored recipients/cc when others remain. Captured envelope_to is compared
    lower-cased. A topic message with two recipients left has no List-Unsubscribe.
  - The 'unsubscribed' receipt of a one-click, an unsubscribe mail or a provider event has
    recipient = the bare lower-cased address. A SendGrid `unsubscribe` event carrying
    pg_email_id, fed to email.ingest_webhook of a sendgrid+api transport with webhook_key (it
    never sends), is such an event.
  - The GET /u/<token> page contains the topic's name literally.
  - email.forget works inside a REPEATABLE READ transaction (used so that the daily_stats totals
    before and after it are read without the workers' concurrent receipts); it keeps the message
    rows (contents NULL or empty) and their receipt rows; relation names are schema-qualified
    ('email.messages'); a relation may appear more than once (its rows are summed). The shared
    message keeps its subject and body. The scan of every text/varchar/text[]/varchar[]/json/
    jsonb/bytea column of every table of schema email also covers whatever forget itself keeps
    (the salted hash), and is first shown to find her in eight tables before the forget.
Listener events are stored asynchronously: every check of one waits (up to SLOW)."""
import base64
import email
import email.message
import email.policy
import email.utils
import html
import json
import re
import time
import uuid

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

import webhooks as W
from conftest import LISTEN_URL, SLOW, connect, fresh, send, status, wait_until
from test_inbound import REPLY_DOMAIN, Sent, flat, inbound, inbound_rows, ingest, send_raw  # noqa: F401 (inbound: a fixture)
from test_tracking import http, path_of

CAP = "consentcap"  # capture:// transport: the message bytes and the envelope land in email.captured
SG_BASE = "sendgrid+api://test-key@127.0.0.1:28290?scheme=http"  # never sent to: only its webhooks are used
FINAL = ("sent", "delivered", "bounced", "failed", "cancelled", "suppressed")
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = [("Content-Type", "application/x-www-form-urlencoded")]


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def cap(cluster):
    d = fresh()
    d.all("SELECT email.add_transport(%s, 'capture://')", CAP)
    d.conn.close()


@pytest.fixture
def db(cap, mail):
    return mail


def _health():
    try:
        return http("GET", "/health", timeout=10).status == 200
    except (OSError, AssertionError):
        return False


@pytest.fixture(scope="module")
def listener(cluster):
    wait_until(_health, "the listener to answer GET /health with 200", SLOW, every=0.2)


@pytest.fixture(scope="module")
def sendgrid(cluster):
    """(transport name, signer) of a sendgrid+api transport with webhook options."""
    p = W.SendGrid()
    name = f"consent-sg-{uuid.uuid4().hex[:10]}"
    d = fresh()
    d.all("SELECT email.add_transport(%s, %s)", name, W.dsn(SG_BASE, p.options()))
    d.conn.close()
    return name, p


def addr(tag, domain="example.test"):
    return f"{tag}-{uuid.uuid4().hex[:10]}@{domain}"


def new_topic(db, default_subscribed):
    name = f"topic-{uuid.uuid4().hex[:10]}"
    db.all("INSERT INTO email.topics (name, description, default_subscribed) VALUES (%s, %s, %s)",
           name, "Consent tests", default_subscribed)
    return name


def settle(db, mid):
    """Waits until the message has a final status; returns it."""
    wait_until(lambda: status(db, mid) in FINAL, f"message {mid} to leave the queue", SLOW, every=0.1)
    return status(db, mid)


def deliver(db, recipients, **kw):
    """Sends through CAP to `recipients` (the first in To, the others in Cc; kw: more email.send
    arguments), checks that it was sent and returns it as captured (test_inbound's Sent)."""
    kw["recipients"] = recipients[0]
    if len(recipients) > 1:
        kw["cc"] = ", ".join(recipients[1:])
    kw.setdefault("subject", f"consent {uuid.uuid4().hex[:10]}")
    mid = send(db, CAP, **kw)
    st = settle(db, mid)
    assert st == "sent", (f"message {mid} to {recipients} ({kw.get('topic')}) is {st}: "
                          f"{db.val('SELECT last_error FROM email.messages WHERE id = %s', mid)}")
    row = db.one("SELECT envelope_from, envelope_to, raw FROM email.captured WHERE message_id = %s ORDER BY id DESC LIMIT 1",
                 mid)
    assert row is not None, f"message {mid} is sent but nothing was captured"
    rfc_id = db.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    return Sent(mid, rfc_id, list(recipients), kw["subject"], row[0], list(row[1]), bytes(row[2]))


def envelope(sent):
    return sorted(a.lower() for a in sent.envelope_to)


def dropped(db, mid):
    """(recipient, source, response) of the message's 'suppressed' receipts."""
    return db.all("SELECT recipient, source, response FROM email.receipts WHERE message_id = %s AND event = 'suppressed' "
                  "ORDER BY id", mid)


def check_dropped_for_topic(db, mid, who, topic):
    rows = dropped(db, mid)
    assert [(r, s) for r, s, _ in rows] == [(a.lower(), "api") for a in who], rows
    for _, _, response in rows:
        assert topic in (response or ""), f"the 'suppressed' receipt does not name topic {topic}: {response!r}"


def unsubscribed(db, mid):
    """(recipient, source) of the message's 'unsubscribed' receipts."""
    return db.all("SELECT recipient, source FROM email.receipts WHERE message_id = %s AND event = 'unsubscribed' ORDER BY id",
                  mid)


def subscription(db, address, topic):
    """(subscribed, source) of the address's row for the topic, or None."""
    return db.one("SELECT subscribed, source FROM email.subscriptions WHERE address = %s AND topic = %s",
                  address.lower(), topic)


def suppression(db, address):
    """(reason, message_id) of the address's suppression, or None."""
    return db.one("SELECT reason, message_id FROM email.suppressions WHERE address = lower(%s)", address)


def bare_lists(db, mid):
    """The bare lower-cased addresses of the stored To, Cc and Bcc lists."""
    lists = db.one("SELECT recipients, cc, bcc FROM email.messages WHERE id = %s", mid)
    return {email.utils.parseaddr(m)[1].lower() for lst in lists if lst for m in lst}


def unsubscribe_path(sent):
    """The listener path of the message's List-Unsubscribe http link; checks the RFC 8058 header."""
    msg = sent.message()
    lu = flat(str(msg["List-Unsubscribe"] or ""))
    m = re.search(r"<(https?://[^<>\s]+)>", lu)
    assert m, f"no <http...> link in List-Unsubscribe: {msg['List-Unsubscribe']!r}"
    assert flat(str(msg["List-Unsubscribe-Post"] or "")) == "List-Unsubscribe=One-Click", msg["List-Unsubscribe-Post"]
    return path_of(m.group(1))


def one_click(path, **kw):
    r = http("POST", path, body=ONE_CLICK, headers=FORM, **kw)
    assert r.status == 200, r
    return r


def sg_event(kind, recipient, mid=None, rfc_id=None, **extra):
    """A SendGrid event about `recipient`, naming our message `mid` (pg_email_id) when given."""
    e = {"email": recipient, "timestamp": int(time.time()), "event": kind,
         "sg_event_id": f"consent-{uuid.uuid4()}",
         "sg_message_id": f"consent{uuid.uuid4().hex}.filterdrecv-5645d9c87f-6r2ch-1-0-2B.0",
         "smtp-id": rfc_id or f"<{uuid.uuid4().hex}@nowhere.example.test>"}
    if mid is not None:
        e["pg_email_id"] = str(mid)
    e.update(extra)
    return e


def ingest_sg(db, hook, events):
    """email.ingest_webhook of a signed SendGrid batch; the rows stored."""
    name, p = hook
    body = json.dumps(events, ensure_ascii=False).encode()
    return db.val("SELECT email.ingest_webhook(%s, %s::jsonb, %s)", name, json.dumps(p.sign_raw(body)),
                  psycopg2.Binary(body))


def reply_from(address, rfc_id, subject, body):
    msg = email.message.EmailMessage()
    msg["From"] = f"Ada Lovelace <{address}>"
    msg["To"] = f"support@{REPLY_DOMAIN}"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@nowhere.test>"
    msg["In-Reply-To"] = rfc_id
    msg["References"] = rfc_id
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def hard_bounce(rfc_id, recipient):
    """An RFC 3464 report: 550 5.1.1 for `recipient` of the message `rfc_id` (returned headers)."""
    return (f"From: MAILER-DAEMON@mx.nowhere.test\r\nTo: <tests@example.org>\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@mx.nowhere.test>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="RB"\r\n\r\n'
            "--RB\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"I could not deliver your message to <{recipient}>.\r\n\r\n"
            "--RB\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.nowhere.test\r\n\r\n"
            f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown\r\n\r\n"
            "--RB\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"From: pg_email tests <tests@example.org>\r\nTo: {recipient}\r\nSubject: invoice\r\nMessage-ID: {rfc_id}\r\n\r\n"
            "--RB--\r\n").encode()


def like_escape(s):
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


SCANNED_TYPES = ("'text'::regtype, 'varchar'::regtype, 'text[]'::regtype, 'varchar[]'::regtype, 'json'::regtype, "
                 "'jsonb'::regtype, 'bytea'::regtype")


def traces(db, address):
    """[(table, column, rows)] of every table of schema email (relkind 'r') and every column of
    type text, varchar, text[], varchar[], json, jsonb (cast to text, ILIKE: any letter case) or
    bytea (the UTF-8 bytes of the address as given or lower-cased) with rows containing it."""
    cols = db.all(f"""SELECT quote_ident(c.relname), quote_ident(a.attname), a.atttypid = 'bytea'::regtype
                      FROM pg_class c
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      JOIN pg_attribute a ON a.attrelid = c.oid
                      WHERE n.nspname = 'email' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.atttypid IN ({SCANNED_TYPES})
                      ORDER BY 1, 2""")
    assert cols, "no text or bytea column in schema email?"
    pattern = "%" + like_escape(address) + "%"
    found = []
    for table, col, is_bytea in cols:
        if is_bytea:
            n = db.val(f"SELECT count(*) FROM email.{table} WHERE position(convert_to(%s, 'UTF8') IN {col}) > 0 "
                       f"OR position(convert_to(%s, 'UTF8') IN {col}) > 0", address, address.lower())
        else:
            n = db.val(f"SELECT count(*) FROM email.{table} WHERE {col}::text ILIKE %s", pattern)
        if n:
            found.append((f"email.{table}", col, n))
    return found


def forget_between_totals(address, mids):
    """email.forget(address) in one REPEATABLE READ transaction, between two readings of the
    email.daily_stats totals (the sum of every bigint column over all rows) and of the receipt
    counts of messages `mids`: one snapshot, so concurrent receipts of the workers do not show.
    Returns (forget's rows, totals before, totals after, receipts before, receipts after)."""
    conn = connect(autocommit=False)
    conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    try:
        for _ in range(3):
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT quote_ident(column_name) FROM information_schema.columns WHERE table_schema = 'email' "
                                "AND table_name = 'daily_stats' AND data_type = 'bigint' ORDER BY ordinal_position")
                    counts = [r[0] for r in cur.fetchall()]
                    assert counts, "email.daily_stats has no count column"
                    totals = f"SELECT {', '.join(f'coalesce(sum({c}), 0)' for c in counts)} FROM email.daily_stats"
                    receipts = ("SELECT message_id, count(*) FROM email.receipts WHERE message_id = ANY(%s) "
                                "GROUP BY 1 ORDER BY 1")
                    cur.execute(totals)
                    before = dict(zip(counts, cur.fetchone()))
                    cur.execute(receipts, (list(mids),))
                    receipts_before = cur.fetchall()
                    cur.execute("SELECT f.relation, f.rows FROM email.forget(%s) AS f", (address,))
                    rows = cur.fetchall()
                    cur.execute(totals)
                    after = dict(zip(counts, cur.fetchone()))
                    cur.execute(receipts, (list(mids),))
                    receipts_after = cur.fetchall()
                conn.commit()
                return rows, before, after, receipts_before, receipts_after
            except (psycopg2.errors.SerializationFailure, psycopg2.errors.DeadlockDetected):
                conn.rollback()  # a concurrent update of the same rows: try again
        raise AssertionError("email.forget failed three times with a serialization failure")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Topics at enqueue


@pytest.mark.on_citus
def test_opt_in_topic_sends_only_to_subscribers(db):
    t = new_topic(db, False)
    never, joined = addr("never"), addr("joined")
    db.all("SELECT email.subscribe(%s, %s)", f'"Joined Reader" <{joined.upper()}>', t)
    assert subscription(db, joined, t) == (True, "api"), "stored lower-cased and bare, source api"
    assert db.val("SELECT count(*) FROM email.subscriptions WHERE address = %s", never) == 0
    # never subscribed to an opt-in topic: dropped at enqueue
    mid = send(db, CAP, recipients=never, topic=t)
    assert status(db, mid) == "suppressed"
    assert db.val("SELECT topic FROM email.messages WHERE id = %s", mid) == t
    check_dropped_for_topic(db, mid, [never], t)
    assert suppression(db, never) is None, "a topic drop adds no suppression"
    # subscribed: sent
    sent = deliver(db, [joined], topic=t)
    assert envelope(sent) == [joined]
    assert dropped(db, sent.mid) == []
    assert db.val("SELECT topic FROM email.messages WHERE id = %s", sent.mid) == t
    # both in one message: only the subscriber gets it
    both = deliver(db, [never, joined], topic=t)
    assert envelope(both) == [joined]
    check_dropped_for_topic(db, both.mid, [never], t)


@pytest.mark.on_citus
def test_opt_out_topic_drops_only_those_who_left(db):
    t = new_topic(db, True)
    stays, joined, left = addr("stays"), addr("joined"), addr("left")
    db.all("SELECT email.subscribe(%s, %s)", joined, t)
    db.all("SELECT email.unsubscribe(%s, %s)", f"Left Reader <{left.upper()}>", t)
    assert subscription(db, left, t) == (False, "api")
    assert suppression(db, left) is None, "unsubscribing from a topic is not a suppression"
    sent = deliver(db, [stays, left.upper(), joined], topic=t)
    assert envelope(sent) == sorted([stays, joined]), f"the opted-out recipient is not in the envelope: {sent.envelope_to}"
    check_dropped_for_topic(db, sent.mid, [left], t)
    lists = bare_lists(db, sent.mid)
    assert left not in lists and {stays, joined} <= lists, lists
    assert sent.message()["List-Unsubscribe"] is None, "two recipients: no List-Unsubscribe"
    # without a topic she still gets mail; subscribing again brings the topic back
    assert envelope(deliver(db, [left])) == [left]
    db.all("SELECT email.subscribe(%s, %s)", left, t)
    assert subscription(db, left, t) == (True, "api")
    assert envelope(deliver(db, [left], topic=t)) == [left]


@pytest.mark.on_citus
def test_unsubscribe_without_topic_suppresses_and_bad_input_is_refused(db):
    a = addr("everything")
    t = new_topic(db, True)
    db.all("SELECT email.unsubscribe(%s)", f'"Every Thing" <{a.upper()}>')
    assert suppression(db, a) is not None and suppression(db, a)[0] == "unsubscribed", suppression(db, a)
    assert db.val("SELECT count(*) FROM email.subscriptions WHERE address = %s", a) == 0
    assert status(db, send(db, CAP, recipients=a)) == "suppressed"
    # a global suppression applies to topic mail too
    assert status(db, send(db, CAP, recipients=a, topic=t)) == "suppressed"
    for q in ("SELECT email.subscribe(%s, %s)", "SELECT email.unsubscribe(%s, %s)"):
        code, msg = db.error(q, "not an address", t)
        assert code == "22023", (q, code, msg)
    code, msg = db.error("SELECT email.unsubscribe(%s)", "not an address")
    assert code == "22023", (code, msg)


@pytest.mark.on_citus
def test_unknown_topic_is_42704_and_stores_nothing(db):
    missing = f"no-such-topic-{uuid.uuid4().hex[:10]}"
    to = addr("unknown-topic")
    name = f"consent-{uuid.uuid4().hex[:10]}"
    db.all("INSERT INTO email.templates (name, subject, body) VALUES (%s, 'Hello {{ who }}', 'Hi {{ who }}')", name)
    before = db.val("SELECT count(*) FROM email.messages")
    code, msg = db.error("SELECT email.send(recipients => %s, subject => 'x', body => 'y', transport => %s, topic => %s)",
                         to, CAP, missing)
    assert code == "42704", (code, msg)
    code, msg = db.error("SELECT email.send_template(%s, %s, %s::jsonb, transport => %s, topic => %s)",
                         name, to, json.dumps({"who": "x"}), CAP, missing)
    assert code == "42704", (code, msg)
    assert db.val("SELECT count(*) FROM email.messages") == before, "a message was stored for an unknown topic"
    assert db.val("SELECT count(*) FROM email.messages WHERE template = %s", name) == 0
    for q in ("SELECT email.subscribe(%s, %s)", "SELECT email.unsubscribe(%s, %s)"):
        code, msg = db.error(q, to, missing)
        assert code == "42704", (q, code, msg)
    assert db.val("SELECT count(*) FROM email.subscriptions WHERE address = %s", to) == 0
    assert suppression(db, to) is None
    # a known topic through email.send_template: the non-subscriber is dropped, the other gets it
    t = new_topic(db, False)
    joined = addr("tpl-joined")
    db.all("SELECT email.subscribe(%s, %s)", joined, t)
    mid = db.val("SELECT email.send_template(%s, %s, %s::jsonb, transport => %s, topic => %s)",
                 name, f"{to}, {joined}", json.dumps({"who": "x"}), CAP, t)
    assert settle(db, mid) == "sent"
    assert db.val("SELECT topic FROM email.messages WHERE id = %s", mid) == t
    check_dropped_for_topic(db, mid, [to], t)
    got = db.val("SELECT envelope_to FROM email.captured WHERE message_id = %s ORDER BY id DESC LIMIT 1", mid)
    assert sorted(a.lower() for a in got) == [joined], got


# ---------------------------------------------------------------------------------------------
# Leaving a topic: one-click, mail to the mailto address, a provider event


def test_one_click_unsubscribe_leaves_the_topic_only(db, listener):
    t, other = new_topic(db, True), new_topic(db, False)
    to = f"Clicker-{uuid.uuid4().hex[:10]}@Example.test"
    low = to.lower()
    sent = deliver(db, [f'"Click Er" <{to}>'], topic=t)  # list_unsubscribe left NULL: on for a topic
    path = unsubscribe_path(sent)
    for _ in range(2):  # a link scanner, then the reader: the page changes nothing
        page = http("GET", path)
        assert page.status == 200, page
        assert t.encode() in page.body, f"the page does not name topic {t}: {page.body[:800]!r}"
    assert subscription(db, low, t) is None and unsubscribed(db, sent.mid) == []
    one_click(path)
    wait_until(lambda: subscription(db, low, t) == (False, "tracking"),
               f"email.subscriptions ({low}, {t}) subscribed false, source tracking", SLOW)
    wait_until(lambda: unsubscribed(db, sent.mid) == [(low, "tracking")], "the 'unsubscribed' receipt", SLOW)
    assert suppression(db, low) is None, "leaving a topic is not a suppression"
    # the topic is gone for her; mail without a topic, and of a topic she is in, still go out
    nxt = send(db, CAP, recipients=to, topic=t)
    assert status(db, nxt) == "suppressed"
    check_dropped_for_topic(db, nxt, [low], t)
    assert envelope(deliver(db, [to])) == [low]
    db.all("SELECT email.subscribe(%s, %s)", to, other)
    assert envelope(deliver(db, [to], topic=other)) == [low]


def test_provider_unsubscribe_event_leaves_the_topic_or_suppresses(db, sendgrid):
    t = new_topic(db, True)
    a, b = addr("sg-topic"), addr("sg-plain")
    topical = deliver(db, [a], topic=t)
    plain = deliver(db, [b])
    assert ingest_sg(db, sendgrid, [sg_event("unsubscribe", a, topical.mid, topical.rfc_id)]) == 1
    assert unsubscribed(db, topical.mid) == [(a, "webhook")]
    assert subscription(db, a, t) == (False, "webhook")
    assert suppression(db, a) is None, "leaving a topic is not a suppression"
    assert status(db, send(db, CAP, recipients=a, topic=t)) == "suppressed"
    assert envelope(deliver(db, [a])) == [a]
    # a message without a topic: the old behaviour, a suppression
    assert ingest_sg(db, sendgrid, [sg_event("unsubscribe", b, plain.mid, plain.rfc_id)]) == 1
    assert unsubscribed(db, plain.mid) == [(b, "webhook")]
    assert suppression(db, b) == ("unsubscribed", plain.mid)
    assert db.val("SELECT count(*) FROM email.subscriptions WHERE address = %s", b) == 0


# ---------------------------------------------------------------------------------------------
# email.forget


def test_forget_removes_every_trace_and_keeps_the_counts(db, listener, sendgrid):
    h = uuid.uuid4().hex[:10]
    ada = f"Ada.{h}@Example.org"
    low = ada.lower()
    bo, cy = f"bo-{h}@example.test", f"cy-{h}@example.test"
    t = new_topic(db, True)
    # to her alone: an attachment and metadata naming her, a tracked link naming her
    link = f"https://shop.example.org/account?email={ada}"
    alone = deliver(db, [f'"Ada Lovelace" <{ada}>'], subject=f"Your invoice {h}", body="Your invoice is attached.",
                    html=f'<p>Your invoice is attached. <a href="{link}">Your account</a></p>', track_clicks=True,
                    headers=json.dumps({"X-Account": "A-1042"}), metadata=json.dumps({"customer": ada}),
                    attachments=json.dumps([{"filename": "invoice.txt", "content_type": "text/plain",
                                             "content": base64.b64encode(f"Invoice for {ada}\n".encode()).decode()}]))
    part = alone.message().get_body(("html",))
    hrefs = [html.unescape(u) for u in re.findall(r'href="([^"]+)"', part.get_content())]
    clicks = [u for u in hrefs if u.startswith(LISTEN_URL + "/c/")]
    assert len(clicks) == 1, hrefs
    r = http("GET", path_of(clicks[0]), xff="192.0.2.77")
    assert r.status == 302 and r.header("location") == link.encode(), r
    wait_until(lambda: db.val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'clicked'",
                              alone.mid) >= 1, "the click receipt", SLOW)
    # to her and two others (To + Cc)
    shared = deliver(db, [f"Ada <{ada}>", bo, cy], subject=f"Meeting notes {h}", body="The notes of today's meeting.")
    # a topic message, and her one-click unsubscribe from it (her address in the User-Agent)
    news = deliver(db, [ada], topic=t, subject=f"News {h}", body="This week's news.")
    one_click(unsubscribe_path(news), ua=f"Mail/1.0 ({ada})", xff="192.0.2.78")
    wait_until(lambda: subscription(db, low, t) == (False, "tracking"), "her subscription row (tracking)", SLOW)
    wait_until(lambda: unsubscribed(db, news.mid) == [(low, "tracking")], "the 'unsubscribed' receipt", SLOW)
    # a provider event about her, and one that matches no message
    assert ingest_sg(db, sendgrid, [sg_event("delivered", ada, alone.mid, alone.rfc_id,
                                             response=f"250 2.0.0 OK <{ada}> queued")]) == 1
    stray = sg_event("bounce", ada, type="bounce", status="5.1.1", reason=f"550 5.1.1 <{ada}>: user unknown")
    assert ingest_sg(db, sendgrid, [stray]) == 1
    assert db.val("SELECT count(*) FROM email.unmatched_events WHERE transport = %s AND payload::text ILIKE %s",
                  sendgrid[0], "%" + like_escape(ada) + "%") == 1
    # her reply to the shared message, and a hard bounce of the one to her alone (a suppression)
    rid = ingest(db, reply_from(ada, shared.rfc_id, f"Re: Meeting notes {h}", f"Thanks, see you Monday.\n\nAda ({ada})\n"),
                 [f"support@{REPLY_DOMAIN}"], ada)
    [row] = inbound_rows(db, "id = %s", rid)
    assert (row["kind"], row["message_id"]) == ("reply", shared.mid), row
    bid = ingest(db, hard_bounce(alone.rfc_id, ada), None, "")
    [row] = inbound_rows(db, "id = %s", bid)
    assert (row["kind"], row["message_id"]) == ("bounce", alone.mid), row
    assert suppression(db, low) == ("bounced", alone.mid)
    mids = (alone.mid, shared.mid, news.mid)
    # the scan finds her before
    found = {table for table, _, _ in traces(db, ada)}
    for table in ("email.messages", "email.receipts", "email.captured", "email.attachments", "email.inbound",
                  "email.subscriptions", "email.suppressions", "email.unmatched_events"):
        assert table in found, f"the scan does not find her in {table} before email.forget: {sorted(found)}"

    rows, before, after, receipts_before, receipts_after = forget_between_totals(ada, mids)

    changed = {}
    for relation, n in rows:
        changed[relation] = changed.get(relation, 0) + (n or 0)
    assert changed.get("email.messages", 0) > 0 and changed.get("email.receipts", 0) > 0, rows
    left = traces(db, ada)
    assert left == [], f"her address is still in (table, column, rows): {left}"
    assert after == before, f"email.daily_stats totals changed: {before} -> {after}"
    assert receipts_after == receipts_before, "receipt rows were deleted or added"
    # the others keep the shared message, with its content; her own messages lose theirs
    assert {bo, cy} <= bare_lists(db, shared.mid), bare_lists(db, shared.mid)
    assert db.one("SELECT subject, body FROM email.messages WHERE id = %s", shared.mid) == \
        (f"Meeting notes {h}", "The notes of today's meeting.")
    for mid in (alone.mid, news.mid):
        content = db.one("SELECT subject, body, html, data, headers, metadata FROM email.messages WHERE id = %s", mid)
        assert content is not None, f"message {mid} is gone (its row is kept, its content cleared)"
        assert all(v in (None, "", {}, []) for v in content), f"message {mid} sent to her alone kept content: {content}"
    assert db.val("SELECT count(*) FROM email.attachments WHERE message_id = %s", alone.mid) == 0
    assert db.val("SELECT count(*) FROM email.captured WHERE message_id = ANY(%s)", list(mids)) == 0
    assert db.val("SELECT count(*) FROM email.inbound WHERE id IN (%s, %s)", rid, bid) == 0
    assert db.val("SELECT count(*) FROM email.subscriptions WHERE address = %s", low) == 0
    # forgetting again is fine
    db.all("SELECT * FROM email.forget(%s)", ada)
    # still suppressed, in any letter case (these new rows name her again: checked last)
    for who in (ada, low, ada.upper()):
        mid = send(db, CAP, recipients=who)
        assert status(db, mid) == "suppressed", f"a send to {who} after email.forget is {status(db, mid)}"


def test_forget_an_invalid_address_is_22023(db):
    code, msg = db.error("SELECT * FROM email.forget(%s)", "not an address")
    assert code == "22023", (code, msg)


# ---------------------------------------------------------------------------------------------
# Mail to the List-Unsubscribe mailto address (last: the inbound fixture sets bounce_domain until
# the end of the module)


def test_mail_to_the_unsubscribe_address_leaves_the_topic(db, inbound):
    t = new_topic(db, True)
    to = addr("mailto")
    sent = deliver(db, [to], topic=t)
    mailto = sent.unsubscribe_address()
    raw = (f"From: <{to}>\r\nTo: <{mailto}>\r\nSubject: unsubscribe\r\nDate: {email.utils.formatdate()}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@nowhere.test>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=us-ascii\r\n\r\nunsubscribe\r\n").encode()
    assert [c for c, _ in send_raw(raw, [mailto], mail_from=to)] == [250]
    [row] = inbound_rows(db, "%s = ANY(rcpt_to)", mailto)
    assert (row["kind"], row["message_id"]) == ("unsubscribe", sent.mid), row
    wait_until(lambda: subscription(db, to, t) == (False, "inbound"),
               f"email.subscriptions ({to}, {t}) subscribed false, source inbound", SLOW)
    assert unsubscribed(db, sent.mid) == [(to, "inbound")]
    assert suppression(db, to) is None, "leaving a topic is not a suppression"
    assert status(db, send(db, CAP, recipients=to, topic=t)) == "suppressed"
    assert envelope(deliver(db, [to])) == [to]
