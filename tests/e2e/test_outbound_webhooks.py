"""Outbound webhooks end to end (DESIGN.md "Events out", issue #13): receipts of messages sent
through the consent tests' capture:// transport (CAP) queue deliveries in email.webhook_deliveries,
and the delivery workers POST them to a local receiver (`Receiver`: a threaded HTTP server on
127.0.0.1) that checks every request with the PyPI `standardwebhooks` package (an independent
implementation of Standard Webhooks) and answers as its script says: 200, 500 then 200, 410, a 302,
or never.

Every test lists 127.0.0.1 in pg_email.webhook_allow_hosts (ALTER SYSTEM + reload, reset at
teardown; test 6 resets it itself) and removes every webhook it added at teardown, so the
deliveries of other modules' receipts are not affected.

Contract details these tests take as given beyond DESIGN.md (see /var/tmp/wip13/CONTRACT.md):
  - webhook-id is `msg_<email.webhook_deliveries.id>`, the same on every attempt of a delivery.
  - The body's `data` has exactly the keys message_id, receipt_id, rfc_message_id, recipient,
    transport, tags, metadata, smtp_code, enhanced_code, response, bounce_type, url; rfc_message_id
    is email.messages.message_id as stored; tags [] and metadata {} when the message has none;
    `timestamp` is RFC 3339 UTC with milliseconds; the recipient of a delivered/opened/clicked
    event is the bare address; the click's url is the link's URL. Content-Type is
    application/json.
  - response_status is recorded for failed attempts too (a 302 leaves 302); last_error names the
    answer ("302" in it), a refused connection ("refused"), the allow-list refusal ("127.0.0.1"
    and "loopback" or "webhook_allow_hosts"), a timeout ("timed out" or "timeout").
  - A 410 fails the delivery after that one attempt and disables the webhook (enabled = false,
    disabled_at set, disabled_because containing "410") in one go.
  - The delivery workers apply a reload of pg_email.webhook_allow_hosts / webhook_timeout within
    CONF_SETTLE seconds after a new backend shows the new value (they take SIGHUP between slices).
    The allow list is judged at each attempt, so listing the host later lets a refused delivery
    through.
  - A click on a tracked link answers a 3xx; an open and a click each store one receipt.
The only timing assertion is test 7's (ratio of drain rates >= 0.5, both printed)."""
import email
import email.policy
import http.client
import json
import re
import selectors
import socket
import statistics
import threading
import time
import uuid
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks

from conftest import SLOW, fresh, send, val_retry, wait_status, wait_until
from test_consent import CAP, addr, cap, deliver, ingest_sg, listener, sendgrid, sg_event  # noqa: F401 (fixtures)
from test_tracking import http as listener_http
from test_tracking import path_of

ALLOW = "pg_email.webhook_allow_hosts"
TIMEOUT = "pg_email.webhook_timeout"
# How long after a reload the delivery workers are given to apply it (no timing is asserted).
CONF_SETTLE = 2.0
DATA_KEYS = {"message_id", "receipt_id", "rfc_message_id", "recipient", "transport", "tags", "metadata",
             "smtp_code", "enhanced_code", "response", "bounce_type", "url"}
RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


# ---------------------------------------------------------------------------------------------
# The receiver


class Req:
    """One request the receiver got: when, what, whether it verified, and how it was answered."""

    def __init__(self, at, method, path, headers, body):
        self.at, self.method, self.path, self.headers, self.body = at, method, path, headers, body
        self.webhook_id = headers.get("webhook-id")
        self.nth = 0  # 1 for the first arrival of this webhook-id, 2 for the second, ...
        self.payload = None  # the verified JSON body
        self.error = None  # why it did not verify
        self.answered = None  # the status sent back (None: never answered)

    @property
    def data(self):
        return (self.payload or {}).get("data") or {}

    def __repr__(self):
        return (f"<Req {self.method} {self.path} id={self.webhook_id} #{self.nth} answered={self.answered} "
                f"error={self.error} body={self.body[:300]!r}>")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a webhook client expects

    def log_message(self, *args):
        pass

    def _body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _any(self):
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.receiver._handle(self, body, headers)

    do_POST = do_GET = do_PUT = do_HEAD = do_DELETE = _any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class Receiver:
    """A local webhook endpoint. `mode` says how to answer each request, by the how-manyth arrival
    (`n`, from 1) of its webhook-id:
      'ok'           200
      'fail-then-ok' 500 for n = 1, then 200
      '410'          410 Gone
      '302'          302 Found with Location: `location`
      'hang'         never answers (the connection is held until stop())
      a callable     f(req, n) -> status or (status, {header: value})
    A request that does not verify with `secret` (set it as soon as email.add_webhook returns it)
    is recorded with its error and answered 400. `port` 0 picks a free port."""

    def __init__(self, mode="ok", port=0, location=None, secret=None):
        self.mode, self.location, self.secret = mode, location, secret
        self._lock = threading.Lock()
        self._reqs = []
        self._seen = {}
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.receiver = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._started = False

    def start(self):
        self._thread.start()
        self._started = True
        return self

    def stop(self):
        self._stop.set()
        if self._started:
            self._server.shutdown()
            self._started = False
        self._server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    # -- what was received --

    @property
    def requests(self):
        with self._lock:
            return list(self._reqs)

    def errors(self):
        return [r for r in self.requests if r.error is not None]

    def by_id(self):
        """{webhook-id: [requests in arrival order]}."""
        out = {}
        for r in self.requests:
            out.setdefault(r.webhook_id, []).append(r)
        return out

    def for_message(self, mid):
        """The verified requests about message `mid`."""
        return [r for r in self.requests if r.payload is not None and r.data.get("message_id") == mid]

    # -- answering --

    def _answer(self, req, n):
        if req.error is not None:
            return 400, {}
        m = self.mode
        if callable(m):
            got = m(req, n)
            return got if isinstance(got, tuple) else (got, {})
        if m == "ok":
            return 200, {}
        if m == "fail-then-ok":
            return (500, {}) if n == 1 else (200, {})
        if m == "410":
            return 410, {}
        if m == "302":
            return 302, {"Location": self.location}
        if m == "hang":
            return None, {}
        raise AssertionError(f"unknown receiver mode {m!r}")

    def _handle(self, handler, body, headers):
        req = Req(time.time(), handler.command, handler.path, headers, body)
        try:
            if not self.secret:
                raise standardwebhooks.webhooks.WebhookVerificationError("the receiver has no secret yet")
            req.payload = standardwebhooks.Webhook(self.secret).verify(body, headers)
        except Exception as e:  # noqa: BLE001 (any failure to verify is recorded)
            req.error = f"{type(e).__name__}: {e}"
        with self._lock:
            n = self._seen[req.webhook_id] = self._seen.get(req.webhook_id, 0) + 1
            req.nth = n
            status, extra = self._answer(req, n)
            req.answered = status
            self._reqs.append(req)
        if status is None:  # 'hang': hold the connection, never answer
            self._stop.wait()
            handler.close_connection = True
            return
        out = b"" if status in (204, 304) else json.dumps({"status": status, "error": req.error}).encode()
        handler.send_response(status)
        for k, v in extra.items():
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(out)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(out)


class Blackhole:
    """Accepts TCP connections and never answers: it reads and drops whatever arrives and closes a
    connection only when the other side does (or at stop())."""

    def __init__(self, port=0):
        self._sock = socket.create_server(("127.0.0.1", port), backlog=256)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._accepted = 0
        self._open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def accepted(self):
        with self._lock:
            return self._accepted

    @property
    def open(self):
        with self._lock:
            return self._open

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        conns = set()
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    if key.fileobj is self._sock:
                        try:
                            c, _ = self._sock.accept()
                        except BlockingIOError:
                            continue
                        c.setblocking(False)
                        sel.register(c, selectors.EVENT_READ)
                        conns.add(c)
                        with self._lock:
                            self._accepted += 1
                            self._open += 1
                    else:
                        c = key.fileobj
                        try:
                            data = c.recv(65536)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            sel.unregister(c)
                            conns.discard(c)
                            c.close()
                            with self._lock:
                                self._open -= 1
        finally:
            for c in conns:
                c.close()
            sel.close()
            self._sock.close()


def free_port():
    """A port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Cluster settings, webhooks and their deliveries


Delivery = namedtuple("Delivery", "id event status attempts response_status last_error sent_at receipt_id message_id")


def deliveries(db, name, mid=None):
    """The deliveries of webhook `name` (of message `mid`'s receipts when given), oldest first."""
    return [Delivery(*r) for r in db.all(
        "SELECT d.id, r.event::text, d.status, d.attempts, d.response_status, d.last_error, d.sent_at, r.id, r.message_id "
        "FROM email.webhook_deliveries d JOIN email.receipts r ON r.id = d.receipt_id "
        "WHERE d.webhook = %s AND (%s::bigint IS NULL OR r.message_id = %s) ORDER BY d.id", name, mid, mid)]


def one_delivery(db, name, mid):
    rows = deliveries(db, name, mid)
    assert len(rows) <= 1, f"expected at most one delivery of {name} for message {mid}: {rows}"
    return rows[0] if rows else None


def wait_for(probe, what, timeout=SLOW, every=0.1):
    """Polls probe() -> (done, state) until done; on timeout the AssertionError shows the last state."""
    deadline = time.monotonic() + timeout
    while True:
        done, state = probe()
        if done:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last state: {state}")
        time.sleep(every)


class Env:
    """What a test configured: webhooks, servers, settings; undone by close()."""

    def __init__(self, db):
        self.db = db
        self.webhooks = []
        self.servers = []
        self.settings = set()

    def set(self, name, value):
        self.settings.add(name)
        d = fresh()
        try:
            d.all(f"ALTER SYSTEM SET {name} = %s", value)
            d.all("SELECT pg_reload_conf()")
        finally:
            d.conn.close()
        wait_until(lambda: val_retry(f"SHOW {name}") == value, f"{name} to be {value!r}", SLOW, every=0.1)
        time.sleep(CONF_SETTLE)

    def reset(self, name, settle=True):
        d = fresh()
        try:
            d.all(f"ALTER SYSTEM RESET {name}")
            d.all("SELECT pg_reload_conf()")
        finally:
            d.conn.close()
        wait_until(lambda: val_retry("SELECT source FROM pg_settings WHERE name = %s", name) == "default",
                   f"{name} to be back to its default", SLOW, every=0.1)
        if settle:
            time.sleep(CONF_SETTLE)

    def webhook(self, url, events=None):
        """Adds a webhook with a new name; returns (name, secret)."""
        name = f"ow-{uuid.uuid4().hex[:10]}"
        self.webhooks.append(name)
        secret = self.db.val("SELECT email.add_webhook(%s, %s, %s::text[])", name, url, events)
        assert secret and secret.startswith("whsec_"), secret
        return name, secret

    def receiver(self, *args, **kw):
        r = Receiver(*args, **kw).start()
        self.servers.append(r)
        return r

    def blackhole(self):
        b = Blackhole().start()
        self.servers.append(b)
        return b

    def close(self):
        try:
            d = fresh()
            try:
                for name in self.webhooks:
                    d.val("SELECT email.remove_webhook(%s)", name)
            finally:
                d.conn.close()
        finally:
            try:
                for s in self.servers:
                    s.stop()
            finally:
                for name in sorted(self.settings):
                    self.reset(name, settle=False)


@pytest.fixture
def env(mail, cap):
    e = Env(mail)
    try:
        e.set(ALLOW, "127.0.0.1")
        yield e
    finally:
        e.close()


def hooked(env, mode="ok", events=("sent",), **kw):
    """A started receiver and a webhook to it (its secret given to the receiver): (receiver, name)."""
    rec = env.receiver(mode, **kw)
    name, secret = env.webhook(rec.url, list(events) if events is not None else None)
    rec.secret = secret
    return rec, name


def sent_message(db, **kw):
    """A message through CAP, waited for until it is sent; its id."""
    mid = send(db, CAP, recipients=addr("outbound"), **kw)
    wait_status(db, mid, "sent", timeout=SLOW)
    return mid


# ---------------------------------------------------------------------------------------------
# The receiver alone (no cluster): the harness the tests below rely on


def _post(port, body, headers, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/hook", body=body, headers=headers)
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        c.close()


def _signed(secret, msg_id, body, ts=None):
    from datetime import datetime, timezone

    ts = int(time.time()) if ts is None else ts
    sig = standardwebhooks.Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=timezone.utc), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig,
            "Content-Type": "application/json"}


def test_the_receiver_verifies_and_follows_its_script():
    import base64
    import os

    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    body = json.dumps({"type": "email.sent", "timestamp": "2026-01-01T00:00:00.000Z",
                       "data": {"message_id": 7, "receipt_id": 9}}).encode()
    servers = []
    try:
        ok = Receiver("ok", secret=secret).start()
        servers.append(ok)
        assert _post(ok.port, body, _signed(secret, "msg_1", body))[0] == 200
        bad = _signed(secret, "msg_2", body)
        bad["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
        assert _post(ok.port, body, bad)[0] == 400
        old = _signed(secret, "msg_3", body, ts=int(time.time()) - 3600)
        assert _post(ok.port, body, old)[0] == 400
        assert _post(ok.port, body + b" ", _signed(secret, "msg_4", body))[0] == 400
        reqs = ok.requests
        assert [r.webhook_id for r in reqs] == ["msg_1", "msg_2", "msg_3", "msg_4"]
        assert reqs[0].payload == json.loads(body) and reqs[0].error is None and reqs[0].answered == 200
        assert reqs[0].data["message_id"] == 7 and ok.for_message(7) == [reqs[0]]
        assert all(r.error and r.payload is None and r.answered == 400 for r in reqs[1:]), reqs
        assert len(ok.errors()) == 3

        flaky = Receiver("fail-then-ok", secret=secret).start()
        servers.append(flaky)
        h = _signed(secret, "msg_10", body)
        assert [_post(flaky.port, body, h)[0] for _ in range(3)] == [500, 200, 200]
        assert [(r.nth, r.answered) for r in flaky.by_id()["msg_10"]] == [(1, 500), (2, 200), (3, 200)]
        assert _post(flaky.port, body, _signed(secret, "msg_11", body))[0] == 500

        gone = Receiver("410", secret=secret).start()
        servers.append(gone)
        assert _post(gone.port, body, _signed(secret, "msg_20", body))[0] == 410

        moved = Receiver("302", location=ok.url, secret=secret).start()
        servers.append(moved)
        st, hs, _ = _post(moved.port, body, _signed(secret, "msg_30", body))
        assert st == 302 and hs["location"] == ok.url
        assert len(ok.requests) == 4  # http.client follows nothing either

        scripted = Receiver(lambda req, n: (503, {"Retry-After": "1"}) if n < 3 else 204, secret=secret).start()
        servers.append(scripted)
        h = _signed(secret, "msg_40", body)
        assert [_post(scripted.port, body, h)[0] for _ in range(3)] == [503, 503, 204]

        # A receiver started later on a port chosen before (test 3), and one that hangs.
        port = free_port()
        with pytest.raises(ConnectionRefusedError):
            _post(port, body, _signed(secret, "msg_50", body))
        late = Receiver("ok", port=port, secret=secret).start()
        servers.append(late)
        assert _post(port, body, _signed(secret, "msg_50", body))[0] == 200
        hang = Receiver("hang", secret=secret).start()
        servers.append(hang)
        with pytest.raises(TimeoutError):
            _post(hang.port, body, _signed(secret, "msg_60", body), timeout=1)
        assert [(r.webhook_id, r.answered, r.error) for r in hang.requests] == [("msg_60", None, None)]

        hole = Blackhole().start()
        servers.append(hole)
        with pytest.raises(TimeoutError):
            _post(hole.port, body, _signed(secret, "msg_70", body), timeout=1)
        wait_until(lambda: hole.accepted == 1 and hole.open == 0, "the blackhole to see the connection close", 10)
        held = [socket.create_connection(("127.0.0.1", hole.port), timeout=5) for _ in range(20)]
        wait_until(lambda: hole.accepted == 21 and hole.open == 20, "the blackhole to hold 20 connections", 10)
        for s in held:
            s.close()
    finally:
        for s in servers:
            s.stop()


# ---------------------------------------------------------------------------------------------
# 1. sent, delivered, opened, clicked: four signed deliveries


LINK = "https://example.org/welcome?x=1&y=2"


def test_sent_delivered_opened_clicked_arrive_signed_with_stable_ids(env, mail, sendgrid, listener):
    rec, name = hooked(env, events=("sent", "delivered", "opened", "clicked"))
    rcpt = addr("hook4")
    tag = f"ow-{uuid.uuid4().hex[:6]}"
    sent = deliver(mail, [rcpt], body="hello", html=f'<p>Hello <a href="{LINK.replace("&", "&amp;")}">read</a></p>',
                   track_opens=True, track_clicks=True, tags=[tag], metadata=json.dumps({"order": 42}))
    mid = sent.mid
    assert ingest_sg(mail, sendgrid, [sg_event("delivered", rcpt, mid=mid)]) == 1
    page = email.message_from_bytes(sent.raw, policy=email.policy.default).get_body(("html",)).get_content()
    pixel = re.search(r'src="([^"]*/o/[^"]+)"', page)
    click = re.search(r'href="([^"]*/c/[^"]+)"', page)
    assert pixel and click, page
    time.sleep(2.5)  # later than the 2 s in which hits count as machine ones: a person's open and click
    assert listener_http("GET", path_of(pixel.group(1))).status == 200
    answer = listener_http("GET", path_of(click.group(1)))
    assert 300 <= answer.status < 400, answer

    def probe():
        rows = deliveries(mail, name, mid)
        done = len(rows) == 4 and all(r.status == "sent" for r in rows)
        return done, (rows, rec.requests)

    rows, _ = wait_for(probe, "four deliveries of the message to be sent")
    assert rec.errors() == [], rec.errors()
    got = rec.for_message(mid)
    assert len(got) == 4, got
    assert sorted(r.payload["type"] for r in got) == sorted(["email.sent", "email.delivered", "email.opened", "email.clicked"])
    assert sorted(r.event for r in rows) == sorted(["sent", "delivered", "opened", "clicked"])
    ids = [r.webhook_id for r in got]
    assert len(set(ids)) == 4, ids
    by_id = {f"msg_{r.id}": r for r in rows}
    assert set(ids) == set(by_id), (ids, rows)
    receipts = dict(mail.all("SELECT id, event::text FROM email.receipts WHERE message_id = %s", mid))
    for req in got:
        row = by_id[req.webhook_id]
        p, d = req.payload, req.data
        assert set(p) == {"type", "timestamp", "data"}, p
        assert p["type"] == f"email.{row.event}", (p, row)
        assert RFC3339_MS.match(p["timestamp"]), p
        assert set(d) == DATA_KEYS, d
        assert d["message_id"] == mid and d["receipt_id"] == row.receipt_id and receipts[row.receipt_id] == row.event, (d, row)
        assert d["rfc_message_id"] == sent.rfc_id, d
        assert d["tags"] == [tag] and d["metadata"] == {"order": 42}, d
        if row.event != "sent":
            assert d["recipient"] == rcpt, d
        assert d["url"] == (LINK if row.event == "clicked" else None), d
        assert req.method == "POST" and req.answered == 200 and req.nth == 1, req
        assert req.headers.get("content-type", "").startswith("application/json"), req.headers
        assert abs(int(req.headers["webhook-timestamp"]) - req.at) < 300, req.headers
    for r in rows:
        assert r.status == "sent" and r.response_status == 200 and r.sent_at is not None, r
    # Exactly four: nothing else about this message reached the receiver.
    assert len([r for r in rec.requests if r.data.get("message_id") == mid]) == 4


# ---------------------------------------------------------------------------------------------
# 2. 500, then 200: the same delivery again


def test_a_500_is_retried_with_the_same_webhook_id(env, mail):
    rec, name = hooked(env, "fail-then-ok")
    mid = sent_message(mail)
    row = wait_for(lambda: ((r := one_delivery(mail, name, mid)) is not None and r.status == "sent", r),
                   "the delivery to be sent after a retry")
    wid = f"msg_{row.id}"
    tries = rec.by_id().get(wid, [])
    assert [(t.nth, t.answered) for t in tries] == [(1, 500), (2, 200)], rec.requests
    assert all(t.error is None for t in tries), tries
    assert tries[0].payload == tries[1].payload, (tries[0].payload, tries[1].payload)
    assert tries[1].data["message_id"] == mid and tries[1].payload["type"] == "email.sent"
    assert row.attempts == 2 and row.response_status == 200 and row.sent_at is not None, row
    assert rec.errors() == []


# ---------------------------------------------------------------------------------------------
# 3. The receiver is down, then up


def test_deliveries_wait_for_a_receiver_that_is_down(env, mail):
    """The receiver is down for 30 s: every delivery keeps being retried (connection refused),
    then all of them arrive, each once, when it is back."""
    port = free_port()
    name, secret = env.webhook(f"http://127.0.0.1:{port}/hook", ["sent"])
    mids = [sent_message(mail) for _ in range(3)]
    started = time.monotonic()

    def all_refused_twice():
        rows = [one_delivery(mail, name, m) for m in mids]
        ok = all(r is not None and r.attempts >= 2 and "refused" in (r.last_error or "").lower() for r in rows)
        return ok, rows

    down = wait_for(all_refused_twice, "two refused attempts of every delivery while the receiver is down")
    for r in down:
        assert r.status == "queued" and r.response_status is None and r.sent_at is None, r
    time.sleep(max(0.0, 30 - (time.monotonic() - started)))
    still = [one_delivery(mail, name, m) for m in mids]
    assert all(r.status == "queued" for r in still), still
    print(f"receiver down 30 s: attempts {[r.attempts for r in still]}, last_error {still[0].last_error!r}")
    rec = env.receiver("ok", port=port, secret=secret)

    def all_sent():
        rows = [one_delivery(mail, name, m) for m in mids]
        return all(r is not None and r.status == "sent" for r in rows), rows

    rows = wait_for(all_sent, "every delivery to arrive once the receiver is up")
    for r, before in zip(rows, still):
        assert r.attempts > before.attempts and r.response_status == 200, r
    got = rec.requests
    assert sorted((r.webhook_id, r.answered) for r in got) == sorted((f"msg_{r.id}", 200) for r in rows), got
    for r in got:
        assert r.error is None and r.payload["type"] == "email.sent" and r.data["message_id"] in mids, r


# ---------------------------------------------------------------------------------------------
# 4. 410 disables the webhook


def test_a_410_fails_the_delivery_and_disables_the_webhook(env, mail):
    rec, name = hooked(env, "410")
    mid = sent_message(mail)

    def probe():
        r = one_delivery(mail, name, mid)
        w = mail.one("SELECT enabled, disabled_at, disabled_because FROM email.webhooks WHERE name = %s", name)
        return r is not None and r.status == "failed" and w is not None and w[0] is False, (r, w)

    row, (enabled, disabled_at, because) = wait_for(probe, "the delivery to fail and the webhook to be disabled")
    assert row.response_status == 410 and row.attempts == 1 and row.sent_at is None, row
    assert disabled_at is not None and "410" in (because or ""), (disabled_at, because)
    got = rec.requests
    assert [(r.webhook_id, r.answered, r.error) for r in got] == [(f"msg_{row.id}", 410, None)], got
    # Later events of every kind it subscribed to queue nothing for it.
    later = sent_message(mail)
    assert deliveries(mail, name, later) == []
    assert [d.id for d in deliveries(mail, name)] == [row.id]
    assert len(rec.requests) == 1


# ---------------------------------------------------------------------------------------------
# 5. A 302 is not followed


def test_a_302_is_a_failed_attempt_and_is_not_followed(env, mail):
    other = env.receiver("ok")
    rec, name = hooked(env, "302", location=other.url)
    other.secret = rec.secret
    mid = sent_message(mail)
    row = wait_for(lambda: ((r := one_delivery(mail, name, mid)) is not None and r.attempts >= 2, r),
                   "two attempts answered 302")
    assert row.response_status == 302 and row.status in ("queued", "failed") and row.sent_at is None, row
    assert "302" in (row.last_error or ""), row
    got = rec.requests
    assert len(got) >= 2 and {r.webhook_id for r in got} == {f"msg_{row.id}"}, got
    assert all(r.error is None and r.answered == 302 for r in got), got
    assert other.requests == [], other.requests


# ---------------------------------------------------------------------------------------------
# 6. Loopback is refused without the allow list


def test_loopback_is_refused_unless_allowed(env, mail):
    env.reset(ALLOW)
    rec, name = hooked(env, "ok")
    mid = sent_message(mail)
    row = wait_for(lambda: ((r := one_delivery(mail, name, mid)) is not None and r.attempts >= 2
                            and r.last_error is not None, r),
                   "two refused attempts")
    err = row.last_error
    print(f"refused: {err!r}")
    assert "127.0.0.1" in err and ("loopback" in err or "webhook_allow_hosts" in err), row
    assert row.status == "queued" and row.response_status is None and row.sent_at is None, row
    assert rec.requests == [], rec.requests
    # Each attempt judges the URL anew: listed now, the same delivery goes through.
    env.set(ALLOW, "127.0.0.1")
    row = wait_for(lambda: ((r := one_delivery(mail, name, mid)) is not None and r.status == "sent", r),
                   "the delivery to go through once 127.0.0.1 is listed")
    got = rec.requests
    assert [(r.webhook_id, r.answered, r.error) for r in got] == [(f"msg_{row.id}", 200, None)], got


# ---------------------------------------------------------------------------------------------
# 7. A hanging endpoint does not slow mail


N = 1000
REPS = 3


def drain(db, n, tag):
    """Queues n messages to CAP in one statement and waits until all are sent. Returns (rate,
    seconds): seconds from the enqueue's created_at to the last sent_at, by the server's clock (so
    the test's polling does not count); the wall time is printed next to it."""
    t0 = time.monotonic()
    ids = db.val("SELECT array_agg(email.send(recipients => 'drain-' || i || %s, subject => %s, body => 'x', "
                 "transport => %s)) FROM generate_series(1, %s) i", f"-{tag}@example.test", f"drain {tag}", CAP, n)

    def probe():
        counts = dict(db.all("SELECT status::text, count(*) FROM email.messages WHERE id = ANY(%s) GROUP BY 1", ids))
        bad = {k: v for k, v in counts.items() if k not in ("queued", "sending", "sent")}
        assert not bad, f"messages of drain {tag} ended otherwise than sent: {counts}"
        return counts.get("sent", 0) == n, counts

    wait_for(probe, f"{n} messages of drain {tag} to be sent", every=0.02)
    wall = time.monotonic() - t0
    secs = db.val("SELECT extract(epoch FROM max(sent_at) - min(created_at))::float8 FROM email.messages WHERE id = ANY(%s)",
                  ids)
    secs = wall if secs is None or secs <= 0 else secs
    print(f"  drain {tag}: {n} in {secs * 1000:.0f} ms (server clock), {wall * 1000:.0f} ms wall: {n / secs:.0f} msg/s")
    return n / secs, secs


def test_a_hanging_endpoint_does_not_slow_mail(env, empty_outbox):
    mail = empty_outbox
    env.set(TIMEOUT, "3s")
    drain(mail, 20, "warm-base")
    base = [drain(mail, N, f"base{i}")[0] for i in range(REPS)]
    hole = env.blackhole()
    name, _ = env.webhook(hole.url, None)  # every event
    drain(mail, 20, "warm-hung")
    wait_until(lambda: hole.open >= 1, "the webhook workers to hang on the blackhole", SLOW, every=0.05)
    hung = [drain(mail, N, f"hung{i}")[0] for i in range(REPS)]
    b, h = statistics.median(base), statistics.median(hung)
    print(f"mail drain of {N} via capture: {b:.0f} msg/s without a webhook, {h:.0f} msg/s while a webhook hangs "
          f"(ratio {h / b:.2f}); blackhole: {hole.accepted} connections accepted, {hole.open} open")
    # The endpoint really hung while mail was measured, and nothing it got was counted as sent.
    assert hole.accepted >= 1
    rows = deliveries(mail, name)
    assert len(rows) >= 20 + REPS * N and not [r for r in rows if r.status == "sent"], rows[:5]
    timed_out = wait_for(lambda: ((r := [d for d in deliveries(mail, name) if d.attempts >= 1 and d.last_error])[:1] != [], r[:1]),
                         "a delivery to the blackhole to time out")[0]
    assert "timed out" in timed_out.last_error.lower() or "timeout" in timed_out.last_error.lower(), timed_out
    assert timed_out.response_status is None, timed_out
    assert h / b >= 0.5, f"mail drained at {h:.0f} msg/s while a webhook hung, {b:.0f} msg/s without (ratio {h / b:.2f})"
