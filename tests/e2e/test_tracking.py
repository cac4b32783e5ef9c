"""Open and click tracking and one-click unsubscribe, end to end: email.send(track_opens,
track_clicks, list_unsubscribe) → worker → a real Postfix delivering into a Maildir, the message
parsed back with `email`; then its links are fetched from the listener (LISTEN_URL) over raw HTTP
and with curl, and the answers, receipts and suppressions are checked.

Contract: DESIGN.md "The listener" and "Tracking and unsubscribe links", research/
feedback_loop.md §4. What these tests take as given beyond the text there:
  - A redirect's Location is the link's URL (entities decoded) byte for byte, also when the URL
    has raw non-ASCII characters: they go out as their UTF-8 bytes (hyper's
    HeaderValue::from_bytes takes obs-text; from_str refuses it). Nothing is percent-encoded,
    decoded or normalised on the way.
  - `at` of a tracking receipt is the time of the hit or later (never earlier).
  - email.tracking_keys (kid, secret) holds the keys: the newest signs, all verify, and a deleted
    row stops verifying once the listener has re-read the table (within SLOW).
  - An open token is not a click token (and the other way round): the wrong route answers 404.
Hits are stored asynchronously, so every check of a stored hit waits (up to SLOW); a check that
nothing was stored waits for a later hit (a marker) instead, since the listener stores in order.
Nothing here asserts that anything is fast."""
import email
import email.policy
import html
import html.parser
import os
import re
import socket
import subprocess
import uuid

import pytest

from conftest import E2E_DIR, LISTEN_PORT, LISTEN_URL, SLOW, send, status, wait_status, wait_until
from servers import AioSmtp, Postfix

PF_PORT = 26540
AIO_PORT = 26541
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

# The HTML part every tracked message carries: (what the href says in the HTML source, the URL it
# means once entities are decoded, the link's text). Only the first five are http(s).
TRACKED = [
    ("https://example.org/plain", "https://example.org/plain", "plain"),
    ("https://example.org/q?x=1&y=2&z=a%20b", "https://example.org/q?x=1&y=2&z=a%20b", "bare ampersand"),
    ("https://example.org/p?a=1&amp;b=%C3%A9&amp;c=%C3%BC#frag", "https://example.org/p?a=1&b=%C3%A9&c=%C3%BC#frag", "encoded"),
    ("https://example.org/p?a=1&amp;b=%C3%A9&amp;c=ü#frag", "https://example.org/p?a=1&b=%C3%A9&c=ü#frag", "non-ascii"),
    ("http://example.com/insecure/", "http://example.com/insecure/", "http"),
]
UNTRACKED = [
    ('href="mailto:help@example.org?subject=Hi%20there&amp;body=x"', "mailto:help@example.org?subject=Hi%20there&body=x", "mail us"),
    ('href="#top"', "#top", "top"),
    ('data-pg-email-notrack href="https://example.org/private?x=1&amp;y=2"', "https://example.org/private?x=1&y=2", "not tracked"),
]
HTML = ("<!DOCTYPE html><html><head><title>News</title></head><body>\n<h1>Grüße</h1>\n"
        + "".join(f'<p><a class="cta" title="x &amp; y" href="{src}">{text}</a></p>\n' for src, _, text in TRACKED)
        + "".join(f"<p><a {attrs}>{text}</a></p>\n" for attrs, _, text in UNTRACKED)
        + "<p>Bye.</p>\n</body></html>\n")
TEXT = ("Read https://example.org/plain or https://example.org/p?a=1&b=%C3%A9&c=ü#frag\n"
        "Write to mailto:help@example.org. Grüße!\n")


# --- the servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix(cluster):
    pf = Postfix(os.path.join(E2E_DIR, "postfix-tracking"), PF_PORT)
    pf.start()
    yield pf
    pf.stop()


@pytest.fixture
def tr(mail, postfix):
    """`mail`, with transport pf_track to the module's Postfix and the listener answering."""
    mail.all("SELECT email.add_transport('pf_track', %s)", f"smtp://127.0.0.1:{PF_PORT}?tls=none")
    wait_until(lambda: _health_ok(), "the listener to answer GET /health with 200", SLOW, every=0.2)
    return mail


def _health_ok():
    try:
        return http("GET", "/health").status == 200
    except OSError:
        return False


# --- HTTP, byte-exact ---------------------------------------------------------------------------


class Reply:
    """An HTTP answer: status, headers as (lower-case name, raw value bytes), body bytes."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        """The (first) value of a header as the raw bytes received, or None."""
        values = [v for k, v in self.headers if k == name.lower()]
        return values[0] if values else None

    def __repr__(self):
        return f"<Reply {self.status} {self.headers} {self.body[:200]!r}>"


def _parse_head(head):
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(b":")
            headers.append((k.strip().lower().decode("latin-1"), v.strip(b" \t")))
    return status, headers


def http(method, path, *, ua=BROWSER, xff=None, headers=(), body=None, timeout=SLOW):
    """One request to the listener on a fresh connection (Connection: close), read to the end, so
    the Location header comes back as the exact bytes sent. ua=None sends no User-Agent."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{LISTEN_PORT}", "Connection: close"]
    if ua is not None:
        lines.append(f"User-Agent: {ua}")
    if xff is not None:
        lines.append(f"X-Forwarded-For: {xff}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with socket.create_connection(("127.0.0.1", LISTEN_PORT), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    raw = b"".join(chunks)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP answer to {method} {path}: {raw[:500]!r}"
    st, hs = _parse_head(head)
    length = next((int(v) for k, v in hs if k == "content-length"), None)
    return Reply(st, hs, rest if length is None or method == "HEAD" else rest[:length])


def curl(*args):
    """curl (no redirects followed) with the given arguments; the answer's head, byte-exact
    (-D -). The body is not kept."""
    p = subprocess.run(["curl", "-sS", "--max-time", str(int(SLOW)), "-o", os.devnull, "-D", "-", *args],
                       capture_output=True, timeout=SLOW + 10)
    assert p.returncode == 0, f"curl {args} failed ({p.returncode}): {p.stderr.decode(errors='replace')}"
    head = p.stdout.rstrip(b"\r\n")
    if head.startswith(b"HTTP/1.1 100"):  # an interim 100 Continue precedes the answer
        head = head.split(b"\r\n\r\n", 1)[1]
    st, hs = _parse_head(head)
    return Reply(st, hs, None)


def path_of(url):
    """The path of a link to the listener (the links must point at pg_email.public_url)."""
    assert url.startswith(LISTEN_URL + "/"), f"{url!r} does not point at the listener {LISTEN_URL}"
    return url[len(LISTEN_URL):]


def changed(token, i):
    """token with the character at i replaced by another one."""
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]


# --- the delivered message ----------------------------------------------------------------------


class Page(html.parser.HTMLParser):
    """The tags of an HTML part in order; attribute values come entity-decoded."""

    def __init__(self, source):
        super().__init__(convert_charrefs=True)
        self.source = source
        self.events = []  # ("start", tag, attrs dict) / ("end", tag, None)
        self.anchors = []  # [attrs dict, text]
        self._open = None
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.events.append(("start", tag, a))
        if tag == "a":
            self._open = [a, ""]
            self.anchors.append(self._open)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag):
        self.events.append(("end", tag, None))
        if tag == "a":
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def pixels(self):
        return [a.get("src") for kind, tag, a in self.events
                if kind == "start" and tag == "img" and (a.get("src") or "").startswith(LISTEN_URL + "/o/")]

    def href(self, text):
        """The href of the link with this text."""
        found = [a.get("href") for a, t in self.anchors if t == text]
        assert len(found) == 1, f"expected one link {text!r}, found {found} in {self.source}"
        return found[0]


class Delivered:
    def __init__(self, mid, subject, copies):
        self.mid, self.subject, self.copies = mid, subject, copies
        self.msg, self.raw = copies[0]
        self.page = Page(self.msg.get_body(("html",)).get_content()) if self.msg.get_body(("html",)) else None

    def pixel(self):
        px = self.page.pixels()
        assert len(px) == 1, f"expected one open pixel, found {px}"
        return path_of(px[0])

    def click(self, text):
        return path_of(self.page.href(text))

    def raw_header(self, name):
        """A header's value as written in the delivered bytes, unfolded (no decoding)."""
        m = email.message_from_bytes(self.raw, policy=email.policy.compat32)
        v = m.get(name)
        return None if v is None else " ".join(str(v).split())

    def unsubscribe(self):
        """The listener path of the message's List-Unsubscribe link."""
        lu = self.raw_header("List-Unsubscribe")
        assert lu, f"no List-Unsubscribe header in {self.subject!r}"
        return path_of(lu.strip("<>"))


def deliver(db, pf, copies=1, **kw):
    """Sends through pf_track (kw as email.send arguments), waits until it is sent and `copies`
    copies (one per recipient) are in the Maildir."""
    kw.setdefault("subject", f"tracking {uuid.uuid4().hex[:10]}")
    mid = send(db, "pf_track", **kw)
    wait_status(db, mid, "sent", timeout=SLOW)
    found = []

    def arrived():
        found[:] = [(m, raw) for raw in pf.raw_messages()
                    for m in [email.message_from_bytes(raw, policy=email.policy.default)] if m["subject"] == kw["subject"]]
        return len(found) >= copies

    wait_until(arrived, f"{copies} cop(ies) of {kw['subject']!r} in the Maildir", SLOW)
    return Delivered(mid, kw["subject"], list(found))


def addr(tag):
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.test"


def past_sent_at(db, mid, seconds=3.0):
    """Waits until the database clock is `seconds` past the message's sent_at, so that a hit
    now is not flagged machine for its timing."""
    wait_until(lambda: db.val("SELECT now() > sent_at + make_interval(secs => %s) FROM email.messages WHERE id = %s",
                              seconds, mid), f"{seconds} s past sent_at of message {mid}", SLOW, every=0.1)


HIT_COLS = ("event", "recipient", "source", "url", "user_agent", "ip", "machine")


def hits(db, mid, ip=None):
    """The message's tracking receipts (opened, clicked), oldest first, optionally from one ip."""
    rows = db.all("SELECT event, recipient, source, url, user_agent, host(ip), machine FROM email.receipts "
                  "WHERE message_id = %s AND event IN ('opened', 'clicked') AND (%s::inet IS NULL OR ip = %s::inet) "
                  "ORDER BY id", mid, ip, ip)
    return [dict(zip(HIT_COLS, r)) for r in rows]


def wait_hits(db, mid, ip, n=1):
    """Waits until n tracking receipts from ip are stored; returns them."""
    wait_until(lambda: len(hits(db, mid, ip)) >= n, f"{n} tracking receipt(s) of message {mid} from {ip}", SLOW)
    return hits(db, mid, ip)


def is_pixel(r):
    body = r.body or b""
    return (r.status == 200 and r.header("content-type") == b"image/gif" and body[:6] in (b"GIF87a", b"GIF89a")
            and int.from_bytes(body[6:8], "little") == 1 and int.from_bytes(body[8:10], "little") == 1)


# --- tests --------------------------------------------------------------------------------------


def test_health_and_unknown_routes(tr):
    r = http("GET", "/health")
    assert r.status == 200 and r.body.strip() == b"ok", r
    for path in ("/", "/nope", "/o/", "/c/", "/u/", "/o/not-a-token", "/c/not-a-token", "/u/not-a-token",
                 "/webhooks", "/health/x", "/o/a/b"):
        r = http("GET", path)
        assert r.status == 404, (path, r)
        assert r.header("location") is None, (path, r)


def test_links_rewritten_pixel_appended_text_unchanged(tr, postfix):
    to = addr("reader")
    d = deliver(tr, postfix, recipients=to, body=TEXT, html=HTML, track_opens=True, track_clicks=True)
    page = d.page
    # every link is still there, in order, with its text and its other attributes
    assert [t for _, t in page.anchors] == [t for *_, t in TRACKED] + [t for *_, t in UNTRACKED]
    for (src, url, text), (attrs, _) in zip(TRACKED, page.anchors):
        href = attrs.get("href") or ""
        assert href.startswith(LISTEN_URL + "/c/") and len(href) > len(LISTEN_URL + "/c/"), (text, href)
        assert attrs.get("class") == "cta" and attrs.get("title") == "x & y", (text, attrs)
    tokens = [a["href"] for a, _ in page.anchors[:len(TRACKED)]]
    assert len(set(tokens)) == len(tokens), f"two different URLs got the same tracking link: {tokens}"
    for (_, url, text), (attrs, _) in zip(UNTRACKED, page.anchors[len(TRACKED):]):
        assert attrs.get("href") == url, (text, attrs)
    notrack = page.anchors[-1][0]
    assert "data-pg-email-notrack" not in notrack, f"the opt-out attribute must be removed: {notrack}"
    assert "data-pg-email-notrack" not in page.source
    # one pixel, the last thing opened inside <body>
    pixel = d.pixel()
    assert pixel.startswith("/o/") and len(pixel) > 3
    body_end = max(i for i, e in enumerate(page.events) if e[:2] == ("end", "body"))
    last_start = [e for e in page.events[:body_end] if e[0] == "start"][-1]
    assert last_start[1] == "img" and last_start[2]["src"] == LISTEN_URL + pixel, last_start
    # the text part is exactly what was sent; no header asked for
    text = d.msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert text.rstrip("\n") == TEXT.rstrip("\n")
    assert LISTEN_URL not in text
    assert d.msg["List-Unsubscribe"] is None and d.msg["List-Unsubscribe-Post"] is None


def test_flags_are_independent_and_off_by_default(tr, postfix):
    assert tr.val("SHOW pg_email.track_opens") == "off" and tr.val("SHOW pg_email.track_clicks") == "off"
    plain = deliver(tr, postfix, recipients=addr("plain"), body=TEXT, html=HTML)
    opens = deliver(tr, postfix, recipients=addr("opens"), body=TEXT, html=HTML, track_opens=True)
    clicks = deliver(tr, postfix, recipients=addr("clicks"), body=TEXT, html=HTML, track_clicks=True)
    unsub = deliver(tr, postfix, recipients=addr("unsub"), body=TEXT, html=HTML, list_unsubscribe=True)
    untouched = [u for _, u, _ in TRACKED + UNTRACKED]
    for d in (plain, opens, unsub):
        assert [a.get("href") for a, _ in d.page.anchors] == untouched, d.page.source
    assert "data-pg-email-notrack" in plain.page.anchors[-1][0], "without click tracking the HTML is not rewritten"
    for d in (plain, clicks, unsub):
        assert d.page.pixels() == [], d.page.source
    opens.pixel()
    assert all(a["href"].startswith(LISTEN_URL + "/c/") for a, _ in clicks.page.anchors[:len(TRACKED)])
    for d in (plain, opens, clicks):
        assert d.msg["List-Unsubscribe"] is None, d.subject
    assert unsub.msg["List-Unsubscribe"] is not None


def test_click_redirects_to_the_exact_url_and_is_recorded(tr, postfix):
    to = addr("clicker")
    d = deliver(tr, postfix, recipients=f'"Cli Cker" <{to}>', body=TEXT, html=HTML, track_opens=True, track_clicks=True)
    past_sent_at(tr, d.mid)
    ascii_links = [(url, text) for _, url, text in TRACKED if text != "non-ascii"]
    for i, (url, text) in enumerate(ascii_links):
        ip = f"203.0.113.{i + 1}"
        if text == "encoded":  # with curl, as a browser would
            r = curl("-A", BROWSER, "-H", f"X-Forwarded-For: {ip}", LISTEN_URL + d.click(text))
        else:
            r = http("GET", d.click(text), xff=ip)
        assert r.status == 302, (text, r)
        assert r.header("location") == url.encode("ascii"), (text, r.header("location"), url)
    r = http("GET", d.pixel(), xff="203.0.113.99")
    assert is_pixel(r), r
    assert b"no-store" in (r.header("cache-control") or b""), r
    assert r.header("location") is None
    for i, (url, text) in enumerate(ascii_links):
        [row] = wait_hits(tr, d.mid, f"203.0.113.{i + 1}")
        assert row == {"event": "clicked", "recipient": to, "source": "tracking", "url": url, "user_agent": BROWSER,
                       "ip": f"203.0.113.{i + 1}", "machine": False}, (text, row)
    [row] = wait_hits(tr, d.mid, "203.0.113.99")
    assert row == {"event": "opened", "recipient": to, "source": "tracking", "url": None, "user_agent": BROWSER,
                   "ip": "203.0.113.99", "machine": False}, row
    # without X-Forwarded-For the address is the peer's
    assert http("GET", d.pixel(), ua=BROWSER + " direct").status == 200
    wait_until(lambda: any(h["user_agent"] == BROWSER + " direct" for h in hits(tr, d.mid)), "the direct hit", SLOW)
    assert [h["ip"] for h in hits(tr, d.mid) if h["user_agent"] == BROWSER + " direct"] == ["127.0.0.1"]


def test_click_to_a_non_ascii_url_redirects_byte_for_byte(tr, postfix):
    """The href `https://example.org/p?a=1&amp;b=%C3%A9&amp;c=ü#frag` must come back as a 302
    whose Location is the decoded URL's UTF-8 bytes, unchanged: not percent-encoded, not refused.
    (hyper: HeaderValue::from_str refuses non-ASCII and would make this a 404 for a link the
    recipient really clicked; HeaderValue::from_bytes sends the bytes as given.) The percent-encoded
    spelling of the same URL is checked byte for byte in the test above."""
    to = addr("umlaut")
    d = deliver(tr, postfix, recipients=to, body=TEXT, html=HTML, track_clicks=True)
    url = TRACKED[3][1]
    assert "ü" in url and "&amp;" not in url
    past_sent_at(tr, d.mid)
    r = http("GET", d.click("non-ascii"), xff="203.0.113.50")
    assert r.status == 302, f"a link to a URL with a raw non-ASCII character must redirect, got {r}"
    assert r.header("location") == url.encode("utf-8"), (r.header("location"), url.encode("utf-8"))
    [row] = wait_hits(tr, d.mid, "203.0.113.50")
    assert row["event"] == "clicked" and row["url"] == url and row["recipient"] == to and row["machine"] is False, row


def test_head_and_machine_user_agents_are_machine(tr, postfix):
    to = addr("machines")
    d = deliver(tr, postfix, recipients=to, body=TEXT, html=HTML, track_opens=True, track_clicks=True)
    past_sent_at(tr, d.mid)
    px, click, url = d.pixel(), d.click("plain"), TRACKED[0][1]
    cases = [  # (ip, method, path, user agent or None for no header, machine)
        ("198.51.100.1", "GET", px, BROWSER, False),
        ("198.51.100.2", "HEAD", px, BROWSER, True),
        ("198.51.100.3", "GET", px, "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)", True),
        ("198.51.100.4", "GET", px, None, True),
        ("198.51.100.5", "GET", px, "", True),
        ("198.51.100.6", "GET", click, BROWSER, False),
        ("198.51.100.7", "HEAD", click, BROWSER, True),
        ("198.51.100.8", "GET", click, "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", True),
        ("198.51.100.9", "GET", click, "Mozilla/5.0 (compatible; link scanner 1.0)", True),
        ("198.51.100.10", "GET", click, "Mozilla/5.0 (compatible; link preview fetcher)", True),
    ]
    for ip, method, path, ua, _ in cases:
        r = http(method, path, ua=ua, xff=ip)
        if path == px:
            assert r.status == 200 and r.header("content-type") == b"image/gif", (ip, method, ua, r)
        else:
            assert r.status == 302 and r.header("location") == url.encode(), (ip, method, ua, r)
    for ip, method, path, ua, machine in cases:
        [row] = wait_hits(tr, d.mid, ip)
        assert row["event"] == ("opened" if path == px else "clicked"), (ip, row)
        assert row["machine"] is machine, f"{method} with user agent {ua!r}: machine = {row['machine']}, expected {machine}"
        assert row["recipient"] == to and row["source"] == "tracking", row
        if ua:
            assert row["user_agent"] == ua, row


class HitOnArrival(list):
    """AioSmtp's list of messages: when a message arrives, before the server answers 250 (so
    before the worker can know it was sent and record sent_at), its pixel and first link are
    fetched with a browser user agent."""

    def __init__(self, xff):
        super().__init__()
        self.xff = xff
        self.replies = []
        self.errors = []

    def append(self, m):
        try:
            msg = email.message_from_bytes(m["data"], policy=email.policy.default)
            page = Page(msg.get_body(("html",)).get_content())
            for url in page.pixels() + [page.href("plain")]:
                self.replies.append((url, http("GET", path_of(url), xff=self.xff, timeout=20)))
        except Exception as e:  # the test reports it; the SMTP session must still end well
            self.errors.append(repr(e))
        super().append(m)


def test_hits_before_or_just_after_sending_are_machine_later_ones_are_not(tr):
    to = addr("early")
    hook = HitOnArrival("192.0.2.10")
    with AioSmtp(AIO_PORT) as srv:
        srv.messages = hook
        tr.all("SELECT email.add_transport('aio_track', %s)", f"smtp://127.0.0.1:{AIO_PORT}?tls=none")
        mid = send(tr, "aio_track", recipients=to, body=TEXT, html=HTML, track_opens=True, track_clicks=True)
        wait_status(tr, mid, "sent", timeout=SLOW)
        assert hook.errors == [], hook.errors
        assert [r.status for _, r in hook.replies] == [200, 302], hook.replies
        # hits before sent_at was recorded: a browser, a GET, and still machine
        rows = wait_hits(tr, mid, "192.0.2.10", 2)
        assert sorted(r["event"] for r in rows) == ["clicked", "opened"], rows
        assert all(r["machine"] is True and r["user_agent"] == BROWSER and r["recipient"] == to for r in rows), rows
        px = path_of(hook.replies[0][0])
        # just after sending: machine when it landed within 2 s of sent_at (a loaded machine may
        # take longer to get here; then the timing cannot be told apart and is not checked)
        assert http("GET", px, xff="192.0.2.11").status == 200
        [row] = wait_hits(tr, mid, "192.0.2.11")
        lag = tr.val("SELECT extract(epoch FROM max(r.at) - m.sent_at) FROM email.receipts r JOIN email.messages m "
                     "ON m.id = r.message_id WHERE r.message_id = %s AND r.ip = '192.0.2.11'::inet GROUP BY m.sent_at", mid)
        if lag < 1.5:
            assert row["machine"] is True, f"an open {lag:.2f} s after sent_at is machine: {row}"
        # well after sending, the same browser is a human
        past_sent_at(tr, mid)
        assert http("GET", px, xff="192.0.2.12").status == 200
        assert http("GET", path_of(hook.replies[1][0]), xff="192.0.2.12").status == 302
        rows = wait_hits(tr, mid, "192.0.2.12", 2)
        assert all(r["machine"] is False for r in rows), rows


def test_a_changed_token_is_404_and_records_nothing(tr, postfix):
    to = addr("forger")
    d = deliver(tr, postfix, recipients=to, body=TEXT, html=HTML, track_opens=True, track_clicks=True,
                list_unsubscribe=True)
    unsub = d.unsubscribe()
    px, click = d.pixel(), d.click("plain")
    past_sent_at(tr, d.mid)
    assert http("GET", px).status == 200 and http("GET", click).status == 302  # the real ones work
    wait_until(lambda: len(hits(tr, d.mid)) == 2, "the two genuine hits", SLOW)
    before = tr.val("SELECT count(*) FROM email.receipts WHERE message_id = %s", d.mid)
    bad = []
    for route, path in (("/o/", px), ("/c/", click)):
        token = path[len(route):]
        variants = [changed(token, i) for i in range(len(token))] + [token[:-1], token + "A", token.upper()]
        for v in variants:
            if v == token:
                continue
            r = http("GET", route + v, xff="192.0.2.66")
            if r.status != 404 or r.header("location") is not None or r.header("content-type") == b"image/gif":
                bad.append((route + v, r.status, r.header("location")))
    token = unsub[len("/u/"):]
    for i in sorted({0, len(token) // 2, len(token) - 1}):
        for method, body in (("GET", None), ("POST", b"List-Unsubscribe=One-Click")):
            r = http(method, "/u/" + changed(token, i), body=body, xff="192.0.2.66",
                     headers=[("Content-Type", "application/x-www-form-urlencoded")] if body else [])
            if r.status != 404:
                bad.append((method, "/u/" + changed(token, i), r.status))
    # a token of one kind on another route
    for path in ("/c/" + px[3:], "/o/" + click[3:], "/c/" + unsub[3:], "/u/" + click[3:]):
        r = http("GET", path, xff="192.0.2.66")
        if r.status != 404 or r.header("location") is not None:
            bad.append((path, r.status, r.header("location")))
    assert bad == [], f"{len(bad)} changed or misplaced tokens were not refused with 404: {bad[:10]}"
    # the listener stores hits in order: once a later genuine hit is stored, none of the above was
    marker = f"marker {uuid.uuid4()}"
    assert http("GET", px, ua=marker, xff="192.0.2.67").status == 200
    wait_hits(tr, d.mid, "192.0.2.67")
    assert hits(tr, d.mid, "192.0.2.66") == []
    assert tr.val("SELECT count(*) FROM email.receipts WHERE message_id = %s", d.mid) == before + 1
    assert tr.val("SELECT count(*) FROM email.suppressions WHERE address = %s", to) == 0


def test_rotated_key_keeps_old_links_working_and_signs_new_mail(tr, postfix):
    old = deliver(tr, postfix, recipients=addr("oldkey"), body=TEXT, html=HTML, track_opens=True, track_clicks=True)
    url = TRACKED[0][1].encode()
    r = http("GET", old.click("plain"), xff="192.0.2.20")
    assert r.status == 302 and r.header("location") == url, r
    kid = tr.val("SELECT email.rotate_tracking_key()")
    assert isinstance(kid, int) and kid == tr.val("SELECT kid FROM email.tracking_keys ORDER BY created_at DESC, kid DESC LIMIT 1"), kid
    new = deliver(tr, postfix, recipients=addr("newkey"), body=TEXT, html=HTML, track_opens=True, track_clicks=True,
                  list_unsubscribe=True)
    wait_until(lambda: http("GET", new.click("plain"), xff="192.0.2.21").status == 302,
               "the listener to take links signed with the new key", SLOW, every=0.2)
    for path in (old.click("plain"), old.pixel()):  # old links keep working
        r = http("GET", path, xff="192.0.2.22")
        assert r.status in (200, 302), (path, r)
    assert http("GET", old.click("plain"), xff="192.0.2.22").header("location") == url
    # The new mail is signed with the new key: with every older key retired, the old links stop
    # working and the new ones do not. The keys are put back afterwards.
    saved = tr.all("SELECT kid, secret, created_at FROM email.tracking_keys WHERE kid <> %s", kid)
    assert saved, "rotation kept no older key"
    try:
        tr.all("DELETE FROM email.tracking_keys WHERE kid <> %s", kid)
        wait_until(lambda: http("GET", old.click("plain"), xff="192.0.2.23").status == 404,
                   "the listener to stop taking links of the retired keys", SLOW, every=0.2)
        r = http("GET", new.click("plain"), xff="192.0.2.24")
        assert r.status == 302 and r.header("location") == url, f"mail sent after rotate_tracking_key() is not signed with key {kid}: {r}"
        assert is_pixel(http("GET", new.pixel(), xff="192.0.2.24"))
        assert http("GET", new.unsubscribe(), xff="192.0.2.24").status == 200
    finally:
        for k, secret, created in saved:
            tr.all("INSERT INTO email.tracking_keys (kid, secret, created_at) VALUES (%s, %s, %s) ON CONFLICT (kid) DO NOTHING",
                   k, secret, created)
    wait_until(lambda: http("GET", old.click("plain"), xff="192.0.2.25").status == 302,
               "the listener to take the restored keys again", SLOW, every=0.2)


def test_list_unsubscribe_only_for_a_single_recipient(tr, postfix):
    one = addr("single")
    d = deliver(tr, postfix, recipients=f'"Single Reader" <{one}>', body=TEXT, html=HTML, list_unsubscribe=True,
                track_clicks=True)
    lu = d.raw_header("List-Unsubscribe")
    assert re.fullmatch(re.escape(f"<{LISTEN_URL}/u/") + r"[^<>\s]+>", lu), lu
    assert "=?" not in lu, f"List-Unsubscribe must not be an encoded word: {lu}"
    assert d.raw_header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    a, b, c = addr("multi-a"), addr("multi-b"), addr("multi-c")
    cc = deliver(tr, postfix, copies=2, recipients=a, cc=b, body=TEXT, html=HTML, list_unsubscribe=True,
                 track_opens=True, track_clicks=True)
    bcc = deliver(tr, postfix, copies=2, recipients=a, bcc=c, body=TEXT, html=HTML, list_unsubscribe=True)
    for m, raw in cc.copies + bcc.copies:
        assert m["List-Unsubscribe"] is None and m["List-Unsubscribe-Post"] is None, m["Delivered-To"]
        assert b"list-unsubscribe" not in raw.lower()
    # tracking still works for several recipients, without naming one
    past_sent_at(tr, cc.mid)
    assert http("GET", cc.click("plain"), xff="192.0.2.30").status == 302
    assert http("GET", cc.pixel(), xff="192.0.2.30").status == 200
    rows = wait_hits(tr, cc.mid, "192.0.2.30", 2)
    assert all(r["recipient"] is None for r in rows), rows


def test_unsubscribe_page_changes_nothing(tr, postfix):
    to = addr("looker")
    d = deliver(tr, postfix, recipients=f'"Look Er" <{to}>', body=TEXT, html=HTML, list_unsubscribe=True)
    path = d.unsubscribe()
    for _ in range(2):  # a link scanner, then the reader
        r = http("GET", path)
        assert r.status == 200, r
        assert (r.header("content-type") or b"").startswith(b"text/html"), r
        assert r.header("location") is None
        assert to.encode() in r.body, f"the page does not name {to}: {r.body[:500]!r}"
    assert http("HEAD", path).status == 200
    assert tr.val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'unsubscribed'", d.mid) == 0
    assert tr.val("SELECT count(*) FROM email.suppressions WHERE address = %s", to) == 0
    again = send(tr, "pf_track", recipients=to)
    assert status(tr, again) != "suppressed"


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_one_click_unsubscribe(tr, postfix, encoding):
    to = addr(f"leaver-{encoding}")
    d = deliver(tr, postfix, recipients=f'"Leav Er" <{to}>', body=TEXT, html=HTML, list_unsubscribe=True)
    url = LISTEN_URL + d.unsubscribe()
    for attempt in range(2):  # mail clients may post twice: the second answer is the same
        if encoding == "urlencoded":
            r = http("POST", path_of(url), body=b"List-Unsubscribe=One-Click",
                     headers=[("Content-Type", "application/x-www-form-urlencoded")], ua="Mozilla/5.0 (one-click)")
        else:  # multipart/form-data, as curl -F (and Gmail) send it
            r = curl("-A", "Mozilla/5.0 (one-click)", "-F", "List-Unsubscribe=One-Click", url)
        assert r.status == 200, (attempt, r)
        assert r.header("location") is None, f"RFC 8058: no redirect ({r})"
        # committed before the answer: visible at once
        assert tr.val("SELECT count(*) FROM email.receipts WHERE message_id = %s AND event = 'unsubscribed' "
                      "AND source = 'tracking' AND recipient = %s", d.mid, to) >= 1
        assert tr.one("SELECT reason, message_id FROM email.suppressions WHERE address = %s", to) == ("unsubscribed", d.mid)
    nxt = send(tr, "pf_track", recipients=to)
    assert status(tr, nxt) == "suppressed"


def test_templates_get_the_unsubscribe_url(tr, postfix):
    """Template data has `unsubscribe_url`: the message's own link (the one List-Unsubscribe names)
    for one recipient, an empty string for several; a preview shows a stand-in."""
    name = f"unsub-{uuid.uuid4().hex[:8]}"
    tr.all("INSERT INTO email.templates (name, subject, body, html) VALUES (%s, 'Hello {{ who }}', "
           "'Leave: [{{ unsubscribe_url }}]', '<p><a href=\"{{ unsubscribe_url }}\">leave</a></p>')", name)
    preview = tr.one("SELECT body FROM email.render(%s, '{\"who\": \"x\"}')", name)[0]
    assert preview == f"Leave: [{LISTEN_URL}/u/preview]", preview
    one = addr("templated")
    subject = f"templated {uuid.uuid4().hex[:8]}"
    mid = tr.val("SELECT email.send_template(%s, %s, '{\"who\": \"Ada\"}', transport => 'pf_track', "
                 "list_unsubscribe => true, track_clicks => true)", name, one)
    wait_status(tr, mid, "sent", timeout=SLOW)
    found = []
    wait_until(lambda: found.extend(m for raw in postfix.raw_messages()
                                    for m in [email.message_from_bytes(raw, policy=email.policy.default)]
                                    if m["subject"] == "Hello Ada" and one in str(m["To"])) or found,
               "the templated message in the Maildir", SLOW)
    m = found[0]
    link = str(m["List-Unsubscribe"]).strip("<>")
    text = m.get_body(("plain",)).get_content()
    assert text.strip() == f"Leave: [{link}]", (text, link)
    # the unsubscribe link is not click-tracked: it stays the link itself (minijinja's autoescape
    # writes '/' as &#x2f;, which a browser reads back as '/')
    part = m.get_body(("html",)).get_content()
    assert f'href="{link}"' in html.unescape(part) and "/c/" not in part, part
    r = http("POST", path_of(link), body=b"List-Unsubscribe=One-Click",
             headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert r.status == 200, r
    assert tr.val("SELECT reason FROM email.suppressions WHERE address = %s", one) == "unsubscribed"
    # several recipients: no link to give, an empty string
    a, b = addr("tpl-a"), addr("tpl-b")
    mid = tr.val("SELECT email.send_template(%s, %s, '{\"who\": \"Bo\"}', transport => 'pf_track')", name, f"{a}, {b}")
    wait_status(tr, mid, "sent", timeout=SLOW)
    body = tr.val("SELECT body FROM email.messages WHERE id = %s", mid)
    assert body == "Leave: []", body
