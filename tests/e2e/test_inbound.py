"""Bounce, complaint and reply mail coming back in (DESIGN.md "Bounce and reply mail: inbound";
research/feedback_loop.md §3): the listener's SMTP/LMTP service on INBOUND_PORT and
email.ingest_message. Part of `make test`, so CI runs it.

    VERP            with pg_email.bounce_domain set, the envelope sender of every message is
                    bounce+<42 lower-case base32>@bounces.test (From unchanged), List-Unsubscribe
                    also names mailto:unsubscribe+<token>@bounces.test
    corpus          tests/inbound_corpus/*.eml (Postfix, Exim plain-text and DSN, sendmail,
                    Exchange, Gmail, SMTPUTF8 mailbox-full, policy blocks, VERP-only, two ARF,
                    RFC 3834 and Outlook vacation notices, a reply, an unsubscribe mail; shared with
                    the Rust unit tests of src/inbound), each made about a real message (its
                    Message-ID, recipients and return path put in place of the file's) and fed
                    to email.ingest_message: kind, events per recipient (event, bounce_type,
                    codes, response), the matched message, suppressions, status
    matching        VERP token before Message-ID; a forged token or an unknown Message-ID is
                    stored and changes nothing; the same report twice is one event
    unsubscribe     mail to the List-Unsubscribe mailto address unsubscribes
    reply           In-Reply-To / References our Message-ID → kind reply, an application trigger
                    on email.inbound fires once
    real Postfix    pg_email → Postfix "out" (relay for nowhere.test) → an aiosmtpd next hop that
                    answers 550 5.1.1 or 450 4.2.0 → Postfix writes its own DSN to the VERP
                    address → Postfix "mx" (relay for bounces.test) → LMTP to the listener:
                    hard bounce (suppression, status bounced), a 4xx given up (soft, nothing
                    suppressed), several recipients (one envelope, Final-Recipient decides)
    protocol        swaks as an independent client: 550 5.7.1 for foreign domains, an SMTP
                    session with PIPELINING, LMTP with two recipients (two replies), 552 over
                    pg_email.max_message_size; 5,000 messages over 8 LMTP connections stored once
    hostile         2,000 malformed messages, half through email.ingest_message, half through
                    SMTP: each stored or refused cleanly (22023/54000, SMTP 5xx), no crash
    crash           kill -9 of the listener in the middle of DATA: no 250, nothing stored; the
                    same message sent again after the restart is stored once (last test: the
                    whole cluster restarts)

Contract details these tests take as given beyond DESIGN.md (see the module's report):
  - The report's own Message-ID plus its recipient name an event: a report received twice (an
    MTA that missed our 250) gives two email.inbound rows but one receipt.
  - email.inbound.rcpt_to holds the envelope recipients as the client spelled them (bare
    addresses), mail_from '' (or NULL) for the null sender <>; one row per received message, also
    for LMTP with several recipients.
  - The EHLO/LHLO reply advertises SIZE with pg_email.max_message_size in bytes; the listener
    re-reads the setting on reload.
  - Auto-replies: RFC 3834 Auto-Submitted, and Microsoft's X-Auto-Response-Suppress /
    X-MS-Exchange-Inbox-Rules-Loop / "Automatic reply:" (an Exchange out-of-office without
    Auto-Submitted); an auto-reply or a reply is matched to our message through
    In-Reply-To/References (or its VERP token) like a report.
  - A DSN stays a bounce although it carries Auto-Submitted (Postfix, Exim, Gmail do) or
    In-Reply-To/References naming our message (Exchange, Gmail, Exim do). Exim's plain-text
    bounce (no multipart/report) is read from its text: its 5.1.1 line is a hard bounce, the
    5.7.1 spam refusal beside it is not reported. A report event without a recipient (an
    unsubscribe mail, an ARF without Original-Rcpt-To) is about the message's only recipient.
  - smtp_code is taken only from an `smtp;` Diagnostic-Code (NULL for X-Postfix ones).
The module sets pg_email.bounce_domain = 'bounces.test' and pg_email.inbound_domains =
'replies.test' (ALTER SYSTEM + reload, waited for) and resets both at its end, so the other
modules keep plain envelopes. Every wait is generous (a loaded 2-core CI machine)."""
import base64
import collections
import contextlib
import email
import email.message
import email.policy
import email.utils
import glob
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

import psycopg2
import pytest

from conftest import (E2E_DIR, INBOUND_PORT, ROOT, SLOW, fresh, send, server_log, val_retry, wait_for_workers,
                      wait_status, wait_until)
from servers import AioSmtp, Postfix

HOST = "127.0.0.1"
BOUNCE_DOMAIN = "bounces.test"
REPLY_DOMAIN = "replies.test"
CAP = "inb_cap"  # capture:// transport: the message bytes and the envelope land in email.captured
PF_TRANSPORT = "inb_pf"  # smtp:// to the module's outgoing Postfix
PF_OUT_PORT = 26550
PF_MX_PORT = 26551
HOP_PORT = 26552
SENDER = "tests@example.org"  # conftest's pg_email.default_sender
CORPUS_DIR = os.path.join(ROOT, "tests", "inbound_corpus")
VERP_RE = re.compile(r"bounce\+([a-z2-7]{42})@bounces\.test")
UNSUB_RE = re.compile(r"<mailto:(unsubscribe\+([a-z2-7]{42})@bounces\.test)(\?[^>]*)?>")
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


# ---------------------------------------------------------------------------------------------
# Helpers


def addr(tag, domain="nowhere.test"):
    return f"{tag}-{uuid.uuid4().hex[:10]}@{domain}"


def smtp_client(lmtp=False, timeout=60.0):
    """A connection to the inbound service (no DNS: the client names itself)."""
    cls = smtplib.LMTP if lmtp else smtplib.SMTP
    return cls(HOST, INBOUND_PORT, local_hostname="client.test", timeout=timeout)


def send_raw(raw, rcpts, mail_from="sender@example.net", lmtp=False, conn=None):
    """One transaction on the inbound service; the final replies [(code, text)]: one for SMTP,
    one per accepted recipient for LMTP. Raises AssertionError when MAIL or a RCPT is refused."""
    own = conn is None
    c = smtp_client(lmtp) if own else conn
    try:
        c.ehlo_or_helo_if_needed()
        code, text = c.mail(mail_from, ["BODY=8BITMIME"])
        assert code == 250, f"MAIL FROM:<{mail_from}> answered {code} {text!r}"
        for r in rcpts:
            code, text = c.rcpt(r)
            assert code == 250, f"RCPT TO:<{r}> answered {code} {text!r}"
        out = [c.data(raw)]
        if lmtp:
            out += [c.getreply() for _ in rcpts[1:]]
        return [(code, text.decode(errors="replace") if isinstance(text, bytes) else text) for code, text in out]
    finally:
        if own:
            try:
                c.quit()
            except (OSError, smtplib.SMTPException):
                c.close()


def rcpt_code(rcpt):
    """The answer of the inbound service to RCPT TO:<rcpt> (None when it does not answer)."""
    try:
        with smtp_client(timeout=10) as c:
            c.ehlo()
            c.mail("")
            return c.rcpt(rcpt)[0]
    except (OSError, smtplib.SMTPException):
        return None


def ehlo_size():
    """The SIZE the inbound service advertises (None when it does not answer or has none)."""
    try:
        with smtp_client(timeout=10) as c:
            c.ehlo()
            v = (c.esmtp_features.get("size") or "").strip()
            return int(v) if v.isdigit() else None
    except (OSError, smtplib.SMTPException):
        return None


def listening_pid(port):
    """The pid of the process holding the listening socket 127.0.0.1:port (from /proc)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == port and parts[3] == "0A":
                inodes.add(parts[9])
    if not inodes:
        return None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return int(pid)
    return None


def inbound_pid():
    """The pid of the process serving INBOUND_PORT: the socket's owner, else the listener
    pg_stat_activity shows."""
    return listening_pid(INBOUND_PORT) or val_retry(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email listener'")


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_inbound(other_than=None, timeout=SLOW):
    """Waits until the inbound service (served by a pid other than other_than) takes mail for
    both domains; returns its pid."""
    found = []

    def up():
        if rcpt_code(f"probe@{BOUNCE_DOMAIN}") != 250 or rcpt_code(f"probe@{REPLY_DOMAIN}") != 250:
            return False
        pid = inbound_pid()
        if pid is None or pid == other_than:
            return False
        found[:] = [pid]
        return True

    wait_until(up, f"the inbound service to take mail for {BOUNCE_DOMAIN} and {REPLY_DOMAIN}"
               + (f" (served by a pid other than {other_than})" if other_than else ""), timeout, every=0.2)
    return found[0]


INBOUND_COLS = ("id", "kind", "message_id", "mail_from", "rcpt_to", "from_address", "subject", "rfc_message_id",
                "in_reply_to", "text_body", "html_body")


def inbound_rows(db, where, *args):
    rows = db.all(f"SELECT {', '.join(INBOUND_COLS)} FROM email.inbound WHERE {where} ORDER BY id", *args)
    return [dict(zip(INBOUND_COLS, r)) for r in rows]


def inbound_row(db, iid):
    rows = inbound_rows(db, "id = %s", iid)
    assert len(rows) == 1, f"email.ingest_message returned {iid}, but email.inbound has {rows}"
    return rows[0]


RECEIPT_COLS = ("event", "bounce_type", "enhanced_code", "smtp_code", "recipient", "response")


def inbound_receipts(db, mid):
    """The message's receipts from inbound mail, oldest first."""
    rows = db.all(f"SELECT {', '.join(RECEIPT_COLS)} FROM email.receipts WHERE message_id = %s AND source = 'inbound' "
                  "ORDER BY id", mid)
    return [dict(zip(RECEIPT_COLS, r)) for r in rows]


def suppression(db, address):
    """(reason, message_id) of the address's suppression, or None."""
    return db.one("SELECT reason, message_id FROM email.suppressions WHERE address = lower(%s)", address)


def flat(text):
    return " ".join((text or "").split())


def ingest(db, raw, rcpt_to=None, mail_from=None):
    return db.val("SELECT email.ingest_message(%s, %s, %s)", psycopg2.Binary(raw), rcpt_to, mail_from)


@dataclass
class Sent:
    """A message pg_email sent through the capture transport, as captured."""
    mid: int
    rfc_id: str  # its Message-ID, as email.messages stores it (<...>)
    recipients: list
    subject: str
    envelope_from: str
    envelope_to: list
    raw: bytes

    @property
    def recipient(self):
        return self.recipients[0]

    def message(self):
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    def unsubscribe_address(self):
        """The mailto address of its List-Unsubscribe header."""
        m = UNSUB_RE.search(flat(str(self.message()["List-Unsubscribe"])))
        assert m, f"no <mailto:unsubscribe+TOKEN@{BOUNCE_DOMAIN}> in List-Unsubscribe: {self.message()['List-Unsubscribe']}"
        return m.group(1)


def captured(db, recipients=None, **kw):
    """Sends a message through the capture transport to `recipients` (a list: the first in To,
    the others in Cc; default one new address; kw: more email.send arguments) and returns it as
    captured, once it is sent."""
    recipients = list(recipients or [addr("reader")])
    kw["recipients"] = recipients[0]
    if len(recipients) > 1:
        kw["cc"] = ", ".join(recipients[1:])
    kw.setdefault("subject", f"inbound {uuid.uuid4().hex[:10]}")
    mid = send(db, CAP, **kw)
    wait_status(db, mid, "sent", timeout=SLOW)
    row = db.one("SELECT envelope_from, envelope_to, raw FROM email.captured WHERE message_id = %s ORDER BY id DESC LIMIT 1",
                 mid)
    assert row is not None, f"message {mid} is sent but nothing was captured"
    rfc_id = db.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    return Sent(mid, rfc_id, recipients, kw["subject"], row[0], list(row[1]), bytes(row[2]))


# ---------------------------------------------------------------------------------------------
# Module set-up: bounce_domain and inbound_domains on, a capture transport


@pytest.fixture(scope="module")
def inbound(cluster):
    """Sets pg_email.bounce_domain and pg_email.inbound_domains and waits until the delivery
    workers use the VERP return path and the listener takes mail for both domains; resets both
    afterwards and waits until envelopes are plain again."""
    d = fresh()
    try:
        d.all(f"ALTER SYSTEM SET pg_email.bounce_domain = '{BOUNCE_DOMAIN}'")
        d.all(f"ALTER SYSTEM SET pg_email.inbound_domains = '{REPLY_DOMAIN}'")
        d.all("SELECT pg_reload_conf()")
        d.all("SELECT email.add_transport(%s, 'capture://')", CAP)
        wait_until(lambda: val_retry("SHOW pg_email.bounce_domain") == BOUNCE_DOMAIN,
                   "SHOW pg_email.bounce_domain in a new connection", SLOW, every=0.1)
        wait_until(lambda: VERP_RE.fullmatch(captured(d).envelope_from) is not None,
                   "a captured message's envelope sender to be a bounce+ address", SLOW, every=0.2)
        wait_inbound()
        d.conn.close()
        yield
    finally:
        d = fresh()
        d.all("ALTER SYSTEM RESET pg_email.bounce_domain")
        d.all("ALTER SYSTEM RESET pg_email.inbound_domains")
        d.all("SELECT pg_reload_conf()")
        wait_until(lambda: not captured(d).envelope_from.startswith("bounce+"),
                   "envelopes to be plain again after the reset of pg_email.bounce_domain", SLOW, every=0.2)
        d.conn.close()


@pytest.fixture
def db(inbound, mail):
    return mail


# ---------------------------------------------------------------------------------------------
# VERP


def test_verp_return_path_names_the_message_and_from_is_unchanged(db):
    one = captured(db, [addr("verp-one")], list_unsubscribe=True)
    two = captured(db, [addr("verp-two")])
    a, b = addr("verp-a"), addr("verp-b")
    multi = captured(db, [a, b], list_unsubscribe=True)
    tokens = []
    for s in (one, two, multi):
        m = VERP_RE.fullmatch(s.envelope_from)
        assert m, f"envelope sender {s.envelope_from!r} is not bounce+<42 base32>@{BOUNCE_DOMAIN}"
        tokens.append(m.group(1))
        assert email.utils.parseaddr(str(s.message()["From"]))[1] == SENDER, s.message()["From"]
        assert s.envelope_from.encode() not in s.raw, "the return path must not be written into the message"
    assert len(set(tokens)) == 3, f"different messages got the same return token: {tokens}"
    assert sorted(multi.envelope_to) == sorted([a, b]), f"several recipients have one envelope: {multi.envelope_to}"
    # List-Unsubscribe: the one-click URL and the mailto address, for one recipient only
    lu = flat(str(one.message()["List-Unsubscribe"]))
    m = UNSUB_RE.search(lu)
    assert m and lu.startswith("<http"), f"List-Unsubscribe lacks <http...> and <mailto:unsubscribe+TOKEN@{BOUNCE_DOMAIN}>: {lu}"
    assert m.group(2) != tokens[0], "the unsubscribe token must differ from the bounce token"
    assert multi.message()["List-Unsubscribe"] is None


# ---------------------------------------------------------------------------------------------
# The corpus: tests/inbound_corpus/*.eml, one test per file
#
# The files are real-world shaped messages with fixed addresses and ids (the Rust unit tests of
# src/inbound parse them as they are). Here each one is made about a real message: a message is
# sent through the capture transport to as many new recipients as the file names, and the file's
# literal Message-ID, recipients and return paths are replaced (in any letter case) by that
# message's; then it goes through email.ingest_message.


@dataclass(frozen=True)
class Case:
    kind: str
    rcpts: tuple = ()  # the file's recipient addresses, in order: replaced by the message's recipients
    ids: tuple = ()  # the file's Message-IDs of the message it is about (with or without <>)
    verps: tuple = ()  # the file's return paths: replaced by the message's (bounce+TOKEN@bounces.test)
    unsub: str = None  # the file's unsubscribe address: replaced by the message's List-Unsubscribe mailto
    more: tuple = ()  # other (literal, replacement) pairs
    to: str = None  # the envelope recipient: 'verp', 'unsub', an address, or None
    mail_from: str = ""  # the envelope sender: '' (<>), 'recipient' (the first recipient) or an address
    # (recipient index, event, bounce_type, enhanced_code, smtp_code, a piece of the response or None)
    events: tuple = ()
    suppressed: tuple = ()  # (recipient index, reason)
    status: str = "sent"
    row: tuple = ()  # (email.inbound column, a piece of its value)


def _bounced(i, bounce_type, enhanced, smtp, response=None):
    return (i, "bounced", bounce_type, enhanced, smtp, response)


CASES = {
    "postfix_5.1.1": Case(
        "bounce", rcpts=("nobody@example.com",), ids=("<3f1c9a0e5b6d4e2f8a7b1c2d3e4f5a6b@example.org>",),
        verps=("bounce+AQAAAAAAAAAqAA.Xk2Jp0sQ@bounce.example.org",),
        events=(_bounced(0, "hard", "5.1.1", 550, "User unknown in virtual mailbox table"),),
        suppressed=((0, "bounced"),), status="bounced",
        row=(("subject", "Undelivered Mail Returned to Sender"), ("from_address", "MAILER-DAEMON@mail.example.net"))),
    "postfix_delayed": Case(
        "delay", rcpts=("slow@example.com",), ids=("<8c2e4f6a1b3d5c7e9f0a2b4c6d8e0f1a@example.org>",),
        verps=("bounce+AQAAAAAAAAArAA.Lm3Qw8eR@bounce.example.org",),
        events=((0, "deferred", None, "4.4.1", None, "Connection timed out"),)),
    # Exim's classic plain-text bounce: only the 5.1.1 line is read as a report
    "exim_failed": Case(
        "bounce", rcpts=("jdoe@example.com", "trap@example.net"), ids=("<5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f5a@example.org>",),
        verps=("bounce+AQAAAAAAAAAsAA.Pq4Rt9uV@bounce.example.org",),
        events=(_bounced(0, "hard", "5.1.1", 550, "User unknown in local recipient table"),),
        suppressed=((0, "bounced"),)),
    # Status 5.0.0: the Diagnostic-Code's 5.1.1 is the more specific code
    "exim_report": Case(
        "bounce", rcpts=("gone@example.com",), ids=("<7a9c1e3f5b7d9a1c3e5f7b9d1a3c5e7f@example.org>",),
        verps=("bounce+AQAAAAAAAAAtAA.Vw5Xy0zA@bounce.example.org",),
        events=(_bounced(0, "hard", "5.1.1", 550, "Recipient address rejected: User unknown"),),
        suppressed=((0, "bounced"),), status="bounced"),
    "exchange_ndr": Case(
        "bounce", rcpts=("missing@contoso.com", "former.employee@contoso.com"),
        ids=("<9e1f3a5b7c9d1e3f5a7b9c1d3e5f7a9b@example.org>",), verps=("bounce+AQAAAAAAAAAuAA.Bc6De1fG@bounce.example.org",),
        events=(_bounced(0, "hard", "5.1.10", 550, "RESOLVER.ADR.RecipientNotFound"),
                _bounced(1, "hard", "5.1.1", 550, "RESOLVER.ADR.RecipNotFound")),
        suppressed=((0, "bounced"), (1, "bounced")), status="bounced",
        row=(("text_body", "couldn't be delivered"), ("html_body", "wasn't found at"))),
    "gmail_style": Case(
        "bounce", rcpts=("no.such.user.4242@gmail.com",), ids=("<1b3d5f7a9c1e3b5d7f9a1c3e5b7d9f1a@example.org>",),
        verps=("bounce+AQAAAAAAAAAvAA.Hi7Jk2lM@bounce.example.org",),
        events=(_bounced(0, "hard", "5.1.1", 550, "does not exist"),),
        suppressed=((0, "bounced"),), status="bounced", row=(("text_body", "** Address not found **"),)),
    # a second recipient without a Diagnostic-Code (5.1.2, no SMTP code)
    "headers_only": Case(
        "bounce", rcpts=("old@example.net", "someone@nonexistent.invalid"),
        ids=("<2c4e6a8c0e2a4c6e8a0c2e4a6c8e0a2c@example.org>",), verps=("bounce+AQAAAAAAAAAwAA.Nn8Oo3pQ@bounce.example.org",),
        events=(_bounced(0, "hard", "5.1.1", 550, "User unknown"), _bounced(1, "hard", "5.1.2", None)),
        suppressed=((0, "bounced"), (1, "bounced")), status="bounced"),
    # no Message-ID anywhere: only the VERP envelope recipient names the message
    "verp_only": Case(
        "bounce", rcpts=("lost@example.com",), verps=("bounce+AQAAAAAAAAAxAA.Rr9Ss4tU@bounce.example.org",), to="verp",
        events=(_bounced(0, "hard", "5.1.1", 550, "User unknown"),), suppressed=((0, "bounced"),), status="bounced"),
    # message/global-delivery-status (SMTPUTF8); the recipient becomes an ASCII one here
    "mailbox_full": Case(
        "bounce", rcpts=("josé@exämple.com",), ids=("<4e6a8c0e2a4c6e8a0c2e4a6c8e0a2c4e@example.org>",),
        verps=("bounce+AQAAAAAAAAAyAA.Vv0Ww5xY@bounce.example.org",),
        events=(_bounced(0, "soft", "5.2.2", 552, "Mailbox full"),)),
    "policy_block": Case(
        "bounce", rcpts=("buyer@strict.example", "ceo@dmarc.example"), ids=("<6a8c0e2a4c6e8a0c2e4a6c8e0a2c4e6a@example.org>",),
        verps=("bounce+AQAAAAAAAAAzAA.Zz1Aa6bC@bounce.example.org",),
        events=(_bounced(0, "block", "5.7.1", 550, "zen.spamhaus.org"), _bounced(1, "block", "5.7.26", 550, "DMARC policy"))),
    # the RFC 5965 example; its Message-ID has no angle brackets
    "arf": Case(
        "complaint", rcpts=("user@example.com",), ids=("8787KJKJ3K4J3K4J3K4J3.mail@example.net",), to=f"fbl@{BOUNCE_DOMAIN}",
        events=((0, "complained", None, None, None, None),), suppressed=((0, "complained"),)),
    # no Original-Rcpt-To: the returned message's To names the recipient
    "arf_no_rcpt": Case(
        "complaint", rcpts=("pat.complainer@mailbox.example",), ids=("<8c0e2a4c6e8a0c2e4a6c8e0a2c4e6a8c@example.org>",),
        verps=("bounce+AQAAAAAAAAA0AA.Dd2Ee7fG@bounce.example.org",), to=f"fbl@{BOUNCE_DOMAIN}",
        events=((0, "complained", None, None, None, None),), suppressed=((0, "complained"),)),
    "vacation_rfc3834": Case(
        "auto_reply", rcpts=("jane@example.com",), ids=("<3f1c9a0e5b6d4e2f8a7b1c2d3e4f5a6b@example.org>",),
        verps=("bounce+AQAAAAAAAAAqAA.Xk2Jp0sQ@bounce.example.org",), to="verp", row=(("text_body", "I am away until"),)),
    # no Auto-Submitted: X-Auto-Response-Suppress and "Automatic reply:" say it; Windows-1252 text
    "vacation_outlook": Case(
        "auto_reply", rcpts=("john.smith@contoso.com",), ids=("<0e2a4c6e8a0c2e4a6c8e0a2c4e6a8c0e@example.org>",),
        verps=("bounce+AQAAAAAAAAA1AA.Hh3Ii8jK@bounce.example.org",), to="verp", mail_from="recipient",
        row=(("text_body", "out of the office until Monday \u2013 I will reply"),)),
    "reply": Case(
        "reply", rcpts=("jose@example.com",), ids=("<3f1c9a0e5b6d4e2f8a7b1c2d3e4f5a6b@example.org>",),
        more=(("support@replies.example.org", f"support@{REPLY_DOMAIN}"),), to=f"support@{REPLY_DOMAIN}",
        mail_from="recipient",
        row=(("text_body", "Could you check the tracking number?"), ("subject", "Re: Your order 1042 has shipped \u2014 thanks"),
             ("html_body", "tracking number?"))),
    "unsubscribe": Case(
        "unsubscribe", rcpts=("reader@example.com",), unsub="unsubscribe+AQAAAAAAAAAqAQ.Ss5Tt0uV@bounce.example.org",
        to="unsub", mail_from="recipient", events=((0, "unsubscribed", None, None, None, None),),
        suppressed=((0, "unsubscribed"),)),
}
CORPUS = sorted(os.path.basename(p)[:-len(".eml")] for p in glob.glob(os.path.join(CORPUS_DIR, "*.eml")))


def corpus(name):
    with open(os.path.join(CORPUS_DIR, name + ".eml"), "rb") as f:
        return f.read()


def adapt(name, sent, *, verp=None, message_id=None, recipients=None):
    """corpus(name) made about `sent`: its Message-ID (or message_id), recipients (or
    recipients), return path (or verp) and unsubscribe address instead of the file's, with CRLF
    line ends."""
    case = CASES[name]
    data = corpus(name)
    recipients = recipients or sent.recipients
    assert len(recipients) >= len(case.rcpts), (name, recipients)
    rfc_id = message_id or sent.rfc_id
    pairs = [(lit, verp or sent.envelope_from) for lit in case.verps]
    if case.unsub:
        pairs.append((case.unsub, sent.unsubscribe_address()))
    pairs += [(lit, rfc_id if lit.startswith("<") else rfc_id.strip("<>")) for lit in case.ids]
    pairs += list(zip(case.rcpts, recipients)) + list(case.more)
    for lit, ours in pairs:
        pattern = re.compile(re.escape(lit.encode()), re.IGNORECASE)
        assert pattern.search(data), f"{name}.eml does not contain {lit!r} (any more): update CASES"
        data = pattern.sub(lambda _: ours.encode(), data)
    return re.sub(rb"\r?\n", b"\r\n", data)


def test_every_corpus_file_has_a_case():
    assert CORPUS, f"no *.eml in {CORPUS_DIR}"
    assert set(CORPUS) == set(CASES), (f"files without a case: {sorted(set(CORPUS) - set(CASES))}; "
                                       f"cases without a file: {sorted(set(CASES) - set(CORPUS))}")
    for name in CORPUS:
        data = corpus(name)
        for lit in CASES[name].verps + CASES[name].ids + CASES[name].rcpts + tuple(l for l, _ in CASES[name].more) + \
                ((CASES[name].unsub,) if CASES[name].unsub else ()):
            assert re.search(re.escape(lit.encode()), data, re.IGNORECASE), f"{name}.eml does not contain {lit!r}"


@pytest.mark.parametrize("name", CORPUS)
def test_corpus(db, name):
    case = CASES.get(name)
    assert case is not None, f"{name}.eml has no entry in CASES"
    recipients = [addr(f"{name.replace('.', '-')}-{i}") for i in range(max(1, len(case.rcpts)))]
    sent = captured(db, recipients, subject=f"corpus {name} {uuid.uuid4().hex[:8]}", list_unsubscribe=bool(case.unsub))
    assert VERP_RE.fullmatch(sent.envelope_from), sent.envelope_from
    rcpt_to = {"verp": [sent.envelope_from], "unsub": [sent.unsubscribe_address() if case.unsub else None],
               None: None}.get(case.to, [case.to])
    mail_from = sent.recipient if case.mail_from == "recipient" else case.mail_from
    iid = ingest(db, adapt(name, sent), rcpt_to, mail_from)
    row = inbound_row(db, iid)
    what = f"{name}: inbound row {({k: row[k] for k in ('kind', 'message_id', 'subject', 'from_address')})}"
    assert row["kind"] == case.kind, what
    assert row["message_id"] == sent.mid, f"{what}: expected to be about message {sent.mid}"
    assert row["rcpt_to"] == (rcpt_to or []), what
    assert row["mail_from"] in ((mail_from,) if mail_from else ("", None)), what
    assert inbound_rows(db, "message_id = %s", sent.mid) == [row], "one email.inbound row per received message"
    for col, piece in case.row:
        assert piece in (row[col] or ""), f"{name}: {col} {row[col]!r} lacks {piece!r}"
    receipts = inbound_receipts(db, sent.mid)
    got = sorted((r["recipient"], r["event"], r["bounce_type"], r["enhanced_code"], r["smtp_code"]) for r in receipts)
    want = sorted((recipients[i], ev, bt, ec, sc) for i, ev, bt, ec, sc, _ in case.events)
    assert got == want, f"{name}: receipts (recipient, event, bounce_type, enhanced_code, smtp_code) {got}, expected {want}"
    for i, *_, piece in case.events:
        if piece:
            [r] = [r for r in receipts if r["recipient"] == recipients[i]]
            assert piece in flat(r["response"]), f"{name}: response {r['response']!r} lacks {piece!r}"
    reasons = dict(case.suppressed)
    for i, rcpt in enumerate(recipients):
        want = (reasons[i], sent.mid) if i in reasons else None
        assert suppression(db, rcpt) == want, f"{name}: suppression of recipient {i}: {suppression(db, rcpt)}, expected {want}"
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", sent.mid) == case.status, name


# ---------------------------------------------------------------------------------------------
# Matching


def test_a_returned_message_id_matches_without_a_token(db):
    """The report carries no return token anywhere (as if sent before bounce_domain was set):
    the returned headers' Message-ID names the message."""
    sent = captured(db)
    row = inbound_row(db, ingest(db, adapt("postfix_5.1.1", sent, verp=SENDER), None, ""))
    assert (row["kind"], row["message_id"]) == ("bounce", sent.mid), row
    assert [(r["recipient"], r["bounce_type"]) for r in inbound_receipts(db, sent.mid)] == [(sent.recipient, "hard")]


def test_verp_token_wins_over_the_returned_message_id(db):
    """A report to B's return path that returns A's headers is B's."""
    a, b = captured(db, [addr("match-a")]), captured(db, [addr("match-b")])
    raw = adapt("postfix_5.1.1", b, message_id=a.rfc_id)
    row = inbound_row(db, ingest(db, raw, [b.envelope_from], ""))
    assert (row["kind"], row["message_id"]) == ("bounce", b.mid), row
    assert [r["recipient"] for r in inbound_receipts(db, b.mid)] == [b.recipient]
    assert inbound_receipts(db, a.mid) == [] and suppression(db, a.recipient) is None
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", a.mid) == "sent"


def test_forged_token_and_unknown_message_id_are_stored_and_change_nothing(db):
    sent = captured(db, [addr("forged")])
    token = VERP_RE.fullmatch(sent.envelope_from).group(1)
    bad = []
    for i in (0, 20, 41):
        forged = f"bounce+{token[:i]}{BASE32[(BASE32.index(token[i]) + 1) % 32]}{token[i + 1:]}@{BOUNCE_DOMAIN}"
        row = inbound_row(db, ingest(db, adapt("verp_only", sent, verp=forged), [forged], ""))
        if (row["kind"], row["message_id"]) != ("bounce", None):
            bad.append((i, row["kind"], row["message_id"]))
    assert bad == [], f"a return token with one character changed was taken: {bad}"
    # a report whose returned Message-ID is nobody's, to a plain address
    stranger = addr("stranger")
    raw = adapt("postfix_5.1.1", sent, verp=SENDER, message_id=f"<nobody-{uuid.uuid4().hex}@example.org>",
                recipients=[stranger])
    row = inbound_row(db, ingest(db, raw, None, ""))
    assert (row["kind"], row["message_id"]) == ("bounce", None), row
    assert inbound_receipts(db, sent.mid) == []
    assert suppression(db, sent.recipient) is None and suppression(db, stranger) is None
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", sent.mid) == "sent"


def test_the_same_report_received_twice_is_one_event(db):
    """An MTA that did not see our 250 delivers the report again: two email.inbound rows, one
    receipt (the report's Message-ID and recipient name the event)."""
    sent = captured(db, [addr("twice")])
    raw = adapt("postfix_5.1.1", sent)
    first, second = ingest(db, raw, [sent.envelope_from], ""), ingest(db, raw, [sent.envelope_from], "")
    assert first != second
    assert [r["message_id"] for r in inbound_rows(db, "id IN (%s, %s)", first, second)] == [sent.mid, sent.mid]
    receipts = inbound_receipts(db, sent.mid)
    assert len(receipts) == 1 and receipts[0]["bounce_type"] == "hard", receipts


# ---------------------------------------------------------------------------------------------
# Unsubscribe by mail, replies


def test_mail_to_the_list_unsubscribe_address_unsubscribes(db):
    sent = captured(db, [addr("leaver")], list_unsubscribe=True)
    mailto = sent.unsubscribe_address()
    raw = (f"From: <{sent.recipient}>\r\nTo: <{mailto}>\r\nSubject: unsubscribe\r\nDate: {email.utils.formatdate()}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@nowhere.test>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=us-ascii\r\n\r\nunsubscribe\r\n").encode()
    assert [c for c, _ in send_raw(raw, [mailto], mail_from=sent.recipient)] == [250]
    [row] = inbound_rows(db, "%s = ANY(rcpt_to)", mailto)
    assert (row["kind"], row["message_id"]) == ("unsubscribe", sent.mid), row
    receipts = inbound_receipts(db, sent.mid)
    assert [(r["event"], r["recipient"]) for r in receipts] == [("unsubscribed", sent.recipient)], receipts
    assert suppression(db, sent.recipient) == ("unsubscribed", sent.mid)
    again = send(db, CAP, recipients=sent.recipient)
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", again) == "suppressed"


TRIGGER_SQL = [
    "CREATE TABLE IF NOT EXISTS public.inbound_seen (inbound_id bigint, kind text, message_id bigint, subject text)",
    "TRUNCATE public.inbound_seen",
    """CREATE OR REPLACE FUNCTION public.inbound_seen_fn() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           INSERT INTO public.inbound_seen VALUES (NEW.id, NEW.kind, NEW.message_id, NEW.subject);
           RETURN NULL;
       END $$""",
    "DROP TRIGGER IF EXISTS inbound_seen ON email.inbound",
    "CREATE TRIGGER inbound_seen AFTER INSERT ON email.inbound FOR EACH ROW EXECUTE FUNCTION public.inbound_seen_fn()",
]


def reply_to(sent, subject, in_reply_to=True, references=True, body="Sounds good, see you then."):
    msg = email.message.EmailMessage()
    msg["From"] = f"Reader <{sent.recipient}>"
    msg["To"] = f"support@{REPLY_DOMAIN}"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@nowhere.test>"
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to if isinstance(in_reply_to, str) else sent.rfc_id
    if references:
        msg["References"] = f"<thread-start@example.org> {sent.rfc_id}"
    msg.set_content(f"{body}\n\n> hello\n")
    return msg.as_bytes(policy=email.policy.SMTP)


def test_reply_is_linked_and_an_application_trigger_fires_once(db):
    sent = captured(db, [addr("replier")])
    for q in TRIGGER_SQL:
        db.all(q)
    try:
        subj = f"Re: {sent.subject} ({uuid.uuid4().hex[:6]})"
        replies = send_raw(reply_to(sent, subj), [f"support@{REPLY_DOMAIN}"], mail_from=sent.recipient)
        assert [c for c, _ in replies] == [250], replies
        [row] = inbound_rows(db, "subject = %s", subj)  # committed before the 250
        assert (row["kind"], row["message_id"]) == ("reply", sent.mid), row
        assert row["rcpt_to"] == [f"support@{REPLY_DOMAIN}"] and row["mail_from"] == sent.recipient, row
        assert sent.rfc_id.strip("<>") in (row["in_reply_to"] or ""), row
        assert sent.recipient in (row["from_address"] or "") and "Sounds good" in (row["text_body"] or ""), row
        seen = db.all("SELECT inbound_id, kind, message_id FROM public.inbound_seen WHERE subject = %s", subj)
        assert seen == [(row["id"], "reply", sent.mid)], f"the trigger did not fire exactly once: {seen}"
        # References alone is enough; an In-Reply-To naming no message of ours is just a message
        subj2, subj3 = subj + " refs", subj + " stranger"
        r2 = inbound_row(db, ingest(db, reply_to(sent, subj2, in_reply_to=False), [f"support@{REPLY_DOMAIN}"], sent.recipient))
        r3 = inbound_row(db, ingest(db, reply_to(sent, subj3, in_reply_to=f"<{uuid.uuid4().hex}@elsewhere.test>",
                                                  references=False), [f"support@{REPLY_DOMAIN}"], sent.recipient))
        assert (r2["kind"], r2["message_id"]) == ("reply", sent.mid), r2
        assert (r3["kind"], r3["message_id"]) == ("message", None), r3
        counts = dict(db.all("SELECT subject, count(*) FROM public.inbound_seen WHERE subject IN (%s, %s, %s) GROUP BY 1",
                             subj, subj2, subj3))
        assert counts == {subj: 1, subj2: 1, subj3: 1}, counts
        assert inbound_receipts(db, sent.mid) == [] and suppression(db, sent.recipient) is None
    finally:
        db.all("DROP TRIGGER IF EXISTS inbound_seen ON email.inbound")
        db.all("DROP FUNCTION IF EXISTS public.inbound_seen_fn()")
        db.all("DROP TABLE IF EXISTS public.inbound_seen")


# ---------------------------------------------------------------------------------------------
# Real Postfix, real DSNs


@dataclass
class Mta:
    hop: AioSmtp  # the next hop for nowhere.test: accepts, or refuses per recipient
    mx: Postfix  # relay for bounces.test and replies.test → LMTP to the listener
    out: Postfix  # relay for nowhere.test, tries once (maximal_queue_lifetime = 0)

    def refuse(self, address, answer):
        self.hop.reject[address.lower()] = answer

    @contextlib.contextmanager
    def logs_on_failure(self):
        try:
            yield
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- Postfix out log:\n{self.out.log()[-3000:]}\n"
                                 f"--- Postfix mx log:\n{self.mx.log()[-3000:]}") from None


@pytest.fixture(scope="module")
def mta(inbound):
    """pg_email → Postfix "out" (relays nowhere.test to the aiosmtpd next hop; mail it cannot
    deliver is tried once and returned at once, even after a 4xx) → its DSN to the VERP address
    goes to Postfix "mx" (relays bounces.test and replies.test) → LMTP to the listener."""
    lmtp = f"lmtp:inet:[{HOST}]:{INBOUND_PORT}"
    hop = AioSmtp(HOP_PORT)
    mx = Postfix(os.path.join(E2E_DIR, "pf-inbound-mx"), PF_MX_PORT, domains=("mx.local.test",),
                 relay={BOUNCE_DOMAIN: lmtp, REPLY_DOMAIN: lmtp}, main_cf={"myhostname": "mx.inbound.test"})
    out = Postfix(os.path.join(E2E_DIR, "pf-inbound-out"), PF_OUT_PORT, domains=("out.local.test",),
                  relay={"nowhere.test": f"smtp:[{HOST}]:{HOP_PORT}", BOUNCE_DOMAIN: f"smtp:[{HOST}]:{PF_MX_PORT}"},
                  main_cf={"myhostname": "out.sender.test", "maximal_queue_lifetime": "0", "bounce_queue_lifetime": "0"})
    started = []
    try:
        for srv in (hop, mx, out):
            srv.start()
            started.append(srv)
        d = fresh()
        d.all("SELECT email.add_transport(%s, %s)", PF_TRANSPORT, f"smtp://{HOST}:{PF_OUT_PORT}?tls=none")
        d.conn.close()
        yield Mta(hop, mx, out)
    finally:
        for srv in reversed(started):
            srv.stop()


def wait_receipts(db, mid, n, what):
    wait_until(lambda: len(inbound_receipts(db, mid)) >= n, f"{n} inbound receipt(s) for {what} (message {mid})", SLOW,
               every=0.2)
    return inbound_receipts(db, mid)


def test_postfix_hard_bounce(db, mta):
    gone = addr("gone")
    mta.refuse(gone, f"550 5.1.1 <{gone}>: Recipient address rejected: User unknown")
    mid = send(db, PF_TRANSPORT, recipients=gone, subject=f"to a gone reader {uuid.uuid4().hex[:6]}")
    with mta.logs_on_failure():
        [r] = wait_receipts(db, mid, 1, "Postfix's DSN of a 550 5.1.1")
    assert (r["event"], r["bounce_type"], r["enhanced_code"], r["smtp_code"], r["recipient"]) == \
        ("bounced", "hard", "5.1.1", 550, gone), r
    assert "Recipient address rejected: User unknown" in flat(r["response"]), r
    assert suppression(db, gone) == ("bounced", mid)
    wait_status(db, mid, "bounced", timeout=SLOW)
    assert db.val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'sent'", mid) >= 1, \
        "the message was first accepted by Postfix (sent)"
    [row] = inbound_rows(db, "message_id = %s", mid)
    assert row["kind"] == "bounce", row
    assert len(row["rcpt_to"]) == 1 and VERP_RE.fullmatch(row["rcpt_to"][0]), f"delivered to the VERP address: {row}"
    assert row["mail_from"] in ("", None), f"a DSN comes from the null sender: {row['mail_from']!r}"
    assert "mailer-daemon" in (row["from_address"] or "").lower(), row
    assert row["subject"] == "Undelivered Mail Returned to Sender", row
    # a later message to the address is dropped at enqueue
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", send(db, PF_TRANSPORT, recipients=gone)) == "suppressed"


def test_postfix_gives_up_after_a_4xx_soft_bounce(db, mta):
    busy = addr("busy")
    mta.refuse(busy, f"450 4.2.0 <{busy}>: Mailbox busy, try later")
    mid = send(db, PF_TRANSPORT, recipients=busy, subject=f"to a busy reader {uuid.uuid4().hex[:6]}")
    with mta.logs_on_failure():
        [r] = wait_receipts(db, mid, 1, "Postfix's DSN after a 450 4.2.0 given up")
    assert (r["event"], r["bounce_type"], r["enhanced_code"], r["smtp_code"], r["recipient"]) == \
        ("bounced", "soft", "4.2.0", 450, busy), r
    assert "Mailbox busy" in flat(r["response"]), r
    assert suppression(db, busy) is None, "a soft bounce never suppresses"
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "sent"
    [row] = inbound_rows(db, "message_id = %s", mid)
    assert row["kind"] == "bounce", row


def test_postfix_bounces_of_a_message_with_several_recipients(db, mta):
    """One envelope per message: the DSN's Final-Recipient names who bounced. A message keeps
    status sent while one recipient got it; it is bounced when every recipient hard-bounced."""
    ok, gone = addr("ok"), addr("gone-cc")
    g1, g2 = addr("gone-1"), addr("gone-2")
    for a in (gone, g1, g2):
        mta.refuse(a, f"550 5.1.1 <{a}>: Recipient address rejected: User unknown")
    mixed = send(db, PF_TRANSPORT, recipients=ok, cc=gone, subject=f"mixed {uuid.uuid4().hex[:6]}")
    lost = send(db, PF_TRANSPORT, recipients=g1, cc=g2, subject=f"all gone {uuid.uuid4().hex[:6]}")
    with mta.logs_on_failure():
        rm = wait_receipts(db, mixed, 1, "the DSN of the mixed message")
        rl = wait_receipts(db, lost, 2, "the DSN(s) of the message whose recipients are all gone")
    assert [(r["event"], r["bounce_type"], r["recipient"]) for r in rm] == [("bounced", "hard", gone)], rm
    assert sorted((r["event"], r["bounce_type"], r["recipient"]) for r in rl) == \
        sorted([("bounced", "hard", g1), ("bounced", "hard", g2)]), rl
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", mixed) == "sent"
    wait_status(db, lost, "bounced", timeout=SLOW)
    assert suppression(db, gone) == ("bounced", mixed) and suppression(db, ok) is None
    assert suppression(db, g1)[0] == "bounced" and suppression(db, g2)[0] == "bounced"
    # the next hop got the mixed message for `ok`, from the return path, with From unchanged
    got = [m for m in list(mta.hop.messages) if ok in m["rcpt_tos"]]
    assert len(got) == 1, got
    assert VERP_RE.fullmatch(got[0]["mail_from"]), got[0]["mail_from"]
    msg = email.message_from_bytes(got[0]["data"], policy=email.policy.default)
    assert email.utils.parseaddr(str(msg["From"]))[1] == SENDER, msg["From"]


# ---------------------------------------------------------------------------------------------
# The protocol, with swaks as an independent client


def swaks(*args, lmtp=False, timeout=SLOW):
    """swaks against the inbound service; (exit code, transcript)."""
    cmd = ["swaks", "--server", HOST, "--port", str(INBOUND_PORT), "--helo", "client.test", "--timeout", "60",
           "--from", "sender@example.net"]
    if lmtp:
        cmd += ["--protocol", "LMTP"]
    p = subprocess.run(cmd + list(args), capture_output=True, timeout=timeout + 30)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


def server_lines(transcript):
    """What the server said, line by line (swaks marks it '<- ' or '<**')."""
    return [line[4:] for line in transcript.splitlines() if line.startswith(("<-  ", "<** "))]


def test_foreign_recipients_are_refused_never_relayed(db):
    for rcpt in ("someone@foreign.test", f"x@sub.{BOUNCE_DOMAIN}", f"x@{BOUNCE_DOMAIN}.evil.test", "x@nowhere.test",
                 f"postmaster@{SENDER.split('@')[1]}"):
        rc, t = swaks("--to", rcpt, "--quit-after", "RCPT")
        lines = server_lines(t)
        assert lines and lines[0].startswith("220"), t
        assert rc == 24 and any(l.startswith("550 5.7.1") for l in lines), f"RCPT TO:<{rcpt}> was not refused with 550 5.7.1:\n{t}"
    for rcpt in (f"anything@{BOUNCE_DOMAIN}", f"Upper@{BOUNCE_DOMAIN.upper()}", f"help@{REPLY_DOMAIN}"):
        rc, t = swaks("--to", rcpt, "--quit-after", "RCPT")
        assert rc == 0, f"RCPT TO:<{rcpt}> was refused:\n{t}"
    # a transaction with a foreign and a local recipient: only the local one is kept
    subj = f"half foreign {uuid.uuid4().hex[:8]}"
    local = addr("local", REPLY_DOMAIN)
    rc, t = swaks("--to", f"victim@foreign.test,{local}", "--header", f"Subject: {subj}")
    assert rc == 0, t
    [row] = inbound_rows(db, "subject = %s", subj)
    assert row["rcpt_to"] == [local], row


def test_smtp_session_with_pipelining_delivers(db):
    subj = f"swaks smtp {uuid.uuid4().hex[:8]}"
    to = addr("help", REPLY_DOMAIN)
    rc, t = swaks("--to", to, "--pipeline", "--header", f"Subject: {subj}", "--body", "hello from swaks")
    assert rc == 0, t
    lines = server_lines(t)
    assert lines[0].startswith("220"), t
    said = " ".join(lines)
    for ext in ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert re.search(rf"\b250[- ]{ext}\b", said), f"EHLO does not offer {ext}:\n{t}"
    assert any(re.match(r"250 2\.\d\.\d", l) for l in lines), t
    [row] = inbound_rows(db, "subject = %s", subj)
    assert (row["kind"], row["rcpt_to"], row["mail_from"]) == ("message", [to], "sender@example.net"), row
    assert "hello from swaks" in (row["text_body"] or ""), row


def test_lmtp_with_two_recipients_answers_twice(db):
    subj = f"swaks lmtp {uuid.uuid4().hex[:8]}"
    a, b = addr("lmtp-a", BOUNCE_DOMAIN), addr("lmtp-b", REPLY_DOMAIN)
    rc, t = swaks("--to", f"{a},{b}", "--header", f"Subject: {subj}", lmtp=True)
    assert rc == 0, t
    lines = t.splitlines()
    assert any(l.startswith(" -> LHLO") for l in lines), t
    dot = max(i for i, l in enumerate(lines) if l.strip() == "-> .")
    after = [l[4:] for l in lines[dot + 1:] if l.startswith(("<-  ", "<** "))]
    finals = [l for l in after if not l.startswith("221")]
    assert len(finals) == 2 and all(l.startswith("250") for l in finals), f"LMTP must answer once per recipient:\n{t}"
    [row] = inbound_rows(db, "subject = %s", subj)
    assert row["rcpt_to"] == [a, b], row


def test_message_over_max_message_size_is_552_and_not_stored(db):
    limit = 1024 * 1024
    d = fresh()
    d.all("ALTER SYSTEM SET pg_email.max_message_size = '1MB'")
    d.all("SELECT pg_reload_conf()")
    body = os.path.join(E2E_DIR, f"inbound-big-{uuid.uuid4().hex[:6]}.txt")
    try:
        wait_until(lambda: ehlo_size() == limit, f"the inbound service to advertise SIZE {limit}", SLOW, every=0.2)
        with open(body, "w") as f:
            line = "0123456789" * 7 + "abcdef\n"
            f.write(line * (2 * limit // len(line)))
        subj = f"too big {uuid.uuid4().hex[:8]}"
        rc, t = swaks("--to", addr("big", REPLY_DOMAIN), "--header", f"Subject: {subj}", "--body", "@" + body,
                      "--suppress-data")
        assert rc != 0 and any(l.startswith("552") for l in server_lines(t)), f"2 MB over a 1 MB limit:\n{t}"
        assert inbound_rows(db, "subject = %s", subj) == []
        # declared with SIZE, refused at MAIL
        with smtp_client() as c:
            c.ehlo()
            code, text = c.mail("big@example.net", [f"SIZE={2 * limit}"])
            assert code == 552, (code, text)
        # just under the limit is taken
        subj = f"just fits {uuid.uuid4().hex[:8]}"
        head = f"From: <big@example.net>\r\nSubject: {subj}\r\n\r\n".encode()
        raw = head + b"x" * 998 + b"\r\n"
        raw += (b"y" * 998 + b"\r\n") * ((limit - 8192 - len(raw)) // 1000)
        assert [c for c, _ in send_raw(raw, [addr("fits", REPLY_DOMAIN)])] == [250]
        assert len(inbound_rows(db, "subject = %s", subj)) == 1
    finally:
        d.all("ALTER SYSTEM RESET pg_email.max_message_size")
        d.all("SELECT pg_reload_conf()")
        d.conn.close()
        if os.path.exists(body):
            os.unlink(body)
        wait_until(lambda: ehlo_size() not in (None, limit), "the inbound service to drop the 1 MB limit again", SLOW,
                   every=0.2)


def test_thirty_megabytes_over_the_default_limit_is_552_and_not_stored(db):
    """The acceptance case as stated: 30 MB against the default 25 MB limit, over plain SMTP."""
    assert ehlo_size() == 25 * 1024 * 1024
    subj = f"thirty megabytes {uuid.uuid4().hex[:8]}"
    head = f"From: <big@example.net>\r\nSubject: {subj}\r\n\r\n".encode()
    raw = head + (b"z" * 998 + b"\r\n") * (30 * 1024 * 1024 // 1000)
    with smtp_client(timeout=SLOW) as c:
        c.ehlo()
        assert c.mail("big@example.net")[0] == 250
        assert c.rcpt(addr("huge", REPLY_DOMAIN))[0] == 250
        code, text = c.data(raw)
    assert code == 552, (code, text)
    assert inbound_rows(db, "subject = %s", subj) == []


def test_inbound_rows_follow_purge(db):
    """email.purge(older_than) removes inbound mail received before then, and nothing newer."""
    subj = f"old mail {uuid.uuid4().hex[:8]}"
    old = ingest(db, f"From: <a@example.net>\r\nSubject: {subj}\r\n\r\nold\r\n".encode(), [f"x@{REPLY_DOMAIN}"])
    new = ingest(db, f"From: <a@example.net>\r\nSubject: {subj} new\r\n\r\nnew\r\n".encode(), [f"x@{REPLY_DOMAIN}"])
    db.all("UPDATE email.inbound SET received_at = now() - interval '400 days' WHERE id = %s", old)
    db.val("SELECT email.purge('399 days')")
    assert db.val("SELECT count(*) FROM email.inbound WHERE id = %s", old) == 0
    assert db.val("SELECT count(*) FROM email.inbound WHERE id = %s", new) == 1


def test_five_thousand_messages_over_eight_lmtp_connections_are_stored_once(db):
    total, conns = 5000, 8
    run = uuid.uuid4().hex[:8]
    errors, acked = [], [0] * conns

    def client(k):
        try:
            with smtplib.LMTP(HOST, INBOUND_PORT, local_hostname=f"load{k}.test", timeout=SLOW) as c:
                for i in range(k, total, conns):
                    raw = (f"From: <load@sender.test>\r\nTo: <load-{run}-{i}@{REPLY_DOMAIN}>\r\nSubject: load {run} {i}\r\n"
                           f"Message-ID: <load-{run}-{i}@sender.test>\r\nDate: {email.utils.formatdate()}\r\n\r\n"
                           f"message {i} of {total}\r\n").encode()
                    c.sendmail("load@sender.test", [f"load-{run}-{i}@{REPLY_DOMAIN}"], raw)
                    acked[k] += 1
        except Exception as e:  # reported below
            errors.append(f"connection {k} after {acked[k]} messages: {e!r}")

    threads = [threading.Thread(target=client, args=(k,), name=f"lmtp-{k}", daemon=True) for k in range(conns)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "an LMTP client did not finish within 300 s"
    assert errors == [], errors
    assert sum(acked) == total
    counts = dict(db.all("SELECT subject, count(*) FROM email.inbound WHERE subject LIKE %s GROUP BY subject",
                         f"load {run} %"))
    wrong = [(i, counts.get(f"load {run} {i}", 0)) for i in range(total) if counts.get(f"load {run} {i}") != 1]
    print(f"LMTP load: {total} messages over {conns} connections in {elapsed:.1f} s ({total / elapsed:.0f}/s)")
    assert not wrong, f"{len(wrong)} messages not stored exactly once (index, copies): {wrong[:10]}"


# ---------------------------------------------------------------------------------------------
# Hostile input


HOSTILE_KINDS = ["broken_boundary", "missing_headers", "bad_encoding", "deep_nesting", "long_header", "many_parts",
                 "many_headers", "bad_report", "bad_feedback", "rfc822_nesting", "mutated_report", "weird_lines",
                 "bad_params", "binary_noise"]


@dataclass
class Target:
    """A real message hostile reports may name (so the matching and effects code runs too)."""
    rfc_id: str
    verp: str
    recipient: str
    dsn: bytes  # a valid DSN for it


def _h(rng, t, extra=b""):
    """A plausible header block, fields sometimes missing."""
    fields = [
        b"From: " + rng.choice([b"a@b.test", b"", b"<>", b'"x" <', "Ünï <u@x.test>".encode(), b"@@@", b"a@b.test, c@d.test"]),
        b"To: " + rng.choice([t.recipient.encode(), b"undisclosed-recipients:;", b""]),
        b"Subject: hostile " + str(rng.random()).encode(),
        b"Message-ID: " + rng.choice([b"<" + uuid.uuid4().hex.encode() + b"@hostile.test>", b"", b"<<>>", b"no-brackets"]),
        b"Date: " + rng.choice([email.utils.formatdate().encode(), b"yesterday", b"Thu, 31 Feb 99999 25:61:61 +9999"]),
        b"MIME-Version: " + rng.choice([b"1.0", b"2.0", b""]),
    ]
    rng.shuffle(fields)
    return b"\r\n".join(f for f in fields if rng.random() < 0.8) + (b"\r\n" + extra if extra else b"")


def _dsn(t, status=b"5.1.1", action=b"failed", final=None, diag=b"smtp; 550 5.1.1 no such user", returned=None,
         boundary=b"HB", report_type=b"delivery-status", ds_type=b"message/delivery-status", blocks=None):
    final = t.recipient.encode() if final is None else final
    block = b"Final-Recipient: rfc822; " + final + b"\r\nAction: " + action + b"\r\nStatus: " + status + \
        b"\r\nDiagnostic-Code: " + diag + b"\r\n"
    ds = b"Reporting-MTA: dns; hostile.test\r\n\r\n" + (blocks if blocks is not None else block)
    returned = returned if returned is not None else b"Message-ID: " + t.rfc_id.encode() + b"\r\nSubject: x\r\n"
    return (b"From: MAILER-DAEMON@hostile.test\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=" + report_type + b"; boundary=\"" + boundary + b"\"\r\n\r\n"
            b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
            b"--" + boundary + b"\r\nContent-Type: " + ds_type + b"\r\n\r\n" + ds + b"\r\n"
            b"--" + boundary + b"\r\nContent-Type: text/rfc822-headers\r\n\r\n" + returned + b"\r\n"
            b"--" + boundary + b"--\r\n")


def hostile_message(kind, rng, big, t):
    """One malformed message of the given kind; big: the largest variant (10,000 nested parts,
    a 1 MB header line, ...)."""
    h = _h(rng, t)
    v = rng.randrange(8)
    if kind == "broken_boundary":
        if v == 0:  # declared, never used
            return h + b'\r\nContent-Type: multipart/mixed; boundary="nope"\r\n\r\n--other\r\n\r\nx\r\n'
        if v == 1:  # no closing delimiter
            return h + b'\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b\r\n'
        if v == 2:  # empty boundary
            return h + b'\r\nContent-Type: multipart/alternative; boundary=""\r\n\r\n--\r\n\r\nx\r\n----\r\n'
        if v == 3:  # no boundary parameter
            return h + b"\r\nContent-Type: multipart/mixed\r\n\r\n--\r\nx\r\n"
        if v == 4:  # a child reuses its parent's boundary
            return (h + b'\r\nContent-Type: multipart/mixed; boundary="same"\r\n\r\n--same\r\n'
                    b'Content-Type: multipart/mixed; boundary="same"\r\n\r\n--same\r\n\r\ninner\r\n--same--\r\n--same--\r\n')
        if v == 5:  # 1,000-character boundary
            b = b"b" * 1000
            return h + b'\r\nContent-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n--' + b + b"\r\n\r\nx\r\n--" + b + b"--\r\n"
        if v == 6:  # only a closing delimiter, garbage after it
            return h + b'\r\nContent-Type: multipart/alternative; boundary=z\r\n\r\n--z--garbage\r\n--z\r\n'
        return h + b'\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="r"\r\n\r\n--r\r\n--r--\r\n--r\r\n'
    if kind == "missing_headers":
        return [b"", b"hello world\r\n", b"\r\n\r\n", h, b"no colon here\r\n\r\nbody\r\n", b" folded first\r\nA: b\r\n\r\nx\r\n",
                b"From nobody Mon Jan  1 00:00:00 2024\r\nSubject: mbox\r\n\r\nx\r\n", b":\r\n:\r\n\r\n"][v]
    if kind == "bad_encoding":
        return [
            h + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!@@@====***\r\n====\r\n",
            h + b"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=\r\n=0\r\n",
            h + b"\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n\r\n\xff\xfe\xfd caf\xe9\r\n",
            b"Subject: \xff\xfe \xc0\xaf \xed\xa0\x80\r\nFrom: \xe9t\xe9 <a@b.test>\r\n\r\n\xc3\x28\r\n",
            b"Subject: =?utf-8?B?####?= =?unknown?Q?x?= =?utf-8?X?abc?= =?utf-8?q?unterminated\r\n" + h + b"\r\n\r\nx\r\n",
            h + b"\r\nX-Nul: a\x00b\r\n\r\nbody\x00with\x00nuls\r\n",
            h + b"\r\nContent-Transfer-Encoding: x-uuencode; garbage\r\n\r\nbegin 644 x\r\n`\r\nend\r\n",
            h + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" +
            base64.b64encode(b"\xff\xfe\x00\xd8" * 100) + b"\r\n",
        ][v]
    if kind == "deep_nesting":
        depth = 10_000 if big else rng.randint(20, 400)
        parts = [h + b'\r\nContent-Type: multipart/mixed; boundary="b0"\r\n\r\n']
        parts += [b"--b%d\r\nContent-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n" % (i, i + 1) for i in range(depth)]
        parts.append(b"--b%d\r\nContent-Type: text/plain\r\n\r\nbottom\r\n" % depth)
        if rng.random() < 0.5:  # closed properly, or left open
            parts += [b"--b%d--\r\n" % i for i in range(depth, -1, -1)]
        return b"".join(parts)
    if kind == "long_header":
        n = 1024 * 1024 if big else rng.randint(10_000, 200_000)
        if big or v % 3 == 0:  # one line of n bytes
            return h + b"\r\nSubject: " + b"x" * n + b"\r\n\r\nbody\r\n"
        if v % 3 == 1:  # folded into very many continuation lines
            return h + b"\r\nX-Folded: a" + b"\r\n b" * (n // 4) + b"\r\n\r\nbody\r\n"
        return h + b"\r\nSubject: " + b"=?utf-8?B?" + b"QUFB" * (n // 4) + b"?=\r\n\r\nbody\r\n"
    if kind == "many_parts":
        n = 10_000 if big else rng.randint(50, 2000)
        return (h + b'\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n'
                + b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(n)) + b"--p--\r\n")
    if kind == "many_headers":
        n = 10_000 if big else rng.randint(200, 3000)
        if v % 2 == 0:
            fields = b"".join(b"Received: from h%d.test by h%d.test; %s\r\n" % (i, i + 1, email.utils.formatdate().encode())
                              for i in range(n))
        else:  # repeated threading fields, one of them naming our message
            ids = [b"<" + uuid.uuid4().hex.encode() + b"@x.test>" for _ in range(min(n, 2000))]
            ids[rng.randrange(len(ids))] = t.rfc_id.encode()
            fields = b"In-Reply-To: " + ids[0] + b"\r\nReferences: " + b"\r\n ".join(ids) + b"\r\n"
            fields += b"In-Reply-To: <second@x.test>\r\nMessage-ID: <a@x.test>\r\nMessage-ID: <b@x.test>\r\n"
        return fields + h + b"\r\n\r\nbody\r\n"
    if kind == "bad_report":
        return [
            _dsn(t, status=rng.choice([b"9.9.9", b"5.1", b"5.999999999999.1", b"abc", b"", b"5.1.1.1", b"55.1.1"])),
            _dsn(t, action=rng.choice([b"exploded", b"", b"FAILED", b"failed\r\nAction: delivered", b"delayed; x"])),
            _dsn(t, final=rng.choice([b"", b"<<<>>>", b"unknown", b"\xff\xfe@x", b"a" * 5000 + b"@x.test"])),
            _dsn(t, diag=rng.choice([b"smtp; 99999999999 5.1.1 overflow", b"smtp; 550-", b"smtp;", b"", b"x" * 100_000,
                                     b"smtp; 550 5.0.0 the same 5.0.0", b"smtp; 4xx 5.x.y", b"smtp; -550 -5.1.1"])),
            _dsn(t, blocks=b"".join(b"Final-Recipient: rfc822; r%d@nowhere.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n" % i
                                    for i in range(rng.randint(100, 3000)))),
            _dsn(t, ds_type=b"message/delivery-status\r\nContent-Transfer-Encoding: base64", blocks=b"!!not base64!!\r\n"),
            _dsn(t, report_type=rng.choice([b"", b"feedback-report", b"delivery-status; report-type=x", b'"'])),
            _dsn(t, returned=rng.choice([b"", b"Message-ID: \r\n", b"Message-ID: " + b"<" * 10_000 + b"\r\n", b"\x00" * 100])),
        ][v]
    if kind == "bad_feedback":
        fields = [b"Feedback-Type: " + rng.choice([b"abuse", b"", b"\xff", b"x" * 10_000, b"not-spam"]),
                  b"Version: " + rng.choice([b"1", b"9999999999999999999999", b""]),
                  b"Original-Rcpt-To: " + rng.choice([t.recipient.encode(), b"<>", b"", b"a" * 3000])]
        if rng.random() < 0.5:
            fields.append(b"User-Agent: x")
        rng.shuffle(fields)
        original = rng.choice([b"", b"Message-ID: " + t.rfc_id.encode() + b"\r\n\r\nx\r\n", b"garbage"])
        return (b"From: fbl@isp.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; "
                b'boundary="f"\r\n\r\n--f\r\nContent-Type: text/plain\r\n\r\nreport\r\n--f\r\nContent-Type: message/feedback-report'
                b"\r\n\r\n" + b"\r\n".join(fields) + b"\r\n\r\n--f\r\nContent-Type: message/rfc822\r\n\r\n" + original
                + rng.choice([b"\r\n--f--\r\n", b""]))
    if kind == "rfc822_nesting":
        depth = 10_000 if big else rng.randint(10, 500)
        return h + b"\r\nContent-Type: message/rfc822\r\n\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * depth + b"Subject: bottom\r\n\r\nx\r\n"
    if kind == "mutated_report":
        b = bytearray(t.dsn)
        for _ in range(rng.randint(1, 40)):
            op, i = rng.randrange(4), rng.randrange(len(b))
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                del b[i:i + rng.randint(1, 50)]
            elif op == 2:
                b[i:i] = rng.randbytes(rng.randint(1, 20))
            else:
                j = rng.randrange(len(b))
                b[i:i] = b[j:j + rng.randint(1, 200)]
        return bytes(b[:rng.randint(1, len(b))]) if rng.random() < 0.2 else bytes(b)
    if kind == "weird_lines":
        return [
            b"Subject: cr only\rFrom: a@b.test\r\rbody\r",
            b"Subject: lf only\nFrom: a@b.test\n\nbody\n.\n..\n",
            b"Subject: mixed\r\r\nFrom: a@b.test\n\r\n\rbody\r\n\n\r",
            h + b"\r\n\r\n" + b"z" * rng.randint(100_000, 500_000) + b"\r\n",
            b"Subject : spaced\r\nFrom\t: a@b.test\r\n\r\nx\r\n",
            "Sübject: x\r\nFröm: a@b.test\r\n\r\nx\r\n".encode(),
            h + b"\r\n\x0c\x0b\r\n\r\n\x1b[31mred\r\n",
            h + b"\r\n\r\n" + b".\r\n" * 1000,
        ][v]
    if kind == "bad_params":
        return h + b"\r\nContent-Type: " + [
            b"text/plain; " + b"; ".join(b"p%d=v" % i for i in range(10_000)),
            b'text/plain; charset="utf-8',
            b"text/plain (" + b"(" * 10_000 + b"comment",
            b"/",
            b"multipart/",
            b"multipart/report; report-type=",
            b"text/plain; name*0*=utf-8''%ZZ%; name*1=\"x; name*99999999999=y",
            b"application/octet-stream; name==?utf-8?B?" + b"A" * 10_000,
        ][v] + b"\r\n\r\nbody\r\n"
    if kind == "binary_noise":
        return rng.randbytes(1024 * 1024 if big else rng.randint(1, 65536))
    raise ValueError(kind)


def test_two_thousand_malformed_messages_are_stored_or_refused_cleanly(db):
    """2,000 generated malformed messages (fixed seed), alternately through email.ingest_message
    and SMTP, the first round of each kind in its largest form (10,000 nested parts, a 1 MB
    header line, 10,000 parts, ...): each is stored (exactly once) or refused with 22023/54000 or
    an SMTP 5xx; the server never restarts, the listener keeps its pid. Prints the slowest cases."""
    total = 2000
    run = uuid.uuid4().hex[:8]
    sent = captured(db, [addr("hostile-target")])
    t = Target(sent.rfc_id, sent.envelope_from, sent.recipient, b"")
    t.dsn = _dsn(t)
    started = db.val("SELECT pg_postmaster_start_time()")
    listener = inbound_pid()
    log_from = len(server_log())
    rng = random.Random(20261130)
    sql = fresh()
    conn = None
    results = []  # (seconds, i, path, kind, size, outcome, detail)
    bad = []

    def connect():
        c = smtp_client(timeout=SLOW)
        c.ehlo()
        return c

    try:
        for i in range(total):
            path = "sql" if i % 2 == 0 else "smtp"
            kind = HOSTILE_KINDS[(i // 2) % len(HOSTILE_KINDS)]
            big = i // 2 < len(HOSTILE_KINDS)
            raw = hostile_message(kind, rng, big, t)
            marker = f"h-{run}-{i}@{REPLY_DOMAIN}"
            rcpts = [marker] + rng.choice([[], [t.verp], [f"bounce+{'a' * 42}@{BOUNCE_DOMAIN}"], [f"x@{BOUNCE_DOMAIN}"]])
            mail_from = rng.choice(["", "hostile@sender.test"])
            t0 = time.monotonic()
            outcome, detail = None, ""
            if path == "sql":
                try:
                    iid = sql.val("SELECT email.ingest_message(%s, %s, %s)", psycopg2.Binary(raw), rcpts, mail_from)
                    outcome, detail = "stored", iid
                except psycopg2.Error as e:  # 54000 is an OperationalError to psycopg2, like a lost connection
                    if e.pgcode is None and isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                        raise AssertionError(f"message {i} ({kind}, {len(raw)} bytes) through email.ingest_message lost "
                                             f"the connection (a crash?): {e}") from None
                    outcome, detail = ("refused" if e.pgcode in ("22023", "54000") else "error"), f"{e.pgcode} {e.pgerror}"
            else:
                try:
                    if conn is None:
                        conn = connect()
                    [(code, text)] = send_raw(raw, rcpts, mail_from, conn=conn)
                    outcome = "stored" if code == 250 else "refused" if 500 <= code < 600 else "error"
                    detail = f"{code} {text}"
                    if outcome != "stored":
                        conn.rset()
                except (smtplib.SMTPServerDisconnected, OSError) as e:
                    outcome, detail, conn = "error", f"the connection was dropped without a reply: {e!r}", None
                except (smtplib.SMTPException, AssertionError) as e:
                    outcome, detail = "error", repr(e)
                    conn.close()
                    conn = None
            dt = time.monotonic() - t0
            results.append((dt, i, path, kind, len(raw), outcome, str(detail)[:200]))
            if outcome == "error":
                bad.append((i, path, kind, len(raw), str(detail)[:300]))
                if sum(1 for b in bad if "dropped" in b[4]) >= 10:
                    break  # the service is gone (a crash?): no point in trying the rest
    finally:
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                conn.close()
    # every stored message is there exactly once, no refused one is
    stored = dict(sql.all("SELECT lower(r), count(*) FROM email.inbound i, unnest(i.rcpt_to) r WHERE r ILIKE %s GROUP BY 1",
                          f"h-{run}-%"))
    sql.conn.close()
    wrong = [(i, path, kind, outcome, stored.get(f"h-{run}-{i}@{REPLY_DOMAIN}", 0))
             for _, i, path, kind, _, outcome, _ in results
             if stored.get(f"h-{run}-{i}@{REPLY_DOMAIN}", 0) != (1 if outcome == "stored" else 0)]
    by = collections.Counter((path, outcome) for _, _, path, _, _, outcome, _ in results)
    print(f"hostile messages: {dict(sorted(by.items()))}")
    for dt, i, path, kind, size, outcome, detail in sorted(results, reverse=True)[:5]:
        print(f"  slow: {dt:.2f} s  #{i} {path} {kind} {size} bytes -> {outcome} {detail[:100]}")
    assert bad == [], f"{len(bad)} messages neither stored nor refused cleanly (22023/54000, SMTP 5xx), e.g. {bad[:5]}"
    assert wrong == [], f"stored copies do not match the answers (index, path, kind, answer, copies): {wrong[:10]}"
    d = fresh()
    assert d.val("SELECT pg_postmaster_start_time()") == started, "the server restarted"
    d.conn.close()
    assert inbound_pid() == listener, "the listener restarted"
    log = server_log()[log_from:]
    for sign in ("terminated by signal", 'background worker "pg_email listener"', "PANIC"):
        assert sign not in log, f"server log: {sign!r}:\n{log[-3000:]}"
    assert rcpt_code(f"probe@{BOUNCE_DOMAIN}") == 250, "the inbound service stopped taking mail"


# ---------------------------------------------------------------------------------------------
# A crash in the middle of DATA (last: the whole cluster restarts)


def _reply(f):
    """One (possibly multi-line) SMTP reply from a socket file: (code, lines)."""
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError(f"connection closed after {lines}")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), lines


def test_kill9_during_data_acknowledges_nothing_and_stores_nothing(inbound):
    pid = wait_inbound()
    marker = addr("killed", REPLY_DOMAIN)
    subj = f"cut by kill -9 {uuid.uuid4().hex[:8]}"
    head = (f"From: <crash@sender.test>\r\nTo: <{marker}>\r\nSubject: {subj}\r\nMessage-ID: <{uuid.uuid4().hex}@sender.test>\r\n"
            f"Date: {email.utils.formatdate()}\r\n\r\n").encode() + b"first half\r\n" * 20_000
    tail = b"second half\r\n" * 20_000
    answer = b""
    s = socket.create_connection((HOST, INBOUND_PORT), timeout=30)
    try:
        f = s.makefile("rb")
        assert _reply(f)[0] == 220
        for cmd, want in ((b"EHLO killer.test", 250), (b"MAIL FROM:<crash@sender.test>", 250), (b"RCPT TO:<" + marker.encode() + b">", 250),
                          (b"DATA", 354)):
            s.sendall(cmd + b"\r\n")
            code, lines = _reply(f)
            assert code == want, (cmd, lines)
        s.sendall(head)
        time.sleep(1.0)  # the listener has read the first half
        os.kill(pid, signal.SIGKILL)
        try:
            s.sendall(tail + b".\r\n")
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
    finally:
        s.close()
    assert not any(line.startswith(b"250") for line in answer.split(b"\r\n")), f"a killed listener answered {answer[:500]!r}"
    wait_until(lambda: not pid_alive(pid), f"listener pid {pid} to be gone", 30)
    wait_for_workers()
    new = wait_inbound(other_than=pid)
    d = fresh()
    try:
        assert inbound_rows(d, "subject = %s", subj) == [], "a message cut by the crash was stored"
        assert inbound_rows(d, "%s = ANY(rcpt_to)", marker) == []
        # sent again in one piece, it is stored once
        assert [c for c, _ in send_raw(head + tail, [marker], "crash@sender.test")] == [250]
        assert len(inbound_rows(d, "subject = %s", subj)) == 1
        print(f"kill -9 during DATA: listener {pid} replaced by {new}; the client got {answer[:200]!r}")
    finally:
        d.conn.close()
