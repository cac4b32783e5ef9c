"""Local fake servers for the five provider HTTP APIs that pg_email sends mail through.

    Fake(provider, port, *, key=..., domain=..., access_key=..., secret_key=..., region=...)

provider is one of "sendgrid", "postmark", "resend", "mailgun", "ses". Every fake listens on
127.0.0.1:port (plain HTTP) in a background thread of this process and implements the send call
described in /work/shared/PROVIDERS.md, ENFORCING the documented request shape: the URL path, the
authentication (for SES a real AWS Signature Version 4, verified independently with botocore), the
content type and the body. A request that the real service would refuse is refused here with the
provider's own status, headers and error body; a request it would accept is answered with the
provider's own success response and recorded in `accepted`.

    fake.requests        every request received, valid or not, in order of arrival
    fake.accepted        only those answered with success
    fake.fail_next(status, n=1, retry_after=None)
                         the next n otherwise-valid requests get this status and the provider's
                         error body for it (plus Retry-After when given)
    fake.reject_address(address)
                         a valid request naming the address (to/cc/bcc, case-insensitive) gets the
                         provider's recipient-level rejection
    fake.wait_for(n, timeout=10.0)
                         waits until len(accepted) >= n; returns accepted, raises AssertionError
    fake.set_down(True)  every connection is closed at once without a response
    fake.url / fake.endpoint / fake.reset() / fake.clear_rejections()

Each recorded request is a dict:

    method, path, query ({name: [values]}), headers ({lower-case name: value}), body (bytes),
    json (parsed JSON or None), form ({field: [str values]} or None, Mailgun),
    files ([{field, filename, content_type, content}], Mailgun), mime (email.message.EmailMessage
    for SES Raw content, else None), status (int answered), response (dict/list answered as JSON,
    or bytes), response_headers (dict), at (time.monotonic() on arrival)

and, where they apply: message_id (the id answered on success), rejected_address (reject_address
hit), idempotent_replay (Resend: same Idempotency-Key and body, answered with the first id and not
added to `accepted`), batch_index (Postmark /email/batch: accepted holds one entry per accepted
message, with json = that message), sigv4 (SES: canonical_request, string_to_sign, expected and
given signature, to debug a refusal), raw_query and _raw_headers (as received).

Order of checks: path and method, authentication, content type and body shape (all of these are
refused whatever was scripted), then Resend idempotency replay/conflict, then fail_next, then
reject_address, then success. A bug inside the fake is answered with status 599 and a text body.

Requests are appended to `requests` on arrival (status None until answered, which happens before
the response is written); a success is appended to `accepted` before its response is written.

Start/stop: start() returns self once the port listens; stop() is idempotent, closes kept-alive
connections and joins the thread; both are available through `with Fake(...) as fake:`. Fakes still
running at interpreter exit are stopped by an atexit hook. Run under Debian's /usr/bin/python3
(python3-botocore is needed for SES).
"""
import atexit
import base64
import binascii
import collections
import datetime
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import http.server
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
import uuid

__all__ = ["Fake", "PROVIDERS"]

HOST = "127.0.0.1"
PROVIDERS = ("sendgrid", "postmark", "resend", "mailgun", "ses")

_LIVE = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all():
    with _LIVE_LOCK:
        fakes = list(_LIVE)
    for f in fakes:
        try:
            f.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# helpers


class _Reply(Exception):
    """An HTTP answer. Raised by validators, returned by the commit step."""

    def __init__(self, status, body=b"", headers=None, accepted=False):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.accepted = accepted


_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Entity", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _reason(status):
    return _REASONS.get(status, "Error")


_LOCAL_RE = re.compile(r'^[^@\s<>()\[\]\\,;:"]+$')
_DOMAIN_RE = re.compile(r'^[^@\s<>()\[\]\\,;:"_.][^@\s<>()\[\]\\,;:"]*$')


def _is_email(s):
    """A bare address: local@domain, no display name, no spaces or specials."""
    if not isinstance(s, str) or len(s) > 320 or "@" not in s:
        return False
    local, _, domain = s.rpartition("@")
    if not local or not domain or not _LOCAL_RE.match(local) or not _DOMAIN_RE.match(domain):
        return False
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    if domain.endswith(".") or ".." in domain or domain.startswith("-"):
        return False
    return True


_MAILBOX_RE = re.compile(
    r'^\s*(?:(?P<name>"(?:[^"\\\r\n]|\\.)*"|[^<>"\r\n]*?)\s*<(?P<a1>[^<>\s]+)>|(?P<a2>[^<>\s",]+))\s*$'
)


def _mailbox(s):
    """'a@b' or 'Name <a@b>' or '"Name, Jr." <a@b>' -> 'a@b'; None when not a valid mailbox."""
    if not isinstance(s, str) or "\r" in s or "\n" in s:
        return None
    m = _MAILBOX_RE.match(s)
    if not m:
        return None
    addr = m.group("a1") or m.group("a2")
    return addr if _is_email(addr) else None


def _split_list(s):
    """Splits an address list at commas outside quotes and angle brackets."""
    out, cur, quoted, angle, esc = [], [], False, False, False
    for ch in s:
        if esc:
            cur.append(ch)
            esc = False
            continue
        if quoted and ch == "\\":
            cur.append(ch)
            esc = True
            continue
        if ch == '"' and not angle:
            quoted = not quoted
        elif ch == "<" and not quoted:
            angle = True
        elif ch == ">" and not quoted:
            angle = False
        elif ch == "," and not quoted and not angle:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def _mailbox_list(s):
    """'a@b, Name <c@d>' -> (['a@b', 'c@d'], None) or (None, offending entry)."""
    if not isinstance(s, str):
        return None, s
    addrs = []
    for part in _split_list(s):
        a = _mailbox(part)
        if a is None:
            return None, part.strip()
        addrs.append(a)
    return addrs, None


def _b64(s, *, lenient_whitespace=True):
    """Strict base64 decoding; None when not base64. Line breaks are tolerated unless told."""
    if not isinstance(s, str):
        return None
    if lenient_whitespace:
        s = s.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def _mime_type(headers):
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _load_json(rec):
    """Parses the body as JSON into rec['json']; returns (ok, value)."""
    try:
        value = json.loads(rec["body"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, None
    rec["json"] = value
    return True, value


def _is_name_value(h):
    """A {Name, Value} header object of single-line strings (Postmark and SES Simple)."""
    return (isinstance(h, dict) and not set(h) - {"Name", "Value"}
            and isinstance(h.get("Name"), str) and bool(h["Name"])
            and isinstance(h.get("Value"), str)
            and not _has_crlf(h["Name"]) and not _has_crlf(h["Value"]))


def _has_crlf(s):
    return isinstance(s, str) and ("\r" in s or "\n" in s)


def _retry_headers(retry_after):
    return {"Retry-After": retry_after} if retry_after is not None else {}


def _retry_seconds(retry_after, default=1):
    try:
        return max(0, int(retry_after))
    except (TypeError, ValueError):
        return default


# --------------------------------------------------------------------------------------------
# SendGrid


class _SendGrid:
    PATH = "/v3/mail/send"
    RESERVED_HEADERS = {
        "from", "to", "subject", "reply-to", "cc", "bcc", "content-type", "dkim-signature",
        "content-transfer-encoding", "x-sg-id", "x-sg-eid", "received",
    }
    TOP_KEYS = {
        "personalizations", "from", "reply_to", "reply_to_list", "subject", "content",
        "attachments", "template_id", "headers", "categories", "custom_args", "send_at",
        "batch_id", "asm", "ip_pool_name", "mail_settings", "tracking_settings",
    }
    P_KEYS = {
        "to", "cc", "bcc", "from", "subject", "headers", "substitutions",
        "dynamic_template_data", "custom_args", "send_at",
    }
    MAX_BODY = 30 * 1024 * 1024

    def __init__(self, fake):
        self.fake = fake

    @staticmethod
    def err(status, message, field=None, headers=None):
        return _Reply(status, {"errors": [{"message": message, "field": field, "help": None}]}, headers)

    def validate(self, rec):
        if rec["path"] != self.PATH:
            raise self.err(404, "not found")
        if rec["method"] != "POST":
            raise self.err(405, "method not allowed")
        scheme, _, token = rec["headers"].get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.fake.key:
            raise self.err(401, "The provided authorization grant is invalid, expired, or revoked")
        if len(rec["body"]) > self.MAX_BODY:
            raise self.err(413, "The JSON payload you have included in your request is too large.")
        ok, body = _load_json(rec)
        if _mime_type(rec["headers"]) != "application/json":
            raise self.err(400, "Content-Type should be application/json.")
        if not ok or not isinstance(body, dict):
            raise self.err(400, "Bad Request")
        return self.validate_body(body)

    def email_obj(self, obj, field, what="email"):
        if not isinstance(obj, dict):
            raise self.err(400, f"The {what} must be an object with an email and an optional name.", field)
        for k in obj:
            if k not in ("email", "name"):
                raise self.err(400, f"Unknown field `{k}`.", f"{field}.{k}")
        if not _is_email(obj.get("email")):
            raise self.err(400, "Does not contain a valid address.", f"{field}.email")
        name = obj.get("name")
        if name is not None and (not isinstance(name, str) or _has_crlf(name)):
            raise self.err(400, "The name must be a string without line breaks.", f"{field}.name")
        return obj["email"]

    def headers_obj(self, h, field):
        if not isinstance(h, dict):
            raise self.err(400, "The headers must be an object of string values.", field)
        for name, value in h.items():
            if not isinstance(value, str) or _has_crlf(value) or _has_crlf(name) or not name:
                raise self.err(400, "Header values must be strings.", f"{field}.{name}")
            if name.lower() in self.RESERVED_HEADERS:
                raise self.err(400, f"The header {name} is reserved and may not be set in headers.",
                               f"{field}.{name}")

    def custom_args(self, ca, field):
        if not isinstance(ca, dict) or not all(isinstance(v, str) for v in ca.values()):
            raise self.err(400, "The custom_args must be an object of string values.", field)
        if len(json.dumps(ca).encode()) > 10000:
            raise self.err(400, "The custom_args may not exceed 10,000 bytes.", field)

    def validate_body(self, b):
        for k in b:
            if k not in self.TOP_KEYS:
                raise self.err(400, f"Unknown field `{k}`.", k)
        ps = b.get("personalizations")
        if not isinstance(ps, list) or not 1 <= len(ps) <= 1000:
            raise self.err(400, "The personalizations field is required and must have at least one "
                                "personalization and no more than 1000.", "personalizations")
        self.email_obj(b.get("from"), "from", "from")
        if "reply_to" in b and "reply_to_list" in b:
            raise self.err(400, "reply_to and reply_to_list are mutually exclusive.", "reply_to")
        if "reply_to" in b:
            self.email_obj(b["reply_to"], "reply_to", "reply_to")
        if "reply_to_list" in b:
            if not isinstance(b["reply_to_list"], list) or not b["reply_to_list"]:
                raise self.err(400, "The reply_to_list must be a non-empty array.", "reply_to_list")
            for i, r in enumerate(b["reply_to_list"]):
                self.email_obj(r, f"reply_to_list.{i}", "reply_to")
        top_subject = b.get("subject")
        if top_subject is not None and not isinstance(top_subject, str):
            raise self.err(400, "The subject must be a string.", "subject")
        templated = "template_id" in b
        recipients = []
        for pi, p in enumerate(ps):
            pf = f"personalizations.{pi}"
            if not isinstance(p, dict):
                raise self.err(400, "Each personalization must be an object.", pf)
            for k in p:
                if k not in self.P_KEYS:
                    raise self.err(400, f"Unknown field `{k}`.", f"{pf}.{k}")
            seen = set()
            for kind in ("to", "cc", "bcc"):
                lst = p.get(kind)
                if lst is None:
                    if kind == "to":
                        raise self.err(400, "The to array is required for all personalization objects, "
                                            "and must have at least one email object with a valid email "
                                            "address.", f"{pf}.to")
                    continue
                if not isinstance(lst, list) or (kind == "to" and not lst):
                    raise self.err(400, f"The {kind} field must be an array of email objects"
                                        + (" with at least one element." if kind == "to" else "."),
                                   f"{pf}.{kind}")
                for i, r in enumerate(lst):
                    f = f"{pf}.{kind}.{i}"
                    addr = self.email_obj(r, f)
                    if addr.lower() in seen:
                        raise self.err(400, "Each email address in the personalization block should be "
                                            "unique between to, cc, and bcc. We found the first duplicate "
                                            f"instance of [{addr}] in the personalizations.{pi}.{kind} field.",
                                       f"{f}.email")
                    seen.add(addr.lower())
                    recipients.append((addr, f"{f}.email"))
            if "from" in p:
                self.email_obj(p["from"], f"{pf}.from", "from")
            if "subject" in p and not isinstance(p["subject"], str):
                raise self.err(400, "The subject must be a string.", f"{pf}.subject")
            if not templated and not top_subject and not p.get("subject"):
                raise self.err(400, "The subject is required. You can get around this requirement if you "
                                    "use a template with a subject defined or if every personalization "
                                    "has a subject defined.", "subject")
            if "headers" in p:
                self.headers_obj(p["headers"], f"{pf}.headers")
            if "custom_args" in p:
                self.custom_args(p["custom_args"], f"{pf}.custom_args")
            if "send_at" in p and (type(p["send_at"]) is not int):
                raise self.err(400, "The send_at must be a unix timestamp (integer).", f"{pf}.send_at")
        if len(recipients) > 1000:
            raise self.err(400, "The total number of recipients in all personalizations may not exceed "
                                "1000.", "personalizations")
        content = b.get("content")
        if content is None and not templated:
            raise self.err(400, "Unless a valid template_id is provided, the content parameter is "
                                "required. There must be at least one defined content block. We "
                                "typically suggest both text/plain and text/html blocks are included, "
                                "but only one block is required.", "content")
        if content is not None:
            if not isinstance(content, list) or not content:
                raise self.err(400, "The content must be an array with at least one content block.",
                               "content")
            types = []
            for i, c in enumerate(content):
                f = f"content.{i}"
                if not isinstance(c, dict) or set(c) - {"type", "value"}:
                    raise self.err(400, "Each content block must be an object with type and value.", f)
                if not isinstance(c.get("type"), str) or not c["type"] or _has_crlf(c["type"]):
                    raise self.err(400, "The content type must be a string at least one character in "
                                        "length.", f"{f}.type")
                if not isinstance(c.get("value"), str) or not c["value"]:
                    raise self.err(400, "The content value must be a string at least one character in "
                                        "length.", f"{f}.value")
                types.append(c["type"].split(";")[0].strip().lower())
            if len(set(types)) != len(types):
                raise self.err(400, "Each content type may appear only once.", "content")
            if "text/plain" in types and types.index("text/plain") != 0:
                raise self.err(400, "If present, text/plain must be first, followed by text/html, "
                                    "followed by any other content.", "content")
            if "text/html" in types and types.index("text/html") != (1 if "text/plain" in types else 0):
                raise self.err(400, "If present, text/plain must be first, followed by text/html, "
                                    "followed by any other content.", "content")
        atts = b.get("attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.err(400, "The attachments must be an array.", "attachments")
            for i, a in enumerate(atts):
                f = f"attachments.{i}"
                if not isinstance(a, dict):
                    raise self.err(400, "Each attachment must be an object.", f)
                for k in a:
                    if k not in ("content", "type", "filename", "disposition", "content_id"):
                        raise self.err(400, f"Unknown field `{k}`.", f"{f}.{k}")
                if not a.get("content") or _b64(a["content"]) is None:
                    raise self.err(400, "The attachment content must be base64 encoded.", f"{f}.content")
                if not isinstance(a.get("filename"), str) or not a["filename"] or _has_crlf(a["filename"]):
                    raise self.err(400, "The attachment filename parameter is required.", f"{f}.filename")
                if "type" in a and (not isinstance(a["type"], str) or not a["type"] or _has_crlf(a["type"])):
                    raise self.err(400, "The attachment type must be a string.", f"{f}.type")
                disp = a.get("disposition", "attachment")
                if disp not in ("attachment", "inline"):
                    raise self.err(400, "The disposition of your attachment can be either 'inline' or "
                                        "'attachment'.", f"{f}.disposition")
                if disp == "inline" and (not isinstance(a.get("content_id"), str) or not a["content_id"]):
                    raise self.err(400, "The content_id parameter is required if your attachment has a "
                                        "disposition of 'inline'.", f"{f}.content_id")
                if "content_id" in a and not isinstance(a["content_id"], str):
                    raise self.err(400, "The content_id must be a string.", f"{f}.content_id")
        cats = b.get("categories")
        if cats is not None:
            if not isinstance(cats, list) or len(cats) > 10:
                raise self.err(400, "You may not have more than 10 categories per request.", "categories")
            for i, c in enumerate(cats):
                if not isinstance(c, str) or not c or len(c) > 255:
                    raise self.err(400, "Each category must be a string of 1 to 255 characters.",
                                   f"categories.{i}")
        if "custom_args" in b:
            self.custom_args(b["custom_args"], "custom_args")
        if "headers" in b:
            self.headers_obj(b["headers"], "headers")
        if "send_at" in b and type(b["send_at"]) is not int:
            raise self.err(400, "The send_at must be a unix timestamp (integer).", "send_at")
        if "mail_settings" in b and not isinstance(b["mail_settings"], dict):
            raise self.err(400, "The mail_settings must be an object.", "mail_settings")
        return recipients

    def fail(self, status, retry_after):
        msgs = {
            400: "Bad Request", 401: "The provided authorization grant is invalid, expired, or revoked",
            403: "access forbidden", 404: "not found", 413: "The JSON payload you have included in "
            "your request is too large.", 429: "too many requests", 500: "internal server error",
            503: "service unavailable",
        }
        headers = _retry_headers(retry_after)
        if status == 429:
            headers.update({
                "X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(time.time()) + max(1, _retry_seconds(retry_after))),
            })
        return self.err(status, msgs.get(status, _reason(status).lower()), None, headers)

    def reject(self, rec, address, locator):
        return self.err(400, "Does not contain a valid address.", locator)

    def success(self, rec):
        sandbox = False
        ms = rec["json"].get("mail_settings") or {}
        if isinstance(ms.get("sandbox_mode"), dict) and ms["sandbox_mode"].get("enable") is True:
            sandbox = True
        mid = secrets.token_urlsafe(16)[:22]
        rec["message_id"] = mid
        return _Reply(200 if sandbox else 202, b"", {"X-Message-Id": mid}, accepted=True)


# --------------------------------------------------------------------------------------------
# Postmark


class _Postmark:
    KEYS = {
        "From", "To", "Cc", "Bcc", "Subject", "Tag", "HtmlBody", "TextBody", "ReplyTo", "Headers",
        "TrackOpens", "TrackLinks", "Attachments", "Metadata", "MessageStream", "InlineCss",
    }

    def __init__(self, fake):
        self.fake = fake

    @staticmethod
    def err(status, code, message, headers=None):
        return _Reply(status, {"ErrorCode": code, "Message": message}, headers)

    def bad(self, message):
        return self.err(422, 300, message)

    def validate(self, rec):
        if rec["path"] not in ("/email", "/email/batch"):
            raise self.err(404, 0, "Not found.")
        if rec["method"] != "POST":
            raise self.err(405, 0, "Method not allowed.")
        if rec["headers"].get("x-postmark-server-token") != self.fake.key:
            raise self.err(401, 10, "Request does not contain a valid Server token.")
        if "application/json" not in rec["headers"].get("accept", "").lower():
            raise self.bad("The 'Accept' header must be 'application/json'.")
        ok, body = _load_json(rec)
        if _mime_type(rec["headers"]) != "application/json":
            raise self.bad("The 'Content-Type' header must be 'application/json'.")
        if not ok:
            raise self.err(422, 402, "Received invalid JSON input.")
        if rec["path"] == "/email/batch":
            if not isinstance(body, list) or not 1 <= len(body) <= 500:
                raise self.bad("A batch must be a JSON array of 1 to 500 messages.")
            results = []
            for msg in body:
                try:
                    results.append(("ok", self.validate_message(msg)))
                except _Reply as r:
                    results.append(("err", r))
            return results
        return self.validate_message(body)

    def validate_message(self, m):
        if not isinstance(m, dict):
            raise self.bad("The message must be a JSON object.")
        for k in m:
            if k not in self.KEYS:
                raise self.bad(f"Unknown field '{k}'.")
        frm = m.get("From")
        if not isinstance(frm, str) or not frm.strip():
            raise self.bad("Invalid 'From' address: ''.")
        if _mailbox(frm) is None:
            raise self.bad(f"Invalid 'From' address: '{frm}'.")
        recipients = []
        for field in ("To", "Cc", "Bcc"):
            v = m.get(field)
            if v is None or v == "":
                continue
            addrs, badpart = _mailbox_list(v)
            if addrs is None:
                raise self.bad(f"Invalid '{field}' address: '{badpart}'.")
            recipients += [(a, field) for a in addrs]
        if not m.get("To"):
            raise self.bad("Zero recipients specified")
        if len(recipients) > 50:
            raise self.bad("Maximum of 50 recipients exceeded: 'To', 'Cc' and 'Bcc' may hold at most "
                           f"50 recipients in total, you supplied {len(recipients)}.")
        for field in ("Subject", "HtmlBody", "TextBody", "Tag", "MessageStream", "TrackLinks"):
            if field in m and m[field] is not None and not isinstance(m[field], str):
                raise self.bad(f"The '{field}' field must be a string.")
        if _has_crlf(m.get("Subject")):
            raise self.bad("The 'Subject' may not contain line breaks.")
        if not m.get("HtmlBody") and not m.get("TextBody"):
            raise self.bad("Provide either email TextBody or HtmlBody or both.")
        if m.get("Tag") is not None and len(m["Tag"]) > 1000:
            raise self.bad("The 'Tag' may hold at most 1000 characters.")
        if m.get("TrackLinks") not in (None, "None", "HtmlAndText", "HtmlOnly", "TextOnly"):
            raise self.bad("Invalid 'TrackLinks' value.")
        if m.get("TrackOpens") is not None and not isinstance(m["TrackOpens"], bool):
            raise self.bad("The 'TrackOpens' field must be a boolean.")
        if m.get("MessageStream") is not None and not m["MessageStream"]:
            raise self.bad("The 'MessageStream' may not be empty.")
        rt = m.get("ReplyTo")
        if rt is not None and rt != "":
            if _mailbox_list(rt)[0] is None:
                raise self.bad(f"Invalid 'ReplyTo' address: '{rt}'.")
        hs = m.get("Headers")
        if hs is not None:
            if not isinstance(hs, list):
                raise self.bad("The 'Headers' field must be an array of {Name, Value} objects.")
            if not all(_is_name_value(h) for h in hs):
                raise self.bad("Each header must be an object {Name, Value} of strings.")
        atts = m.get("Attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.bad("The 'Attachments' field must be an array.")
            for a in atts:
                if not isinstance(a, dict) or set(a) - {"Name", "Content", "ContentType", "ContentID"}:
                    raise self.bad("Each attachment must be an object {Name, Content, ContentType, "
                                   "ContentID}.")
                if not isinstance(a.get("Name"), str) or not a["Name"]:
                    raise self.bad("Attachment 'Name' is required.")
                if not isinstance(a.get("ContentType"), str) or not a["ContentType"]:
                    raise self.bad(f"Attachment 'ContentType' is required ({a['Name']}).")
                if _b64(a.get("Content")) is None:
                    raise self.bad(f"Attachment 'Content' must be base64 encoded ({a['Name']}).")
                if "ContentID" in a and a["ContentID"] is not None and not isinstance(a["ContentID"], str):
                    raise self.bad("Attachment 'ContentID' must be a string.")
        md = m.get("Metadata")
        if md is not None:
            if not isinstance(md, dict) or len(md) > 10:
                raise self.bad("'Metadata' must be an object of at most 10 fields.")
            for k, v in md.items():
                if not k or len(k) > 20 or not isinstance(v, str) or len(v) > 80:
                    raise self.bad("Metadata keys may hold at most 20 characters and values must be "
                                   "strings of at most 80 characters.")
        return recipients

    def fail(self, status, retry_after):
        h = _retry_headers(retry_after)
        if status == 401:
            return self.err(401, 10, "Request does not contain a valid Server token.", h)
        if status == 422:
            return self.err(422, 300, "Invalid request", h)
        msgs = {429: "Rate limit exceeded. Please retry later.", 500: "Internal server error.",
                503: "Service unavailable. Please retry later."}
        return self.err(status, 0, msgs.get(status, _reason(status) + "."), h)

    @staticmethod
    def reject_body(address):
        return {"ErrorCode": 406, "Message": "You tried to send to recipient(s) that have been marked as "
                f"inactive. Found inactive addresses: {address}. Inactive recipients are ones that have "
                "generated a hard bounce, a spam complaint, or a manual suppression."}

    def reject(self, rec, address, locator):
        return _Reply(422, self.reject_body(address))

    @staticmethod
    def ok_body(m):
        return {"To": m.get("To"),
                "SubmittedAt": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "MessageID": str(uuid.uuid4()), "ErrorCode": 0, "Message": "OK"}

    def success(self, rec):
        body = self.ok_body(rec["json"])
        rec["message_id"] = body["MessageID"]
        return _Reply(200, body, accepted=True)


# --------------------------------------------------------------------------------------------
# Resend


class _Resend:
    KEYS = {"from", "to", "subject", "cc", "bcc", "reply_to", "html", "text", "headers",
            "scheduled_at", "attachments", "tags"}
    TAG_RE = re.compile(r"^[A-Za-z0-9_-]+$")

    def __init__(self, fake):
        self.fake = fake

    @staticmethod
    def err(status, name, message, headers=None):
        return _Reply(status, {"statusCode": status, "message": message, "name": name}, headers)

    def bad(self, message):
        return self.err(422, "validation_error", message)

    def addr_field(self, v, field, limit=None):
        vals = [v] if isinstance(v, str) else v
        if not isinstance(vals, list) or not vals or not all(isinstance(x, str) for x in vals):
            raise self.bad(f"Invalid `{field}` field. It must be a string or an array of strings.")
        if limit is not None and len(vals) > limit:
            raise self.bad(f"Invalid `{field}` field. It may contain at most {limit} addresses.")
        out = []
        for x in vals:
            a = _mailbox(x)
            if a is None:
                raise self.bad(f"Invalid `{field}` field. The email address needs to follow the "
                               "`email@example.com` or `Name <email@example.com>` format.")
            out.append(a)
        return out

    def validate(self, rec):
        if rec["path"] != "/emails":
            raise self.err(404, "not_found", "The requested endpoint does not exist.")
        if rec["method"] != "POST":
            raise self.err(405, "method_not_allowed", "Method is not allowed for the requested path.")
        auth = rec["headers"].get("authorization")
        scheme, _, token = (auth or "").partition(" ")
        if not auth or scheme.lower() != "bearer" or not token.strip():
            raise self.err(401, "missing_api_key", "Missing API key in the authorization header")
        if token.strip() != self.fake.key:
            raise self.err(403, "invalid_api_key", "API key is invalid")
        ik = rec["headers"].get("idempotency-key")
        if ik is not None and not 1 <= len(ik) <= 256:
            raise self.err(400, "invalid_idempotency_key", "The key must be between 1-256 chars.")
        ok, b = _load_json(rec)
        if _mime_type(rec["headers"]) != "application/json":
            raise self.bad("Invalid content type: the body must be sent as application/json.")
        if not ok or not isinstance(b, dict):
            raise self.bad("Invalid JSON body.")
        for k in b:
            if k not in self.KEYS:
                raise self.bad(f"Unknown field `{k}`.")
        for f in ("from", "to", "subject"):
            if b.get(f) is None:
                raise self.err(422, "missing_required_field", f"Missing `{f}` field.")
        if _mailbox(b["from"]) is None:
            raise self.bad("Invalid `from` field. The email address needs to follow the "
                           "`email@example.com` or `Name <email@example.com>` format.")
        recipients = [(a, "to") for a in self.addr_field(b["to"], "to", 50)]
        for f in ("cc", "bcc"):
            if b.get(f) is not None:
                recipients += [(a, f) for a in self.addr_field(b[f], f)]
        if b.get("reply_to") is not None:
            self.addr_field(b["reply_to"], "reply_to")
        if not isinstance(b["subject"], str) or _has_crlf(b["subject"]):
            raise self.bad("Invalid `subject` field. It must be a string without line breaks.")
        for f in ("html", "text", "scheduled_at"):
            if b.get(f) is not None and not isinstance(b[f], str):
                raise self.bad(f"Invalid `{f}` field. It must be a string.")
        if not b.get("html") and not b.get("text"):
            raise self.bad("Missing `html` or `text` field.")
        hs = b.get("headers")
        if hs is not None:
            if not isinstance(hs, dict) or not all(isinstance(v, str) and not _has_crlf(v) and
                                                   k and not _has_crlf(k) for k, v in hs.items()):
                raise self.bad("Invalid `headers` field. It must be an object of string values.")
        atts = b.get("attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.err(422, "invalid_attachment", "Attachments must be an array.")
            for a in atts:
                if not isinstance(a, dict) or set(a) - {"content", "path", "filename", "content_type",
                                                        "content_id"}:
                    raise self.err(422, "invalid_attachment", "Attachment must be an object with "
                                   "content or path, filename, content_type and content_id.")
                has_c, has_p = a.get("content") is not None, a.get("path") is not None
                if has_c == has_p:
                    raise self.err(422, "invalid_attachment",
                                   "Attachment must have either a `content` or `path`.")
                if has_c and _b64(a["content"]) is None:
                    raise self.err(422, "invalid_attachment",
                                   "Attachment `content` must be base64 encoded.")
                if has_p and (not isinstance(a["path"], str) or not a["path"]):
                    raise self.err(422, "invalid_attachment", "Attachment `path` must be a URL.")
                fn = a.get("filename")
                if (has_c and not fn) or (fn is not None and (not isinstance(fn, str) or _has_crlf(fn))):
                    raise self.err(422, "invalid_attachment", "Attachment `filename` is required.")
                for f in ("content_type", "content_id"):
                    if a.get(f) is not None and (not isinstance(a[f], str) or not a[f] or _has_crlf(a[f])):
                        raise self.err(422, "invalid_attachment", f"Attachment `{f}` must be a string.")
        tags = b.get("tags")
        if tags is not None:
            if not isinstance(tags, list):
                raise self.bad("Invalid `tags` field. It must be an array of {name, value}.")
            for t in tags:
                if not isinstance(t, dict) or set(t) - {"name", "value"}:
                    raise self.bad("Invalid `tags` field. It must be an array of {name, value}.")
                name, value = t.get("name"), t.get("value")
                if not isinstance(name, str) or not self.TAG_RE.match(name) or len(name) > 256:
                    raise self.bad("Tags should only contain ASCII letters (a–z, A–Z), numbers (0–9), "
                                   "underscores (_), or dashes (-). It can contain no more than 256 "
                                   "characters.")
                if value is not None and (not isinstance(value, str) or
                                          (value and not self.TAG_RE.match(value)) or len(value) > 256):
                    raise self.bad("Tags should only contain ASCII letters (a–z, A–Z), numbers (0–9), "
                                   "underscores (_), or dashes (-). It can contain no more than 256 "
                                   "characters.")
        return recipients

    def idempotency(self, rec):
        """Under the fake's lock, before anything else is decided: a replay or a conflict."""
        ik = rec["headers"].get("idempotency-key")
        if ik is None:
            return None
        canon = json.dumps(rec["json"], sort_keys=True)
        seen = self.fake._idempotency.get(ik)
        if seen is None:
            return None
        if seen[0] != canon:
            return self.err(409, "invalid_idempotent_request", "Same idempotency key used with a "
                            "different request payload. Change your idempotency key or payload.")
        rec["idempotent_replay"] = True
        rec["message_id"] = seen[1]
        return _Reply(200, {"id": seen[1]})

    def fail(self, status, retry_after):
        h = _retry_headers(retry_after)
        if status == 429:
            h.update({"ratelimit-limit": "2", "ratelimit-remaining": "0",
                      "ratelimit-reset": str(max(1, _retry_seconds(retry_after)))})
            if retry_after is not None:
                h["retry-after"] = h.pop("Retry-After")
            return self.err(429, "rate_limit_exceeded", "Too many requests", h)
        names = {400: ("validation_error", "Invalid request"),
                 401: ("missing_api_key", "Missing API key in the authorization header"),
                 403: ("invalid_api_key", "API key is invalid"),
                 404: ("not_found", "The requested endpoint does not exist."),
                 409: ("concurrent_idempotent_requests", "Same idempotency key used while original "
                       "request is still in progress."),
                 422: ("validation_error", "Invalid request")}
        name, msg = names.get(status, ("application_error", "An unexpected error occurred."))
        return self.err(status, name, msg, h)

    def reject(self, rec, address, locator):
        return _Reply(422, {"statusCode": 422, "name": "validation_error",
                            "message": "Invalid `to` field. The email address needs to follow the "
                            "`email@example.com` or `Name <email@example.com>` format: " + address})

    def success(self, rec):
        mid = str(uuid.uuid4())
        rec["message_id"] = mid
        ik = rec["headers"].get("idempotency-key")
        if ik is not None:
            self.fake._idempotency[ik] = (json.dumps(rec["json"], sort_keys=True), mid)
        return _Reply(200, {"id": mid}, accepted=True)


# --------------------------------------------------------------------------------------------
# Mailgun


def _parse_multipart(body, boundary):
    """multipart/form-data -> [(header Message, content bytes)]; ValueError when malformed."""
    delim = b"--" + boundary.encode("latin-1")
    if body.startswith(delim):
        i = len(delim)
    else:
        pos = body.find(b"\r\n" + delim)
        if pos < 0:
            raise ValueError("no boundary delimiter in the body")
        i = pos + 2 + len(delim)
    parts = []
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    while True:
        if body[i:i + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", i)
        if eol < 0 or body[i:eol].strip(b" \t"):
            raise ValueError("malformed boundary line")
        start = eol + 2
        nxt = body.find(b"\r\n" + delim, start)
        if nxt < 0:
            raise ValueError("no closing boundary delimiter")
        part = body[start:nxt]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]
        else:
            he = part.find(b"\r\n\r\n")
            if he < 0:
                raise ValueError("part without a header/body separator")
            head, content = part[:he + 2], part[he + 4:]
        headers = parser.parsestr(head.decode("utf-8", "replace"))
        cte = (headers.get("content-transfer-encoding") or "").strip().lower()
        if cte == "base64":
            content = base64.b64decode(content)
        elif cte == "quoted-printable":
            content = binascii.a2b_qp(content)
        parts.append((headers, content))
        i = nxt + 2 + len(delim)


class _Mailgun:
    PATH_RE = re.compile(r"^/v3/([^/]+)/messages$")
    FIELDS = {"from", "to", "cc", "bcc", "subject", "text", "html", "amp-html", "attachment",
              "inline", "template", "recipient-variables"}
    OPTION_PREFIXES = ("o:", "h:", "v:", "t:")
    MAX_OPTION = 16 * 1024
    MAX_BODY = 25 * 1024 * 1024

    def __init__(self, fake):
        self.fake = fake

    @staticmethod
    def err(status, message, headers=None):
        return _Reply(status, {"message": message}, headers)

    def validate(self, rec):
        m = self.PATH_RE.match(rec["path"])
        if not m:
            raise _Reply(404, b"404 page not found\n", {"Content-Type": "text/plain; charset=utf-8"})
        if rec["method"] != "POST":
            raise self.err(405, "Method Not Allowed")
        auth = rec["headers"].get("authorization", "")
        scheme, _, cred = auth.partition(" ")
        try:
            user, _, pw = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            user = pw = None
        if scheme.lower() != "basic" or user != "api" or pw != self.fake.key:
            raise _Reply(401, b"Forbidden", {"Content-Type": "text/plain; charset=utf-8"})
        domain = urllib.parse.unquote(m.group(1))
        if domain.lower() != self.fake.domain.lower():
            raise self.err(404, f"Domain not found: {domain}")
        if len(rec["body"]) > self.MAX_BODY:
            raise self.err(413, "Request entity too large: messages may not exceed 25 MB.")
        ctype = rec["headers"].get("content-type", "")
        if _mime_type(rec["headers"]) != "multipart/form-data":
            raise self.err(400, "The body must be multipart/form-data (got "
                                f"{ctype or 'no Content-Type'}).")
        msg = email.message.Message()
        msg["Content-Type"] = ctype
        boundary = msg.get_param("boundary")
        if not boundary:
            raise self.err(400, "multipart/form-data without a boundary.")
        try:
            parts = _parse_multipart(rec["body"], boundary)
        except (ValueError, binascii.Error) as e:
            raise self.err(400, f"Malformed multipart/form-data body: {e}.")
        form, files = {}, []
        for headers, content in parts:
            if headers.get_content_disposition() != "form-data":
                raise self.err(400, "Every part must have Content-Disposition: form-data.")
            name = headers.get_param("name", header="content-disposition")
            if not name:
                raise self.err(400, "A form-data part without a name.")
            name = email.utils.collapse_rfc2231_value(name)
            filename = headers.get_filename()
            if filename is not None:
                files.append({"field": name, "filename": filename,
                              "content_type": headers.get_content_type() if headers.get("content-type")
                              else "application/octet-stream",
                              "content": content})
                continue
            charset = headers.get_content_charset() or "utf-8"
            try:
                value = content.decode(charset)
            except (LookupError, UnicodeDecodeError):
                raise self.err(400, f"Parameter '{name}' is not valid {charset} text.")
            form.setdefault(name, []).append(value)
        rec["form"], rec["files"] = form, files
        return self.validate_form(form, files)

    def validate_form(self, form, files):
        for name in form:
            if name in ("attachment", "inline"):
                raise self.err(400, f"'{name}' parameter must be a file part (with a filename).")
            if name not in self.FIELDS and not name.startswith(self.OPTION_PREFIXES):
                raise self.err(400, f"Unknown parameter '{name}'.")
        for f in files:
            if f["field"] not in ("attachment", "inline"):
                raise self.err(400, f"Unexpected file part '{f['field']}'.")
        if not form.get("from"):
            raise self.err(400, "'from' parameter is missing")
        if len(form["from"]) != 1 or _mailbox(form["from"][0]) is None:
            raise self.err(400, "from parameter is not a valid address. please check documentation")
        if not form.get("to"):
            raise self.err(400, "'to' parameter is missing")
        recipients = []
        for field in ("to", "cc", "bcc"):
            for v in form.get(field, []):
                addrs, badpart = _mailbox_list(v)
                if addrs is None:
                    raise self.err(400, f"{field} parameter is not a valid address. please check "
                                        f"documentation: {badpart}")
                recipients += [(a, field) for a in addrs]
        if len(recipients) > 1000:
            raise self.err(400, "Too many recipients: at most 1000 in to, cc and bcc together.")
        if not form.get("subject"):
            raise self.err(400, "'subject' parameter is missing")
        for field in ("subject", "text", "html", "template"):
            if len(form.get(field, [])) > 1:
                raise self.err(400, f"'{field}' parameter may be given only once.")
        if _has_crlf(form["subject"][0]):
            raise self.err(400, "'subject' may not contain line breaks.")
        if not form.get("text") and not form.get("html") and not form.get("template"):
            raise self.err(400, "Need at least one of 'text', 'html' or 'template' parameters "
                                "specified")
        for name, values in form.items():
            if name.startswith(self.OPTION_PREFIXES):
                for v in values:
                    if len(v.encode("utf-8")) > self.MAX_OPTION:
                        raise self.err(400, f"'{name}' parameter value is too large: options, headers "
                                            "and variables may hold at most 16 KB.")
            if name.startswith("h:") and (len(name) == 2 or any(_has_crlf(v) for v in values)):
                raise self.err(400, f"'{name}' is not a valid header.")
        if len(form.get("o:tag", [])) > 3:
            raise self.err(400, "Too many tags: a message may carry at most 3 'o:tag' values.")
        for v in form.get("o:testmode", []):
            if v.lower() not in ("yes", "no", "true", "false"):
                raise self.err(400, "'o:testmode' must be yes, no, true or false.")
        for v in form.get("o:deliverytime", []):
            try:
                email.utils.parsedate_to_datetime(v)
            except (TypeError, ValueError):
                raise self.err(400, "'o:deliverytime' must be an RFC 2822 date.")
        return recipients

    def fail(self, status, retry_after):
        h = _retry_headers(retry_after)
        if status == 401:
            return _Reply(401, b"Forbidden", dict(h, **{"Content-Type": "text/plain; charset=utf-8"}))
        msgs = {400: "Bad request", 403: "Forbidden", 404: "Not found",
                413: "Request entity too large", 429: "Too many requests, please retry later",
                500: "Internal server error", 503: "Service unavailable"}
        return self.err(status, msgs.get(status, _reason(status)), h)

    def reject(self, rec, address, locator):
        return self.err(400, "to parameter is not a valid address. please check documentation: "
                        + address)

    def success(self, rec):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S")
        mid = f"<{stamp}.{secrets.token_hex(8)}@{self.fake.domain}>"
        rec["message_id"] = mid
        return _Reply(200, {"id": mid, "message": "Queued. Thank you."}, accepted=True)


# --------------------------------------------------------------------------------------------
# Amazon SES v2


class _SES:
    PATH = "/v2/email/outbound-emails"
    KEYS = {"FromEmailAddress", "FromEmailAddressIdentityArn", "Destination", "ReplyToAddresses",
            "FeedbackForwardingEmailAddress", "FeedbackForwardingEmailAddressIdentityArn",
            "Content", "EmailTags", "ConfigurationSetName", "ListManagementOptions", "EndpointId"}
    TAG_RE = re.compile(r"^[A-Za-z0-9_-]*$")
    SIG_MISMATCH = "The request signature we calculated does not match the signature you provided."

    def __init__(self, fake):
        self.fake = fake

    @staticmethod
    def err(status, etype, message, headers=None):
        h = {"x-amzn-ErrorType": etype, "x-amzn-RequestId": str(uuid.uuid4())}
        h.update(headers or {})
        return _Reply(status, {"message": message}, h)

    def bad(self, message):
        return self.err(400, "BadRequestException", message)

    # ---- signature

    def verify_signature(self, rec):
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.compat import HTTPHeaders
        from botocore.credentials import Credentials

        hdrs = rec["headers"]
        auth = hdrs.get("authorization")
        if not auth:
            raise self.err(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        m = re.match(r"^AWS4-HMAC-SHA256\s+(.*)$", auth.strip())
        if not m:
            raise self.err(403, "IncompleteSignatureException",
                           "Authorization header requires the AWS4-HMAC-SHA256 algorithm.")
        params = {}
        for item in m.group(1).split(","):
            k, eq, v = item.strip().partition("=")
            if eq:
                params[k.strip()] = v.strip()
        missing = [p for p in ("Credential", "SignedHeaders", "Signature") if p not in params]
        if missing:
            raise self.err(403, "IncompleteSignatureException",
                           f"Authorization header requires '{missing[0]}' parameter. "
                           f"Authorization={auth}")
        scope = params["Credential"].split("/")
        if len(scope) != 5:
            raise self.err(403, "IncompleteSignatureException",
                           f"Credential should have exactly 5 slash-separated parts: "
                           f"{params['Credential']}")
        access, sdate, region, service, term = scope
        if access != self.fake.access_key:
            raise self.err(403, "UnrecognizedClientException",
                           "The security token included in the request is invalid.")
        amz_date = hdrs.get("x-amz-date")
        if amz_date is None and hdrs.get("date"):
            try:
                d = email.utils.parsedate_to_datetime(hdrs["date"])
                amz_date = d.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            except (TypeError, ValueError):
                amz_date = None
        if amz_date is None:
            raise self.err(403, "IncompleteSignatureException",
                           "Authorization header requires existence of either a 'X-Amz-Date' or a "
                           "'Date' header.")
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=datetime.timezone.utc)
        except ValueError:
            raise self.err(403, "IncompleteSignatureException",
                           f"X-Amz-Date must be in the ISO8601 Long Format: {amz_date}")
        if sdate != amz_date[:8]:
            raise self.err(403, "InvalidSignatureException",
                           f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                           f"date from HTTP: '{sdate}' != '{amz_date[:8]}', from '{amz_date}'.")
        if region != self.fake.region:
            raise self.err(403, "InvalidSignatureException",
                           f"Credential should be scoped to a valid region, not '{region}'.")
        if service != "ses":
            raise self.err(403, "InvalidSignatureException",
                           f"Credential should be scoped to correct service: 'ses'. ")
        if term != "aws4_request":
            raise self.err(403, "InvalidSignatureException",
                           f"Credential should be scoped with a valid terminator: 'aws4_request', "
                           f"not '{term}'.")
        now = datetime.datetime.now(datetime.timezone.utc)
        if abs((now - when).total_seconds()) > 15 * 60:
            raise self.err(403, "InvalidSignatureException",
                           f"Signature expired: {amz_date} is now earlier than "
                           f"{(now - datetime.timedelta(minutes=15)).strftime('%Y%m%dT%H%M%SZ')}.")
        signed = params["SignedHeaders"].split(";")
        if "host" not in signed:
            raise self.err(403, "InvalidSignatureException",
                           "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
        if "x-amz-date" in hdrs and "x-amz-date" not in signed:
            raise self.err(403, "InvalidSignatureException",
                           "'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization.")
        for name in signed:
            if name not in hdrs:
                raise self.err(403, "InvalidSignatureException", self.SIG_MISMATCH)
        token = hdrs.get("x-amz-security-token")
        if self.fake.session_token is None and token is not None:
            raise self.err(403, "UnrecognizedClientException",
                           "The security token included in the request is invalid.")
        if self.fake.session_token is not None and (token != self.fake.session_token
                                                    or "x-amz-security-token" not in signed):
            raise self.err(403, "UnrecognizedClientException",
                           "The security token included in the request is invalid.")
        sha = hdrs.get("x-amz-content-sha256")
        if sha is not None and sha != hashlib.sha256(rec["body"]).hexdigest():
            raise self.err(403, "InvalidSignatureException",
                           "The provided 'x-amz-content-sha256' header does not match what was "
                           "computed.")

        raw_pairs = rec["_raw_headers"]

        class _Exact(SigV4Auth):
            # Exactly the headers the client says it signed, with all their values as received.
            def headers_to_sign(self, request):
                hm = HTTPHeaders()
                for n, v in raw_pairs:
                    if n.lower() in signed:
                        hm[n.lower()] = v
                return hm

        req = AWSRequest(method=rec["method"], url=f"http://{hdrs['host']}{rec['path']}",
                         data=rec["body"],
                         params=[(urllib.parse.unquote(k), urllib.parse.unquote(v))
                                 for k, _, v in (p.partition("=") for p in rec["raw_query"].split("&") if p)])
        for n, v in raw_pairs:
            if n.lower() == "x-amz-content-sha256":
                req.headers["X-Amz-Content-SHA256"] = v
        req.context["timestamp"] = amz_date
        signer = _Exact(Credentials(self.fake.access_key, self.fake.secret_key,
                                    self.fake.session_token), "ses", self.fake.region)
        canonical = signer.canonical_request(req)
        sts = signer.string_to_sign(req, canonical)
        expected = signer.signature(sts, req)
        rec["sigv4"] = {"canonical_request": canonical, "string_to_sign": sts,
                        "expected": expected, "given": params["Signature"]}
        if not hmac.compare_digest(expected, params["Signature"]):
            raise self.err(403, "InvalidSignatureException", self.SIG_MISMATCH)

    # ---- body

    def address(self, v, what):
        a = _mailbox(v)
        if a is None:
            raise self.bad(f"Invalid email address <{v}> in {what}.")
        local, _, domain = a.rpartition("@")
        if not local.isascii():
            raise self.bad(f"Local address contains control or whitespace or non-ASCII characters: "
                           f"<{v}> in {what}.")
        if not domain.isascii():
            raise self.bad(f"Domain contains illegal character (non-ASCII; use Punycode): <{v}> in "
                           f"{what}.")
        return a

    def string_list(self, v, what):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.bad(f"{what} must be a list of strings.")
        return v

    def charset_data(self, obj, what):
        if not isinstance(obj, dict) or set(obj) - {"Data", "Charset"} or not isinstance(obj.get("Data"), str):
            raise self.bad(f"{what} must be an object {{Data, Charset}} with a string Data.")
        if "Charset" in obj and not isinstance(obj["Charset"], str):
            raise self.bad(f"{what}.Charset must be a string.")

    def validate(self, rec):
        if rec["path"] != self.PATH:
            raise self.err(404, "UnknownOperationException", "Unknown operation.")
        if rec["method"] != "POST":
            raise self.err(405, "UnknownOperationException", "Unknown operation.")
        self.verify_signature(rec)
        ok, b = _load_json(rec)
        if _mime_type(rec["headers"]) != "application/json":
            raise self.bad("Content-Type must be application/json.")
        if not ok or not isinstance(b, dict):
            raise self.err(400, "SerializationException", "Could not parse the request body as a JSON "
                                                          "object.")
        for k in b:
            if k not in self.KEYS:
                raise self.bad(f"Unknown member '{k}'.")
        frm = b.get("FromEmailAddress")
        if frm is not None:
            if not isinstance(frm, str):
                raise self.bad("FromEmailAddress must be a string.")
            self.address(frm, "FromEmailAddress")
        content = b.get("Content")
        if not isinstance(content, dict):
            raise self.bad("Content is required.")
        kinds = [k for k in ("Simple", "Raw", "Template") if content.get(k) is not None]
        if len(kinds) != 1 or set(content) - {"Simple", "Raw", "Template"}:
            raise self.bad("Content must contain exactly one of Simple, Raw or Template.")
        recipients = []
        dest = b.get("Destination")
        if dest is not None:
            if not isinstance(dest, dict) or set(dest) - {"ToAddresses", "CcAddresses", "BccAddresses"}:
                raise self.bad("Destination must be an object {ToAddresses, CcAddresses, BccAddresses}.")
            for field, loc in (("ToAddresses", "to"), ("CcAddresses", "cc"), ("BccAddresses", "bcc")):
                for a in self.string_list(dest.get(field, []), f"Destination.{field}"):
                    recipients.append((self.address(a, f"Destination.{field}"), loc))
        if b.get("ReplyToAddresses") is not None:
            for a in self.string_list(b["ReplyToAddresses"], "ReplyToAddresses"):
                self.address(a, "ReplyToAddresses")
        if "Simple" in kinds:
            self.validate_simple(content["Simple"])
            if frm is None:
                raise self.bad("Missing required field FromEmailAddress.")
        elif "Raw" in kinds:
            mime_rcpts = self.validate_raw(rec, content["Raw"], frm)
            if dest is None:
                recipients = mime_rcpts
        else:
            t = content["Template"]
            if not isinstance(t, dict) or not (t.get("TemplateName") or t.get("TemplateArn")
                                               or t.get("TemplateContent")):
                raise self.bad("Template must name a TemplateName, TemplateArn or TemplateContent.")
            if frm is None:
                raise self.bad("Missing required field FromEmailAddress.")
        if not recipients:
            raise self.bad("Missing required field Destination: at least one recipient is required.")
        if len(recipients) > 50:
            raise self.bad("Recipient count exceeds 50.")
        tags = b.get("EmailTags")
        if tags is not None:
            if not isinstance(tags, list):
                raise self.bad("EmailTags must be a list of {Name, Value}.")
            for t in tags:
                if (not isinstance(t, dict) or set(t) - {"Name", "Value"}
                        or not isinstance(t.get("Name"), str) or not isinstance(t.get("Value"), str)
                        or not t["Name"] or len(t["Name"]) > 256 or len(t["Value"]) > 256
                        or not self.TAG_RE.match(t["Name"]) or not self.TAG_RE.match(t["Value"])):
                    raise self.bad("Tag names and values may only contain ASCII letters, numbers, "
                                   "underscores and dashes, at most 256 characters.")
        if b.get("ConfigurationSetName") is not None and (
                not isinstance(b["ConfigurationSetName"], str) or not b["ConfigurationSetName"]):
            raise self.bad("ConfigurationSetName must be a non-empty string.")
        return recipients

    def validate_simple(self, s):
        if not isinstance(s, dict) or set(s) - {"Subject", "Body", "Headers", "Attachments"}:
            raise self.bad("Content.Simple must be an object {Subject, Body, Headers, Attachments}.")
        self.charset_data(s.get("Subject"), "Content.Simple.Subject")
        if _has_crlf(s["Subject"]["Data"]):
            raise self.bad("Content.Simple.Subject may not contain line breaks.")
        body = s.get("Body")
        if not isinstance(body, dict) or set(body) - {"Text", "Html"} or not body:
            raise self.bad("Content.Simple.Body must hold Text and/or Html.")
        for k, v in body.items():
            self.charset_data(v, f"Content.Simple.Body.{k}")
        hs = s.get("Headers")
        if hs is not None:
            if not isinstance(hs, list) or len(hs) > 15:
                raise self.bad("Content.Simple.Headers must be a list of at most 15 {Name, Value}.")
            if not all(_is_name_value(h) for h in hs):
                raise self.bad("Each header must be an object {Name, Value} of strings.")
        atts = s.get("Attachments")
        if atts is not None:
            if not isinstance(atts, list):
                raise self.bad("Content.Simple.Attachments must be a list.")
            allowed = {"RawContent", "ContentDisposition", "FileName", "ContentDescription",
                       "ContentId", "ContentTransferEncoding", "ContentType"}
            for a in atts:
                if not isinstance(a, dict) or set(a) - allowed:
                    raise self.bad("Invalid attachment object.")
                if _b64(a.get("RawContent"), lenient_whitespace=False) is None:
                    raise self.bad("Attachment RawContent must be base64 encoded.")
                if not isinstance(a.get("FileName"), str) or not a["FileName"]:
                    raise self.bad("Attachment FileName is required.")
                if a.get("ContentDisposition") not in (None, "ATTACHMENT", "INLINE"):
                    raise self.bad("Attachment ContentDisposition must be ATTACHMENT or INLINE.")
                if a.get("ContentTransferEncoding") not in (None, "BASE64", "QUOTED_PRINTABLE",
                                                            "SEVEN_BIT"):
                    raise self.bad("Invalid attachment ContentTransferEncoding.")

    def validate_raw(self, rec, raw, frm):
        if not isinstance(raw, dict) or set(raw) - {"Data"}:
            raise self.bad("Content.Raw must be an object {Data}.")
        data = _b64(raw.get("Data"), lenient_whitespace=False)
        if not data:
            raise self.bad("Content.Raw.Data must be a non-empty base64 string.")
        if b"\n\n" not in data.replace(b"\r\n", b"\n") and not data.replace(b"\r\n", b"\n").endswith(b"\n"):
            raise self.bad("Content.Raw.Data is not a MIME message (no header section).")
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
        rec["mime"] = msg
        if not msg.keys():
            raise self.bad("Content.Raw.Data is not a MIME message (no headers).")
        if frm is None and msg.get("From") is None:
            raise self.bad("Missing required header 'From'.")
        rcpts = []
        for field, loc in (("To", "to"), ("Cc", "cc"), ("Bcc", "bcc")):
            for h in msg.get_all(field, []):
                for part in _split_list(str(h)):
                    if not part.strip():
                        continue
                    a = _mailbox(part)
                    if a is None:
                        raise self.bad(f"Illegal address in the {field} header: {part.strip()}")
                    rcpts.append((a, loc))
        return rcpts

    def fail(self, status, retry_after):
        h = _retry_headers(retry_after)
        types = {400: ("BadRequestException", "Bad request."),
                 403: ("AccessDeniedException", "Access denied."),
                 404: ("NotFoundException", "Resource not found."),
                 429: ("TooManyRequestsException", "Maximum sending rate exceeded."),
                 500: ("InternalServiceErrorException", "Internal service error."),
                 503: ("ServiceUnavailableException", "Service unavailable.")}
        etype, msg = types.get(status, ("InternalServiceErrorException" if status >= 500
                                        else "BadRequestException", _reason(status) + "."))
        return self.err(status, etype, msg, h)

    def reject(self, rec, address, locator):
        return self.err(400, "MessageRejected", "Email address is not verified. The following "
                        f"identities failed the check in region {self.fake.region.upper()}: {address}")

    def success(self, rec):
        mid = f"0102{secrets.token_hex(6)}-{uuid.uuid4()}-000000"
        rec["message_id"] = mid
        return _Reply(200, {"MessageId": mid},
                      {"x-amzn-RequestId": str(uuid.uuid4())}, accepted=True)


_IMPLS = {"sendgrid": _SendGrid, "postmark": _Postmark, "resend": _Resend, "mailgun": _Mailgun,
          "ses": _SES}


# --------------------------------------------------------------------------------------------
# the HTTP server


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
            self._write(_Reply(400, b"bad request framing\n", {"Content-Type": "text/plain"}))
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
            "mime": None, "status": None, "response": None, "response_headers": {}, "at": at,
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
        self.send_response(reply.status, _reason(reply.status) if reply.status != 202 else "Accepted")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class Fake:
    """A local fake of one provider's send API. See the module docstring."""

    def __init__(self, provider: str, port: int, *, key: str = "test-key",
                 domain: str = "mg.example.test", access_key: str = "AKIDEXAMPLE",
                 secret_key: str = "wJalr/XUtnFEMI+K7MDENG", region: str = "eu-west-1",
                 session_token: str | None = None):
        if provider not in _IMPLS:
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
        self._impl = _IMPLS[provider](self)

    # ---- addresses

    @property
    def url(self):
        """The base URL (scheme, host, port) to configure in place of the provider's API host."""
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self):
        """The full URL of the send call."""
        path = {"sendgrid": "/v3/mail/send", "postmark": "/email", "resend": "/emails",
                "mailgun": f"/v3/{self.domain}/messages", "ses": "/v2/email/outbound-emails"}
        return self.url + path[self.provider]

    # ---- life cycle

    def start(self) -> "Fake":
        if self._server is not None:
            return self
        self._stopping = False
        server = _HTTPServer((HOST, self.port), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-{self.provider}-{self.port}", daemon=True)
        self._thread.start()
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def stop(self):
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
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

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
        except _Reply as r:
            return self._finish(rec, r)
        except Exception as e:  # a bug in the fake must not look like a provider answer
            return self._finish(rec, _Reply(599, f"fake {self.provider} crashed: {e!r}\n"))
        with self._lock:
            if self.provider == "postmark" and rec["path"] == "/email/batch":
                return self._postmark_batch(rec, checked)
            if self.provider == "resend":
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

    def _postmark_batch(self, rec, results):
        if self._fail:
            status, retry_after = self._fail.popleft()
            return self._finish(rec, self._impl.fail(status, retry_after))
        out, accepted = [], []
        for i, (kind, val) in enumerate(results):
            msg = rec["json"][i]
            if kind == "err":
                out.append(val.body)
                continue
            bad = next((a for a, _ in val if a.lower() in self._rejected), None)
            if bad is not None:
                out.append(_Postmark.reject_body(bad))
                continue
            body = _Postmark.ok_body(msg)
            out.append(body)
            accepted.append(dict(rec, json=msg, batch_index=i, message_id=body["MessageID"],
                                 status=200, response=body))
        reply = self._finish(rec, _Reply(200, out))
        self.accepted.extend(accepted)
        self._cond.notify_all()
        return reply

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
