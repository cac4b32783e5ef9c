"""Provider webhooks end to end: a message goes out through a provider transport to the local fake
of that provider (fakes/), which answers with a real-looking provider id; then the provider's
events about it, signed as the provider signs them (webhooks.py, no pg_email code), are POSTed to
the listener at LISTEN_URL/webhooks/<transport>, and the rows they leave are checked: receipts,
status, suppressions, email.unmatched_events.

The test_selftest_* tests check the signers, payload builders and HTTP clients themselves and need
no cluster; from the repository root:

    /usr/bin/python3 -m pytest -p no:cacheprovider -q tests/e2e/test_webhooks.py -k selftest

Every other test uses the `mail` fixture (the e2e cluster with the worker and the listener). Each
creates its own uniquely named transports and fresh recipient addresses, so they do not depend on
one another or on their order."""
import base64
import collections
import hashlib
import hmac
import http.server
import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import psycopg2
import pytest
import standardwebhooks
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import webhooks as W
from conftest import LISTEN_URL, SLOW, connect, send, status, wait_status, wait_until
from fakes import Fake
from webhooks import Msg

ALL = list(W.PROVIDERS)
# Fakes of the providers' send APIs, one port each (test_providers.py uses 271xx, the fakes'
# self-test 27000-27999).
PORTS = {"sendgrid": 28201, "postmark": 28202, "resend": 28203, "mailgun": 28204, "ses": 28205}
BASES = {
    "sendgrid": "sendgrid+api://test-key@127.0.0.1:{port}?scheme=http",
    "postmark": "postmark+api://test-key@127.0.0.1:{port}?scheme=http&message_stream=outbound",
    "resend": "resend+api://test-key@127.0.0.1:{port}?scheme=http",
    "mailgun": "mailgun+api://test-key:mg.example.test@127.0.0.1:{port}?scheme=http",
    "ses": "ses+api://AKIDEXAMPLE:wJalr%2FXUtnFEMI%2BK7MDENG@127.0.0.1:{port}?scheme=http&region=eu-west-1",
}
# A missing or bad signature: 401, but Mailgun 406 (so that it stops retrying) and SNS 403.
REFUSED = {"sendgrid": 401, "postmark": 401, "resend": 401, "mailgun": 406, "ses": 403}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# =============================================================================================
# Self-tests: no cluster


def test_selftest_sendgrid_signature_verifies_and_a_changed_byte_does_not():
    s = W.SendGrid()
    body = json.dumps([{"email": "a@example.test", "event": "delivered", "category": "Grüße"}],
                      ensure_ascii=False).encode()
    h = s.sign_raw(body)
    # the key as SendGrid shows it: base64 SPKI DER of a P-256 key
    key = serialization.load_der_public_key(base64.b64decode(s.public_key_b64))
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    # the signature is base64 of a DER SEQUENCE{r, s} over timestamp || body, no separator
    r, _ = decode_dss_signature(base64.b64decode(h[W.SendGrid.SIG]))
    assert r > 0
    key.verify(base64.b64decode(h[W.SendGrid.SIG]), h[W.SendGrid.TS].encode() + body, ec.ECDSA(hashes.SHA256()))
    assert W.SendGrid.verify(s.public_key_b64, h, body)
    assert not W.SendGrid.verify(s.public_key_b64, h, W.flip_byte(body, b"a@example"))
    assert not W.SendGrid.verify(s.public_key_b64, dict(h, **{W.SendGrid.TS: str(int(h[W.SendGrid.TS]) + 1)}), body)
    assert not W.SendGrid.verify(W.SendGrid().public_key_b64, h, body)
    assert not W.SendGrid.verify(s.public_key_b64, s.unsigned(W.Req(h, body)).headers, body)


def test_selftest_postmark_basic_credentials():
    p = W.Postmark()
    req = p.requests([p.event("delivered", W.random_msg())])[0]
    scheme, _, cred = req.headers["Authorization"].partition(" ")
    assert scheme == "Basic" and base64.b64decode(cred).decode() == f"{p.user}:{p.password}"
    bad = base64.b64decode(p.tamper(req).headers["Authorization"].split()[1]).decode()
    user, _, pw = bad.partition(":")
    assert user == p.user and len(pw) == len(p.password)
    assert sum(x != y for x, y in zip(pw, p.password)) == 1
    assert "Authorization" not in p.unsigned(req).headers


def test_selftest_svix_known_answer():
    """The svix test vector (research §2.1): our signer, and HMAC by hand, give the known answer."""
    secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    msg_id, ts = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553
    body = b'{"email":"test@example.com","username":"test_user"}'
    want = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
    assert W.Resend(secret).signature(msg_id, ts, body) == want
    key = base64.b64decode(secret[len("whsec_"):])
    by_hand = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    assert "v1," + base64.b64encode(by_hand).decode() == want


def _as_standard(headers):
    return {k.replace("svix-", "webhook-"): v for k, v in headers.items()}


def test_selftest_resend_signature_verifies_with_standardwebhooks():
    p = W.Resend()
    msg = W.random_msg()
    req = p.requests([p.event("click", msg)])[0]
    wh = standardwebhooks.Webhook(p.secret)
    assert wh.verify(req.body, _as_standard(req.headers))["type"] == "email.clicked"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        wh.verify(p.tamper(req, msg.recipient.split("@")[0]).body, _as_standard(req.headers))
    stale = p.sign_raw(req.body, msg_id=req.headers["svix-id"], timestamp=time.time() - 400)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        wh.verify(req.body, _as_standard(stale))
    # several signatures (key rotation): any one that matches is enough
    other = W.Resend().signature(req.headers["svix-id"], req.headers["svix-timestamp"], req.body)
    both = dict(req.headers, **{"svix-signature": f"{other} {req.headers['svix-signature']}"})
    assert wh.verify(req.body, _as_standard(both))
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        wh.verify(req.body, _as_standard(dict(req.headers, **{"svix-signature": other})))
    # a retry keeps the id and is signed again
    again = p.retry(req)
    assert again.headers["svix-id"] == req.headers["svix-id"] and wh.verify(again.body, _as_standard(again.headers))


def test_selftest_mailgun_signature():
    p = W.Mailgun()
    req = p.requests([p.event("hard", W.random_msg())])[0]
    body = json.loads(req.body)
    assert len(body["signature"]["token"]) == 50 and set(body) == {"signature", "event-data"}
    assert W.Mailgun.verify(p.signing_key, req.body)
    assert not W.Mailgun.verify("key-other", req.body)
    assert not W.Mailgun.verify(p.signing_key, p.tamper(req).body)
    assert req.event_ids == [{body["signature"]["token"], body["event-data"]["id"]}]


def _independent_sns_string(m):
    """The SNS string to sign, written again here from the AWS page, to check the signer's."""
    if m["Type"] == "Notification":
        order = ["Message", "MessageId"] + (["Subject"] if "Subject" in m else []) + ["Timestamp", "TopicArn", "Type"]
    else:
        order = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{k}\n{m[k]}\n" for k in order).encode()


def test_selftest_sns_signatures_v1_and_v2_verify_with_the_served_certificate():
    ses = W.Ses()
    try:
        with OPENER.open(ses.server.cert_url, timeout=10) as r:
            pem = r.read()
        assert ses.server.cert_gets() == 1
        key = x509.load_pem_x509_certificate(pem).public_key()
        assert key.key_size == 2048
        msg = W.random_msg()
        for version, h in ((1, hashes.SHA1()), (2, hashes.SHA256())):
            for subject in (None, "Amazon SES Email Event Notification"):
                req = ses.requests([ses.event("delivered", msg, version=version, subject=subject)])[0]
                m = json.loads(req.body)
                assert m["SignatureVersion"] == str(version) and m["SigningCertURL"] == ses.server.cert_url
                assert ("Subject" in m) == (subject is not None)
                assert W.sns_string_to_sign(m) == _independent_sns_string(m)
                assert W.sns_string_to_sign(m).endswith(b"\n")
                key.verify(base64.b64decode(m["Signature"]), _independent_sns_string(m), padding.PKCS1v15(), h)
                assert W.Sns.verify(pem, m)
                wrong = dict(m, SignatureVersion="2" if version == 1 else "1")
                assert not W.Sns.verify(pem, wrong)
                bad = json.loads(ses.tamper(req, msg.recipient.split("@")[0]).body)
                assert bad["Message"] != m["Message"] and not W.Sns.verify(pem, bad)
                assert req.headers["x-amz-sns-message-id"] == m["MessageId"]
                assert req.event_ids == [{m["MessageId"]}]
        token = secrets.token_hex(64)
        for version in (1, 2):
            conf = ses.sns.confirmation(ses.server.subscribe_url(W.TOPIC_ARN, token), token=token, version=version)
            m = json.loads(conf.body)
            assert m["Type"] == "SubscriptionConfirmation" and W.Sns.verify(pem, m)
            assert W.sns_string_to_sign(m) == _independent_sns_string(m)
            assert conf.headers["x-amz-sns-message-type"] == "SubscriptionConfirmation"
    finally:
        ses.close()


def test_selftest_cert_server_records_subscribe_gets():
    ses = W.Ses()
    try:
        token = secrets.token_hex(16)
        url = ses.server.subscribe_url(W.TOPIC_ARN, token)
        assert url.startswith(ses.server.prefix)
        with OPENER.open(url, timeout=10) as r:
            assert r.status == 200 and b"ConfirmSubscriptionResult" in r.read()
        assert ses.server.subscribe_gets(token) == 1 and ses.server.subscribe_gets("other") == 0
        with pytest.raises(urllib.error.HTTPError) as e:
            OPENER.open(ses.server.prefix + "nothing-here", timeout=10)
        assert e.value.code == 404
        txt = ses.server.serve("/cert.txt", b"x")
        with OPENER.open(txt, timeout=10) as r:
            assert r.read() == b"x"
    finally:
        ses.close()


@pytest.mark.parametrize("provider", ALL)
def test_selftest_builders(provider):
    p = W.PROVIDERS[provider]()
    try:
        msg = W.random_msg()
        evs = [p.event(k, msg, marker="mk-1") for k in p.KINDS]
        reqs = p.requests(evs)
        assert [e for r in reqs for e in r.events] == evs
        assert all(len(r.events) == len(r.event_ids) for r in reqs)
        assert len(reqs) == (1 if provider == "sendgrid" else len(evs))
        bodies = "".join(r.body.decode("utf-8") for r in reqs)
        assert "Grüße" in bodies  # sent as UTF-8: the signatures cover those bytes
        assert all(str(msg.id).encode() in r.body for r in reqs)
        kinds = {ev.kind: ev for ev in evs}
        assert kinds["hard"].expect == dict(kinds["hard"].expect, event="bounced", bounce_type="hard",
                                            recipient=msg.recipient)
        assert kinds["complaint"].expect["event"] == "complained"
        assert kinds["click"].expect["url"] == W.CLICK_URL
        assert kinds["unknown"].expect["event"] is None
        if provider == "sendgrid":
            batch = json.loads(reqs[0].body)
            assert isinstance(batch, list) and len(batch) == len(evs)
            assert {e["event"] for e in batch} >= {"delivered", "bounce", "spamreport", "open", "click"}
            assert all(e["sg_message_id"].split(".")[0] == msg.provider_id for e in batch)
            assert all(e["pg_email_id"] == str(msg.id) for e in batch)
            assert reqs[0].event_ids == [{e["sg_event_id"]} for e in batch]
            assert len({e["sg_event_id"] for e in batch}) == len(batch)
        elif provider == "postmark":
            objs = [json.loads(r.body) for r in reqs]
            assert [o["RecordType"] for o in objs][:6] == ["Delivery", "Bounce", "Bounce", "Bounce", "SpamComplaint", "Open"]
            assert all(o["MessageID"] == msg.provider_id and o["Metadata"] == {"pg_email_id": str(msg.id)} for o in objs)
            for o, r in zip(objs, reqs):
                assert r.event_ids == ([{str(o["ID"])}] if "ID" in o else [None])
        elif provider == "resend":
            objs = [json.loads(r.body) for r in reqs]
            assert [o["type"] for o in objs][:5] == ["email.delivered", "email.bounced", "email.complained",
                                                     "email.opened", "email.clicked"]
            assert all(o["data"]["email_id"] == msg.provider_id for o in objs)
            assert [r.event_ids for r in reqs] == [[{r.headers["svix-id"]}] for r in reqs]
            arr = p.event("delivered", msg, tags_as="array").data["data"]["tags"]
            assert arr == [{"name": "pg_email_id", "value": str(msg.id)}]
        elif provider == "mailgun":
            objs = [json.loads(r.body) for r in reqs]
            assert [o["event-data"]["event"] for o in objs][:5] == ["delivered", "failed", "complained", "opened", "clicked"]
            assert objs[1]["event-data"]["severity"] == "permanent"
            assert all(o["event-data"]["user-variables"] == {"pg_email_id": str(msg.id)} for o in objs)
            assert all(o["event-data"]["message"]["headers"]["message-id"] == msg.provider_id.strip("<>") for o in objs)
            assert all(W.Mailgun.verify(p.signing_key, r.body) for r in reqs)
        elif provider == "ses":
            envs = [json.loads(r.body) for r in reqs]
            assert all(e["Type"] == "Notification" and e["TopicArn"] == W.TOPIC_ARN for e in envs)
            assert [e["SignatureVersion"] for e in envs][:2] in (["1", "2"], ["2", "1"])
            inner = [json.loads(e["Message"]) for e in envs]
            assert [i["eventType"] for i in inner][:6] == ["Delivery", "Bounce", "Bounce", "Complaint", "Open", "Click"]
            assert inner[1]["bounce"]["bounceType"] == "Permanent" and inner[2]["bounce"]["bounceType"] == "Transient"
            assert all(i["mail"]["messageId"] == msg.provider_id for i in inner)
            assert all(i["mail"]["tags"]["pg_email_id"] == [str(msg.id)] for i in inner)
            assert all(W.Sns.verify(p.sns.cert_pem, e) for e in envs)
        # without our id, no pg_email_id anywhere
        anon = Msg(None, msg.recipients, msg.provider_id, msg.message_id)
        for r in p.requests([p.event(k, anon, marker="x") for k in p.KINDS]):
            assert b"pg_email_id" not in r.body
    finally:
        p.close()


@pytest.mark.parametrize("provider", ["sendgrid", "resend", "mailgun", "ses"])
def test_selftest_tamper_changes_one_byte_and_breaks_the_signature(provider):
    p = W.PROVIDERS[provider]()
    try:
        msg = W.random_msg()
        req = p.requests([p.event("delivered", msg)])[0]
        bad = p.tamper(req, msg.recipient.split("@")[0])
        assert len(bad.body) == len(req.body)
        assert sum(a != b for a, b in zip(bad.body, req.body)) == 1
        json.loads(bad.body)  # still the provider's format: only the signature is wrong
        if provider == "sendgrid":
            assert not W.SendGrid.verify(p.public_key_b64, bad.headers, bad.body)
        elif provider == "resend":
            with pytest.raises(standardwebhooks.WebhookVerificationError):
                standardwebhooks.Webhook(p.secret).verify(bad.body, _as_standard(bad.headers))
        elif provider == "mailgun":
            assert not W.Mailgun.verify(p.signing_key, bad.body)
        else:
            assert not W.Sns.verify(p.sns.cert_pem, json.loads(bad.body))
    finally:
        p.close()


def test_selftest_dsn_options_are_percent_encoded():
    opts = {"webhook_key": "MFkw+EwYH/KoZIzj0CAQ==", "sns_url_prefix": "http://127.0.0.1:1/",
            "webhook_password": "p&ss=word"}
    d = W.dsn("sendgrid+api://k@127.0.0.1:1?scheme=http", opts)
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(d).query)
    assert q == {"scheme": ["http"], **{k: [v] for k, v in opts.items()}}
    assert "+" not in d.split("?")[1] and d.split("?")[1].count("&") == 3


class _EarlyServer:
    """A socket server that answers after the request head: 413 at once without reading the
    body (and closes, which may reset), or reads the whole body and answers 200 with its
    length. For the self-test of raw_post."""

    def __init__(self, early):
        self.early = early
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/webhooks/x"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        c, _ = self.sock.accept()
        with c:
            data = b""
            while b"\r\n\r\n" not in data:
                data += c.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            if self.early:
                c.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
                return
            if b"chunked" in head.lower():
                while not rest.endswith(b"0\r\n\r\n"):
                    rest += c.recv(65536)
                n, body = 0, rest
                while True:
                    size_line, _, body = body.partition(b"\r\n")
                    size = int(size_line, 16)
                    if size == 0:
                        break
                    n += size
                    body = body[size + 2:]
            else:
                length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
                while len(rest) < length:
                    rest += c.recv(65536)
                n = len(rest)
            answer = str(n).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_selftest_raw_post_reads_an_early_answer(chunked):
    big = b"x" * (4 << 20)
    s = _EarlyServer(early=True)
    st, body, _ = W.raw_post(s.url, {"Content-Type": "application/json"}, big, chunked=chunked, timeout=30)
    assert (st, body) == (413, b"too large")
    s = _EarlyServer(early=False)
    st, body, all_sent = W.raw_post(s.url, {"Content-Type": "application/json"}, big[:300_001], chunked=chunked, timeout=30)
    assert (st, body, all_sent) == (200, b"300001", True)


def test_selftest_curl_post_sends_the_exact_bytes():
    seen = {}

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen["headers"] = {k.lower(): v for k, v in self.headers.items()}
            seen["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(202)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.handle_request, daemon=True)
    t.start()
    try:
        body = json.dumps({"RecordType": "Delivery", "Recipient": "ü@example.test"}, ensure_ascii=False).encode() + b"\n\x00"
        st, out = W.curl_post(f"http://127.0.0.1:{srv.server_address[1]}/webhooks/x",
                              {"Content-Type": "application/json", "X-Test": "1"}, body, user="u:p w", timeout=20)
        t.join(10)
        assert (st, out) == (202, b"ok")
        assert seen["body"] == body
        assert seen["headers"]["authorization"] == W.Postmark.basic("u", "p w")
        assert seen["headers"]["x-test"] == "1" and seen["headers"]["content-type"] == "application/json"
    finally:
        srv.server_close()


# =============================================================================================
# Helpers of the end-to-end tests


def url_of(name):
    return f"{LISTEN_URL}/webhooks/{name}"


def probe(name):
    """The listener's answer to an unsigned empty POST (None while it does not answer)."""
    try:
        return W.post(url_of(name), {"Content-Type": "application/json"}, b"", timeout=10)[0]
    except OSError:
        return None


class Hook:
    """One transport with (or without) webhook options, its signer `p` and the fake it sends to."""

    def __init__(self, mail, provider, p, fake, name):
        self.mail, self.provider, self.p, self.fake, self.name = mail, provider, p, fake, name
        self.url = url_of(name)

    def wait_served(self):
        """Waits until the listener knows the new transport (anything but 404 for an unsigned
        empty POST, which stores nothing)."""
        wait_until(lambda: probe(self.name) not in (None, 404), f"the listener to serve {self.url}", SLOW, every=0.2)

    def send(self, *labels, n=1):
        """One message per label, to n fresh addresses each, through this transport; waits until
        every one is 'sent' and returns their Msg."""
        sent = []
        for label in labels:
            addrs = tuple(f"{label}-{uuid.uuid4().hex[:12]}@example.test" for _ in range(n))
            sent.append((send(self.mail, self.name, recipients=", ".join(addrs), subject=W.SUBJECT), addrs))
        out = []
        for mid, addrs in sent:
            wait_status(self.mail, mid, "sent", timeout=SLOW)
            rfc, pid = self.mail.one("SELECT message_id, provider_message_id FROM email.messages WHERE id = %s", mid)
            assert pid, f"message {mid} has no provider_message_id"
            out.append(Msg(mid, addrs, pid, rfc))
        return out

    def post(self, req):
        return W.post(self.url, req.headers, req.body, timeout=SLOW)[0]

    def post_all(self, reqs):
        return [self.post(r) for r in reqs]

    def ingest(self, req):
        return self.mail.val("SELECT email.ingest_webhook(%s, %s::jsonb, %s)", self.name,
                             json.dumps(req.headers), psycopg2.Binary(req.body))


@pytest.fixture
def hooks(mail):
    """hooks(provider, webhook=True, wait=True) -> Hook: a new transport named wh-<provider>-<hex>
    sending to the provider's fake, with the signer's webhook options unless webhook=False; waits
    until the listener serves it unless wait=False."""
    fakes, signers = {}, []

    def make(provider, *, webhook=True, wait=True):
        if provider not in fakes:
            fakes[provider] = Fake(provider, PORTS[provider]).start()
        p = W.PROVIDERS[provider]()
        signers.append(p)
        name = f"wh-{provider}-{uuid.uuid4().hex[:10]}"
        base = BASES[provider].format(port=PORTS[provider])
        mail.all("SELECT email.add_transport(%s, %s)", name, W.dsn(base, p.options()) if webhook else base)
        h = Hook(mail, provider, p, fakes[provider], name)
        if webhook and wait:
            h.wait_served()
        return h

    yield make
    for p in signers:
        p.close()
    for f in fakes.values():
        f.stop()


@pytest.fixture
def servers():
    """Extra CertServers a test starts (stopped at the end)."""
    started = []

    def start(pem):
        s = W.CertServer(pem).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def last_receipt(mail):
    return mail.val("SELECT coalesce(max(id), 0) FROM email.receipts")


COLS = ("message_id", "event", "bounce_type", "recipient", "provider_event_id", "source", "transport", "url",
        "user_agent", "ip", "machine", "smtp_code", "enhanced_code", "has_payload")


def new_receipts(mail, msgs, since):
    rows = mail.all("""SELECT message_id, event::text, bounce_type, recipient, provider_event_id, source, transport,
                              url, user_agent, host(ip), machine, smtp_code, enhanced_code, payload IS NOT NULL
                       FROM email.receipts WHERE message_id = ANY(%s::bigint[]) AND id > %s ORDER BY id""",
                    [m.id for m in msgs], since)
    return [dict(zip(COLS, r)) for r in rows]


def id_matches(got, ids):
    """The provider's event id as it is, or followed by a separator and more (an implementation
    may add the recipient to an id that one notification shares between several recipients)."""
    return got is not None and any(got == i or (got.startswith(i) and got[len(i)] in ":/#|.") for i in ids)


def check_rows(rows, reqs, transport, owner=None):
    """The receipts `rows` are exactly those the events of `reqs` ask for (one per known event),
    with their columns. owner: {recipient: message id} when the events do not carry our id."""
    exp = [(ev, ids) for r in reqs for ev, ids in zip(r.events, r.event_ids) if ev.expect["event"] is not None]

    def mid(ev):
        return owner[ev.msg.recipient] if owner else ev.msg.id

    def key(ev):
        return mid(ev), ev.expect["event"], ev.expect["bounce_type"]

    got = collections.Counter((r["message_id"], r["event"], r["bounce_type"]) for r in rows)
    want = collections.Counter(key(ev) for ev, _ in exp)
    assert got == want, f"receipts (message, event, bounce_type): got {sorted(got.items())}, want {sorted(want.items())}"
    for ev, ids in exp:
        cands = [r for r in rows if (r["message_id"], r["event"], r["bounce_type"]) == key(ev)]
        if ids:
            match = [r for r in cands if id_matches(r["provider_event_id"], ids)]
            assert len(match) == 1, (f"{ev.kind}: provider_event_id should be one of {sorted(ids)}, "
                                     f"got {[c['provider_event_id'] for c in cands]}")
            row = match[0]
        else:
            assert len(cands) == 1, cands
            row = cands[0]
        assert row["source"] == "webhook", row
        assert row["transport"] == transport, row
        assert row["provider_event_id"], f"{ev.kind}: no provider_event_id: {row}"
        assert row["has_payload"], f"{ev.kind}: no payload: {row}"
        for col in ("recipient", "url", "user_agent", "ip", "machine", "smtp_code", "enhanced_code"):
            if col in ev.expect:
                assert row[col] == ev.expect[col], f"{ev.kind}: {col} is {row[col]!r}, want {ev.expect[col]!r}"
    ids = [r["provider_event_id"] for r in rows]
    assert len(set(ids)) == len(ids), f"a provider_event_id twice: {ids}"


def suppressions(mail, addrs):
    return dict(mail.all("SELECT address, reason FROM email.suppressions WHERE address = ANY(%s::text[])",
                         [a.lower() for a in addrs]))


def statuses(mail, msgs):
    return {m.id: status(mail, m.id) for m in msgs}


def snapshot(mail, hook, msgs=(), addrs=()):
    """What a refused or repeated request must not change."""
    ids = [m.id for m in msgs]
    addrs = [a for m in msgs for a in m.recipients] + list(addrs)
    return {
        "receipts": mail.all("SELECT id FROM email.receipts WHERE message_id = ANY(%s::bigint[]) ORDER BY id", ids),
        "webhook receipts of the transport": mail.val(
            "SELECT count(*) FROM email.receipts WHERE transport = %s AND source = 'webhook'", hook.name),
        "unmatched": mail.val("SELECT count(*) FROM email.unmatched_events WHERE transport = %s", hook.name),
        "suppressions": suppressions(mail, addrs),
        "statuses": statuses(mail, msgs),
    }


def unmatched_with(mail, hook, needle):
    return mail.val("SELECT count(*) FROM email.unmatched_events WHERE transport = %s AND payload::text LIKE %s",
                    hook.name, f"%{needle}%")


def local(addr):
    return addr.split("@")[0]


def echoed_ids(provider, rec):
    """The pg_email_id values a send request carried to the provider."""
    j = rec.get("json") or {}
    if provider == "sendgrid":
        vals = [ca["pg_email_id"] for ca in [j.get("custom_args") or {}] + [p.get("custom_args") or {} for p in j.get("personalizations", [])]
                if "pg_email_id" in ca]
    elif provider == "postmark":
        vals = [v for k, v in (j.get("Metadata") or {}).items() if k == "pg_email_id"]
    elif provider == "resend":
        vals = [t.get("value") for t in j.get("tags") or [] if t.get("name") == "pg_email_id"]
    elif provider == "mailgun":
        vals = (rec.get("form") or {}).get("v:pg_email_id", [])
    else:
        vals = [t.get("Value") for t in j.get("EmailTags") or [] if t.get("Name") == "pg_email_id"]
    out = []
    for v in vals:
        try:
            v = json.loads(v) if isinstance(v, str) else v
        except ValueError:
            pass
        out.append(str(v))
    return out


# =============================================================================================
# Every provider: the events and their effects


@pytest.mark.parametrize("provider", ALL)
def test_our_id_reaches_the_provider(mail, hooks, provider):
    h = hooks(provider, wait=False)
    (a,) = h.send("id")
    recs = [r for r in h.fake.accepted if r.get("message_id") == a.provider_id.strip("<>") or r.get("message_id") == a.provider_id]
    assert len(recs) == 1, [r.get("message_id") for r in h.fake.accepted]
    assert echoed_ids(provider, recs[0]) == [str(a.id)]


@pytest.mark.parametrize("provider", ALL)
def test_events_are_stored_with_their_effects(mail, hooks, provider):
    """delivered + open + click for one message, a hard bounce for a second, delivered +
    complaint for a third: receipts, status, suppressions; the same batch again adds nothing."""
    h = hooks(provider)
    p = h.p
    a, b, c = h.send("delivered", "bounced", "complained")
    evs = [p.event("delivered", a), p.event("open", a, machine=True), p.event("click", a),
           p.event("hard", b, tags_as="array"), p.event("delivered", c), p.event("complaint", c)]
    reqs = p.requests(evs)
    since = last_receipt(mail)
    assert h.post_all(reqs) == [200] * len(reqs)
    check_rows(new_receipts(mail, [a, b, c], since), reqs, h.name)
    assert statuses(mail, [a, b, c]) == {a.id: "delivered", b.id: "bounced", c.id: "delivered"}
    assert suppressions(mail, [a.recipient, b.recipient, c.recipient]) == {b.recipient: "bounced", c.recipient: "complained"}
    assert mail.val("SELECT message_id FROM email.suppressions WHERE address = %s", b.recipient) in (b.id, None)
    # the provider retries: 200 again, nothing new
    before = snapshot(mail, h, [a, b, c])
    assert h.post_all([p.retry(r) for r in reqs]) == [200] * len(reqs)
    assert snapshot(mail, h, [a, b, c]) == before


@pytest.mark.parametrize("provider", ALL)
def test_matched_by_provider_message_id(mail, hooks, provider):
    """Events that do not echo pg_email_id (and name a Message-ID we do not have) are matched by
    the provider's message id (SendGrid: the sg_message_id before the first '.')."""
    h = hooks(provider)
    p = h.p
    a, b = h.send("bypid-ok", "bypid-bounce")
    bare = {m.recipient: Msg(None, m.recipients, m.provider_id, f"<{uuid.uuid4().hex}@elsewhere.example.test>") for m in (a, b)}
    reqs = p.requests([p.event("delivered", bare[a.recipient]), p.event("hard", bare[b.recipient])])
    since = last_receipt(mail)
    assert h.post_all(reqs) == [200] * len(reqs)
    check_rows(new_receipts(mail, [a, b], since), reqs, h.name, owner={a.recipient: a.id, b.recipient: b.id})
    assert statuses(mail, [a, b]) == {a.id: "delivered", b.id: "bounced"}
    assert suppressions(mail, [a.recipient, b.recipient]) == {b.recipient: "bounced"}


@pytest.mark.parametrize("provider", ["sendgrid", "mailgun"])
def test_matched_by_rfc_message_id(mail, hooks, provider):
    """Neither pg_email_id nor a provider id we know: the RFC 5322 Message-ID (SendGrid smtp-id,
    Mailgun message.headers.message-id without angle brackets) finds the message."""
    h = hooks(provider)
    p = h.p
    (a,) = h.send("byrfc")
    bare = Msg(None, a.recipients, None, a.message_id)
    reqs = p.requests([p.event("delivered", bare)])
    since = last_receipt(mail)
    assert h.post_all(reqs) == [200]
    check_rows(new_receipts(mail, [a], since), reqs, h.name, owner={a.recipient: a.id})
    assert status(mail, a.id) == "delivered"


@pytest.mark.parametrize("provider", ["sendgrid", "postmark", "mailgun", "ses"])
def test_status_bounced_only_when_every_recipient_hard_bounced(mail, hooks, provider):
    h = hooks(provider)
    p = h.p
    (m,) = h.send("two", n=2)
    r1, r2 = m.recipients
    assert h.post_all(p.requests([p.event("hard", m, recipient=r1)])) == [200]
    assert status(mail, m.id) == "sent"
    assert suppressions(mail, [r1, r2]) == {r1: "bounced"}
    assert h.post_all(p.requests([p.event("hard", m, recipient=r2)])) == [200]
    assert status(mail, m.id) == "bounced"
    assert suppressions(mail, [r1, r2]) == {r1: "bounced", r2: "bounced"}
    rows = mail.all("SELECT recipient, bounce_type FROM email.receipts WHERE message_id = %s AND event = 'bounced' ORDER BY id", m.id)
    assert rows == [(r1, "hard"), (r2, "hard")]


@pytest.mark.parametrize("provider,kind", [("sendgrid", "block"), ("postmark", "soft"), ("postmark", "block"), ("ses", "soft")])
def test_soft_and_block_bounces_never_suppress(mail, hooks, provider, kind):
    h = hooks(provider)
    p = h.p
    (a,) = h.send(kind)
    reqs = p.requests([p.event(kind, a)])
    since = last_receipt(mail)
    assert h.post_all(reqs) == [200]
    check_rows(new_receipts(mail, [a], since), reqs, h.name)
    assert status(mail, a.id) == "sent"
    assert suppressions(mail, [a.recipient]) == {}


# =============================================================================================
# Refusals


@pytest.mark.parametrize("provider", ALL)
def test_one_changed_byte_is_refused_and_nothing_stored(mail, hooks, provider):
    """One byte of the signed part changed (Postmark: of the password) → 401 (Mailgun 406, SNS
    403), nothing stored; the request as signed is then accepted."""
    h = hooks(provider)
    p = h.p
    (a,) = h.send("tamper")
    req = p.requests([p.event("hard", a)])[0]
    before = snapshot(mail, h, [a])
    assert h.post(p.tamper(req, local(a.recipient))) == REFUSED[provider]
    assert snapshot(mail, h, [a]) == before
    since = last_receipt(mail)
    assert h.post(req) == 200
    check_rows(new_receipts(mail, [a], since), [req], h.name)


@pytest.mark.parametrize("provider", ["sendgrid", "postmark", "resend"])
def test_missing_signature_is_refused(mail, hooks, provider):
    h = hooks(provider)
    p = h.p
    (a,) = h.send("unsigned")
    req = p.requests([p.event("delivered", a)])[0]
    before = snapshot(mail, h, [a])
    assert h.post(p.unsigned(req)) == 401
    assert snapshot(mail, h, [a]) == before
    assert status(mail, a.id) == "sent"


def test_resend_timestamp_outside_five_minutes_is_refused(mail, hooks):
    h = hooks("resend")
    p = h.p
    (a,) = h.send("stale")
    req = p.requests([p.event("delivered", a)])[0]
    before = snapshot(mail, h, [a])
    for skew in (-400, 400):
        old = req.replace(headers=p.sign_raw(req.body, msg_id=req.headers["svix-id"], timestamp=time.time() + skew))
        assert h.post(old) == 401, f"a signature {skew:+} s off was accepted"
    assert snapshot(mail, h, [a]) == before
    assert h.post(p.retry(req)) == 200
    assert status(mail, a.id) == "delivered"


def test_resend_any_of_several_signatures_is_enough(mail, hooks):
    h = hooks("resend")
    p = h.p
    (a,) = h.send("rotated")
    req = p.requests([p.event("delivered", a)])[0]
    other = W.Resend().signature(req.headers["svix-id"], req.headers["svix-timestamp"], req.body)
    assert h.post(req.replace(headers=dict(req.headers, **{"svix-signature": other}))) == 401
    assert h.post(req.replace(headers=dict(req.headers, **{"svix-signature": f"{other} {req.headers['svix-signature']}"}))) == 200
    assert status(mail, a.id) == "delivered"


@pytest.mark.parametrize("provider", ["sendgrid", "postmark", "resend"])
def test_authentic_body_not_in_the_providers_format_is_400(mail, hooks, provider):
    h = hooks(provider)
    body = b"this is not json {"
    assert W.post(h.url, h.p.sign_raw(body), body, timeout=SLOW)[0] == 400
    assert mail.val("SELECT count(*) FROM email.receipts WHERE transport = %s", h.name) == 0


# =============================================================================================
# Unmatched and unknown events


@pytest.mark.parametrize("provider", ALL)
def test_unknown_event_type_is_answered_200_and_kept(mail, hooks, provider):
    h = hooks(provider)
    p = h.p
    (a,) = h.send("unknown")
    marker = f"marker-{uuid.uuid4().hex}"
    reqs = p.requests([p.event("unknown", a, marker=marker)])
    since = last_receipt(mail)
    assert h.post_all(reqs) == [200]
    assert unmatched_with(mail, h, marker) == 1
    assert new_receipts(mail, [a], since) == []
    assert status(mail, a.id) == "sent"


@pytest.mark.parametrize("provider", ALL)
def test_event_for_a_message_we_do_not_have_is_kept(mail, hooks, provider):
    h = hooks(provider)
    p = h.p
    m = W.random_msg("stranger")
    reqs = p.requests([p.event("delivered", m), p.event("hard", m)])
    assert h.post_all(reqs) == [200] * len(reqs)
    assert unmatched_with(mail, h, m.recipient) == 2
    assert mail.val("SELECT count(*) FROM email.receipts WHERE recipient = %s", m.recipient) == 0


# =============================================================================================
# Routing, size, availability


def test_unknown_transport_is_404(mail, hooks):
    h = hooks("sendgrid")  # the listener is up and serves others
    req = h.p.requests([h.p.event("delivered", W.random_msg())])[0]
    for name in (f"no-such-{uuid.uuid4().hex[:8]}", h.name + "x"):
        assert W.post(url_of(name), req.headers, req.body, timeout=SLOW)[0] == 404


def test_transport_without_webhook_options_is_404(mail, hooks):
    plain = hooks("sendgrid", webhook=False)
    cap = f"wh-capture-{uuid.uuid4().hex[:10]}"
    mail.all("SELECT email.add_transport(%s, 'capture://')", cap)
    known = hooks("sendgrid")  # added last: once it is served, the two above are known too
    req = known.p.requests([known.p.event("delivered", W.random_msg())])[0]
    assert W.post(known.url, req.headers, req.body, timeout=SLOW)[0] == 200
    for name in (plain.name, cap):
        assert W.post(url_of(name), req.headers, req.body, timeout=SLOW)[0] == 404, name
    assert probe(plain.name) == 404


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_1_mb_is_413(mail, hooks, chunked):
    h = hooks("sendgrid")
    p = h.p
    (a,) = h.send("big")
    req = p.requests([p.event("delivered", a, extra={"x_padding": "a" * (1 << 20)})])[0]
    assert len(req.body) > (1 << 20)
    before = snapshot(mail, h, [a])
    st, body, _ = W.raw_post(h.url, req.headers, req.body, chunked=chunked, timeout=SLOW)
    assert st == 413, (st, body[:200])
    assert snapshot(mail, h, [a]) == before


def test_body_under_1_mb_is_accepted(mail, hooks):
    h = hooks("sendgrid")
    p = h.p
    (a,) = h.send("large")
    req = p.requests([p.event("delivered", a, extra={"x_padding": "a" * 950_000})])[0]
    assert 950_000 < len(req.body) < 1_000_000
    since = last_receipt(mail)
    assert h.post(req) == 200
    check_rows(new_receipts(mail, [a], since), [req], h.name)


def test_database_busy_is_503_and_the_retry_is_stored(mail, hooks):
    """While email.receipts is locked the events cannot be stored: 503 (the provider retries)
    within the providers' patience; nothing stored; the retry after the lock goes is."""
    h = hooks("postmark")
    p = h.p
    (a,) = h.send("busy")
    req = p.requests([p.event("delivered", a)])[0]
    before = snapshot(mail, h, [a])
    locker = connect(autocommit=False)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE email.receipts IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        st = h.post(req)
        took = time.monotonic() - t0
    finally:
        locker.rollback()
        locker.close()
    assert st == 503
    assert took < 30, f"503 came after {took:.1f} s (the contract: within 10 s)"
    assert snapshot(mail, h, [a]) == before
    since = last_receipt(mail)
    assert h.post(p.retry(req)) == 200
    check_rows(new_receipts(mail, [a], since), [req], h.name)
    assert status(mail, a.id) == "delivered"


# =============================================================================================
# email.ingest_webhook: the same code from SQL


@pytest.mark.parametrize("provider", ["sendgrid", "postmark", "resend", "mailgun"])
def test_ingest_webhook_from_sql_stores_the_same_rows(mail, hooks, provider):
    h = hooks(provider, wait=False)
    p = h.p
    a, b, c = h.send("sql-delivered", "sql-bounced", "sql-complained")
    evs = [p.event("delivered", a), p.event("open", a, machine=True), p.event("click", a),
           p.event("hard", b), p.event("delivered", c), p.event("complaint", c)]
    reqs = p.requests(evs)
    since = last_receipt(mail)
    assert sum(h.ingest(r) for r in reqs) == len(evs)
    check_rows(new_receipts(mail, [a, b, c], since), reqs, h.name)
    assert statuses(mail, [a, b, c]) == {a.id: "delivered", b.id: "bounced", c.id: "delivered"}
    assert suppressions(mail, [a.recipient, b.recipient, c.recipient]) == {b.recipient: "bounced", c.recipient: "complained"}
    before = snapshot(mail, h, [a, b, c])
    assert sum(h.ingest(p.retry(r)) for r in reqs) == 0
    assert snapshot(mail, h, [a, b, c]) == before


def test_ingest_webhook_refuses_a_bad_signature(mail, hooks):
    h = hooks("sendgrid", wait=False)
    p = h.p
    (a,) = h.send("sql-tamper")
    req = p.requests([p.event("hard", a)])[0]
    before = snapshot(mail, h, [a])
    try:
        stored = h.ingest(p.tamper(req, local(a.recipient)))
    except psycopg2.Error:
        stored = 0
    assert stored == 0
    assert snapshot(mail, h, [a]) == before


# =============================================================================================
# curl as the client


def test_curl_postmark_basic_auth(mail, hooks):
    h = hooks("postmark")
    p = h.p
    (a,) = h.send("curl-pm")
    req = p.requests([p.event("delivered", a)])[0]
    before = snapshot(mail, h, [a])
    assert W.curl_post(h.url, {"Content-Type": "application/json"}, req.body, user=f"{p.user}:wrong")[0] == 401
    assert W.curl_post(h.url, {"Content-Type": "application/json"}, req.body)[0] == 401
    assert snapshot(mail, h, [a]) == before
    since = last_receipt(mail)
    assert W.curl_post(h.url, {"Content-Type": "application/json"}, req.body, user=f"{p.user}:{p.password}")[0] == 200
    check_rows(new_receipts(mail, [a], since), [req], h.name)


def test_curl_sendgrid_signed_batch(mail, hooks):
    h = hooks("sendgrid")
    p = h.p
    a, b = h.send("curl-sg-ok", "curl-sg-bounce")
    req = p.requests([p.event("delivered", a), p.event("hard", b)])[0]
    since = last_receipt(mail)
    assert W.curl_post(h.url, req.headers, req.body)[0] == 200
    check_rows(new_receipts(mail, [a, b], since), [req], h.name)
    assert statuses(mail, [a, b]) == {a.id: "delivered", b.id: "bounced"}


# =============================================================================================
# SES through SNS


def test_sns_signature_versions_1_and_2_are_accepted(mail, hooks):
    h = hooks("ses")
    p = h.p
    a, b = h.send("sns-v1", "sns-v2")
    reqs = p.requests([p.event("delivered", a, version=1, subject="Amazon SES Email Event Notification"),
                       p.event("delivered", b, version=2)])
    assert [json.loads(r.body)["SignatureVersion"] for r in reqs] == ["1", "2"]
    since = last_receipt(mail)
    assert h.post_all(reqs) == [200, 200]
    check_rows(new_receipts(mail, [a, b], since), reqs, h.name)
    assert statuses(mail, [a, b]) == {a.id: "delivered", b.id: "delivered"}


def test_sns_certificate_outside_the_prefix_is_refused_and_not_fetched(mail, hooks, servers):
    h = hooks("ses")
    p = h.p
    (a,) = h.send("sns-cert")
    other = servers(p.sns.cert_pem)  # the same certificate, at a URL outside sns_url_prefix
    not_pem = p.server.serve("/SimpleNotificationService-cert.txt", p.sns.cert_pem)
    message = json.dumps(p.event("delivered", a).data)
    before = snapshot(mail, h, [a])
    for cert_url in (other.cert_url, not_pem):
        st = h.post(p.sns.notification(message, cert_url=cert_url))
        assert 400 <= st < 500 and st != 404, (cert_url, st)
    assert snapshot(mail, h, [a]) == before
    assert other.gets == []
    assert not [g for g in p.server.gets if g["path"].endswith(".txt")]
    assert h.post(p.sns.notification(message)) == 200
    assert status(mail, a.id) == "delivered"


def test_sns_another_topic_is_refused(mail, hooks):
    h = hooks("ses")
    p = h.p
    (a,) = h.send("sns-topic")
    message = json.dumps(p.event("delivered", a).data)
    before = snapshot(mail, h, [a])
    for version in (1, 2):
        st = h.post(p.sns.notification(message, version=version, topic_arn=W.OTHER_TOPIC_ARN))
        assert 400 <= st < 500 and st != 404, st
    assert snapshot(mail, h, [a]) == before


def test_sns_subscription_confirmation_fetches_the_subscribe_url(mail, hooks):
    h = hooks("ses")
    p, srv = h.p, h.p.server
    for version in (1, 2):
        token = secrets.token_hex(64)
        req = p.sns.confirmation(srv.subscribe_url(p.sns.topic_arn, token), token=token, version=version)
        assert h.post(req) == 200
        wait_until(lambda: srv.subscribe_gets(token) >= 1, "the listener to GET the SubscribeURL", SLOW)
        time.sleep(1.0)
        assert srv.subscribe_gets(token) == 1, f"SubscribeURL fetched {srv.subscribe_gets(token)} times for one post"
        # the same confirmation again: answered, fetched at most once more
        assert h.post(req) == 200
        time.sleep(1.0)
        assert 1 <= srv.subscribe_gets(token) <= 2


def test_sns_subscription_confirmation_is_refused_for_another_topic_or_url(mail, hooks, servers):
    h = hooks("ses")
    p, srv = h.p, h.p.server
    other = servers(p.sns.cert_pem)
    t1, t2 = secrets.token_hex(64), secrets.token_hex(64)
    for_other_topic = p.sns.confirmation(srv.subscribe_url(W.OTHER_TOPIC_ARN, t1), token=t1, topic_arn=W.OTHER_TOPIC_ARN)
    outside = p.sns.confirmation(other.subscribe_url(p.sns.topic_arn, t2), token=t2)
    before = snapshot(mail, h)
    for req in (for_other_topic, outside):
        st = h.post(req)
        assert 400 <= st < 500 and st != 404, st
    time.sleep(1.0)
    assert srv.subscribe_gets(t1) == 0 and srv.subscribe_gets(t2) == 0
    assert other.gets == []
    assert snapshot(mail, h) == before


def test_ses_setup_notification_is_answered_200(mail, hooks):
    """After setup SES sends one plain-text Notification; it must not be retried forever."""
    h = hooks("ses")
    req = h.p.sns.notification("Successfully validated SNS topic for Amazon SES event publishing.")
    assert h.post(req) == 200
