"""The HTTP server every provider fake runs on, and the Fake facade the tests use (see the
package docstring for its interface)."""
import collections
import http.server
import json
import socket
import threading
import time
import urllib.parse

from live import HOST, Server

from .common import Reply, reason
from .mailgun import Mailgun
from .postmark import Postmark
from .resend import Resend
from .sendgrid import SendGrid
from .ses import SES

IMPLS = {"sendgrid": SendGrid, "postmark": Postmark, "resend": Resend, "mailgun": Mailgun, "ses": SES}
PROVIDERS = tuple(IMPLS)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of parallel sends must not overflow the accept queue
    allow_reuse_address = True
    fake = None

    def verify_request(self, request, client_address):
        f = self.fake
        if f._down or f._stopping:
            with f._lock:
                f.dropped += 1
            return False
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeProvider/1.0"
    sys_version = ""
    timeout = 60

    def setup(self):
        super().setup()
        self.server.fake._conn_opened(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.fake._conn_closed(self.connection)

    def log_message(self, format, *args):
        pass

    def _drop(self):
        self.close_connection = True
        with self.server.fake._lock:
            self.server.fake.dropped += 1
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        n = self.headers.get("Content-Length")
        if n is None:
            return b""
        n = int(n)
        if n < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(n)

    def _handle(self):
        fake = self.server.fake
        if fake._down or fake._stopping:
            self._drop()
            return
        at = time.monotonic()
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._write(Reply(400, b"bad request framing\n", {"Content-Type": "text/plain"}))
            return
        split = urllib.parse.urlsplit(self.path)
        raw_pairs = list(self.headers.items())
        headers = {}
        for n, v in raw_pairs:
            n = n.lower()
            headers[n] = f"{headers[n]}, {v}" if n in headers else v
        rec = {
            "method": self.command, "path": split.path,
            "query": urllib.parse.parse_qs(split.query, keep_blank_values=True),
            "headers": headers, "body": body, "json": None, "form": None, "files": [],
            "mime": None, "pg_email_id": None, "status": None, "response": None,
            "response_headers": {}, "at": at,
            "raw_query": split.query, "_raw_headers": raw_pairs,
        }
        # once recorded with a status, the answer is written even if set_down() came meanwhile
        self._write(fake._process(rec))

    def _write(self, reply):
        body = reply.body
        headers = dict(reply.headers)
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        elif isinstance(body, str):
            data = body.encode("utf-8")
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            data = bytes(body)
        self.send_response(reply.status, reason(reply.status) if reply.status != 202 else "Accepted")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class Fake(Server):
    """A local fake of one provider's send API. See the package docstring (fakes/__init__.py)."""

    def __init__(self, provider: str, port: int, *, key: str = "test-key",
                 domain: str = "mg.example.test", access_key: str = "AKIDEXAMPLE",
                 secret_key: str = "wJalr/XUtnFEMI+K7MDENG", region: str = "eu-west-1",
                 session_token: str | None = None):
        if provider not in IMPLS:
            raise ValueError(f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
        self.provider = provider
        self.port = port
        self.key = key
        self.domain = domain
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.session_token = session_token
        self.requests = []
        self.accepted = []
        self.dropped = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._fail = collections.deque()
        self._rejected = set()
        self._idempotency = {}
        self._down = False
        self._stopping = False
        self._server = None
        self._thread = None
        self._conns = set()
        self._impl = IMPLS[provider](self)

    # ---- addresses

    @property
    def url(self):
        """The base URL (scheme, host, port) to configure in place of the provider's API host."""
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self):
        """The full URL of the send call."""
        return self.url + self._impl.path()

    # ---- life cycle

    def _start(self):
        self._stopping = False
        server = _HTTPServer((HOST, self.port), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-{self.provider}-{self.port}", daemon=True)
        self._thread.start()

    def _stop(self):
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping = True
        try:
            server.shutdown()
            server.server_close()
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if thread is not None:
                thread.join(5)
        finally:
            self._server = self._thread = None

    def _conn_opened(self, sock):
        with self._lock:
            self._conns.add(sock)

    def _conn_closed(self, sock):
        with self._lock:
            self._conns.discard(sock)

    # ---- scripting

    def fail_next(self, status: int, n: int = 1, retry_after: str | None = None) -> None:
        """The next n otherwise-valid requests are answered with this status and the provider's
        error body for it (and a Retry-After header when retry_after is given)."""
        with self._lock:
            for _ in range(n):
                self._fail.append((int(status), None if retry_after is None else str(retry_after)))

    def reject_address(self, address: str) -> None:
        """A valid request naming this address (to/cc/bcc) gets the recipient-level rejection."""
        with self._lock:
            self._rejected.add(address.lower())

    def clear_rejections(self):
        with self._lock:
            self._rejected.clear()

    def set_down(self, down: bool):
        """While down, every connection (new or kept alive) is closed without a response."""
        with self._lock:
            self._down = bool(down)
            conns = list(self._conns) if down else []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self):
        """Forgets recorded requests, pending failures, rejections and idempotency keys."""
        with self._lock:
            self.requests.clear()
            self.accepted.clear()
            self._fail.clear()
            self._rejected.clear()
            self._idempotency.clear()
            self.dropped = 0

    def wait_for(self, n: int, timeout: float = 10.0) -> list:
        """Waits until at least n requests have been accepted; returns a copy of `accepted`.
        Raises AssertionError (listing what was received) on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.accepted) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(r["method"], r["path"], r["status"], r["response"]) for r in self.requests]
                    raise AssertionError(
                        f"{self.provider} fake on port {self.port}: {len(self.accepted)} accepted "
                        f"of {n} wanted after {timeout}s; received {len(self.requests)}: {seen[-10:]}")
                self._cond.wait(left)
            return list(self.accepted)

    # ---- request processing

    def _process(self, rec):
        with self._lock:
            self.requests.append(rec)
        impl = self._impl
        try:
            checked = impl.validate(rec)
        except Reply as r:
            return self._finish(rec, r)
        except Exception as e:  # a bug in the fake must not look like a provider answer
            return self._finish(rec, Reply(599, f"fake {self.provider} crashed: {e!r}\n"))
        with self._lock:
            r = impl.idempotency(rec)
            if r is not None:
                return self._finish(rec, r)
            if self._fail:
                status, retry_after = self._fail.popleft()
                return self._finish(rec, impl.fail(status, retry_after))
            for addr, locator in checked:
                if addr.lower() in self._rejected:
                    rec["rejected_address"] = addr
                    return self._finish(rec, impl.reject(rec, addr, locator))
            return self._finish(rec, impl.success(rec))

    def _finish(self, rec, reply):
        with self._lock:
            rec["status"] = reply.status
            rec["response"] = reply.body if isinstance(reply.body, (dict, list)) else (
                reply.body.encode("utf-8") if isinstance(reply.body, str) else bytes(reply.body))
            rec["response_headers"] = dict(reply.headers)
            if reply.accepted:
                self.accepted.append(rec)
                self._cond.notify_all()
        return reply

    def __repr__(self):
        return (f"<Fake {self.provider} {self.url} requests={len(self.requests)} "
                f"accepted={len(self.accepted)}>")
