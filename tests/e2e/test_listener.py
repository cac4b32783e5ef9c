"""The listener (DESIGN.md "The listener"): the HTTP worker `pg_email listener` of database `mail`
on LISTEN_URL. Part of `make test`, so CI runs it.

    plain HTTP      /health 200 "ok", unknown paths 404, a wrong method 405, keep-alive, HTTP/1.0,
                    malformed requests refused without harm
    limits          1 MB + 1 body 413 (Content-Length and chunked); slowloris headers and a slow
                    body are cut off while /health keeps being answered; 600 idle connections
                    neither stop /health nor stay open
    hostile input   per provider route, 1,000 generated bodies, signed with the transport's key
                    (so the parsers really run) and unsigned: only 200, 4xx or 503, never a
                    dropped connection, no restart
    ack after commit  a locked email.receipts gives 503 and stores nothing, the retry 200 and
                    stores once; kill -9 of the listener under load loses no acknowledged event
    life cycle      worker_status and pg_stat_activity show it; SIGHUP keeps it; SIGTERM stops it
                    and the postmaster starts a new one

Webhook signers and payloads come from webhooks.py (independent of pg_email's code). The two
tests that stop the listener come last; the kill -9 one crashes the cluster (the postmaster
restarts every backend) and waits until the delivery workers and the listener are back, as
test_faults.py does. Every wait is generous (a loaded 2-core CI machine) and fails naming what
it waited for; every thread and socket is cleaned up."""
import base64
import collections
import copy
import functools
import hashlib
import hmac
import http.client
import json
import os
import queue
import random
import resource
import select
import selectors
import signal
import socket
import string
import threading
import time
import uuid

import pytest

import webhooks
from conftest import (LISTEN_PORT, LISTEN_URL, SLOW, connect, fresh, server_log, val_retry, wait_for_workers,
                      wait_until, worker_pids)
from webhooks import Mailgun, Msg, Postmark, Resend, SendGrid, Ses, random_msg, raw_post

HOST = "127.0.0.1"
MAX_BODY = 1024 * 1024  # 1 MB: the largest request body a route takes
PROVIDERS = {"sendgrid": SendGrid, "postmark": Postmark, "resend": Resend, "mailgun": Mailgun, "ses": Ses}
# The transports of this module: one per provider, with its webhook options.
BASE_DSN = {
    "sendgrid": "sendgrid+api://SG.listener-test@default",
    "postmark": "postmark+api://listener-test-token@default",
    "resend": "resend+api://re_listener_test@default",
    "mailgun": "mailgun+api://key-listener-test:mg.example.test@default",
    "ses": "ses+api://AKIALISTENERTEST:listener-secret@default?region=eu-west-1",
}
AUTH_REFUSED = {401, 403, 406}  # a missing or bad signature (Mailgun 406, SNS 403)


def transport(provider):
    return f"lsn_{provider}"


def hook_path(provider):
    return f"/webhooks/{transport(provider)}"


# ---------------------------------------------------------------------------------------------
# Small HTTP clients


def request(method, path, body=None, headers=None, timeout=30.0):
    """One request on a new connection; returns (status, body)."""
    conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class Client:
    """A keep-alive connection to the listener. A request that fails on a connection that had
    already served one is tried once more on a new connection (the server may have closed it
    while idle, or after an answer with Connection: close); a failure on a new connection is
    raised."""

    def __init__(self, timeout=60.0):
        self.timeout = timeout
        self.conn = None
        self.used = False
        self.reconnects = 0

    def request(self, method, path, body=None, headers=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=self.timeout)
                self.used = False
                self.reconnects += 1
            reused = self.used
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            self.used = True
            if r.will_close:
                self.close()
            return r.status, data
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None


def _response_complete(data):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(rest) >= int(value.strip())
            except ValueError:
                return False
    return False


def exchange(data, timeout=30.0, until_close=False):
    """Sends raw bytes to the listener while reading what it answers, so that an answer sent
    before the request was read whole is seen even if the server then resets the connection.
    Returns (status or None, bytes received, whether the server closed the connection); stops
    at the first complete response unless until_close, at the server's close, or after
    timeout seconds."""
    sock = socket.create_connection((HOST, LISTEN_PORT), timeout=15)
    sock.setblocking(False)
    sent, got, closed = 0, b"", False
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            writing = sent < len(data)
            r, w, _ = select.select([sock], [sock] if writing else [], [], min(left, 1.0))
            if r:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk == b"":
                    closed = True
                    break
                if chunk:
                    got += chunk
                    if not until_close and _response_complete(got):
                        break
            if w and writing:
                try:
                    sent += sock.send(data[sent:sent + 65536])
                except BlockingIOError:
                    pass
                except OSError:
                    sent = len(data)  # the server stopped reading: keep reading its answer
    finally:
        sock.close()
    status = None
    if got.startswith(b"HTTP/1."):
        try:
            status = int(got.split(b" ", 2)[1])
        except (IndexError, ValueError):
            pass
    return status, got, closed


def health_ok(timeout=5.0):
    try:
        status, body = request("GET", "/health", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200 and body.strip() == b"ok"


def listener_pid():
    """The pid of the running listener (pg_stat_activity), None when there is none."""
    return val_retry("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email listener'")


def wait_listener(timeout=SLOW, other_than=None):
    """Waits until a listener (other than pid other_than) runs and answers /health 200; its pid."""
    found = []

    def up():
        pid = listener_pid()
        if pid is None or pid == other_than or not health_ok():
            return False
        found[:] = [pid]
        return True

    what = "the pg_email listener" + (f" to replace pid {other_than}" if other_than else "") + " to answer /health"
    wait_until(up, what, timeout=timeout, every=0.2)
    return found[0]


def probe_health(alive, every=0.5, timeout=10.0):
    """GET /health on new connections, every `every` seconds while alive(); [(seconds, status or error)]."""
    out = []
    while alive():
        t = time.monotonic()
        try:
            status, _ = request("GET", "/health", timeout=timeout)
        except (OSError, http.client.HTTPException) as e:
            status = repr(e)
        out.append((time.monotonic() - t, status))
        time.sleep(every)
    return out


def check_probes(probes, what):
    assert probes, f"no /health probe ran during {what}"
    bad = [p for p in probes if p[1] != 200]
    assert not bad, f"/health was not answered 200 during {what}: {bad[:10]}"
    slowest = max(s for s, _ in probes)
    # The listener answers /health at once; 5 s leaves room for a loaded CI machine (~2 s expected).
    assert slowest < 5.0, f"/health took {slowest:.1f} s during {what}: held hostage"
    return slowest


class Dripper(threading.Thread):
    """Opens one connection per (first, drip) pair, sends `first` at once and then `drip` one
    byte a second, and notes when the server ends each connection (closed_at, seconds after it
    was opened) and what it sent before (received). Stops when every connection is closed,
    after `limit` seconds, or on stop()."""

    def __init__(self, specs, limit):
        super().__init__(daemon=True, name="dripper")
        self.specs = specs
        self.limit = limit
        self.socks = []
        self.opened = []
        self.closed_at = {}
        self.received = collections.defaultdict(bytes)
        self.error = None
        self._halt = threading.Event()

    def open(self):
        for first, _ in self.specs:
            s = socket.create_connection((HOST, LISTEN_PORT), timeout=15)
            if first:
                s.sendall(first)
            s.setblocking(False)
            self.socks.append(s)
            self.opened.append(time.monotonic())
        return self

    def _read(self, i, s):
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.received[i] += data
        else:
            self.closed_at[i] = time.monotonic() - self.opened[i]

    def run(self):
        try:
            pos = 0
            start = time.monotonic()
            while not self._halt.is_set() and len(self.closed_at) < len(self.socks) \
                    and time.monotonic() - start < self.limit:
                for i, s in enumerate(self.socks):
                    if i in self.closed_at:
                        continue
                    self._read(i, s)
                    drip = self.specs[i][1]
                    if i not in self.closed_at and pos < len(drip):
                        try:
                            s.send(drip[pos:pos + 1])
                        except BlockingIOError:
                            pass
                        except OSError:
                            self.closed_at[i] = time.monotonic() - self.opened[i]
                pos += 1
                tick = time.monotonic() + 1.0
                while time.monotonic() < tick and not self._halt.is_set():
                    for i, s in enumerate(self.socks):
                        if i not in self.closed_at:
                            self._read(i, s)
                    time.sleep(0.1)
        except Exception as e:  # reported by the test
            self.error = e

    def stop(self):
        self._halt.set()
        self.join(30)
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Fixtures

_NEVER_UP = []  # why the listener never came up in this module: the next tests fail at once
_SEEN_UP = []


def first_listener():
    """wait_listener(), failing at once when the listener never came up for an earlier test of
    this module (instead of waiting SLOW seconds again in every test)."""
    if _NEVER_UP:
        pytest.fail(_NEVER_UP[0])
    try:
        pid = wait_listener()
    except AssertionError as e:
        if not _SEEN_UP:
            _NEVER_UP.append(f"the pg_email listener never came up in this module: {e}")
        raise
    _SEEN_UP.append(pid)
    return pid


@pytest.fixture(scope="module")
def hooks(cluster):
    """One transport per provider with its webhook options (lsn_sendgrid, lsn_postmark,
    lsn_resend, lsn_mailgun, lsn_ses; SES with its certificate server), plus lsn_plain (a
    SendGrid transport without webhook options) and lsn_cap (capture://). Waits until the
    listener serves every webhook route. Yields {provider: signer}."""
    first_listener()
    signers = {}
    try:
        for name, cls in PROVIDERS.items():
            signers[name] = cls()
        d = fresh()
        try:
            for name, p in signers.items():
                d.all("SELECT email.add_transport(%s, %s)", transport(name), webhooks.dsn(BASE_DSN[name], p.options()))
            d.all("SELECT email.add_transport('lsn_plain', 'sendgrid+api://SG.no-webhook@default')")
            d.all("SELECT email.add_transport('lsn_cap', 'capture://')")
        finally:
            d.conn.close()

        def served(path):
            try:
                return request("POST", path, b"", timeout=10)[0] != 404
            except (OSError, http.client.HTTPException):
                return False

        for name in signers:
            wait_until(lambda: served(hook_path(name)), f"the listener to serve {hook_path(name)}", timeout=60, every=0.2)
        yield signers
    finally:
        for p in signers.values():
            p.close()


@pytest.fixture
def listener(cluster):
    """The pid of the running listener, once it answers /health."""
    return first_listener()


@pytest.fixture
def target(hooks):
    """A message in `mail` for webhook events to name (queued for in 30 days on lsn_cap, so no
    worker touches it); cancelled afterwards on a fresh connection (a test may crash the
    cluster)."""
    address = f"ack-{uuid.uuid4().hex[:10]}@listener.test"
    d = fresh()
    try:
        mid = d.val("SELECT email.send(recipients => %s, subject => 'listener ack', body => 'x', transport => 'lsn_cap', "
                    "send_at => now() + interval '30 days')", address)
    finally:
        d.conn.close()
    yield Msg(id=mid, recipients=(address,), provider_id=None, message_id=None)
    val_retry("SELECT email.cancel(%s)", mid)


def stored_ids(mid, provider="sendgrid"):
    """provider_event_id of the receipts the listener stored for message mid from provider's transport."""
    d = fresh()
    try:
        return [r[0] for r in d.all("SELECT provider_event_id FROM email.receipts WHERE transport = %s AND message_id = %s",
                                    transport(provider), mid)]
    finally:
        d.conn.close()


# ---------------------------------------------------------------------------------------------
# Plain HTTP


def test_health_is_200_ok(listener):
    """GET /health answers 200 with the body "ok"."""
    status, body = request("GET", "/health")
    assert status == 200 and body.strip() == b"ok", (status, body)


def test_unknown_paths_are_404(hooks):
    """Paths that are no route, an unknown transport, a transport without webhook options and
    tokens that are not ours all answer 404."""
    cases = [
        ("GET", "/"), ("GET", "/nope"), ("POST", "/nope"), ("GET", "/healthz"), ("GET", "/health/extra"),
        ("GET", "/webhook/lsn_sendgrid"), ("GET", "/index.html"), ("GET", "/%2e%2e/etc/passwd"),
        ("POST", "/webhooks/no_such_transport"), ("POST", "/webhooks/lsn_plain"), ("POST", "/webhooks/lsn_cap"),
        ("GET", "/o/not-a-token"), ("GET", "/c/not-a-token"), ("GET", "/u/not-a-token"), ("POST", "/u/not-a-token"),
    ]
    got = {}
    for method, path in cases:
        body = b"List-Unsubscribe=One-Click" if (method, path) == ("POST", "/u/not-a-token") else (b"[]" if method == "POST" else None)
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if path.startswith("/u/") else {}
        got[(method, path)] = request(method, path, body, headers)[0]
    wrong = {k: v for k, v in got.items() if v != 404}
    assert not wrong, f"expected 404: {wrong}"


def test_wrong_method_on_a_route_is_405(hooks):
    """A method a route does not take answers 405."""
    cases = [("DELETE", "/health"), ("POST", "/health"), ("PUT", "/health"), ("GET", "/webhooks/lsn_sendgrid"),
             ("PUT", "/webhooks/lsn_sendgrid"), ("DELETE", "/webhooks/lsn_postmark"), ("POST", "/o/some-token"),
             ("PUT", "/c/some-token"), ("DELETE", "/u/some-token"), ("PATCH", "/o/some-token")]
    got = {(m, p): request(m, p, b"" if m in ("POST", "PUT", "PATCH") else None)[0] for m, p in cases}
    wrong = {k: v for k, v in got.items() if v != 405}
    assert not wrong, f"expected 405: {wrong}"


def test_keep_alive_serves_many_requests_on_one_connection(hooks):
    """One http.client connection carries 30 requests (health, 404, 405, an unsigned webhook
    (401) and a signed one (200)) without being closed or reopened."""
    pm = hooks["postmark"]
    unknown = pm.requests([pm.event("unknown", random_msg("keepalive"))])[0]
    conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=30)
    try:
        conn.connect()
        sock = conn.sock
        plan = [("GET", "/health", None, {}, 200)] * 20 + [
            ("GET", "/nope", None, {}, 404),
            ("DELETE", "/health", None, {}, 405),
            ("POST", hook_path("postmark"), unknown.body, pm.unsigned(unknown).headers, 401),
            ("POST", hook_path("postmark"), unknown.body, unknown.headers, 200),
        ] + [("GET", "/health", None, {}, 200)] * 6
        for n, (method, path, body, headers, expect) in enumerate(plan):
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            assert r.status == expect, f"request {n} {method} {path}: {r.status} {data[:200]!r}"
            assert not r.will_close, f"request {n} {method} {path}: the server closed the connection"
            assert conn.sock is sock, f"request {n}: the connection was reopened"
    finally:
        conn.close()


def test_http_1_0_request_is_answered(listener):
    """An HTTP/1.0 request (no Host, no keep-alive) gets its answer, and the server then closes."""
    status, got, closed = exchange(b"GET /health HTTP/1.0\r\n\r\n", timeout=30, until_close=True)
    assert status == 200, got[:300]
    assert got.partition(b"\r\n\r\n")[2].strip() == b"ok", got[:300]
    assert closed, "the server kept an HTTP/1.0 connection without keep-alive open for 30 s"
    status, got, _ = exchange(b"GET /nope HTTP/1.0\r\nHost: x\r\n\r\n", timeout=30)
    assert status == 404, got[:300]


def test_malformed_requests_are_refused_without_harm(listener):
    """Requests that are not HTTP/1.1 as it should be (garbage, 70 KB of headers, 2,000 header
    lines, the HTTP/2 preface, a TLS ClientHello, NUL in a header name, impossible lengths, a
    broken chunked body, a 60 KB path) get no 2xx answer and their connection ends; the
    listener keeps running and answering."""
    pid = listener
    cases = {
        "garbage": b"GARBAGE\r\n\r\n",
        "headers over 64 KB": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        "2,000 header lines": b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: y\r\n" % i for i in range(2000)) + b"\r\n",
        "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        "TLS ClientHello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 2,
        "NUL in a header name": b"GET /health HTTP/1.1\r\nHo\x00st: x\r\n\r\n",
        "unknown HTTP version": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        "huge Content-Length": b"POST /webhooks/lsn_postmark HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        "negative Content-Length": b"POST /webhooks/lsn_postmark HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "two Content-Lengths": b"POST /webhooks/lsn_postmark HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        "broken chunked body": b"POST /webhooks/lsn_postmark HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
        "chunked and Content-Length": (b"POST /webhooks/lsn_postmark HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        "60 KB path": b"GET /" + b"a" * 60_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    }
    outcomes = {}
    for name, data in cases.items():
        status, got, closed = exchange(data, timeout=40)
        outcomes[name] = (status, closed)
        assert status is None or not 200 <= status < 400, f"{name}: answered {got[:300]!r}"
        assert status is not None or closed, f"{name}: neither answered nor closed within 40 s"
    print("malformed requests (status, closed):", outcomes)
    assert health_ok(timeout=10), "/health after the malformed requests"
    assert listener_pid() == pid, "the listener restarted"


# ---------------------------------------------------------------------------------------------
# Limits


def test_body_over_one_megabyte_is_413(hooks):
    """A body of 1 MB + 1 byte is answered 413, declared by Content-Length (answered before it is
    read) and streamed chunked; a body of exactly 1 MB is read (authentic but not JSON: 400)."""
    pm = hooks["postmark"]
    url = LISTEN_URL + hook_path("postmark")
    headers = pm.sign_raw(b"")
    over = b"x" * (MAX_BODY + 1)
    status, body, _ = raw_post(url, headers, over, timeout=60)
    assert status == 413, (status, body[:200])
    status, body, _ = raw_post(url, headers, over, chunked=True, timeout=60)
    assert status == 413, ("chunked", status, body[:200])
    status, body, all_sent = raw_post(url, headers, b"x" * MAX_BODY, timeout=60)
    assert status == 400 and all_sent, ("exactly 1 MB", status, body[:200])
    assert health_ok(timeout=10)


def test_slowloris_headers_are_cut_off_while_others_are_served(listener):
    """20 clients send request headers one byte a second. Each is disconnected within ~10-20 s
    (header_read_timeout 10 s; the test allows 40 s) without a 2xx answer, and meanwhile /health,
    asked every half second on new connections, is answered 200 every time, each in under 5 s."""
    pid = listener
    drip = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\nX-Slow: " + b"a" * 200
    d = Dripper([(b"", drip)] * 20, limit=60).open()
    d.start()
    try:
        probes = probe_health(lambda: d.is_alive())
    finally:
        d.stop()
    assert d.error is None, d.error
    still_open = [i for i in range(len(d.socks)) if i not in d.closed_at]
    assert not still_open, f"{len(still_open)} slowloris connections were still open after 60 s"
    slowest_cut = max(d.closed_at.values())
    assert slowest_cut < 40, f"a slowloris connection was cut only after {slowest_cut:.0f} s"
    answered = [v[:40] for v in d.received.values() if v.startswith(b"HTTP/1.1 2")]
    assert not answered, f"a request whose headers never ended was answered: {answered[:3]}"
    slowest = check_probes(probes, "the slowloris attack")
    print(f"slowloris: cut after {min(d.closed_at.values()):.1f}-{slowest_cut:.1f} s; {len(probes)} health probes, "
          f"slowest {slowest:.2f} s")
    assert listener_pid() == pid


def test_slow_body_gets_408_or_is_disconnected(hooks):
    """5 clients send a webhook's headers (authentic Postmark credentials, Content-Length 1000)
    and then the body one byte a second: each gets 408 or is disconnected within ~10-20 s (the
    test allows 40 s), and /health is answered meanwhile."""
    pm = hooks["postmark"]
    head = "".join(f"{k}: {v}\r\n" for k, v in pm.sign_raw(b"").items())
    first = (f"POST {hook_path('postmark')} HTTP/1.1\r\nHost: {HOST}:{LISTEN_PORT}\r\n{head}"
             f"Content-Length: 1000\r\n\r\n").encode()
    d = Dripper([(first, b"{" + b" " * 999)] * 5, limit=60).open()
    d.start()
    try:
        probes = probe_health(lambda: d.is_alive() and len([1 for v in d.received.values() if v]) < len(d.socks))
    finally:
        d.stop()
    assert d.error is None, d.error
    for i, s in enumerate(d.socks):
        got = d.received.get(i, b"")
        if got:
            assert got.startswith(b"HTTP/1.1 408") or got.startswith(b"HTTP/1.0 408"), f"client {i}: {got[:200]!r}"
        else:
            assert i in d.closed_at, f"client {i}: neither answered 408 nor disconnected within 60 s"
    ended = [d.closed_at.get(i, 0) for i in range(len(d.socks))]
    assert max(ended) < 40, f"a slow body was cut only after {max(ended):.0f} s"
    check_probes(probes, "the slow bodies")


def test_six_hundred_idle_connections_neither_block_health_nor_stay_open(listener):
    """600 connections are opened at once and send nothing (over the limit of 512 open
    connections: the rest wait in the accept queue), next to 3 keep-alive connections that made
    one request. /health on a new connection is still answered (within 60 s: it may wait in the
    queue until idle connections are closed), and the server closes every idle connection,
    including the keep-alive ones, on its own (header_read_timeout ~10 s; the test allows 90 s
    for all, the queued ones included). Afterwards /health is answered at once and the listener
    did not restart."""
    pid = listener
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY else min(4096, hard), hard))
    kept, idle = [], []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(3):
            c = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=30)
            c.request("GET", "/health")
            r = c.getresponse()
            r.read()
            assert r.status == 200 and not r.will_close
            kept.append(c)
        t0 = time.monotonic()
        for _ in range(600):
            idle.append(socket.create_connection((HOST, LISTEN_PORT), timeout=30))
        opened = time.monotonic() - t0
        t1 = time.monotonic()
        status, body = request("GET", "/health", timeout=60)
        health_s = time.monotonic() - t1
        assert status == 200 and body.strip() == b"ok", (status, body)

        socks = [c.sock for c in kept] + idle
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        closed_at = {}
        deadline = time.monotonic() + 90
        while len(closed_at) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    closed_at[key.data] = time.monotonic() - t0
                    sel.unregister(key.fileobj)
        left = len(socks) - len(closed_at)
        assert left == 0, (f"{left} of {len(socks)} idle connections were still open {time.monotonic() - t0:.0f} s after "
                           f"they were opened ({opened:.0f} s to open them, /health answered after {health_s:.0f} s)")
        times = sorted(closed_at.values())
        print(f"600 idle connections: opened in {opened:.1f} s, /health answered after {health_s:.1f} s, "
              f"closed by the server after {times[0]:.1f} s (first) / {times[len(times) // 2]:.1f} s (median) / "
              f"{times[-1]:.1f} s (last)")
    finally:
        sel.close()
        for s in idle:
            s.close()
        for c in kept:
            c.close()
    t = time.monotonic()
    assert health_ok(timeout=10), "/health after the idle connections were closed"
    assert time.monotonic() - t < 10
    assert listener_pid() == pid, "the listener restarted"


# ---------------------------------------------------------------------------------------------
# Hostile input on the webhook routes

WRONG_TYPES = [
    b"null", b"true", b"false", b"0", b"-1", b"1.5", b"-0.0", b'""', b'" "', b'"x"', b"[]", b"{}", b"[null]",
    b"[[]]", b'{"":{}}', b'[{"a":[1,{"b":null}]}]', b'"\\u0000"', b'"2024-13-45T99:99:99Z"', b'"not-an-ip"',
    b'"<>"', b'"@"', b'"\\"quoted\\""', b'"-5"', b'"99999999999999999999999"', b'"1e400"', b'"NaN"',
    b'"\\n\\r\\t"', '"é✓\U0001F4E7 \u202e"'.encode(), b'"smtp;"', b'"5."', b'"550 5.1.1"', b'{"pg_email_id":{}}',
]
HUGE_NUMBERS = [
    b"1e999999", b"-1e999999", b"1e-999999", str(2 ** 70).encode(), str(-2 ** 70).encode(), str(2 ** 64).encode(),
    str(2 ** 63).encode(), str(-2 ** 63 - 1).encode(), b"9" * 4000, b"0." + b"0" * 4000 + b"1",
    b"1.7976931348623157e309", b"123456789012345678901234567890.123456789e-400", b"-0", b"1E+2147483648",
]
ESCAPES = [b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"', b'"\\uZZZZ"', b'"\\x41"', b'"\\', b'"\\u00"',
           b'"\\u0000"', b'"a\\u0000b"', b'"\\/\\b\\f"', b'"\\uD83D\\uDCE7"', b'"\\\'"']
BAD_UTF8 = [b"\xff", b"\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"\xed\xa0\x80",
            b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xef\xbf"]
TOP_LEVEL = [b"null", b"42", b'"a string"', b"[]", b"{}", b"[1]", b"[[]]", b"true", b"[null]", b"[{}]", b'{"":""}',
             b"[" + b"{}," * 1000 + b"{}]", b"1e999999", b'"\\u0000"']
DEEP = 10_000
KINDS = ["random", "truncated", "huge", "deep", "wrong_type", "utf8", "empty", "nul", "unknown", "top", "escape",
         "long", "dupkeys", "known"]


def json_paths(obj, prefix=()):
    """Every path (tuple of keys and indexes) in a JSON value, containers included."""
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return []
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(json_paths(v, prefix + (k,)))
    return out


def value_at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def with_raw(obj, replacements):
    """obj as JSON bytes with the value at each path replaced by raw bytes (anything: invalid JSON
    included)."""
    obj = copy.deepcopy(obj)
    marks = {}
    for n, (path, raw) in enumerate(replacements):
        mark = f"@@raw-{n}-{uuid.uuid4().hex}@@"
        try:
            value_at(obj, path[:-1])[path[-1]] = mark
        except (KeyError, IndexError, TypeError):
            continue  # inside a subtree replaced already
        marks[mark] = raw
    out = json.dumps(obj, ensure_ascii=False).encode()
    for mark, raw in marks.items():
        out = out.replace(json.dumps(mark).encode(), raw, 1)
    return out


def dup_keys(obj, rng):
    """obj as JSON text with every object key twice: a wrong-typed value and the real one, in
    either order."""
    if isinstance(obj, dict):
        parts = []
        for k, v in obj.items():
            key = json.dumps(k, ensure_ascii=False)
            wrong = rng.choice(["[]", "null", "{}", "0", '"x"'])
            pair = [f"{key}:{wrong}", f"{key}:{dup_keys(v, rng)}"]
            if rng.random() < 0.3:
                pair.reverse()
            parts.extend(pair)
        return "{" + ",".join(parts) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dup_keys(v, rng) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def hostile(kind, rng, template, unknown, sweep_path=None):
    """One hostile JSON document shaped after `template` (a provider's valid body), as bytes."""
    valid = json.dumps(template, ensure_ascii=False).encode()
    paths = json_paths(template) or [()]
    strings = [p for p in paths if isinstance(value_at(template, p), str)] or paths

    def some_path():
        return rng.choice(paths)

    if kind == "random":
        r = rng.random()
        if r < 0.5:
            return rng.randbytes(rng.randint(1, 4096))
        if r < 0.8:
            return "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 2000))).encode()
        return valid[:rng.randint(0, len(valid))] + rng.randbytes(rng.randint(1, 500))
    if kind == "truncated":
        return valid[:rng.randint(1, max(1, len(valid) - 1))]
    if kind == "huge":
        return with_raw(template, [(some_path(), rng.choice(HUGE_NUMBERS)) for _ in range(rng.randint(1, 3))])
    if kind == "deep":
        return rng.choice([
            lambda: b"[" * DEEP + b"]" * DEEP,
            lambda: b'{"a":' * DEEP + b"null" + b"}" * DEEP,
            lambda: b"[" * DEEP,
            lambda: b'{"a":[' * (DEEP // 2) + b"1" + b"]}" * (DEEP // 2),
            lambda: with_raw(template, [(some_path(), b"[" * DEEP + b"]" * DEEP)]),
            lambda: with_raw(template, [(some_path(), b'{"x":' * DEEP + b"0" + b"}" * DEEP)]),
        ])()
    if kind == "wrong_type":
        first = sweep_path if sweep_path is not None else some_path()
        more = [(some_path(), rng.choice(WRONG_TYPES)) for _ in range(rng.choice([0, 0, 1, 3]))]
        return with_raw(template, [(first, rng.choice(WRONG_TYPES))] + more)
    if kind == "utf8":
        if rng.random() < 0.5:
            return with_raw(template, [(rng.choice(strings), b'"ok' + rng.choice(BAD_UTF8) + b'end"')])
        at = rng.randint(0, len(valid))
        return valid[:at] + rng.choice(BAD_UTF8) + valid[at:]
    if kind == "empty":
        return rng.choice([b"", b" ", b"\r\n", b"\t\n ", b"\xef\xbb\xbf", b"\xef\xbb\xbf" + valid, b"\xff\xfe" + valid])
    if kind == "nul":
        at = rng.randint(0, len(valid))
        return rng.choice([
            lambda: valid[:at] + b"\x00" + valid[at:],
            lambda: with_raw(template, [(rng.choice(strings), b'"a\x00b"')]),
            lambda: with_raw(template, [(rng.choice(strings), b'"\\u0000"')]),
            lambda: b"\x00" * rng.randint(1, 200),
            lambda: valid + b"\x00",
        ])()
    if kind == "unknown":
        return json.dumps(unknown, ensure_ascii=False).encode()
    if kind == "top":
        return rng.choice(TOP_LEVEL)
    if kind == "escape":
        return with_raw(template, [(rng.choice(strings), rng.choice(ESCAPES))])
    if kind == "long":
        if isinstance(template, list) and rng.random() < 0.5:
            return json.dumps(template * 500, ensure_ascii=False).encode()  # a batch of 500 events
        return with_raw(template, [(rng.choice(strings), json.dumps("x" * 65536 + "é" * 100).encode())])
    if kind == "dupkeys":
        return dup_keys(template, rng).encode()
    if kind == "known":
        return valid
    raise ValueError(kind)


def resend_headers(secret, body, ts=None):
    """Svix headers over arbitrary bytes (standardwebhooks signs text only)."""
    msg_id = "msg_" + uuid.uuid4().hex
    ts = str(int(time.time()) if ts is None else int(ts))
    key = base64.b64decode(secret[len("whsec_"):])
    sig = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    return {"Content-Type": "application/json", "svix-id": msg_id, "svix-timestamp": ts, "svix-signature": "v1," + sig}


def hostile_requests(name, p, rng, count):
    """count (signed, unsigned) request pairs for provider `name`: [(kind, signed, headers, body)]."""
    out = []
    kinds_of = [k for k in p.KINDS if k != "unknown"]

    def template(i):
        ev = p.event(kinds_of[i % len(kinds_of)], random_msg("hostile"))
        if name == "sendgrid":
            return [ev.data]
        if name == "mailgun":
            return {"signature": p.signature(), "event-data": ev.data}
        return ev.data  # Postmark, Resend: the body; SES: the SNS Message

    def unknown_body():
        ev = p.event("unknown", random_msg("hostile"), marker=uuid.uuid4().hex)
        if name == "sendgrid":
            return [ev.data]
        if name == "mailgun":
            return {"signature": p.signature(), "event-data": ev.data}
        return ev.data

    # Every field of every event kind gets a wrong type once, then the other kinds in turn.
    work = []
    for i, k in enumerate(kinds_of):
        t = template(i)
        work += [("wrong_type", t, path) for path in json_paths(t)]
    rng.shuffle(work)
    work = work[:count // 2]
    i = 0
    while len(work) < count:
        work.append((KINDS[i % len(KINDS)], template(i), None))
        i += 1

    for n, (kind, t, sweep) in enumerate(work):
        body = hostile(kind, rng, t, unknown_body(), sweep)
        if name == "sendgrid":
            signed = p.sign_raw(body)
            unsigned = [
                lambda: {"Content-Type": "application/json"},
                lambda: p.sign_raw(body + b" "),
                lambda: {**p.sign_raw(body), SendGrid.SIG: "MEUCIQDx" + "A" * 60},
                lambda: {**signed, SendGrid.TS: str(int(signed[SendGrid.TS]) + 1)},
            ][n % 4]()
            out += [(kind, True, signed, body), (kind, False, unsigned, body)]
        elif name == "postmark":
            unsigned = [
                lambda: {"Content-Type": "application/json"},
                lambda: p.sign_raw(body, password=p.password + "x"),
                lambda: {"Authorization": "Basic " + base64.b64encode(p.user.encode()).decode()},
                lambda: {"Authorization": "Bearer " + p.password},
                lambda: {"Authorization": "Basic %%%not-base64%%%"},
            ][n % 5]()
            out += [(kind, True, p.sign_raw(body), body), (kind, False, unsigned, body)]
        elif name == "resend":
            # Signed when sent, not now: Svix signatures carry a timestamp the listener allows 5
            # minutes of, and on a slow machine the last requests go out minutes after the first.
            signed = functools.partial(resend_headers, p.secret, body)
            other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
            now = signed()
            unsigned = [
                lambda: {"Content-Type": "application/json"},
                lambda: resend_headers(other, body),
                lambda: resend_headers(p.secret, body, ts=time.time() - 3600),
                lambda: {**now, "svix-signature": now["svix-signature"].replace("v1,", "v2,")},
                lambda: {**now, "svix-signature": "v1,AAAA v1," + base64.b64encode(os.urandom(32)).decode()},
            ][n % 5]()
            out += [(kind, True, signed, body), (kind, False, unsigned, body)]
        elif name == "mailgun":
            headers = {"Content-Type": "application/json"}
            sig = t["signature"]
            bad = hmac.new(b"not-the-key", (sig["timestamp"] + sig["token"]).encode(), hashlib.sha256).hexdigest()
            forged = body.replace(sig["signature"].encode(), bad.encode())
            if forged == body:
                forged = json.dumps({"signature": {**sig, "signature": bad}}).encode()[:-1] + b',"event-data":' + body + b"}"
            out += [(kind, True, headers, body), (kind, False, headers, forged)]
        elif name == "ses":
            text = body.decode("utf-8", "replace")
            if n % 97 == 0:  # an authentic SubscriptionConfirmation: the listener GETs its SubscribeURL
                req = p.sns.confirmation(p.server.subscribe_url(p.sns.topic_arn, uuid.uuid4().hex), version=1 + n % 2)
            else:
                req = p.sns.notification(text, version=1 + n % 2)
            envelope = json.loads(req.body)
            envelope["Signature"] = base64.b64encode(os.urandom(256)).decode()
            forged = hostile(kind, rng, envelope, envelope) if kind not in ("known", "unknown") else json.dumps(envelope).encode()
            out += [(kind, True, req.headers, req.body), (kind, False, req.headers, forged)]
    return out


def test_hostile_webhook_bodies_never_break_the_listener(hooks):
    """For each provider route, 1,000 generated bodies (random bytes, truncated JSON, numbers like
    1e999999 and 2^70, 10,000 levels of nesting, a wrong type in every field of every event kind,
    invalid UTF-8, empty bodies, NUL bytes, bad escapes, 64 KB strings and 500-event batches,
    duplicate keys, and well-formed events known and unknown for messages that do not exist),
    each sent signed with the transport's key (for Mailgun and SES, whose signature travels in
    the body: the hostile part is the event inside an authentic envelope) and unsigned (missing,
    wrong, stale or forged signatures), plus 150 made-up tracking tokens. Four threads on
    keep-alive connections.

    Every answer is 200, 4xx or 503, never another 5xx or a dropped connection; an unsigned
    request is never 200; a signed one is never refused for its signature where the signature
    does not depend on the body's shape (SendGrid, Postmark, Resend, SES), and a well-formed
    signed event, known or not, is 200. Tokens are 404. Afterwards the listener has the same
    pid, the postmaster the same start time, and the log shows no crash."""
    rng = random.Random(20261130)
    pid = wait_listener()
    d = fresh()
    started = d.val("SELECT pg_postmaster_start_time()")
    d.conn.close()
    log_before = len(server_log())

    # Self-check of the byte signer against standardwebhooks (which signs text only).
    res = hooks["resend"]
    h = resend_headers(res.secret, b'{"a":1}', ts=1700000000)
    assert h["svix-signature"] == res.signature(h["svix-id"], 1700000000, b'{"a":1}')

    items = []
    for name, p in hooks.items():
        for kind, signed, headers, body in hostile_requests(name, p, rng, 1000):
            items.append((name, kind, signed, "POST", hook_path(name), headers, body))
    alphabet = string.ascii_letters + string.digits + "-_."
    for route in ("o", "c", "u"):
        for _ in range(50):
            token = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
            items.append(("token", route, False, "GET", f"/{route}/{token}", {}, None))
    rng.shuffle(items)
    print(f"hostile: {len(items)} requests, {sum(len(i[6] or b'') for i in items) / 1e6:.1f} MB")

    work = queue.Queue()
    for n, item in enumerate(items):
        work.put((n, item))
    results = [None] * len(items)
    t0 = time.monotonic()

    def runner():
        c = Client(timeout=60)
        try:
            while True:
                try:
                    n, (_, _, _, method, path, headers, body) = work.get_nowait()
                except queue.Empty:
                    return
                if callable(headers):
                    headers = headers()
                try:
                    results[n] = c.request(method, path, body, headers)[0]
                except (OSError, http.client.HTTPException) as e:
                    results[n] = f"{type(e).__name__}: {e}"
        finally:
            c.close()

    threads = [threading.Thread(target=runner, name=f"hostile-{i}", daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1200
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "hostile requests still running after 1,200 s"
    took = time.monotonic() - t0

    summary = collections.defaultdict(collections.Counter)
    problems = []
    for (name, kind, signed, method, path, headers, body), status in zip(items, results):
        summary[(name, "signed" if signed else "unsigned")][status] += 1
        what = f"{name} {kind} {'signed' if signed else 'unsigned'} {path[:60]} body {(body or b'')[:80]!r}"
        if not isinstance(status, int):
            problems.append(f"dropped connection: {status}: {what}")
        elif name == "token":
            if status != 404:
                problems.append(f"{status} for a made-up token: {what}")
        elif not (status == 200 or status == 503 or 400 <= status < 500):
            problems.append(f"{status}: {what}")
        elif not signed and status == 200:
            problems.append(f"200 for an unsigned request: {what}")
        elif signed and name != "mailgun" and status in AUTH_REFUSED:
            problems.append(f"{status} (signature refused) for a signed request: {what}")
        elif signed and kind in ("known", "unknown") and status != 200:
            problems.append(f"{status} for a well-formed signed event: {what}")
    for key in sorted(summary, key=str):
        print(f"hostile {key[0]} {key[1]}: {dict(summary[key])}")
    print(f"hostile: {len(items)} requests in {took:.1f} s")
    assert not problems, f"{len(problems)} bad answers, e.g.:\n" + "\n".join(problems[:20])
    mailgun_signed = summary[("mailgun", "signed")]
    passed = sum(v for k, v in mailgun_signed.items() if k not in AUTH_REFUSED)
    assert passed >= 0.3 * sum(mailgun_signed.values()), f"most signed Mailgun bodies were refused as unsigned: {dict(mailgun_signed)}"

    assert listener_pid() == pid, "the listener restarted during the hostile requests"
    assert health_ok(timeout=10)
    d = fresh()
    assert d.val("SELECT pg_postmaster_start_time()") == started, "the server restarted"
    d.conn.close()
    new_log = server_log()[log_before:]
    for sign in ("terminated by signal", 'background worker "pg_email listener"', "PANIC"):
        assert sign not in new_log, f"the server log shows {sign!r}:\n{new_log[-3000:]}"


# ---------------------------------------------------------------------------------------------
# Acknowledged only after commit


def test_locked_receipts_give_503_and_nothing_stored_then_200_once(hooks, target):
    """While another session holds email.receipts in ACCESS EXCLUSIVE mode, a valid signed
    SendGrid webhook is answered 503 (not 200) within ~15 s (lock_timeout 4 s; the test allows
    25 s) and nothing is stored. Once the lock is released, the provider's retry (the same body)
    is answered 200 and stored once; a second retry is 200 and still stored once."""
    sg = hooks["sendgrid"]
    ev = sg.event("open", target)
    req = sg.requests([ev])[0]
    eid = ev.data["sg_event_id"]
    url = LISTEN_URL + hook_path("sendgrid")
    locker = connect("mail", autocommit=False)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE email.receipts IN ACCESS EXCLUSIVE MODE")
        t = time.monotonic()
        status, body = webhooks.post(url, req.headers, req.body, timeout=60)
        took = time.monotonic() - t
    finally:
        locker.rollback()
        locker.close()
    assert status == 503, f"answered {status} {body[:200]!r} while the receipts table was locked"
    assert took < 25, f"the 503 took {took:.1f} s"
    assert stored_ids(target.id) == [], "an event answered 503 was stored"
    print(f"locked receipts: 503 after {took:.1f} s")

    for attempt in (1, 2):
        retry = sg.retry(req)
        status, body = webhooks.post(url, retry.headers, retry.body, timeout=60)
        assert status == 200, f"retry {attempt}: {status} {body[:200]!r}"
        assert stored_ids(target.id) == [eid], f"retry {attempt}: the event is not stored exactly once"


# ---------------------------------------------------------------------------------------------
# Life cycle. The two tests that stop the listener come last; the kill -9 one, which crashes the
# cluster, at the very end.


def test_listener_shows_in_worker_status_and_pg_stat_activity(listener):
    """email.worker_status() has a row of kind 'listener', state 'listening', with the pid that
    pg_stat_activity shows for backend_type and application_name 'pg_email listener' in
    database mail."""
    pid = listener
    d = fresh()
    try:
        d.wait("SELECT state FROM email.worker_status() WHERE kind = 'listener'", expect="listening", timeout=30)
        rows = d.all("SELECT pid, state FROM email.worker_status() WHERE kind = 'listener'")
        assert rows == [(pid, "listening")], rows
        assert d.val("SELECT count(*) FROM email.worker_status() WHERE kind = 'delivery'") >= 1
        act = d.all("SELECT backend_type, application_name, datname FROM pg_stat_activity WHERE pid = %s", pid)
        assert act == [("pg_email listener", "pg_email listener", "mail")], act
    finally:
        d.conn.close()


def test_sighup_reloads_without_restarting(listener):
    """pg_reload_conf() and a SIGHUP sent to the listener itself leave it running: same pid,
    still 'listening', /health 200 throughout."""
    pid = listener
    d = fresh()
    try:
        assert d.val("SELECT pg_reload_conf()") is True
        os.kill(pid, signal.SIGHUP)
        end = time.monotonic() + 4
        while time.monotonic() < end:
            assert health_ok(timeout=10), "/health after SIGHUP"
            time.sleep(0.25)
        assert listener_pid() == pid, "SIGHUP restarted the listener"
        d.wait("SELECT state FROM email.worker_status() WHERE kind = 'listener'", expect="listening", timeout=30)
        assert d.val("SELECT pid FROM email.worker_status() WHERE kind = 'listener'") == pid
    finally:
        d.conn.close()


def test_terminate_stops_it_and_the_postmaster_starts_a_new_one(listener):
    """pg_terminate_backend(listener pid) ends it within 5 s (the test allows 10), a connection
    it had served among what it closes (so its port is left in TIME_WAIT); the postmaster starts
    a new one (restart time 2 s, binding again while the port is in TIME_WAIT) that answers
    /health within ~15 s (the test allows 60) and shows as listening. The delivery workers and
    the postmaster are not restarted."""
    pid = listener
    d = fresh()
    delivery = sorted(worker_pids(d))
    started = d.val("SELECT pg_postmaster_start_time()")
    served = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=30)
    try:
        served.request("GET", "/health")
        assert served.getresponse().read().strip() == b"ok"
        assert d.val("SELECT pg_terminate_backend(%s)", pid) is True
        t = time.monotonic()
        wait_until(lambda: d.val("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid) == 0
                   and not os.path.exists(f"/proc/{pid}"), f"listener pid {pid} to end after SIGTERM", timeout=10)
        gone = time.monotonic() - t
        new = wait_listener(timeout=60, other_than=pid)
        back = time.monotonic() - t
        print(f"SIGTERM: listener gone after {gone:.2f} s, new pid {new} answering after {back:.1f} s")
        d.wait("SELECT state = 'listening' AND pid = %s FROM email.worker_status() WHERE kind = 'listener'", new, timeout=30)
        assert sorted(worker_pids(d)) == delivery, "the delivery workers restarted"
        assert d.val("SELECT pg_postmaster_start_time()") == started
    finally:
        served.close()
        d.conn.close()


def test_kill9_of_the_listener_under_load_loses_no_acknowledged_event(hooks, target):
    """Four threads post valid, distinct signed SendGrid webhooks (1-3 events each) on
    keep-alive connections; after 200 are acknowledged the listener gets SIGKILL. The postmaster
    restarts the whole cluster (crash recovery); the posts go on until the new listener has
    acknowledged 50 more. Every event of every post answered 200, before or after the crash,
    is in email.receipts; other answers are only 503 (and connection errors during the crash).
    The cluster is left with its delivery workers and a listener running."""
    sg = hooks["sendgrid"]
    pid = wait_listener()
    path = hook_path("sendgrid")
    stop = threading.Event()
    lock = threading.Lock()
    acked = []  # (monotonic time of the answer, [sg_event_id])
    statuses = collections.Counter()
    errors = collections.Counter()

    def poster(n):
        c = Client(timeout=30)
        r = random.Random(n)
        try:
            while not stop.is_set():
                evs = [sg.event("open", target) for _ in range(r.randint(1, 3))]
                req = sg.requests(evs)[0]
                try:
                    status, _ = c.request("POST", path, req.body, req.headers)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        errors[type(e).__name__] += 1
                    stop.wait(0.05)
                    continue
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        acked.append((time.monotonic(), [e.data["sg_event_id"] for e in evs]))
        finally:
            c.close()

    threads = [threading.Thread(target=poster, args=(n,), name=f"poster-{n}", daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 200, "200 acknowledged webhook posts before the kill", timeout=SLOW)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid = wait_listener(other_than=pid)  # after crash recovery
        back_at = time.monotonic()
        wait_for_workers()
        wait_until(lambda: sum(1 for at, _ in list(acked) if at > back_at) >= 50,
                   "50 acknowledged posts after the listener came back", timeout=SLOW)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a posting thread did not stop"
    assert new_pid != pid

    stored = set(stored_ids(target.id))
    acked_ids = [i for _, ids in acked for i in ids]
    missing = [i for i in acked_ids if i not in stored]
    before = sum(1 for at, _ in acked if at < killed_at)
    after = sum(1 for at, _ in acked if at > back_at)
    print(f"kill -9 under load: {len(acked)} posts acknowledged ({before} before the kill, {after} after the restart), "
          f"{len(acked_ids)} events, {len(stored)} stored; other answers {dict(statuses)}; errors {dict(errors)}; "
          f"listener back after {back_at - killed_at:.1f} s")
    assert not missing, f"{len(missing)} of {len(acked_ids)} acknowledged events are not stored, e.g. {missing[:5]}"
    assert len(set(acked_ids)) == len(acked_ids)
    assert set(statuses) <= {200, 503}, f"answers other than 200 and 503: {dict(statuses)}"
    assert before >= 200 and after >= 50
    assert health_ok(timeout=10)
