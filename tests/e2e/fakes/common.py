"""What the five provider fakes share: the Reply they answer with, the Provider interface the
HTTP server drives, and the parsing of addresses, base64 and JSON bodies."""
import base64
import binascii
import json
import re


class Provider:
    """One provider's send call. server.Fake drives it, in this order:

        validate(rec)  -> [(address, locator)] of the recipients; raises Reply to refuse the
                          request (path, method, authentication, content type, body shape)
        idempotency(rec) -> a Reply that answers a replayed or conflicting request, or None
        fail(status, retry_after)  -> the provider's error Reply for a scripted failure
        reject(rec, address, locator) -> the provider's recipient-level rejection
        success(rec)   -> the provider's success Reply (accepted=True); sets rec["message_id"]

    `path()` is the URL path of the send call; the fake's settings (key, domain, SES
    credentials) are read from `self.fake`."""

    PATH = None

    def __init__(self, fake):
        self.fake = fake

    def path(self):
        return self.PATH

    def idempotency(self, rec):
        return None


class Reply(Exception):
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


def reason(status):
    return _REASONS.get(status, "Error")


_LOCAL_RE = re.compile(r'^[^@\s<>()\[\]\\,;:"]+$')
_DOMAIN_RE = re.compile(r'^[^@\s<>()\[\]\\,;:"_.][^@\s<>()\[\]\\,;:"]*$')


def is_email(s):
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


def mailbox(s):
    """'a@b' or 'Name <a@b>' or '"Name, Jr." <a@b>' -> 'a@b'; None when not a valid mailbox."""
    if not isinstance(s, str) or "\r" in s or "\n" in s:
        return None
    m = _MAILBOX_RE.match(s)
    if not m:
        return None
    addr = m.group("a1") or m.group("a2")
    return addr if is_email(addr) else None


def split_list(s):
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


def mailbox_list(s):
    """'a@b, Name <c@d>' -> (['a@b', 'c@d'], None) or (None, offending entry)."""
    if not isinstance(s, str):
        return None, s
    addrs = []
    for part in split_list(s):
        a = mailbox(part)
        if a is None:
            return None, part.strip()
        addrs.append(a)
    return addrs, None


def b64(s, *, lenient_whitespace=True):
    """Strict base64 decoding; None when not base64. Line breaks are tolerated unless told."""
    if not isinstance(s, str):
        return None
    if lenient_whitespace:
        s = s.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def mime_type(headers):
    return headers.get("content-type", "").split(";")[0].strip().lower()


def load_json(rec):
    """Parses the body as JSON into rec['json']; returns (ok, value)."""
    try:
        value = json.loads(rec["body"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, None
    rec["json"] = value
    return True, value


def is_name_value(h):
    """A {Name, Value} header object of single-line strings (Postmark and SES Simple)."""
    return (isinstance(h, dict) and not set(h) - {"Name", "Value"}
            and isinstance(h.get("Name"), str) and bool(h["Name"])
            and isinstance(h.get("Value"), str)
            and not has_crlf(h["Name"]) and not has_crlf(h["Value"]))


def has_crlf(s):
    return isinstance(s, str) and ("\r" in s or "\n" in s)


# The key pg_email sends its message id (email.messages.id) under as custom data: SendGrid
# custom_args, Postmark Metadata, Mailgun v:pg_email_id, Resend tags and SES EmailTags.
ID_KEY = "pg_email_id"


def echoed_id(value):
    """The message id as found in a request's custom data, recorded as rec["pg_email_id"]: an int
    when it is a decimal integer (a string, or a JSON number for Mailgun), else the value as it
    came, so that a wrong value shows in a comparison; None when absent."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return value


def retry_headers(retry_after):
    return {"Retry-After": retry_after} if retry_after is not None else {}


def retry_seconds(retry_after, default=1):
    try:
        return max(0, int(retry_after))
    except (TypeError, ValueError):
        return default
