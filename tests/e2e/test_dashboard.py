"""The dashboard (DESIGN.md "Events out": GET /dashboard on the listener, pg_email.dashboard_password,
HTTP Basic user `admin`), end to end and in a real browser: Debian's headless Chromium
(/usr/bin/chromium, in the Makefile's DEB_PACKAGES) loads the page, dumps its DOM and takes a
desktop (1280 x 900) and a phone (390 x 844) screenshot into E2E_DIR/screenshots/.

Chromium gets the page through AuthProxy, a small reverse proxy of this module on 127.0.0.1 (a
free port) that adds the Authorization header and records every request the browser makes and
every answer it got (so the test also sees that the page loads nothing else and which headers
came with it). Chromium 156 would also take `http://admin:pw@host/dashboard`, but how Chromium
treats credentials in URLs has changed between versions; the proxy does not depend on it.

The figures come from a module fixture that starts from an empty outbox (like conftest's
empty_outbox) and makes:
    m1  sent (capture://), delivered (a SendGrid event), opened twice (the listener's open
        pixel) and clicked twice (the listener's click link), both more than 2 s after sending,
        with a browser's User-Agent: human; tag `dash-a`
    m2  sent, delivered, opened (SendGrid `open`, no sg_machine_open), complained (SendGrid
        `spamreport`); untagged
    m3  sent, opened by a machine (SendGrid `open` with sg_machine_open), hard-bounced (SendGrid
        `bounce`, 5.1.1, a reason holding HTML); tag `dash-b`
    m4  refused at RCPT by an SMTP server of this module with `550 5.1.1` and a reply holding
        HTML: bounced at send, never sent; untagged
so email.stats (every message single-tagged or untagged: summing over tags counts each once)
says sent 3, delivered 2, bounced 2, complained 1, opened 2, clicked 1 (unique messages, human
events only). The expected figures of the page are computed in SQL from email.stats, per day of
the daily chart's buckets (data-bucket, `YYYY-MM-DD`), read before and after the browser ran.

What these tests take as given beyond DESIGN.md and src/dashboard.rs's hooks:
  - pg_email.dashboard_password unset: GET /dashboard is 404, with or without credentials. Set
    (ALTER SYSTEM + pg_reload_conf), the listener serves it once it re-read its settings (polled
    for, up to SLOW). The password may hold a colon and non-ASCII characters (UTF-8, as the
    WWW-Authenticate header's charset="UTF-8" says).
  - The setting is superuser-only: another role's SHOW is 42501.
  - The 200 answer is text/html with Content-Security-Policy (default-src 'none', no script
    source) and Cache-Control no-store; the 401 answer has WWW-Authenticate `Basic realm=...`
    and the same Content-Security-Policy, and its body holds no figure, hook, recipient,
    response or the database's name (`mail`, as a word).
  - The 30-day figures ([data-metric][data-window=30d]) are the sums of email.stats over the
    30 days of the daily chart, which ends with today (UTC); each daily circle is that day's sum.
    The 24-hour figures and the hourly circles count the same events (all of them are minutes
    old). Rates are figure / sent.
  - The last failures show the worker's `bounced`/`failed` receipts and the providers' bounces
    with their responses, as text: no element, attribute or script of theirs reaches the DOM.
  - The header: [data-field=database] is current_database(); [data-field=delivery_running] is
    pg_email.workers (all running), [data-field=listener_running] 1.
The last test resets the password and sees 404 again; the password fixture also resets it in
its teardown, so the rest of the session runs without a dashboard."""
import base64
import dataclasses
import datetime
import html.parser
import http.client
import http.server
import os
import re
import signal
import struct
import subprocess
import tempfile
import threading
import time
import uuid
import zlib

import psycopg2
import pytest

from conftest import E2E_DIR, LISTEN_PORT, SLOW, empty, fresh, send, status, wait_status, wait_until
from servers import AioSmtp
from test_consent import addr, cap, deliver, ingest_sg, listener, sendgrid, sg_event  # noqa: F401 (fixtures)
from test_tracking import BROWSER, past_sent_at

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.path.join(E2E_DIR, "screenshots")
WINDOWS = {"dashboard.png": (1280, 900), "dashboard-phone.png": (390, 844)}
AIO_PORT = 26701
SMTP_TRANSPORT = "dash_smtp"
METRICS = ("sent", "delivered", "bounced", "complained", "opened", "clicked")
RATES = {"delivered": "delivery", "bounced": "bounce", "complained": "complaint", "opened": "open", "clicked": "click"}
# What the fixture's messages add up to in email.stats: m4, refused at RCPT as a bad address, counts
# as sent and bounced (so that bounced never exceeds sent, and every rate is a fraction of sent).
FIXTURE_COUNTS = {"sent": 4, "delivered": 2, "bounced": 2, "complained": 1, "opened": 2, "clicked": 1}
PASSWORD = f"dash:{uuid.uuid4().hex[:12]}-é"
TOKEN = f"dashtok{uuid.uuid4().hex[:10]}"  # in every hostile response, so a page can be searched for them
# A remote server's answer at RCPT, and a provider's bounce reason: HTML that must stay text.
SMTP_HOSTILE = f"<script>alert(1)</script><img src=x onerror=alert(2)> {TOKEN} no such user"
SG_HOSTILE = (f"550 5.1.1 </td></tr></table><script>alert(3)</script><svg onload=alert(4)>"
              f"<a href=\"https://evil.example/\">x</a> {TOKEN} \u202eevil\u202c bell\x07")
BLOCK_HOSTILE = f"<script>alert(5)</script><iframe src=\"https://evil.example/\"></iframe> {TOKEN} policy"
# Hop-by-hop headers and what the proxy sets itself.
NOT_FORWARDED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                 "host", "authorization", "accept-encoding", "content-length", "date", "server"}


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


ADMIN = basic("admin", PASSWORD)


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclasses.dataclass
class Answer:
    method: str
    path: str
    status: int
    headers: list  # [(name, value)] as received
    body: bytes

    def header(self, name):
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} appears {len(values)} times: {values}"
        return values[0] if values else None

    def text(self):
        return self.body.decode("utf-8", "replace")


def get(path="/dashboard", authorization=None, method="GET", timeout=SLOW):
    """One request to the listener on a new connection; the answer read whole (chunked or not)."""
    conn = http.client.HTTPConnection("127.0.0.1", LISTEN_PORT, timeout=timeout)
    try:
        headers = {"User-Agent": BROWSER, "Accept": "text/html"}
        if authorization is not None:
            headers["Authorization"] = authorization
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return Answer(method, path, r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def status_of(authorization):
    try:
        return get(authorization=authorization, timeout=10).status
    except (OSError, http.client.HTTPException):
        return None


class AuthProxy:
    """A reverse proxy on 127.0.0.1 (a free port) to the listener: every request is forwarded
    with `authorization` as its Authorization header (None: without one), without
    Accept-Encoding (so bodies come back as they are) and on a new connection; the answer goes
    back to the client whole, with Content-Length. `.seen` lists an Answer per request."""

    def __init__(self, authorization):
        self.authorization = authorization
        self.seen = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

            def do_POST(self):
                self._forward("POST")

            def _forward(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
                if proxy.authorization is not None:
                    headers["Authorization"] = proxy.authorization
                conn = http.client.HTTPConnection("127.0.0.1", LISTEN_PORT, timeout=SLOW)
                try:
                    conn.request(method, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    answer = Answer(method, self.path, r.status, r.getheaders(), r.read())
                except (OSError, http.client.HTTPException) as e:
                    answer = Answer(method, self.path, 502, [("Content-Type", "text/plain")],
                                    f"proxy: the listener did not answer: {e!r}".encode())
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.seen.append(answer)
                self.send_response(answer.status)
                for k, v in answer.headers:
                    if k.lower() not in NOT_FORWARDED:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(answer.body)
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="dashboard-auth-proxy", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


# ---------------------------------------------------------------------------------------------
# Chromium


def chromium(url, *args, timeout=SLOW):
    """Runs headless Chromium on `url` with a throwaway profile; returns its stdout. Ends the
    browser's process group when it is done or after `timeout` seconds."""
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: `make deps` installs Debian's chromium"
    with tempfile.TemporaryDirectory(prefix="pg_email-chromium-") as profile:
        cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
               "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={profile}", *args, url]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, env={**os.environ, "HOME": profile})
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = b"", b"(timed out)"
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the browser's helpers, if any outlived it
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    assert p.returncode == 0, (f"chromium {' '.join(args)} {url} ended with {p.returncode}:\n"
                               + err.decode(errors="replace")[-3000:])
    return out.decode("utf-8", "replace")


def dump_dom(url):
    dom = chromium(url, "--window-size=1280,900", "--dump-dom")
    assert dom.lstrip().lower().startswith("<!doctype html>") or dom.lstrip().lower().startswith("<html"), dom[:500]
    return dom


def screenshot(url, path, width, height):
    if os.path.exists(path):
        os.unlink(path)
    chromium(url, f"--window-size={width},{height}", f"--screenshot={path}")
    assert os.path.exists(path), f"chromium wrote no screenshot to {path}"


def png_info(path):
    """(width, height, size in bytes) of a PNG file, after checking its signature, its IHDR and
    that its image data inflate to exactly the size its header announces (8-bit RGB or RGBA,
    not interlaced: what Chromium writes)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG: {data[:16]!r}"
    assert data[12:16] == b"IHDR", f"{path}: the first chunk is {data[12:16]!r}, not IHDR"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    idat, pos = [], 8
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(kind + chunk) == crc, f"{path}: bad CRC in chunk {kind!r}"
        if kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + n
        if kind == b"IEND":
            break
    assert kind == b"IEND", f"{path} ends without IEND"
    assert depth == 8 and color in (2, 6) and interlace == 0, (path, depth, color, interlace)
    raw = zlib.decompress(b"".join(idat))
    channels = 3 if color == 2 else 4
    assert len(raw) == height * (1 + width * channels), f"{path}: image data of {len(raw)} bytes for {width}x{height}"
    return width, height, len(data)


# ---------------------------------------------------------------------------------------------
# The DOM


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag=None, **attrs):
        """Descendants (and self) with this tag (None: any) and these attributes (data_chart=
        'daily' is data-chart="daily"; True: present at all)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [n for n in self.iter()
                if (tag is None or n.tag == tag)
                and all(k in n.attrs and (v is True or n.attrs[k] == v) for k, v in want.items())]

    def one(self, tag=None, **attrs):
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one {tag or '*'}{attrs}, found {len(found)}"
        return found[0]

    def text(self):
        return "".join(c.text() if isinstance(c, Node) else c for c in self.children)

    def __repr__(self):
        return f"<{self.tag} {self.attrs}>"


class Tree(html.parser.HTMLParser):
    """The element tree of serialized HTML (Chromium's --dump-dom, or the page's source);
    attribute values come entity-decoded, names lower-cased."""

    def __init__(self, source):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.stack = [self.root]
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: ("" if v is None else v) for k, v in attrs}, self.stack[-1])
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(source):
    return Tree(source).root


def metric(doc, name, window):
    el = doc.one(data_metric=name, data_window=window)
    assert re.fullmatch(r"[0-9]+", el.attrs.get("data-value", "")), el
    value = int(el.attrs["data-value"])
    assert el.text().strip() == f"{value:,}", (el, el.text())
    return value


def series(doc, chart):
    """{metric: [(bucket, value)]} of svg[data-chart=chart]."""
    svg = doc.one("svg", data_chart=chart)
    out = {}
    for m in METRICS:
        g = svg.one("g", data_series=m)
        circles = g.find_all("circle")
        assert circles, f"chart {chart}: no circle in series {m}"
        for c in circles:
            assert re.fullmatch(r"[0-9]+", c.attrs.get("data-value", "")), (chart, m, c)
            assert c.attrs.get("data-bucket"), (chart, m, c)
        out[m] = [(c.attrs["data-bucket"], int(c.attrs["data-value"])) for c in circles]
    buckets = [b for b, _ in out["sent"]]
    for m in METRICS:
        assert [b for b, _ in out[m]] == buckets, f"chart {chart}: series {m} has other buckets than sent"
    return out


URL_ATTRS = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background", "ping",
             "manifest", "cite", "longdesc", "usemap", "codebase", "archive", "icon", "imagesrcset"}
FORBIDDEN_TAGS = {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "base", "img", "video",
                  "audio", "source", "portal", "noscript", "template", "form"}


def local(value):
    v = value.strip().lower()
    return v == "" or v.startswith("data:") or v.startswith("#")


def check_self_contained(doc, where):
    """No script, no element that loads or embeds anything, no event handler attribute, and
    every URL in an attribute or in CSS a data: URL or a link within the page."""
    bad = [n for n in doc.iter() if n.tag in FORBIDDEN_TAGS]
    assert not bad, f"{where}: forbidden elements {bad[:5]}"
    for n in doc.iter():
        for k, v in n.attrs.items():
            assert not k.startswith("on"), f"{where}: event handler attribute on {n}"
            if k in URL_ATTRS:
                assert local(v), f"{where}: {n} points outside the page"
            if k == "style":
                check_css(v, f"{where}: style of {n}")
        if n.tag == "link":
            assert n.attrs.get("rel", "").lower() not in ("stylesheet", "preload", "prefetch", "modulepreload",
                                                            "dns-prefetch", "preconnect", "import"), f"{where}: {n}"
        if n.tag == "meta" and n.attrs.get("http-equiv", "").lower() == "refresh":
            assert re.fullmatch(r"\s*[0-9]+\s*", n.attrs.get("content", "")), f"{where}: refresh elsewhere: {n}"
        if n.tag == "style":
            check_css(n.text(), f"{where}: <style>")


def check_css(css, where):
    assert "@import" not in css.lower(), f"{where}: @import"
    for m in re.finditer(r"url\(\s*['\"]?([^'\")]*)", css, re.I):
        assert local(m.group(1)), f"{where}: url({m.group(1)})"
    assert "expression(" not in css.lower(), where


def check_csp(answer):
    csp = answer.header("Content-Security-Policy")
    assert csp, f"no Content-Security-Policy on the {answer.status} answer: {answer.headers}"
    directives = {d.strip().split()[0].lower(): d.strip().split()[1:] for d in csp.split(";") if d.strip()}
    assert directives.get("default-src") == ["'none'"], csp
    assert directives.get("script-src", ["'none'"]) == ["'none'"], csp
    return csp


# ---------------------------------------------------------------------------------------------
# Settings


def reload_conf(db):
    db.all("SELECT pg_reload_conf()")


def set_password(db, password):
    """ALTER SYSTEM SET (None: RESET) pg_email.dashboard_password and reload; waits until the
    listener answers accordingly: 200 to the new credentials, or 404 without a password."""
    if password is None:
        db.all("ALTER SYSTEM RESET pg_email.dashboard_password")
        reload_conf(db)
        wait_until(lambda: status_of(ADMIN) == 404 and status_of(None) == 404,
                   "GET /dashboard to answer 404 once pg_email.dashboard_password is reset", SLOW, every=0.2)
    else:
        db.all("ALTER SYSTEM SET pg_email.dashboard_password = %s", password)
        reload_conf(db)
        wait_until(lambda: status_of(basic("admin", password)) == 200,
                   "GET /dashboard to answer 200 to the new pg_email.dashboard_password", SLOW, every=0.2)


@pytest.fixture(scope="module")
def dash(cluster, listener):
    """The dashboard open with PASSWORD; reset (404 again) at the end of the module."""
    db = fresh()
    try:
        set_password(db, PASSWORD)
        yield PASSWORD
    finally:
        try:
            db.all("ALTER SYSTEM RESET pg_email.dashboard_password")
            reload_conf(db)
        finally:
            db.conn.close()


# ---------------------------------------------------------------------------------------------
# The figures


@pytest.fixture(scope="module")
def smtp(cluster):
    """An SMTP server that refuses the module's bad and blocked recipients at RCPT, and the
    transport to it."""
    rejects = {}
    server = AioSmtp(AIO_PORT, reject=rejects)
    server.start()
    try:
        d = fresh()
        d.all("SELECT email.add_transport(%s, %s)", SMTP_TRANSPORT, f"smtp://127.0.0.1:{AIO_PORT}?tls=none")
        d.conn.close()
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class Figures:
    mids: dict  # name -> email.messages id
    recipients: dict  # name -> address


def tracking_paths(sent):
    """The listener paths (/o/..., /c/...) of the open pixel and the click link of a captured message."""
    msg = sent.message()
    part = msg.get_body(("html",))
    assert part is not None, "no HTML part"
    body = part.get_content()
    opens = re.findall(r'src="[^"]*?(/o/[^"]+)"', body)
    clicks = re.findall(r'href="[^"]*?(/c/[^"]+)"', body)
    assert len(opens) == 1 and len(clicks) == 1, body
    return opens[0], clicks[0]


@pytest.fixture(scope="module")
def figures(cluster, cap, sendgrid, listener, smtp):
    db = fresh()
    try:
        empty(db)
        rcpt = {k: addr(f"dash-{k}") for k in ("m1", "m2", "m3", "m4")}
        smtp.set_reject({rcpt["m4"]: f"550 5.1.1 {SMTP_HOSTILE}"})
        m4 = send(db, SMTP_TRANSPORT, recipients=rcpt["m4"])
        m1 = deliver(db, [rcpt["m1"]], html='<p>Hello <a href="https://example.org/dash">read</a></p>',
                     track_opens=True, track_clicks=True, tags=["dash-a"])
        m2 = deliver(db, [rcpt["m2"]])
        m3 = deliver(db, [rcpt["m3"]], tags=["dash-b"])
        wait_status(db, m4, "bounced", timeout=SLOW)
        events = [
            sg_event("delivered", rcpt["m1"], mid=m1.mid),
            sg_event("delivered", rcpt["m2"], mid=m2.mid),
            sg_event("open", rcpt["m2"], mid=m2.mid, useragent=BROWSER, ip="203.0.113.7", sg_machine_open=False),
            sg_event("spamreport", rcpt["m2"], mid=m2.mid),
            sg_event("open", rcpt["m3"], mid=m3.mid, useragent=BROWSER, ip="203.0.113.8", sg_machine_open=True),
            sg_event("bounce", rcpt["m3"], mid=m3.mid, type="bounce", status="5.1.1", reason=SG_HOSTILE),
        ]
        assert ingest_sg(db, sendgrid, events) == len(events)
        pixel, click = tracking_paths(m1)
        past_sent_at(db, m1.mid, 3.0)
        for path, want in ((pixel, 200), (pixel, 200), (click, 302), (click, 302)):
            r = get(path)
            assert r.status == want, (path, r.status, r.body[:300])
        hits = ("SELECT count(*) FILTER (WHERE event = 'opened'), count(*) FILTER (WHERE event = 'clicked') "
                "FROM email.receipts WHERE message_id = %s AND source = 'tracking' AND machine IS FALSE")
        wait_until(lambda: tuple(db.one(hits, m1.mid)) == (2, 2), "the two opens and two clicks of m1 stored", SLOW)
        assert status(db, m3.mid) == "bounced", status(db, m3.mid)
        mids = {"m1": m1.mid, "m2": m2.mid, "m3": m3.mid, "m4": m4}
        yield Figures(mids, rcpt)
    finally:
        db.conn.close()


STATS_SUMS = ", ".join(f"coalesce(sum({m}), 0)::bigint" for m in METRICS)


def stats_by_day(db, first, last):
    """{day 'YYYY-MM-DD': {metric: sum over transports, templates and tags}} of email.stats."""
    rows = db.all(f"SELECT day::text, {STATS_SUMS} FROM email.stats "
                  "WHERE day BETWEEN %s::date AND %s::date GROUP BY day", first, last)
    return {r[0]: dict(zip(METRICS, map(int, r[1:]))) for r in rows}


def utc_today():
    return datetime.datetime.now(datetime.timezone.utc).date()


def daily_window(doc):
    """The daily chart's buckets: 30 consecutive days, oldest first, ending today (UTC)."""
    days = [b for b, _ in series(doc, "daily")["sent"]]
    assert len(days) == 30, f"the daily chart has {len(days)} buckets: {days}"
    dates = [datetime.date.fromisoformat(d) for d in days]
    assert all(b - a == datetime.timedelta(days=1) for a, b in zip(dates, dates[1:])), days
    return days


# ---------------------------------------------------------------------------------------------
# Tests


def test_without_a_password_the_dashboard_is_404(cluster, listener):
    db = fresh()
    try:
        set_password(db, None)
        for auth in (None, ADMIN, basic("admin", "")):
            r = get(authorization=auth)
            assert r.status == 404, (auth, r.status, r.body[:300])
            assert b"data-metric" not in r.body
    finally:
        db.conn.close()


def test_the_password_setting_is_superuser_only(dash, mail):
    assert mail.val("SHOW pg_email.dashboard_password") == PASSWORD
    role = f"dash_reader_{uuid.uuid4().hex[:8]}"
    mail.all(f"CREATE ROLE {role} NOLOGIN")
    try:
        mail.all(f"SET ROLE {role}")
        try:
            code, _ = mail.error("SHOW pg_email.dashboard_password")
            assert code == "42501", code
            code, _ = mail.error("SELECT current_setting('pg_email.dashboard_password')")
            assert code == "42501", code
            shown = mail.all("SELECT setting FROM pg_settings WHERE name = 'pg_email.dashboard_password'")
            assert PASSWORD not in repr(shown), shown
        finally:
            mail.all("RESET ROLE")
    finally:
        mail.all(f"DROP ROLE {role}")


def test_the_page_in_chromium_shows_what_email_stats_says(dash, figures, mail):
    # The page the listener serves now shows the figures (polled, should it cache them).
    today = str(utc_today())
    expected = {}

    def page_is_current():
        source = get(authorization=ADMIN)
        if source.status != 200:
            return False
        doc = parse(source.text())
        days = daily_window(doc)
        expected.clear()
        expected.update(stats_by_day(mail, days[0], days[-1]))
        totals = {m: sum(d[m] for d in expected.values()) for m in METRICS}
        return all(metric(doc, m, "30d") == totals[m] for m in METRICS)

    wait_until(page_is_current, "the dashboard to show the 30-day totals of email.stats", SLOW, every=0.5)

    with AuthProxy(ADMIN) as proxy:
        dom = dump_dom(proxy.url + "/dashboard")
    assert proxy.seen, "chromium made no request"
    assert [(a.method, a.path, a.status) for a in proxy.seen] == [("GET", "/dashboard", 200)], \
        f"the browser loaded more than the page: {[(a.method, a.path, a.status) for a in proxy.seen]}"
    answer = proxy.seen[0]
    assert (answer.header("Content-Type") or "").lower().startswith("text/html"), answer.headers
    check_csp(answer)
    assert "no-store" in (answer.header("Cache-Control") or "").lower(), answer.headers

    doc = parse(dom)
    check_self_contained(doc, "the DOM")
    check_self_contained(parse(answer.text()), "the page's source")
    assert not re.search(r"<\s*script", answer.text(), re.I)

    days = daily_window(doc)
    assert days[-1] in (today, str(utc_today())), f"the daily chart ends {days[-1]}, not today (UTC) {today}"
    by_day = stats_by_day(mail, days[0], days[-1])
    assert by_day == expected, "email.stats changed while the browser ran"
    totals = {m: sum(d[m] for d in by_day.values()) for m in METRICS}
    assert totals == FIXTURE_COUNTS, f"email.stats sums {totals}, the fixture's messages make {FIXTURE_COUNTS}"

    daily, hourly = series(doc, "daily"), series(doc, "hourly")
    assert len(hourly["sent"]) == 24, [b for b, _ in hourly["sent"]]
    assert len({b for b, _ in hourly["sent"]}) == 24, "hourly buckets repeat"
    zero = dict.fromkeys(METRICS, 0)
    for m in METRICS:
        assert metric(doc, m, "30d") == totals[m], (m, metric(doc, m, "30d"), totals[m])
        assert sum(v for _, v in daily[m]) == totals[m], (m, daily[m])
        assert [v for _, v in daily[m]] == [by_day.get(d, zero)[m] for d in days], (m, daily[m], by_day)
        # Every event is minutes old: the last 24 hours hold them all.
        assert metric(doc, m, "24h") == totals[m], (m, metric(doc, m, "24h"), totals[m])
        assert sum(v for _, v in hourly[m]) == totals[m], (m, hourly[m])
    for m, key in RATES.items():
        for window in ("24h", "30d"):
            el = doc.one(data_rate=key, data_window=window)
            assert abs(float(el.attrs["data-value"]) - totals[m] / totals["sent"]) < 1e-9, (key, window, el)

    assert doc.one(data_field="database").text().strip() == mail.val("SELECT current_database()")
    workers = int(mail.val("SHOW pg_email.workers"))
    assert int(doc.one(data_field="delivery_running").attrs["data-value"]) == workers
    assert int(doc.one(data_field="listener_running").attrs["data-value"]) == 1


def test_screenshots_desktop_and_phone(dash, figures):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    with AuthProxy(ADMIN) as proxy:
        for name, (width, height) in WINDOWS.items():
            path = os.path.join(SCREENSHOTS, name)
            screenshot(proxy.url + "/dashboard", path, width, height)
            w, h, size = png_info(path)
            assert (w, h) == (width, height), f"{path} is {w}x{h}, the window {width}x{height}"
            assert size > 10 * 1024, f"{path} has only {size} bytes: a blank page?"
    assert {(a.path, a.status) for a in proxy.seen} == {("/dashboard", 200)}, \
        [(a.method, a.path, a.status) for a in proxy.seen]


def check_no_data(answer, figures, what):
    body = answer.text()
    for hook in ("data-metric", "data-chart", "data-series", "data-failure", "data-field", "data-value"):
        assert hook not in body, f"{what}: the 401 page holds {hook}"
    for address in figures.recipients.values():
        assert address not in body and address.split("@")[0] not in body, f"{what}: the 401 page names {address}"
    assert TOKEN not in body, f"{what}: the 401 page holds a failure's response"
    assert not re.search(r"\bmail\b", body), f"{what}: the 401 page names the database `mail`"


def test_wrong_or_missing_credentials_get_401_and_no_data(dash, figures):
    for what, auth in [("no Authorization", None),
                       ("a wrong password", basic("admin", "wrong")),
                       ("the password with one more character", basic("admin", PASSWORD + "x")),
                       ("the password cut short", basic("admin", PASSWORD[:-1])),
                       ("an empty password", basic("admin", "")),
                       ("another user", basic("root", PASSWORD)),
                       ("no colon", "Basic " + base64.b64encode(f"admin{PASSWORD}".encode()).decode()),
                       ("not base64", "Basic !!!not-base64!!!"),
                       ("another scheme", f"Bearer {PASSWORD}")]:
        r = get(authorization=auth)
        assert r.status == 401, (what, r.status, r.body[:300])
        challenge = r.header("WWW-Authenticate") or ""
        assert re.match(r"(?i)basic\s+realm=", challenge), (what, challenge)
        check_csp(r)
        check_no_data(r, figures, what)
    # the right credentials still work
    assert get(authorization=ADMIN).status == 200
    # a browser that is refused gets no page: Chromium shows nothing of it
    with AuthProxy(basic("admin", "wrong")) as proxy:
        dom = chromium(proxy.url + "/dashboard", "--dump-dom")
    tried = [(a.path, a.status) for a in proxy.seen]
    assert ("/dashboard", 401) in tried and all(st == 401 for path, st in tried if path == "/dashboard"), tried
    assert "data-metric" not in dom and TOKEN not in dom


def test_hostile_responses_are_shown_as_text(dash, figures, smtp, mail):
    """A remote server's refusal and a provider's bounce reason full of HTML: the page's source
    has them escaped, the DOM Chromium built has no element or attribute of theirs, and the
    failures table shows their text."""
    blocked = addr("dash-blocked")
    smtp.set_reject({blocked: f"554 5.7.1 {BLOCK_HOSTILE}"})
    m5 = send(mail, SMTP_TRANSPORT, recipients=blocked)
    wait_status(mail, m5, "failed", timeout=SLOW)
    responses = dict(mail.all("SELECT message_id, response FROM email.receipts WHERE message_id = ANY(%s) "
                              "AND event IN ('bounced', 'failed') AND response LIKE %s",
                              [figures.mids["m3"], figures.mids["m4"], m5], f"%{TOKEN}%"))
    assert set(responses) == {figures.mids["m3"], figures.mids["m4"], m5}, responses

    wait_until(lambda: f'data-failure="{m5}"' in get(authorization=ADMIN).text(),
               f"message {m5} among the dashboard's failures", SLOW, every=0.5)
    source = get(authorization=ADMIN).text()
    assert not re.search(r"<\s*(script|iframe|svg\s+onload|img\s+src=x)", source, re.I), "hostile markup in the page"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in source
    assert "\u202e" not in source and "\x07" not in source, "a bidi override or a control character was sent as is"

    with AuthProxy(ADMIN) as proxy:
        dom = dump_dom(proxy.url + "/dashboard")
    doc = parse(dom)
    assert not doc.find_all("script"), "a script element in the DOM"
    check_self_contained(doc, "the DOM with hostile failures")
    for name, mid in (("m3", figures.mids["m3"]), ("m4", figures.mids["m4"]), ("m5", m5)):
        row = doc.one("tr", data_failure=str(mid))
        shown = row.one("td", data_field="response").text()
        # The text shown is the response (cut at 300 characters, with a visible marker).
        expected = responses[mid].replace("\u202e", "\ufffd").replace("\u202c", "\ufffd").replace("\x07", "\u2407")
        assert TOKEN in shown and expected[:120] in shown, (name, shown, responses[mid])
        rcpt = row.one("td", data_field="recipient").text()
        assert (blocked if name == "m5" else figures.recipients[name]) in rcpt, (name, rcpt)


def test_resetting_the_password_closes_the_dashboard_again(dash, mail):
    set_password(mail, None)
    r = get(authorization=ADMIN)
    assert r.status == 404 and b"data-metric" not in r.body, (r.status, r.body[:300])
