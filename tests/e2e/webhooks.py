"""Provider webhooks as the providers send them: independent signers and payload builders for the
five providers pg_email hears back from, for the listener's end-to-end tests (test_webhooks.py).
Nothing here uses pg_email code; every scheme is built from its documentation (research
feedback_loop.md §2.1-2.6) with Python's own primitives:

    SendGrid   ECDSA P-256 / SHA-256 over timestamp || body, base64 DER signature, key given to
               the transport as base64 SPKI DER (`cryptography`)
    Postmark   HTTP Basic credentials (no signature)
    Resend     Svix / Standard Webhooks: HMAC-SHA256 over "id.timestamp.body", `v1,<base64>`
               (the `standardwebhooks` package, pip)
    Mailgun    HMAC-SHA256 hex of timestamp + token, inside the JSON body (`hmac`)
    SES        an SNS envelope signed with RSA (SignatureVersion 1 = SHA1, 2 = SHA256) by a key
               and self-signed certificate made at test time, the certificate served by a local
               CertServer that also records the GETs of a SubscriptionConfirmation's SubscribeURL

Each provider class has the same interface:

    p.options()            the webhook options of its transport DSN ({name: value}, not encoded)
    p.event(kind, msg, **) one provider event (an Ev) about a sent message (a Msg); kinds:
                           delivered, hard, soft, block, complaint, open, click, unknown
                           (p.KINDS says which the provider has)
    p.requests(evs)        the HTTP requests (Req: headers, body) that carry them, signed, as the
                           provider batches them: SendGrid one array, the others one per event
    p.retry(req)           the provider's retry of a request (re-signed where it re-signs)
    p.tamper(req, needle)  the request with one byte of a signed part changed
    p.unsigned(req)        the request without its signature (headers providers only)
    p.sign_raw(body)       headers for an arbitrary body (headers providers only)
    p.close()              stops what it started (the SNS certificate server)

An Ev knows the receipt the listener is expected to store for it (`expect`); `Req.event_ids[i]`
is the set of acceptable provider_event_id values for `Req.events[i]`, or None when the
provider's event carries no id (the listener hashes the event then).

Also here: post() (http.client), raw_post() (a socket client that reads a response the server
sends before it has read the whole body, for 413), curl_post(), flip_byte(), dsn()."""
import base64
import dataclasses
import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import os
import random
import secrets
import select
import socket
import string
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid

import standardwebhooks
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from live import HOST, Server

REGION = "eu-west-1"
ACCOUNT = "123456789012"
TOPIC_ARN = f"arn:aws:sns:{REGION}:{ACCOUNT}:pg-email"
OTHER_TOPIC_ARN = f"arn:aws:sns:{REGION}:{ACCOUNT}:someone-else"
UA = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
      "Version/17.1 Safari/605.1.15")
IP = "198.51.100.23"
CLICK_URL = "https://shop.example.org/pricing?plan=pro&utm_source=mail"
SENDER = "pg_email tests <tests@example.org>"
SUBJECT = "Grüße ✓ order 42"  # non-ASCII on purpose: signatures cover the UTF-8 bytes

# kind -> (receipt event, bounce_type); None: an authentic event of a type pg_email does not know
RECEIPT = {
    "delivered": ("delivered", None), "hard": ("bounced", "hard"), "soft": ("bounced", "soft"),
    "block": ("bounced", "block"), "complaint": ("complained", None), "open": ("opened", None),
    "click": ("clicked", None), "unknown": (None, None),
}


@dataclasses.dataclass(frozen=True)
class Msg:
    """What a provider knows of a message it sent. id: our email.messages.id, echoed back as
    custom data `pg_email_id` (None: the event carries none); provider_id: the id the provider's
    send API answered; message_id: the RFC 5322 Message-ID, with angle brackets."""
    id: int | None
    recipients: tuple
    provider_id: str | None
    message_id: str | None

    @property
    def recipient(self):
        return self.recipients[0]


@dataclasses.dataclass
class Ev:
    """One provider event. data: the provider's JSON object; expect: the receipt columns the
    listener is expected to store (event, bounce_type, recipient, and where the provider says
    them unambiguously url, user_agent, ip, machine, smtp_code, enhanced_code)."""
    kind: str
    msg: Msg
    data: dict
    expect: dict
    sig_version: int | None = None  # SES: the SNS SignatureVersion to sign with
    subject: str | None = None      # SES: the SNS Subject, when there is one


@dataclasses.dataclass
class Req:
    headers: dict
    body: bytes
    events: list = dataclasses.field(default_factory=list)
    event_ids: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def _iso(t=None, ms=True):
    d = datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc)
    return d.isoformat(timespec="milliseconds" if ms else "seconds").replace("+00:00", "Z")


def _expect(kind, recipient, **kw):
    event, bounce_type = RECEIPT[kind]
    e = {"event": event, "bounce_type": bounce_type}
    if kind in ("delivered", "hard", "soft", "block", "complaint"):
        e["recipient"] = recipient
    e.update({k: v for k, v in kw.items() if v is not None})
    return e


def _rand(n, alphabet=string.ascii_letters + string.digits):
    return "".join(secrets.choice(alphabet) for _ in range(n))


def flip_byte(data: bytes, needle: bytes) -> bytes:
    """data with one byte changed: the first alphanumeric byte of the first occurrence of needle
    becomes another alphanumeric byte (so a JSON body stays JSON and only the signature breaks)."""
    i = data.index(needle)
    while not chr(data[i]).isalnum():
        i += 1
    c = data[i]
    new = ord("x") if c != ord("x") else ord("y")
    return data[:i] + bytes([new]) + data[i + 1:]


def dsn(base: str, options: dict) -> str:
    """base DSN (with a query already, e.g. ?scheme=http) plus the options, percent-encoded."""
    extra = "&".join(f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in options.items())
    sep = "&" if "?" in base else "?"
    return base + (sep + extra if extra else "")


# ---------------------------------------------------------------------------------------------
# SendGrid: Signed Event Webhook


class SendGrid:
    name = "sendgrid"
    KINDS = ("delivered", "hard", "block", "complaint", "open", "click", "unknown")
    SIG = "X-Twilio-Email-Event-Webhook-Signature"
    TS = "X-Twilio-Email-Event-Webhook-Timestamp"

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key_b64(self):
        """The verification key as SendGrid shows it: base64 of the SPKI DER, no PEM framing."""
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def options(self):
        return {"webhook_key": self.public_key_b64}

    def sign_raw(self, body: bytes, timestamp=None):
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sig = self.key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))  # DER SEQUENCE{r, s}
        return {"Content-Type": "application/json", "User-Agent": "SendGrid Event API",
                self.SIG: base64.b64encode(sig).decode(), self.TS: ts}

    @staticmethod
    def verify(public_key_b64, headers, body) -> bool:
        """SendGrid's verification as its helpers do it (sendgrid-python eventwebhook)."""
        from cryptography.exceptions import InvalidSignature
        pem = ("-----BEGIN PUBLIC KEY-----\n" + public_key_b64 + "\n-----END PUBLIC KEY-----\n").encode()
        key = serialization.load_pem_public_key(pem)
        h = {k.lower(): v for k, v in headers.items()}
        try:
            key.verify(base64.b64decode(h[SendGrid.SIG.lower()]),
                       h[SendGrid.TS.lower()].encode() + body, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, KeyError, ValueError):
            return False

    def event(self, kind, msg, *, recipient=None, url=CLICK_URL, machine=False, marker=None, extra=None, **_):
        rcpt = recipient or msg.recipient
        sg_mid = msg.provider_id or _rand(22, string.ascii_letters + string.digits + "-_")
        e = {
            "email": rcpt, "timestamp": int(time.time()),
            "smtp-id": msg.message_id or f"<{uuid.uuid4().hex}@example.org>",
            "sg_event_id": base64.urlsafe_b64encode(f"{kind}-{uuid.uuid4()}".encode()).decode().rstrip("="),
            "sg_message_id": f"{sg_mid}.filterdrecv-5645d9c87f-6r2ch-1-{secrets.token_hex(4).upper()}-2B.0",
            "category": ["pg_email", "Grüße"],
        }
        x = {}
        if kind == "delivered":
            e.update(event="delivered", response="250 2.0.0 OK  1700000000 a1-20020a05.1 - gsmtp",
                     tls=1, ip="149.72.123.24")
        elif kind == "hard":
            e.update(event="bounce", type="bounce", status="5.1.1", tls=1,
                     reason="550 5.1.1 The email account that you tried to reach does not exist.",
                     bounce_classification="Invalid Address")
            x["enhanced_code"] = "5.1.1"
        elif kind == "block":
            e.update(event="bounce", type="blocked", status="5.7.1", tls=1,
                     reason="550 5.7.1 Message rejected due to local policy",
                     bounce_classification="Reputation")
        elif kind == "complaint":
            e.update(event="spamreport")
        elif kind == "open":
            e.update(event="open", useragent=UA, ip=IP, sg_machine_open=machine)
            x.update(user_agent=UA, ip=IP)
            if machine:
                x["machine"] = True
        elif kind == "click":
            e.update(event="click", url=url, url_offset={"index": 0, "type": "html"}, useragent=UA, ip=IP)
            x.update(url=url, user_agent=UA, ip=IP)
        elif kind == "unknown":
            e.update(event="pg_email_future_event", marker=marker or "")
        else:
            raise ValueError(f"SendGrid has no {kind} event here")
        if msg.id is not None:
            e["pg_email_id"] = str(msg.id)  # custom_args come back at the top level, as strings
        if extra:
            e.update(extra)
        return Ev(kind, msg, e, _expect(kind, rcpt, **x))

    def requests(self, evs):
        body = json.dumps([ev.data for ev in evs], ensure_ascii=False, separators=(",", ":")).encode()
        return [Req(self.sign_raw(body), body, list(evs), [{ev.data["sg_event_id"]} for ev in evs])]

    def retry(self, req):
        return req.replace(headers=self.sign_raw(req.body))

    def tamper(self, req, needle):
        return req.replace(body=flip_byte(req.body, needle.encode()))

    def unsigned(self, req):
        return req.replace(headers={k: v for k, v in req.headers.items() if k not in (self.SIG, self.TS)})

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# Postmark: HTTP Basic credentials, one JSON object per POST


class Postmark:
    name = "postmark"
    KINDS = ("delivered", "hard", "soft", "block", "complaint", "open", "click", "unknown")

    def __init__(self):
        self.user = "pm-" + _rand(8)
        self.password = _rand(24)

    def options(self):
        return {"webhook_user": self.user, "webhook_password": self.password}

    @staticmethod
    def basic(user, password):
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def sign_raw(self, body, password=None):
        return {"Content-Type": "application/json", "User-Agent": "Postmark",
                "Authorization": self.basic(self.user, self.password if password is None else password)}

    def event(self, kind, msg, *, recipient=None, url=CLICK_URL, marker=None, **_):
        rcpt = recipient or msg.recipient
        pid = msg.provider_id or str(uuid.uuid4())
        meta = {"pg_email_id": str(msg.id)} if msg.id is not None else {}
        common = {"MessageID": pid, "Metadata": meta, "ServerID": 23, "MessageStream": "outbound",
                  "Tag": "welcome"}
        x = {}
        client = {"Client": {"Name": "Safari 17.1", "Family": "Safari", "Company": "Apple Inc."},
                  "OS": {"Name": "OS X 10.15 Catalina", "Family": "OS X", "Company": "Apple Computer, Inc."},
                  "Geo": {"CountryISOCode": "DE", "Country": "Germany", "RegionISOCode": "BE",
                          "Region": "Berlin", "City": "Berlin", "Zip": "10115",
                          "Coords": "52.5200,13.4050", "IP": IP}}

        def bounce(type_, code, name, desc, details, inactive):
            return {"RecordType": "Bounce", "ID": 10 ** 15 + secrets.randbelow(2 ** 62), "Type": type_,
                    "TypeCode": code, "Name": name, **common, "Description": desc, "Details": details,
                    "Email": rcpt, "From": "tests@example.org", "BouncedAt": _iso(), "DumpAvailable": True,
                    "Inactive": inactive, "CanActivate": True, "Subject": SUBJECT, "Content": ""}

        if kind == "delivered":
            e = {"RecordType": "Delivery", **common, "Recipient": rcpt, "DeliveredAt": _iso(),
                 "Details": "smtp;250 2.0.0 OK  1700000000 a1-20020a05.1 - gsmtp"}
        elif kind == "hard":
            e = bounce("HardBounce", 1, "Hard bounce",
                       "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
                       "smtp;550 5.1.1 The email account that you tried to reach does not exist.", True)
        elif kind == "soft":
            e = bounce("SoftBounce", 4096, "Soft bounce",
                       "Unable to temporarily deliver this email.", "smtp;452 4.2.2 Mailbox full", False)
        elif kind == "block":
            e = bounce("Blocked", 100006, "ISP block",
                       "The ISP has blocked this message. This is usually a temporary issue.",
                       "smtp;550 5.7.1 Message rejected due to local policy", False)
        elif kind == "complaint":
            e = bounce("SpamComplaint", 512, "Spam complaint",
                       "The subscriber explicitly marked this message as spam.", "", True)
            e["RecordType"] = "SpamComplaint"
        elif kind == "open":
            e = {"RecordType": "Open", **common, "FirstOpen": True, "Recipient": rcpt, "ReceivedAt": _iso(),
                 "Platform": "Desktop", "ReadSeconds": 5, "UserAgent": UA, **client}
            x["user_agent"] = UA
        elif kind == "click":
            e = {"RecordType": "Click", **common, "ClickLocation": "HTML", "Platform": "Desktop",
                 "UserAgent": UA, "OriginalLink": url, "ReceivedAt": _iso(), "Recipient": rcpt, **client}
            x.update(url=url, user_agent=UA)
        elif kind == "unknown":
            e = {"RecordType": "PgEmailFutureRecord", **common, "Recipient": rcpt,
                 "Marker": marker or "", "ReceivedAt": _iso()}
        else:
            raise ValueError(f"Postmark has no {kind} event here")
        return Ev(kind, msg, e, _expect(kind, rcpt, **x))

    def requests(self, evs):
        out = []
        for ev in evs:
            body = json.dumps(ev.data, ensure_ascii=False, indent=2).encode()
            ids = {str(ev.data["ID"])} if "ID" in ev.data else None
            out.append(Req(self.sign_raw(body), body, [ev], [ids]))
        return out

    def retry(self, req):
        return req

    def tamper(self, req, needle=None):
        """One byte of the password changed (Postmark signs nothing; the credentials are all)."""
        pw = flip_byte(self.password.encode(), self.password[:1].encode()).decode()
        return req.replace(headers=self.sign_raw(req.body, password=pw))

    def unsigned(self, req):
        return req.replace(headers={k: v for k, v in req.headers.items() if k != "Authorization"})

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# Resend: Svix (Standard Webhooks)


class Resend:
    name = "resend"
    KINDS = ("delivered", "hard", "complaint", "open", "click", "unknown")

    def __init__(self, secret=None):
        self.secret = secret or "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.wh = standardwebhooks.Webhook(self.secret)

    def options(self):
        return {"webhook_secret": self.secret}

    def signature(self, msg_id, ts, body: bytes, secret=None):
        wh = self.wh if secret is None else standardwebhooks.Webhook(secret)
        when = datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc)
        return wh.sign(msg_id, when, body.decode("utf-8"))

    def sign_raw(self, body, msg_id=None, timestamp=None):
        msg_id = msg_id or "msg_" + _rand(27)
        ts = int(time.time()) if timestamp is None else int(timestamp)
        return {"Content-Type": "application/json", "User-Agent": "Svix-Webhooks/1.38.0",
                "svix-id": msg_id, "svix-timestamp": str(ts),
                "svix-signature": self.signature(msg_id, ts, body)}

    def event(self, kind, msg, *, recipient=None, url=CLICK_URL, marker=None, tags_as="object", **_):
        rcpt = recipient or msg.recipient
        if msg.id is None:
            tags = {} if tags_as == "object" else []
        elif tags_as == "object":
            tags = {"pg_email_id": str(msg.id)}
        else:
            tags = [{"name": "pg_email_id", "value": str(msg.id)}]
        data = {"created_at": _iso(), "email_id": msg.provider_id or str(uuid.uuid4()), "from": SENDER,
                "to": list(msg.recipients), "subject": SUBJECT, "tags": tags}
        x = {}
        if kind == "delivered":
            t = "email.delivered"
        elif kind == "hard":
            t = "email.bounced"
            data["bounce"] = {"message": "The recipient's email address does not exist.",
                              "subType": "General", "type": "Permanent"}
        elif kind == "complaint":
            t = "email.complained"
        elif kind == "open":
            t = "email.opened"
        elif kind == "click":
            t = "email.clicked"
            data["click"] = {"ipAddress": IP, "link": url, "timestamp": _iso(), "userAgent": UA}
            x.update(url=url, ip=IP, user_agent=UA)
        elif kind == "unknown":
            t = "email.pg_email_future"
            data["marker"] = marker or ""
        else:
            raise ValueError(f"Resend has no {kind} event here")
        return Ev(kind, msg, {"type": t, "created_at": _iso(), "data": data}, _expect(kind, rcpt, **x))

    def requests(self, evs):
        out = []
        for ev in evs:
            body = json.dumps(ev.data, ensure_ascii=False).encode()
            h = self.sign_raw(body)
            out.append(Req(h, body, [ev], [{h["svix-id"]}]))
        return out

    def retry(self, req):
        """Svix retries with the same svix-id, signed again with a new timestamp."""
        return req.replace(headers=self.sign_raw(req.body, msg_id=req.headers["svix-id"]))

    def tamper(self, req, needle):
        return req.replace(body=flip_byte(req.body, needle.encode()))

    def unsigned(self, req):
        return req.replace(headers={k: v for k, v in req.headers.items() if k != "svix-signature"})

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# Mailgun: HMAC of timestamp + token inside the body


class Mailgun:
    name = "mailgun"
    KINDS = ("delivered", "hard", "complaint", "open", "click", "unknown")
    DOMAIN = "mg.example.test"

    def __init__(self):
        self.signing_key = "key-" + secrets.token_hex(16)

    def options(self):
        return {"webhook_signing_key": self.signing_key}

    def signature(self, timestamp=None, token=None, key=None):
        ts = str(int(time.time()) if timestamp is None else timestamp)
        token = token or secrets.token_hex(25)  # 50 characters, as Mailgun's
        sig = hmac.new((key or self.signing_key).encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
        return {"timestamp": ts, "token": token, "signature": sig}

    @staticmethod
    def verify(key, body: bytes) -> bool:
        s = json.loads(body)["signature"]
        want = hmac.new(key.encode(), (s["timestamp"] + s["token"]).encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, s["signature"])

    def event(self, kind, msg, *, recipient=None, url=CLICK_URL, marker=None, **_):
        rcpt = recipient or msg.recipient
        mid = msg.provider_id or msg.message_id or f"<{uuid.uuid4().hex}@{self.DOMAIN}>"
        e = {
            "id": _rand(22), "timestamp": round(time.time(), 6), "recipient": rcpt,
            "recipient-domain": rcpt.rpartition("@")[2], "tags": ["welcome"], "campaigns": [],
            "envelope": {"transport": "smtp", "sender": f"bounce@{self.DOMAIN}",
                         "sending-ip": "209.61.154.250", "targets": rcpt},
            "message": {"headers": {"to": ", ".join(msg.recipients), "message-id": mid.strip("<>"),
                                    "from": SENDER, "subject": SUBJECT},
                        "attachments": [], "size": 2417},
            "flags": {"is-routed": False, "is-authenticated": True, "is-system-test": False,
                      "is-test-mode": False},
            "storage": {"url": f"https://storage-europe-west1.api.mailgun.net/v3/domains/{self.DOMAIN}/messages/{_rand(40)}",
                        "key": _rand(40), "region": "europe-west1"},
            "user-variables": {"pg_email_id": str(msg.id)} if msg.id is not None else {},
        }
        client = {"client-type": "browser", "client-os": "OS X", "device-type": "desktop",
                  "client-name": "Safari", "user-agent": UA}
        geo = {"country": "DE", "region": "BE", "city": "Berlin"}
        x = {}
        if kind == "delivered":
            e.update({"event": "delivered", "log-level": "info", "delivery-status": {
                "tls": True, "mx-host": "mx.example.test", "code": 250, "description": "",
                "session-seconds": 0.43, "utf8": True, "attempt-no": 1, "message": "OK",
                "certificate-verified": True}})
        elif kind == "hard":
            e.update({"event": "failed", "severity": "permanent", "reason": "bounce", "log-level": "error",
                      "delivery-status": {
                          "tls": True, "mx-host": "mx.example.test", "code": 550, "description": "",
                          "session-seconds": 0.12, "utf8": True, "attempt-no": 1,
                          "message": "5.1.1 The email account that you tried to reach does not exist.",
                          "certificate-verified": True}})
            x["smtp_code"] = 550
        elif kind == "complaint":
            e.update({"event": "complained", "log-level": "warn"})
        elif kind == "open":
            e.update({"event": "opened", "log-level": "info", "ip": IP, "geolocation": geo, "client-info": client})
            x.update(ip=IP, user_agent=UA)
        elif kind == "click":
            e.update({"event": "clicked", "log-level": "info", "url": url, "ip": IP, "geolocation": geo,
                      "client-info": client})
            x.update(url=url, ip=IP, user_agent=UA)
        elif kind == "unknown":
            e.update({"event": "pg-email-future", "log-level": "info", "marker": marker or ""})
        else:
            raise ValueError(f"Mailgun has no {kind} event here")
        return Ev(kind, msg, e, _expect(kind, rcpt, **x))

    def requests(self, evs):
        out = []
        for ev in evs:
            sig = self.signature()
            body = json.dumps({"signature": sig, "event-data": ev.data}, ensure_ascii=False).encode()
            out.append(Req({"Content-Type": "application/json", "User-Agent": "mailgun/treq-16.12.0"},
                           body, [ev], [{sig["token"], ev.data["id"]}]))
        return out

    def retry(self, req):
        return req

    def tamper(self, req, needle=None):
        """One byte of the token changed: the HMAC covers timestamp + token only."""
        token = json.loads(req.body)["signature"]["token"]
        return req.replace(body=flip_byte(req.body, token.encode()))

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# Amazon SES through SNS


def _cert_pair(cn="sns.eu-west-1.amazonaws.com"):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


def sns_string_to_sign(m: dict) -> bytes:
    """AWS's canonical form: "Key\\nValue\\n" for each signed key present, in this order (every
    line ends with a newline, the last one too)."""
    if m.get("Type") == "Notification":
        keys = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
    else:
        keys = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
    return "".join(f"{k}\n{m[k]}\n" for k in keys if k in m and m[k] is not None).encode("utf-8")


class _CertHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        srv = self.server.owner
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query)
        with srv.lock:
            srv.gets.append({"path": split.path, "query": query, "at": time.monotonic()})
        if split.path in srv.files:
            self._answer(200, srv.files[split.path], "application/x-x509-ca-cert")
        elif query.get("Action") == ["ConfirmSubscription"]:
            arn = f"{query.get('TopicArn', [''])[0]}:{uuid.uuid4()}"
            self._answer(200, ("<ConfirmSubscriptionResponse xmlns=\"http://sns.amazonaws.com/doc/2010-03-31/\">"
                               f"<ConfirmSubscriptionResult><SubscriptionArn>{arn}</SubscriptionArn>"
                               "</ConfirmSubscriptionResult></ConfirmSubscriptionResponse>").encode(), "text/xml")
        else:
            self._answer(404, b"not found", "text/plain")

    def _answer(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class CertServer(Server):
    """A local stand-in for sns.<region>.amazonaws.com: serves the signing certificate at
    cert_url (and any extra paths given to serve()), answers ConfirmSubscription GETs, and
    records every GET in `gets` ({path, query, at})."""

    def __init__(self, pem: bytes):
        self.pem = pem
        self.cert_path = f"/SimpleNotificationService-{secrets.token_hex(16)}.pem"
        self.files = {self.cert_path: pem}
        self.gets = []
        self.lock = threading.Lock()
        self._httpd = None
        self._thread = None

    def _start(self):
        httpd = http.server.ThreadingHTTPServer((HOST, 0), _CertHandler)
        httpd.daemon_threads = True
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="sns-cert-server", daemon=True)
        self._thread.start()

    def _stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._httpd = self._thread = None

    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def prefix(self):
        return f"http://{HOST}:{self.port}/"

    @property
    def cert_url(self):
        return self.prefix + self.cert_path.lstrip("/")

    def serve(self, path, body):
        """Serves body at path too; returns its URL."""
        self.files[path] = body
        return self.prefix + path.lstrip("/")

    def subscribe_url(self, topic_arn, token):
        return (f"{self.prefix}?Action=ConfirmSubscription&TopicArn={urllib.parse.quote(topic_arn, safe='')}"
                f"&Token={token}")

    def subscribe_gets(self, token):
        with self.lock:
            return sum(1 for g in self.gets if g["query"].get("Token") == [token])

    def cert_gets(self):
        with self.lock:
            return sum(1 for g in self.gets if g["path"].endswith(".pem") or g["path"] in self.files)


class Sns:
    """Signs SNS envelopes with an RSA-2048 key whose self-signed certificate is at cert_url."""

    def __init__(self, topic_arn=TOPIC_ARN):
        self.topic_arn = topic_arn
        self.key, self.cert_pem = _cert_pair()
        self.cert_url = None  # set to a CertServer's cert_url

    def sign(self, m: dict, version: int) -> str:
        h = hashes.SHA1() if version == 1 else hashes.SHA256()
        return base64.b64encode(self.key.sign(sns_string_to_sign(m), padding.PKCS1v15(), h)).decode()

    def _finish(self, m, version, cert_url):
        m["SignatureVersion"] = str(version)
        m["Signature"] = self.sign(m, version)
        m["SigningCertURL"] = cert_url or self.cert_url
        return m

    @staticmethod
    def _headers(m, subscription=True):
        h = {"Content-Type": "text/plain; charset=UTF-8", "User-Agent": "Amazon Simple Notification Service Agent",
             "x-amz-sns-message-type": m["Type"], "x-amz-sns-message-id": m["MessageId"],
             "x-amz-sns-topic-arn": m["TopicArn"]}
        if subscription:
            h["x-amz-sns-subscription-arn"] = f"{m['TopicArn']}:{uuid.uuid5(uuid.NAMESPACE_URL, m['TopicArn'])}"
        return h

    def notification(self, message: str, *, version=1, subject=None, topic_arn=None, cert_url=None) -> Req:
        m = {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": topic_arn or self.topic_arn}
        if subject is not None:
            m["Subject"] = subject
        m["Message"] = message
        m["Timestamp"] = _iso()
        self._finish(m, version, cert_url)
        m["UnsubscribeURL"] = (f"https://sns.{REGION}.amazonaws.com/?Action=Unsubscribe&SubscriptionArn="
                               f"{m['TopicArn']}:{uuid.uuid4()}")
        body = json.dumps(m, ensure_ascii=False, indent=2).encode()
        return Req(self._headers(m), body, [], [], {"sns": m})

    def confirmation(self, subscribe_url, *, version=1, topic_arn=None, cert_url=None, token=None) -> Req:
        token = token or secrets.token_hex(64)
        arn = topic_arn or self.topic_arn
        m = {"Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": token,
             "TopicArn": arn,
             "Message": (f"You have chosen to subscribe to the topic {arn}.\nTo confirm the subscription, "
                         "visit the SubscribeURL included in this message."),
             "SubscribeURL": subscribe_url, "Timestamp": _iso()}
        self._finish(m, version, cert_url)
        body = json.dumps(m, ensure_ascii=False, indent=2).encode()
        return Req(self._headers(m, subscription=False), body, [], [], {"sns": m, "token": token})

    @staticmethod
    def verify(pem: bytes, m: dict) -> bool:
        from cryptography.exceptions import InvalidSignature
        key = x509.load_pem_x509_certificate(pem).public_key()
        h = hashes.SHA1() if m["SignatureVersion"] == "1" else hashes.SHA256()
        try:
            key.verify(base64.b64decode(m["Signature"]), sns_string_to_sign(m), padding.PKCS1v15(), h)
            return True
        except InvalidSignature:
            return False


class Ses:
    """SES event publishing to an SNS topic: one SES event per SNS Notification. Starts its own
    CertServer (the transport's sns_url_prefix)."""
    name = "ses"
    KINDS = ("delivered", "hard", "soft", "complaint", "open", "click", "unknown")

    def __init__(self, topic_arn=TOPIC_ARN):
        self.sns = Sns(topic_arn)
        self.server = CertServer(self.sns.cert_pem).start()
        self.sns.cert_url = self.server.cert_url
        self._next_version = 1

    def options(self):
        return {"sns_topic_arn": self.sns.topic_arn, "sns_url_prefix": self.server.prefix}

    def event(self, kind, msg, *, recipient=None, url=CLICK_URL, marker=None, version=None, subject=None, **_):
        rcpt = recipient or msg.recipient
        pid = msg.provider_id or f"0102{secrets.token_hex(6)}-{uuid.uuid4()}-000000"
        tags = {"ses:configuration-set": ["pg-email"], "ses:source-ip": ["192.0.2.10"],
                "ses:from-domain": ["example.org"], "ses:caller-identity": ["pg-email"],
                "ses:outgoing-ip": ["54.240.3.1"]}
        if msg.id is not None:
            tags["pg_email_id"] = [str(msg.id)]
        mail = {"timestamp": _iso(), "source": "tests@example.org",
                "sourceArn": f"arn:aws:ses:{REGION}:{ACCOUNT}:identity/example.org",
                "sendingAccountId": ACCOUNT, "messageId": pid, "destination": list(msg.recipients),
                "headersTruncated": False,
                "headers": [{"name": "From", "value": SENDER}, {"name": "To", "value": ", ".join(msg.recipients)},
                            {"name": "Subject", "value": SUBJECT},
                            {"name": "Message-ID", "value": f"<{pid}@{REGION}.amazonses.com>"},
                            {"name": "MIME-Version", "value": "1.0"}],
                "commonHeaders": {"from": [SENDER], "to": list(msg.recipients), "messageId": pid,
                                  "subject": SUBJECT},
                "tags": tags}
        x = {}
        if kind == "delivered":
            e = {"eventType": "Delivery", "mail": mail, "delivery": {
                "timestamp": _iso(), "processingTimeMillis": 1132, "recipients": [rcpt],
                "smtpResponse": "250 2.6.0 Message received", "reportingMTA": "a6-1.smtp-out.eu-west-1.amazonses.com"}}
        elif kind in ("hard", "soft"):
            hard = kind == "hard"
            e = {"eventType": "Bounce", "mail": mail, "bounce": {
                "feedbackId": f"0102{secrets.token_hex(6)}-{uuid.uuid4()}-000000",
                "bounceType": "Permanent" if hard else "Transient",
                "bounceSubType": "General" if hard else "MailboxFull",
                "bouncedRecipients": [{"emailAddress": rcpt, "action": "failed",
                                       "status": "5.1.1" if hard else "4.2.2",
                                       "diagnosticCode": "smtp; 550 5.1.1 user unknown" if hard
                                       else "smtp; 452 4.2.2 Mailbox full"}],
                "timestamp": _iso(), "reportingMTA": "dsn; a6-1.smtp-out.eu-west-1.amazonses.com"}}
            x["enhanced_code"] = "5.1.1" if hard else "4.2.2"
        elif kind == "complaint":
            e = {"eventType": "Complaint", "mail": mail, "complaint": {
                "feedbackId": f"0102{secrets.token_hex(6)}-{uuid.uuid4()}-000000",
                "complaintSubType": None, "complainedRecipients": [{"emailAddress": rcpt}],
                "timestamp": _iso(), "userAgent": "Yahoo!-Mail-Feedback/2.0",
                "complaintFeedbackType": "abuse", "arrivalDate": _iso()}}
        elif kind == "open":
            e = {"eventType": "Open", "mail": mail, "open": {"ipAddress": IP, "timestamp": _iso(), "userAgent": UA}}
            x.update(ip=IP, user_agent=UA)
        elif kind == "click":
            e = {"eventType": "Click", "mail": mail, "click": {
                "ipAddress": IP, "timestamp": _iso(), "userAgent": UA, "link": url,
                "linkTags": {"samplekey0": ["samplevalue0"]}}}
            x.update(url=url, ip=IP, user_agent=UA)
        elif kind == "unknown":
            e = {"eventType": "PgEmailFuture", "mail": mail, "pgEmailFuture": {"marker": marker or ""}}
        else:
            raise ValueError(f"SES has no {kind} event here")
        return Ev(kind, msg, e, _expect(kind, rcpt, **x), sig_version=version, subject=subject)

    def requests(self, evs):
        """One SNS Notification per event; SignatureVersion as the event says, else 1 and 2 in
        turn."""
        out = []
        for ev in evs:
            v = ev.sig_version
            if v is None:
                v, self._next_version = self._next_version, 3 - self._next_version
            r = self.sns.notification(json.dumps(ev.data, ensure_ascii=False), version=v, subject=ev.subject)
            out.append(r.replace(events=[ev], event_ids=[{r.extra["sns"]["MessageId"]}]))
        return out

    def retry(self, req):
        return req

    def tamper(self, req, needle):
        return req.replace(body=flip_byte(req.body, needle.encode()))

    def close(self):
        self.server.stop()


PROVIDERS = {"sendgrid": SendGrid, "postmark": Postmark, "resend": Resend, "mailgun": Mailgun, "ses": Ses}


# ---------------------------------------------------------------------------------------------
# HTTP clients


def post(url, headers, body, timeout=120.0):
    """POST with http.client (a new connection, no proxy); returns (status, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path + ("?" + u.query if u.query else ""), body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def raw_post(url, headers, body, *, chunked=False, timeout=120.0, piece=16384):
    """POST over a plain socket that keeps reading while it writes, so that a response sent
    before the body was read (413 on Content-Length, or mid-way through a chunked body) is seen
    even if the server then closes or resets the connection. Returns (status, body, all_sent)."""
    u = urllib.parse.urlsplit(url)
    head = [f"POST {u.path} HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                           for i in range(0, len(body), piece)) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
    deadline = time.monotonic() + timeout
    sent, got, writing = 0, b"", True
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    try:
        sock.setblocking(False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete response from {url} within {timeout} s; got {got[:200]!r}")
            r, w, _ = select.select([sock], [sock] if writing and sent < len(out) else [], [], left)
            if r:
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                if not data:
                    break
                got += data
                writing = False  # the server has answered: stop sending
                if _complete(got):
                    break
            if w:
                try:
                    sent += sock.send(out[sent:sent + piece])
                except (BrokenPipeError, ConnectionResetError):
                    writing = False
    finally:
        sock.close()
    if not got.startswith(b"HTTP/1."):
        raise ConnectionError(f"no HTTP response from {url}: {got[:200]!r}")
    status = int(got.split(b" ", 2)[1])
    _, _, rest = got.partition(b"\r\n\r\n")
    return status, rest, sent == len(out)


def _complete(data):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value.strip())
    return False  # no Content-Length: read until the server closes


def curl_post(url, headers, body, *, user=None, timeout=120):
    """POST with curl (no proxy); user="name:password" lets curl build the Basic header itself.
    Returns (status, body)."""
    with tempfile.TemporaryDirectory(prefix="pg-email-curl-") as d:
        data, out = os.path.join(d, "body"), os.path.join(d, "out")
        with open(data, "wb") as f:
            f.write(body)
        cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(timeout)), "-o", out,
               "-w", "%{http_code}", "-X", "POST", "--data-binary", "@" + data]
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        if user is not None:
            cmd += ["-u", user]
        p = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=timeout + 10)
        assert p.returncode == 0, f"curl failed ({p.returncode}): {p.stderr}"
        with open(out, "rb") as f:
            return int(p.stdout.strip()), f.read()


def random_msg(label="nobody"):
    """A message no database has: a huge id, fresh address, provider id and Message-ID."""
    return Msg(id=8_000_000_000_000 + random.randrange(10 ** 9),
               recipients=(f"{label}-{uuid.uuid4().hex[:12]}@example.test",),
               provider_id=f"unknown-{uuid.uuid4()}", message_id=f"<{uuid.uuid4().hex}@nowhere.example.test>")
