"""SMTP submission (RFC 6409): the listener's submission service on SUBMISSION_PORT, where an
application sends mail as any mail client does, with an API key's name and the key as AUTH user and
password. Part of `make test`, so CI runs it.

    clients       Python's smtplib (AUTH PLAIN with and without the initial response, AUTH LOGIN),
                  Nodemailer (tests/e2e/sdk, PLAIN and LOGIN) and swaks, each over STARTTLS from a
                  non-loopback address of this machine; the worker delivers to a real Postfix: one
                  Maildir copy per RCPT (the Bcc ones too), no Bcc field in any, the Message-ID that
                  email.messages.message_id names (ours when the client sent none, Nodemailer's
                  kept), and the stored message (the submitted one with its Bcc fields taken out and
                  a Message-ID added, nothing else changed) byte for byte at the end of each copy
    TLS and AUTH  AUTH before STARTTLS from a non-loopback address 530, on loopback it works
                  without TLS; MAIL before AUTH 530; a wrong key 535; bad base64 501; `*` cancels
                  (501); a second AUTH 503; commands pipelined in plaintext after STARTTLS are never
                  run; ten wrong keys from one address lock it out (454, even the right key)
    limits        SIZE over pg_email.max_message_size 552 (declared at MAIL or not), nothing stored;
                  more RCPTs than pg_email.max_recipients 452; RCPT takes any domain but checks the
                  syntax; no From 554, nothing stored; no Date or Message-ID: both added in front;
                  a suppressed recipient is dropped; rate '2/s': the refused messages 451 4.7.0,
                  exactly the 250 ones stored
    hostile input 500 generated sessions (random command sequences, bad base64, huge lines, invalid
                  UTF-8, pipelining floods, binary garbage, header injection, broken MIME, STARTTLS
                  midway): every reply line has a code, the listener stays up, and exactly the
                  messages answered "250 2.0.0 Ok: queued as <id>" are stored
    ack after commit  with email.messages locked, the end of DATA is not answered; kill -9 of the
                  listener then: no 250, nothing stored; after the restart a new submission is
                  stored (last test: the whole cluster restarts, as in test_listener.py)

The lockout of failed AUTHs is per source address, so each session comes from an address of its
own: 127.77.x.y (loopback: Linux routes all of 127.0.0.0/8 to lo) or, for the tests that must not
be on loopback, the address this machine uses towards 192.0.2.1 (10.213.0.1/32, added to lo for the
module, when that is none or loopback). The lockout test is the last to use that address. The
module makes a self-signed certificate (CN localhost; localhost, 127.0.0.1 and that address),
sets pg_email.submission_tls_cert/_key (ALTER SYSTEM + reload), resets both at its end, and makes
its own Postfix the default transport of `mail` for its duration. Every wait is generous (a loaded
2-core CI machine) and fails naming what it waited for."""
import base64
import datetime
import email
import email.parser
import email.policy
import email.utils
import ipaddress
import itertools
import json
import os
import pwd
import random
import re
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest

from conftest import (E2E_DIR, SLOW, SUBMISSION_PORT, Db, connect, fresh, postfix_as_default, sending_keys, server_log,
                      val_retry, wait_for_workers, wait_until)

HERE = os.path.dirname(os.path.abspath(__file__))
SDK_DIR = os.path.join(HERE, "sdk")
HOST = "127.0.0.1"
PF_PORT = 26600
PF_TRANSPORT = "subm_pf"
ROLES = ("subm_alice", "subm_bob")
FALLBACK_IP = "10.213.0.1"
TLS_DIR = os.path.join(E2E_DIR, "submission-tls")
SENDER = "sender@example.test"
CRLF = b"\r\n"
TXT = b"Hello attachment\n"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
HTML = '<p>Hello <b>world</b></p><img src="cid:logo">'
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\r?$)")
QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9]+)")
QUEUED_LINE = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9]+)\r?$")
# The answers the contract spells out in full (Postfix's wording).
MUST_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_FAILED = "535 5.7.8 Error: authentication failed"
LOCKED_OUT = "454 4.7.0 Error: too many failed authentications; try again later"


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def plain(user, password):
    """An AUTH PLAIN response (no authorization identity)."""
    return b64(f"\0{user}\0{password}")


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


_ADDRESSES = itertools.count(1)


def own_loopback():
    """A loopback source address no connection of this module used before (failed AUTHs are
    counted per source address): 127.77.x.y."""
    n = next(_ADDRESSES)
    return f"127.77.{n // 250}.{n % 250 + 1}"


# ---------------------------------------------------------------------------------------------
# Clients


class Raw:
    """A raw SMTP connection to the submission service from source address `src` (to `host`):
    commands out, replies in; every line the server sent is kept in .said (bytes, CR included)."""

    def __init__(self, src, host=HOST, timeout=60.0, greet=True):
        self.sock = socket.create_connection((host, SUBMISSION_PORT), timeout=timeout, source_address=(src, 0))
        self.buf = b""
        self.said = []
        if greet:
            code, lines = self.reply()
            assert code == 220, f"the greeting was {lines}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"the server closed the connection (its last lines: {self.said[-3:]})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.said.append(line)
        return line

    def reply(self):
        """One reply: (code, its lines as text); the code is None when the line has none."""
        lines = []
        while True:
            line = self.line()
            lines.append(line.rstrip(b"\r").decode(errors="replace"))
            if line[3:4] != b"-":
                return (int(line[:3]) if REPLY_LINE.match(line) else None), lines

    def replies(self, n):
        """n replies: [(code, lines)]."""
        return [self.reply() for _ in range(n)]

    def cmd(self, line):
        self.send((line if isinstance(line, bytes) else line.encode()) + CRLF)
        return self.reply()

    def ehlo(self, name="client.test"):
        """EHLO; the extensions offered, {KEYWORD: [PARAMS]} (upper case)."""
        code, lines = self.cmd(f"EHLO {name}")
        assert code == 250, f"EHLO was answered {lines}"
        out = {}
        for line in lines[1:]:
            words = line[4:].upper().split()
            if words:
                out[words[0]] = words[1:]
        return out

    def starttls(self, ctx, server_hostname="localhost"):
        code, lines = self.cmd("STARTTLS")
        assert code == 220, f"STARTTLS was answered {lines}"
        assert not self.buf, f"the server sent more after its 220 to STARTTLS: {self.buf[:300]!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def auth_plain(self, user, password):
        return self.cmd("AUTH PLAIN " + plain(user, password))

    def submit(self, message, rcpts, sender=SENDER):
        """MAIL, RCPTs (each must be 250), DATA (354) and the message, dot-stuffed; the final
        reply (code, lines)."""
        for line in [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in rcpts]:
            code, lines = self.cmd(line)
            assert code == 250, f"{line} was answered {lines}"
        code, lines = self.cmd("DATA")
        assert code == 354, f"DATA was answered {lines}"
        self.send(stuffed(message) + b".\r\n")
        return self.reply()

    def until_closed(self, timeout):
        """Everything the server still sends until it closes the connection (or `timeout` seconds
        pass; a reset counts as closing). Its full lines go to .said too."""
        data = self.buf
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:  # socket.timeout and ssl.SSLError among them
            pass
        *lines, self.buf = data.split(b"\n")
        self.said += lines
        return data


def stuffed(message):
    """The message as DATA carries it: a dot doubled at the start of each CRLF line, and ending
    with CRLF. (Bare LFs are left alone.)"""
    out = re.sub(rb"(^|\r\n)\.", rb"\1..", message)
    return out if out.endswith(CRLF) else out + CRLF


def queued(code, text):
    """The id in a '250 2.0.0 Ok: queued as <id>' answer (text: the reply text, or its lines)."""
    if isinstance(text, list):
        text = text[-1][4:]
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    m = QUEUED.fullmatch(text.strip())
    assert code == 250 and m, f"the end of DATA was answered {code} {text!r}, not 250 2.0.0 Ok: queued as <id>"
    return int(m.group(1))


def smtp(src, host=HOST, timeout=60.0):
    """smtplib from source address src."""
    return smtplib.SMTP(host, SUBMISSION_PORT, local_hostname="client.test", timeout=timeout, source_address=(src, 0))


def features(src=HOST, timeout=10.0):
    """The extensions the service offers to a client at src ({KEYWORD: [PARAMS]}), None when it
    does not answer."""
    try:
        with Raw(src, timeout=timeout) as c:
            return c.ehlo()
    except (OSError, EOFError, AssertionError):
        return None


def auth_code(user, password, timeout=10.0):
    """The code AUTH PLAIN user/password gets on loopback, from an address of its own (so that a
    refusal counts against no other test); None when the service does not answer."""
    try:
        with Raw(own_loopback(), timeout=timeout) as c:
            c.ehlo()
            return c.auth_plain(user, password)[0]
    except (OSError, EOFError, AssertionError):
        return None


def simple_message(subject, sender=SENDER, to="alice@example.test", extra=b"", body=b"hello\r\n", date=True):
    date = f"Date: {email.utils.formatdate()}\r\n" if date else ""
    return f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n{date}".encode() + extra + CRLF + body


def composed(subject):
    """A multipart message as a mail client hands it over: CRLF lines, 8-bit UTF-8 text and HTML,
    a base64 attachment, a Subject in an encoded word, a folded Bcc field and a second one in lower
    case, body lines that start with dots or look like a Bcc field, trailing spaces, no Message-ID.
    Returns (the message, the message without its Bcc fields, the envelope recipients)."""
    outer, inner = f"=_outer_{uuid.uuid4().hex}", f"=_inner_{uuid.uuid4().hex}"
    head = [
        b"From: Acme Sender <sender@example.test>\r\n",
        b"To: Alice <alice@example.test>\r\n",
        b"Cc: carol@example.test\r\n",
        b"Bcc: dave@example.test,\r\n  erin@example.test\r\n",
        f"Subject: =?utf-8?b?{b64(subject)}?=\r\n".encode(),
        f"Date: {email.utils.formatdate()}\r\n".encode(),
        b"MIME-Version: 1.0\r\n",
        b"X-Test:   spaced   value  \r\n",
        b"bcc: frank@example.test\r\n",
        f'Content-Type: multipart/mixed;\r\n boundary="{outer}"\r\n'.encode(),
    ]
    body = ("This is a multi-part message in MIME format.\r\n"
            f"--{outer}\r\n"
            f'Content-Type: multipart/alternative; boundary="{inner}"\r\n\r\n'
            f"--{inner}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Hello world \u2014 gr\u00fc\u00dfe\r\n.a line that starts with a dot\r\n..and one with two\r\n.\r\n"
            "Bcc: this is body text, not a field\r\ntrailing spaces   \r\n\r\n"
            f"--{inner}\r\n"
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "<p>Hello <b>world</b> \u2014 gr\u00fc\u00dfe</p>\r\n"
            f"--{inner}--\r\n"
            f"--{outer}\r\n"
            'Content-Type: text/plain; name="hello.txt"\r\nContent-Disposition: attachment; filename="hello.txt"\r\n'
            f"Content-Transfer-Encoding: base64\r\n\r\n{b64(TXT)}\r\n"
            f"--{outer}--\r\n").encode()
    raw = b"".join(head) + CRLF + body
    without = b"".join(h for h in head if not h.lower().startswith(b"bcc:")) + CRLF + body
    rcpts = ["alice@example.test", "carol@example.test", "dave@example.test", "erin@example.test", "frank@example.test"]
    return raw, without, rcpts


def node(message, options):
    """Runs tests/e2e/sdk/client.js in its nodemailer mode: one sendMail; its JSON outcome."""
    req = {"sdk": "nodemailer", "call": "send", "port": SUBMISSION_PORT, "key": None, "message": message,
           "options": options}
    p = subprocess.run(["node", os.path.join(SDK_DIR, "client.js")], input=json.dumps(req), capture_output=True,
                       text=True, timeout=180, cwd=SDK_DIR)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from Nodemailer: {p.stdout!r} {p.stderr!r}"
    return json.loads(lines[-1])


def swaks(*args, src, host=HOST, timeout=SLOW):
    """swaks against the submission service from source address src; (exit code, transcript)."""
    cmd = ["swaks", "--server", host, "--port", str(SUBMISSION_PORT), "--local-interface", src, "--helo", "client.test",
           "--timeout", "60", "--from", SENDER]
    p = subprocess.run(cmd + list(args), capture_output=True, timeout=timeout + 30)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


def server_lines(transcript):
    """What the server said, line by line (swaks marks it '<- ', '<~ ' after STARTTLS, and '<**'
    or '<~*' for errors)."""
    return [line[4:] for line in transcript.splitlines() if line.startswith(("<-  ", "<** ", "<~  ", "<~* "))]


# ---------------------------------------------------------------------------------------------
# The database side


def listener_pid():
    """The pid of the running listener (pg_stat_activity), None when there is none."""
    return val_retry("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email listener'")


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_submission(other_than=None, timeout=SLOW):
    """Waits until a listener (other than pid other_than) runs and its submission service offers
    STARTTLS; returns its pid."""
    found = []

    def up():
        pid = listener_pid()
        if pid is None or pid == other_than or "STARTTLS" not in (features() or {}):
            return False
        found[:] = [pid]
        return True

    wait_until(up, "the pg_email listener" + (f" to replace pid {other_than}" if other_than else "")
               + " to offer STARTTLS on the submission port", timeout, every=0.2)
    return found[0]


def stored(db, mid):
    """(created_by, sender, recipients, subject, message_id, raw bytes, status) of message mid."""
    r = db.one("SELECT created_by, sender, recipients, subject, message_id, raw, status::text FROM email.messages "
               "WHERE id = %s", mid)
    assert r is not None, f"the message answered 'queued as {mid}' is not in email.messages"
    return r[:5] + (bytes(r[5]) if r[5] is not None else None, r[6])


def check_stored(db, mid, without_bcc, *, role, rcpts, subject):
    """The row of a message submitted without Message-ID: the submitted bytes with the Bcc fields
    taken out and one field, Message-ID, added in front (it had a Date); returns (message_id, raw)."""
    created_by, sender, recipients, subj, message_id, raw, _ = stored(db, mid)
    assert (created_by, sender, recipients, subj) == (role, SENDER, rcpts, subject)
    assert raw is not None and raw.endswith(without_bcc), (
        "email.messages.raw is not the submitted message (Bcc fields out) with fields added in front:\n"
        f"{(raw or b'')[:3000]!r}")
    added = raw[:len(raw) - len(without_bcc)]
    m = re.fullmatch(rb"Message-ID: *(<[^<>\s]+@[^<>\s]+>)\r\n", added, re.I)
    assert m, f"added in front of the submitted message: {added!r} (expected only a Message-ID field)"
    assert m.group(1).decode() == message_id, (m.group(1), message_id)
    return message_id, raw


def header_block(raw):
    return re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]


def body_of(raw):
    parts = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)
    return parts[1] if len(parts) > 1 else b""


def copies(pf, subject, n, timeout=SLOW):
    """The n Maildir copies (one per recipient) of the message with this subject: [(bytes, parsed)]."""
    found = []
    headers = email.parser.BytesHeaderParser(policy=email.policy.default)

    def arrived():
        found[:] = [b for b in pf.raw_messages() if str(headers.parsebytes(b)["Subject"]) == subject]
        return len(found) >= n

    wait_until(arrived, f"{n} copies of {subject!r} in the Maildir", timeout)
    return [(b, email.message_from_bytes(b, policy=email.policy.default)) for b in found]


def check_copies(found, rcpts, message_id, raw):
    """Every copy: delivered to one RCPT each, no Bcc field, our Message-ID, and the stored message
    byte for byte at its end (Postfix writes LF line ends; it and the worker only add fields in
    front)."""
    assert sorted(str(m["Delivered-To"]).lower() for _, m in found) == sorted(rcpts)
    lf = raw.replace(b"\r\n", b"\n")
    for b, m in found:
        assert m["Bcc"] is None and not re.search(rb"(?im)^bcc\s*:", header_block(b)), \
            f"a Bcc field reached {m['Delivered-To']}:\n{header_block(b).decode(errors='replace')}"
        assert str(m["Message-ID"]).strip() == message_id, (str(m["Message-ID"]), message_id)
        assert body_of(b) == body_of(lf), f"the body reaching {m['Delivered-To']} differs from the submitted one"
        assert b.endswith(lf), (f"the copy for {m['Delivered-To']} does not end with the stored message:\n"
                                f"{b[:4000].decode(errors='replace')}")


def max_size(db):
    return db.val("SELECT pg_size_bytes(current_setting('pg_email.max_message_size'))")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def db(cluster):
    c = connect("mail")
    yield Db(c)
    c.close()  # broken after the kill -9 test: closing is enough


@pytest.fixture(scope="module")
def remote_ip():
    """A non-loopback IPv4 address of this machine: the one it would use towards 192.0.2.1
    (TEST-NET-1; connecting a UDP socket sends nothing), else 10.213.0.1/32 added to lo for the
    module (as root). Connections from it to itself stay on this machine."""
    ip = None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
    except OSError:
        pass
    added = False
    if ip is None or ipaddress.ip_address(ip).is_loopback or ipaddress.ip_address(ip).is_unspecified:
        ip = FALLBACK_IP
        p = subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], capture_output=True, text=True)
        assert p.returncode == 0 or "File exists" in p.stderr or "already assigned" in p.stderr, \
            f"ip addr add {ip}/32 dev lo: {p.stderr}"
        added = True  # ours, also when a crashed run left it behind
    with socket.socket() as s:
        s.bind((ip, 0))  # usable as a source address
    yield ip
    if added:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


def make_cert(d, ip):
    """A self-signed certificate (RSA 2048, CN localhost; SAN localhost, 127.0.0.1 and ip) and
    its key in d, both owned by postgres (the key 0600); returns (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address(ip))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    pg = pwd.getpwnam("postgres")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    for path, mode in ((cert_path, 0o644), (key_path, 0o600)):
        os.chmod(path, mode)
        os.chown(path, pg.pw_uid, pg.pw_gid)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls(cluster, remote_ip):
    """The service's certificate: set with ALTER SYSTEM + reload, waited for (EHLO offers STARTTLS),
    reset at the end. Yields {"cert": path, "pem": its text, "ctx": a client context trusting it}."""
    cert, key = make_cert(TLS_DIR, remote_ip)
    d = fresh()
    try:
        d.all("ALTER SYSTEM SET pg_email.submission_tls_cert = %s", cert)
        d.all("ALTER SYSTEM SET pg_email.submission_tls_key = %s", key)
        d.all("SELECT pg_reload_conf()")
    finally:
        d.conn.close()
    try:
        wait_until(lambda: "STARTTLS" in (features() or {}),
                   "the submission service to offer STARTTLS with the new certificate", SLOW, every=0.2)
        with open(cert) as f:
            pem = f.read()
        yield {"cert": cert, "pem": pem, "ctx": ssl.create_default_context(cafile=cert)}
    finally:
        d = fresh()
        try:
            d.all("ALTER SYSTEM RESET pg_email.submission_tls_cert")
            d.all("ALTER SYSTEM RESET pg_email.submission_tls_key")
            d.all("SELECT pg_reload_conf()")
        finally:
            d.conn.close()


@pytest.fixture(scope="module")
def postfix(cluster):
    """A Postfix the mail database's default transport delivers to, for this module only."""
    with postfix_as_default("postfix-submission", PF_PORT, PF_TRANSPORT) as pf:
        yield pf


@pytest.fixture(scope="module")
def keys(cluster, tls, postfix):
    """Two roles that may send, a key each (names subm-alice, subm-bob), and subm-slow (rate
    '2/s', role subm_alice); waits until the service takes them."""
    with sending_keys(ROLES, {"alice": ("subm-alice", "subm_alice", None), "bob": ("subm-bob", "subm_bob", None),
                              "slow": ("subm-slow", "subm_alice", "2/s")}) as k:
        for name, key in k.items():
            wait_until(lambda: auth_code(f"subm-{name}", key) == 235, f"the submission service to take key subm-{name}",
                       SLOW, every=0.2)
        yield k


# ---------------------------------------------------------------------------------------------
# Clients end to end, from a non-loopback address over STARTTLS


@pytest.mark.parametrize("mechanism, initial", [("PLAIN", True), ("PLAIN", False), ("LOGIN", False)],
                         ids=["plain", "plain-after-334", "login"])
def test_smtplib_over_starttls_is_stored_and_delivered_as_submitted(db, keys, postfix, tls, remote_ip, mechanism,
                                                                     initial):
    subject = f"Gr\u00fc\u00dfe {unique('smtplib')}"
    raw, without, rcpts = composed(subject)
    with smtp(remote_ip, remote_ip) as s:
        s.ehlo()
        wanted = ("size", "8bitmime", "pipelining", "enhancedstatuscodes", "starttls")
        missing = [e for e in wanted if not s.has_extn(e)]
        assert not missing, f"EHLO does not offer {missing}: {s.esmtp_features}"
        assert not s.has_extn("auth"), f"AUTH is offered to a non-loopback client before STARTTLS: {s.esmtp_features}"
        assert int(s.esmtp_features["size"]) == max_size(db), s.esmtp_features
        s.starttls(context=tls["ctx"])  # verifies the certificate for remote_ip
        s.ehlo()
        assert {"PLAIN", "LOGIN"} <= set(s.esmtp_features.get("auth", "").upper().split()), s.esmtp_features
        assert not s.has_extn("starttls"), f"STARTTLS is offered again inside TLS: {s.esmtp_features}"
        s.user, s.password = "subm-alice", keys["alice"]
        code, text = s.auth(mechanism, getattr(s, f"auth_{mechanism.lower()}"), initial_response_ok=initial)
        assert code == 235, (code, text)
        code, text = s.mail(SENDER, ["BODY=8BITMIME", f"SIZE={len(raw)}"])
        assert code == 250, (code, text)
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = s.data(raw)
    mid = queued(code, text)
    message_id, stored_raw = check_stored(db, mid, without, role="subm_alice", rcpts=rcpts, subject=subject)
    check_copies(copies(postfix, subject, len(rcpts)), rcpts, message_id, stored_raw)


def test_submitted_mail_is_dkim_signed_for_its_from_domain(db, keys, postfix):
    """A DKIM key for the From domain: the copy Postfix delivers carries one signature that dkimpy
    verifies (with a stand-in DNS serving the TXT value email.add_dkim_key returned), and a
    changed body byte fails it; the stored message itself stays unsigned."""
    from test_dkim import Keys, assert_fails, assert_verifies, change_body_byte, only_signature
    d = f"subm{uuid.uuid4().hex[:8]}.example"
    subject = unique("dkim")
    raw = simple_message(subject, sender=f"news@{d}", to="alice@example.test", body=b"Signed as submitted.\r\n")
    with Keys(db) as dk:
        dk.add(d, "sub1")
        with smtp(own_loopback()) as s:
            s.ehlo()
            s.login("subm-alice", keys["alice"])
            refused = s.sendmail(f"news@{d}", ["alice@example.test"], raw)
        assert not refused, refused
        mid = db.val("SELECT id FROM email.messages WHERE subject = %s", subject)
        assert mid, "the submitted message is not stored"
        assert b"DKIM-Signature" not in bytes(db.val("SELECT raw FROM email.messages WHERE id = %s", mid))
        [(delivered, _)] = copies(postfix, subject, 1)
        sig = only_signature(delivered)
        assert (sig["d"], sig["s"]) == (d, "sub1"), sig
        assert_verifies(delivered, dk.dns)
        assert_fails(change_body_byte(delivered), dk.dns, why="body hash mismatch")


@pytest.mark.parametrize("method", ["PLAIN", "LOGIN"])
def test_nodemailer_over_starttls_keeps_its_message_id_and_bcc_stays_in_the_envelope(db, keys, postfix, tls,
                                                                                      remote_ip, method):
    opts = {"host": remote_ip, "localAddress": remote_ip, "user": "subm-alice", "pass": keys["alice"],
            "method": method, "requireTLS": True, "ca": tls["pem"]}
    subject = unique("nodemailer")
    message = {
        "from": "Acme Sender <sender@example.test>", "to": ["alice@example.test", "Bob <bob@example.test>"],
        "cc": "carol@example.test", "bcc": "dave@example.test", "replyTo": "replies@example.test",
        "subject": subject, "text": "Hello world", "html": HTML, "headers": {"X-Test": "1"},
        "attachments": [{"filename": "hello.txt", "content": b64(TXT), "encoding": "base64",
                         "contentType": "text/plain"},
                        {"filename": "logo.png", "content": b64(PNG), "encoding": "base64",
                         "contentType": "image/png", "cid": "logo"}],
    }
    # Without STARTTLS a non-loopback client is not offered AUTH, and its MAIL is refused. (This
    # also shows that client.js connected to options.host: on loopback the send would work.)
    r = node({**message, "subject": subject + "-plaintext"}, {**opts, "requireTLS": False, "ignoreTLS": True})
    assert r["ok"] is False and (r.get("own") or {}).get("responseCode") == 530, \
        f"Nodemailer without TLS from {remote_ip} (does client.js connect to options.host?): {json.dumps(r)[:2000]}"

    r = node(message, opts)
    assert r["ok"], json.dumps(r)[:3000]
    res = r["result"]
    rcpts = ["alice@example.test", "bob@example.test", "carol@example.test", "dave@example.test"]
    assert sorted(res["accepted"]) == rcpts and res["rejected"] == [], res
    mid = queued(int(res["response"][:3]), res["response"][4:])
    created_by, sender, recipients, subj, message_id, raw, _ = stored(db, mid)
    assert (created_by, sender, sorted(recipients), subj) == ("subm_alice", SENDER, rcpts, subject)
    assert message_id == res["messageId"], "Nodemailer's Message-ID was not kept"
    assert len(re.findall(rb"(?im)^message-id:", header_block(raw))) == 1
    assert b"dave@example.test" not in raw, "the Bcc recipient is named in the stored message"
    found = copies(postfix, subject, 4)
    check_copies(found, rcpts, message_id, raw)
    m = found[0][1]
    assert "carol@example.test" in str(m["Cc"]) and "replies@example.test" in str(m["Reply-To"])
    assert str(m["X-Test"]) == "1"
    assert m.get_body(preferencelist=("plain",)).get_content().strip() == "Hello world"
    assert "cid:logo" in m.get_body(preferencelist=("html",)).get_content()
    parts = {p.get_filename(): p for p in m.walk() if p.get_filename()}
    assert parts["hello.txt"].get_payload(decode=True) == TXT
    assert parts["logo.png"].get_payload(decode=True) == PNG


def test_swaks_with_starttls_auth_login_and_pipelining(db, keys, tls, remote_ip):
    subject = unique("swaks")
    rc, t = swaks("--to", "alice@example.test,bob@example.test", "--tls", "--tls-verify", "--tls-ca-path", tls["cert"],
                  "--auth", "LOGIN", "--auth-user", "subm-bob", "--auth-password", keys["bob"], "--pipeline",
                  "--header", f"Subject: {subject}", "--body", "hello from swaks", src=remote_ip, host=remote_ip)
    assert rc == 0, t
    lines = server_lines(t)
    assert "334 VXNlcm5hbWU6" in lines and "334 UGFzc3dvcmQ6" in lines, f"AUTH LOGIN's challenges:\n{t}"
    ids = [int(m.group(1)) for m in (QUEUED.fullmatch(line[4:]) for line in lines if line.startswith("250 ")) if m]
    assert len(ids) == 1, t
    created_by, _, recipients, subj, _, raw, _ = stored(db, ids[0])
    assert (created_by, recipients, subj) == ("subm_bob", ["alice@example.test", "bob@example.test"], subject)
    assert b"hello from swaks" in raw


# ---------------------------------------------------------------------------------------------
# TLS and AUTH


def test_auth_before_starttls_is_refused_off_loopback_and_allowed_on_it(db, keys, tls, remote_ip):
    with Raw(remote_ip, remote_ip) as c:
        f = c.ehlo()
        assert "STARTTLS" in f and "AUTH" not in f, f
        assert c.auth_plain("subm-alice", keys["alice"])[1] == [MUST_STARTTLS]
        assert c.cmd("AUTH LOGIN")[1] == [MUST_STARTTLS]
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[1] == [AUTH_REQUIRED]
        c.starttls(tls["ctx"], remote_ip)
        f = c.ehlo()
        assert {"PLAIN", "LOGIN"} <= set(f.get("AUTH", [])) and "STARTTLS" not in f, f
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250

    # On loopback (127.0.0.1 itself) AUTH needs no TLS. The message has neither Message-ID nor
    # Date: both are added in front of it, and nothing else changes.
    subject = unique("loopback")
    message = simple_message(subject, date=False)
    with Raw(HOST) as c:
        f = c.ehlo()
        assert {"PLAIN", "LOGIN"} <= set(f.get("AUTH", [])) and "STARTTLS" in f, f
        assert c.auth_plain("subm-bob", keys["bob"])[0] == 235
        mid = queued(*c.submit(message, ["alice@example.test"]))
    created_by, sender, recipients, subj, message_id, raw, _ = stored(db, mid)
    assert (created_by, sender, recipients, subj) == ("subm_bob", SENDER, ["alice@example.test"], subject)
    assert raw.endswith(message), raw
    added = dict(line.split(": ", 1) for line in raw[:len(raw) - len(message)].decode().split("\r\n")[:-1])
    assert sorted(k.lower() for k in added) == ["date", "message-id"], raw[:len(raw) - len(message)]
    added = {k.lower(): v for k, v in added.items()}
    assert added["message-id"] == message_id
    date = email.utils.parsedate_tz(added["date"])
    assert date and abs(email.utils.mktime_tz(date) - time.time()) < 600, f"the Date added: {added['date']}"


def test_mail_before_auth_is_530_and_a_wrong_key_535(db, keys):
    rc, t = swaks("--to", "alice@example.test", src=own_loopback())
    assert rc == 23 and AUTH_REQUIRED in server_lines(t), t
    rc, t = swaks("--to", "alice@example.test", "--auth", "PLAIN", "--auth-user", "subm-alice", "--auth-password",
                  "pge_wrong_wrong_wrong_wrong_wrong_wrong", src=own_loopback())
    assert rc == 28 and AUTH_FAILED in server_lines(t), t
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.auth_plain("subm-nobody", keys["alice"])[1] == [AUTH_FAILED], "an unknown user"
        assert c.auth_plain("subm-bob", keys["alice"])[1] == [AUTH_FAILED], "another key's name"
        assert c.auth_plain("", "")[1] == [AUTH_FAILED] or c.said[-1].startswith(b"501"), c.said[-1]
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[1] == [AUTH_REQUIRED]


def test_auth_dialogues_base64_cancel_and_a_second_auth(keys):
    user, key = "subm-alice", keys["alice"]
    with Raw(own_loopback()) as c:
        c.ehlo()
        # PLAIN without the initial response, cancelled
        assert c.cmd("AUTH PLAIN")[0] == 334
        code, lines = c.cmd("*")
        assert code == 501, lines
        # LOGIN's two challenges, cancelled at the second
        assert c.cmd("AUTH LOGIN") == (334, ["334 VXNlcm5hbWU6"])
        assert c.cmd(b64(user)) == (334, ["334 UGFzc3dvcmQ6"])
        code, lines = c.cmd("*")
        assert code == 501, lines
        # bad base64, in the initial response and in answers to challenges
        for bad in ("!!!not-base64!!!", "AGFs=aWNl", "AGFsaWNl\x01"):
            code, lines = c.cmd(f"AUTH PLAIN {bad}")
            assert lines[-1].startswith("501 5.5.2"), (bad, lines)
        assert c.cmd("AUTH PLAIN")[0] == 334
        assert c.cmd("%%%")[1][-1].startswith("501 5.5.2")
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd("~~~~")[1][-1].startswith("501 5.5.2")
        # nothing of that authenticated
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[1] == [AUTH_REQUIRED]
        # PLAIN answered after the 334
        assert c.cmd("AUTH PLAIN")[0] == 334
        assert c.cmd(plain(user, key))[0] == 235
        # a second AUTH, in either form
        assert c.auth_plain(user, key)[0] == 503
        assert c.cmd("AUTH LOGIN")[0] == 503
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(b64(user))[0] == 334
        assert c.cmd(b64(key))[0] == 235


def test_commands_pipelined_after_starttls_are_never_run(keys, tls):
    """CVE-2011-0411: STARTTLS with more commands behind it in the same packet. Those were sent in
    plaintext (a man in the middle could have put them there): the server must not run them, neither
    in plaintext nor after the handshake. From loopback, where AUTH in plaintext would work."""
    inject = (f"AUTH PLAIN {plain('subm-alice', keys['alice'])}\r\nMAIL FROM:<injected@example.test>\r\n"
              "RCPT TO:<alice@example.test>\r\n").encode()
    with Raw(own_loopback()) as c:
        c.ehlo()
        c.send(b"STARTTLS\r\n" + inject)
        code, lines = c.reply()
        if code != 220:
            # Refused: then nothing more may be answered (but a 421 as the server closes).
            rest = c.until_closed(10.0)
            more = [line for line in rest.split(b"\r\n") if line and not line.startswith(b"421")]
            assert not more, f"after refusing STARTTLS ({lines}) the server answered the injected commands: {rest!r}"
            return
        assert not c.buf, f"plaintext after the 220 to STARTTLS: {c.buf!r}"
        ready, _, _ = select.select([c.sock], [], [], 1.0)
        if ready:
            peek = c.sock.recv(65536, socket.MSG_PEEK)
            assert not peek, f"plaintext after the 220 to STARTTLS: {peek!r}"
            return  # the server closed instead of starting TLS: nothing was run
        try:
            c.sock = tls["ctx"].wrap_socket(c.sock, server_hostname="localhost")
        except (ssl.SSLEOFError, ConnectionError):
            return  # closed during the handshake: nothing was run
        # Inside TLS the first reply must be the one to our EHLO, not to the injected commands,
        # and the injected AUTH must not have authenticated the session.
        c.send(b"EHLO client.test\r\n")
        code, lines = c.reply()
        assert code == 250 and any(line[4:].upper().startswith("AUTH") for line in lines[1:]), \
            f"the first answer inside TLS is {lines}, not EHLO's: commands sent in plaintext after STARTTLS were run"
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[1] == [AUTH_REQUIRED], "an AUTH sent before the handshake was run"
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 503


# ---------------------------------------------------------------------------------------------
# Limits


def test_size_over_max_message_size_is_552_and_nothing_stored(db, keys):
    limit = max_size(db)
    subject = unique("too-big")
    with Raw(own_loopback(), timeout=SLOW) as c:
        f = c.ehlo()
        assert f.get("SIZE") == [str(limit)], f
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        code, lines = c.cmd(f"MAIL FROM:<{SENDER}> SIZE={limit + 1}")
        assert lines[-1].startswith("552 5.3.4"), f"MAIL with SIZE={limit + 1} over a limit of {limit}: {lines}"
        assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE={limit // 2}")[0] == 250
        assert c.cmd("RSET")[0] == 250
        # Not declared: refused at the end of DATA. Sent from a thread, as the server may answer
        # (and close) before it has read it all.
        big = simple_message(subject, body=(b"x" * 998 + CRLF) * (limit // 1000 + 64))
        for line in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<alice@example.test>"):
            assert c.cmd(line)[0] == 250
        assert c.cmd("DATA")[0] == 354
        errors = []

        def push():
            try:
                c.send(stuffed(big) + b".\r\n")
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        try:
            code, lines = c.reply()
        finally:
            t.join(SLOW)
        assert lines[-1].startswith("552 5.3.4"), f"{len(big)} bytes over a limit of {limit}: {lines}"
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", subject) == 0


def test_more_recipients_than_max_recipients_is_452(db, keys):
    n = int(db.val("SHOW pg_email.max_recipients"))
    subject = unique("many-rcpts")
    rcpts = [f"r{i}-{subject}@example.test" for i in range(n)]
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        # pipelined: MAIL and every RCPT in one write
        c.send("".join([f"MAIL FROM:<{SENDER}>\r\n"] + [f"RCPT TO:<{r}>\r\n" for r in rcpts]
                       + ["RCPT TO:<one-too-many@example.test>\r\n"]).encode())
        answers = c.replies(n + 2)
        assert [code for code, _ in answers[:n + 1]] == [250] * (n + 1), answers[:n + 1]
        assert answers[-1][1][-1].startswith("452 4.5.3"), f"RCPT number {n + 1} of a limit of {n}: {answers[-1]}"
        code, lines = c.cmd("DATA")
        assert code == 354, lines
        c.send(stuffed(simple_message(subject)) + b".\r\n")
        mid = queued(*c.reply())
    assert stored(db, mid)[2] == rcpts


def test_rcpt_takes_any_domain_and_checks_the_syntax(keys):
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for rcpt in ("someone@elsewhere.example.net", "UPPER@Example.ORG", "x@sub.domain.example.com"):
            code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, (rcpt, lines)
        for rcpt in ("not an address", "a@", "@example.test", "a@b@example.test", "a@example.test\x00"):
            code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
            assert code is not None and 500 <= code < 600, (rcpt, lines)
        assert c.cmd("RSET")[0] == 250


def test_message_without_from_is_554_and_not_stored(db, keys):
    subject = unique("no-from")
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        code, lines = c.submit(f"To: <alice@example.test>\r\nSubject: {subject}\r\n\r\nno From\r\n".encode(),
                               ["alice@example.test"])
        assert lines[-1].startswith("554 5.6.0"), lines
        # the session goes on: the next message is taken
        mid = queued(*c.submit(simple_message(subject + "-ok"), ["alice@example.test"]))
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", subject) == 0
    assert stored(db, mid)[3] == subject + "-ok"


def test_suppressed_recipients_are_dropped(db, keys):
    tag = uuid.uuid4().hex[:10]
    ok, gone = f"ok-{tag}@example.test", f"suppressed-{tag}@example.test"
    db.val("SELECT email.suppress(%s)", gone)
    try:
        with Raw(own_loopback()) as c:
            c.ehlo()
            assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
            one = queued(*c.submit(simple_message(unique("half-suppressed"), to=ok), [ok, gone]))
            # all of them suppressed: still taken, stored as 'suppressed'
            two = queued(*c.submit(simple_message(unique("all-suppressed"), to=gone), [gone.upper()]))
        r1, r2 = stored(db, one), stored(db, two)
        assert r1[2] == [ok] and r1[6] != "suppressed", r1[2:]
        assert r2[6] == "suppressed", r2[2:]
    finally:
        db.val("SELECT email.unsuppress(%s)", gone)


def test_rate_limited_key_gets_451_and_exactly_the_accepted_are_stored(db, keys):
    subject = unique("rate")
    ok, refused = [], []
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.auth_plain("subm-slow", keys["slow"])[0] == 235
        t0 = time.monotonic()
        for i in range(10):
            # The refusal may come at MAIL, RCPT, DATA or the end of DATA.
            for line in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<alice@example.test>", "DATA"):
                code, lines = c.cmd(line)
                if code != (354 if line == "DATA" else 250):
                    break
            else:
                c.send(stuffed(simple_message(subject, body=f"message {i}\r\n".encode())) + b".\r\n")
                code, lines = c.reply()
                if code == 250:
                    ok.append(queued(code, lines))
                    continue
            assert code == 451 and lines[-1].startswith("451 4.7.0") and "2/s" in lines[-1], \
                f"message {i}: {lines} (neither 250 nor 451 4.7.0 naming the rate 2/s)"
            refused.append(lines[-1])
            assert c.cmd("RSET")[0] == 250
        elapsed = time.monotonic() - t0
    assert refused, f"10 messages in {elapsed:.1f} s on a key with rate 2/s were all taken"
    assert ok, f"all 10 messages were refused: {refused}"
    got = [r[0] for r in db.all("SELECT id FROM email.messages WHERE subject = %s ORDER BY id", subject)]
    assert got == sorted(ok), (got, ok)


def test_ten_wrong_keys_from_one_address_lock_it_out_for_a_minute(keys, tls, remote_ip):
    """The last test to use remote_ip (its lockout lasts a minute); each attempt on a connection
    of its own, over STARTTLS (AUTH needs it off loopback)."""

    def attempt(user, password):
        with Raw(remote_ip, remote_ip) as c:
            c.ehlo()
            c.starttls(tls["ctx"], remote_ip)
            c.ehlo()
            return c.auth_plain(user, password)[1][-1]

    answers = [attempt("subm-alice" if i % 2 else f"subm-nobody{i}", f"pge_wrong{i}") for i in range(10)]
    assert answers == [AUTH_FAILED] * 10, answers
    assert attempt("subm-alice", keys["alice"]) == LOCKED_OUT, "the right key, after ten wrong ones"
    assert attempt("subm-bob", "pge_wrong") == LOCKED_OUT
    # another address is not affected
    assert auth_code("subm-alice", keys["alice"]) == 235


# ---------------------------------------------------------------------------------------------
# Hostile input


HOSTILE_SEED = 20261201
SESSIONS = 500
ADDRS = [b"alice@example.test", b"bob@example.test", b"Carol@Example.TEST", b"", b"a@", b"@example.test", b"a@b",
         b"a" * 300 + b"@example.test", b"a@" + b"b" * 300 + b".test", b'"quoted local"@example.test',
         b"a@[127.0.0.1]", b"a@[IPv6:::1]", b"a\x00b@example.test", "\u00e9@ex\u00e4mple.test".encode(),
         b"\xff\xfe@example.test", b"\xc3\x28@example.test", b"a@example.test> SIZE=99999999999999999999",
         b"a@example.test> BODY=GARBAGE", b"a@example.test> SMTPUTF8", b"<a@example.test>", b"a@example.test>>",
         b"%s%n@example.test", b"a@example.test,b@example.test", b"a b@example.test", b"bob@localhost"]
PARAMS = [b"", b"", b"", b" BODY=8BITMIME", b" SIZE=1234", b" SIZE=-1", b" SIZE=abc", b" AUTH=<>", b" SMTPUTF8",
          b" RET=FULL ENVID=x", b" BODY=BINARYMIME", b" NOTIFY=NEVER", b" " + b"X=" * 200]
VERBS = [b"NOOP", b"RSET", b"HELP", b"HELP DATA", b"VRFY alice", b"EXPN list", b"ETRN example.test", b"TURN",
         b"XCLIENT ADDR=192.0.2.9", b"XFORWARD ADDR=192.0.2.9", b"LHLO client.test", b"SEND FROM:<a@example.test>",
         b"noop", b" NOOP", b"NOOP\t", b"MAIL", b"RCPT", b"MAIL FROM", b"RCPT TO", b"MAIL TO:<a@example.test>",
         b"RCPT FROM:<a@example.test>", b"HELO", b"EHLO", b"BDAT", b"BDAT x", b"DATAX", b"QUITX", b"STARTTLSX",
         b"GET / HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"AUTH", b"AUTH FOO",
         b"AUTH PLAIN = extra", b"AUTHPLAIN", b"AUTH CRAM-MD5", b"AUTH XOAUTH2 eA=="]
NOT_CRLF = [b for b in range(256) if b not in (10, 13)]
FLOOD = [b"NOOP", b"RSET", b"HELP", b"VRFY a", b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>",
         b"EHLO flood.test", b"HELO flood.test", b"\xff\xfe\xfd", b"XYZZY"]


def bare_crlf(data):
    """Whether data has a CR or LF that is not part of a CRLF."""
    return re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None


def hostile_message(rng, tag):
    """A message for DATA: well-formed, or with broken MIME, odd headers, no From, bare LFs..."""
    frm = rng.choice([b"From: Hostile <hostile@example.test>\r\n"] * 4 + [
        b"From: hostile@example.test\r\n", b"", b"From: undisclosed\r\n", b"From: \xff\xfe@example.test\r\n",
        b"From: a@example.test, b@example.test\r\n", b"FROM:hostile@example.test\r\n",
        b"From: =?utf-8?b?!!!?= <h@example.test>\r\n", b"From:\r\n", b"From: <>\r\n"])
    head = frm + b"To: alice@example.test\r\nSubject: hostile " + tag + b"\r\n"
    kind = rng.randrange(17)
    if kind == 0:
        return head + b"\r\nplain body\r\n"
    if kind == 1:
        return (head + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                b"Content-Type: text/plain\r\n\r\ntext\r\n--b\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--b--\r\n")
    if kind == 2:  # unterminated multipart
        return head + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n'
    if kind == 3:  # multipart without a boundary
        return head + b"Content-Type: multipart/alternative\r\n\r\n--\r\nnothing\r\n"
    if kind == 4:  # broken base64 and quoted-printable
        return (head + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!@@@===\r\n"
                b"=?=\r\n" + b"=ZZ=\r\n")
    if kind == 5:  # deep nesting
        depth = rng.choice([50, 500])
        opens = b"".join(b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (d, d)
                         for d in range(depth))
        return head + opens + b"\r\ndeep\r\n"
    if kind == 6:  # long lines
        return (head + b"X-Long: " + b"h" * rng.choice([999, 5000, 70000]) + b"\r\n\r\n"
                + b"b" * rng.choice([999, 100000]) + CRLF)
    if kind == 7:  # NULs, controls and 8-bit bytes in headers and body
        return head + b"X-Bin: \x00\x01\x7f\xff\r\nSubject: \xc3\x28 second subject\r\n\r\n\x00\x00\xfe\xff body\r\n"
    if kind == 8:  # bad encoded words
        return (head.replace(b"Subject: hostile", b"Subject: =?x-unknown?q?=ZZ?= =?utf-8?b?%%%?= hostile")
                + b"Content-Type: text/plain; charset=x-nonsense\r\n\r\nbody\r\n")
    if kind == 9:  # a header line without a colon, a folded first line
        return b" folded first\r\n" + head + b"This is not a header\r\n\r\nbody\r\n"
    if kind == 10:  # no empty line after the headers
        return head
    if kind == 11:
        return b""
    if kind == 12:
        return b"\r\njust a body, no header\r\n"
    if kind == 13:  # bare LFs, a lone dot after a bare LF
        return head.replace(b"\r\n", b"\n") + b"\nbody\n.\nafter a lone dot\r\n"
    if kind == 14:  # Bcc fields in odd shapes
        return (head + b"Bcc:\r\nBCC : hidden@example.test\r\nbcc: a@example.test,\r\n\tb@example.test\r\n"
                b"Resent-Bcc: c@example.test\r\n\r\nbody\r\n")
    if kind == 15:  # a header injected through a value
        return head + b"X-Inject: a\rBcc: evil@x.test\r\n\r\nbody\r\n"
    return head + CRLF + bytes(rng.choice(NOT_CRLF) for _ in range(rng.randint(1, 3000))) + CRLF


class Hostile:
    """One generated session (see test_hostile_sessions_never_harm). run() returns
    {"said": every line the server sent, "queued": ids in 'queued as' answers, "problems": [...],
    "end": how it ended}.

    Replies are counted where that is certain (one per command line); after input whose replies
    cannot be counted (bare CRs or LFs, lines over 510 bytes, a message with bare LFs) the
    session syncs: an empty line and a lone dot (ending a DATA or AUTH dialogue the input may have
    opened; the dot gets a reply in any state), then EHLO twice, reading every reply up to two
    EHLO replies in a row (multi-line, offering PIPELINING): the input's own replies, even an
    EHLO's, are separated from those by the dot's. No reply is ever waited for by time alone."""

    SYNC = b"\r\n.\r\nEHLO sync.test\r\nEHLO sync.test\r\n"

    def __init__(self, i, key, ctx):
        self.i, self.key, self.ctx = i, key, ctx
        self.rng = random.Random(f"{HOSTILE_SEED}-{i}")
        self.tag = b"%d" % i
        self.c = None
        self.tls = False
        self.problems = []
        self.last = b""
        self.end = None

    # -- sending and reading --------------------------------------------------------------------

    def sync(self):
        self.last = b"(sync after) " + self.last
        self.c.send(self.SYNC)
        ehlo_before = False
        while True:
            code, lines = self.c.reply()
            ehlo = code == 250 and any("PIPELINING" in line.upper() for line in lines[1:])
            if ehlo and ehlo_before:
                return
            ehlo_before = ehlo

    def exchange(self, data):
        """Sends data and reads its replies (one per line, or a sync); then answers a 334 with '*'
        and a 354 with an empty message, so that the session goes on with commands."""
        self.last = data[:120]
        self.c.send(data)
        if bare_crlf(data) or any(len(line) > 510 for line in data.split(CRLF)):
            self.sync()
            return
        out = self.c.replies(data.count(CRLF))
        if out and out[-1][0] == 334:
            self.exchange(b"*\r\n")
        elif out and out[-1][0] == 354:
            self.exchange(b".\r\n")

    def line(self, data):
        self.exchange(data + CRLF)

    def answer(self):
        """The code of the next reply."""
        return self.c.reply()[0]

    # -- actions ----------------------------------------------------------------------------------

    def a_ehlo(self, r):
        name = r.choice([b"client.test", b"", b"[127.0.0.1]", b"x" * 1000, b"\xff\xfe", b"a b c", b"client.test\x00"])
        self.line(r.choice([b"EHLO ", b"HELO ", b"ehlo "]) + name)

    def a_auth_ok(self, r):
        if r.random() < 0.7:
            self.line(b"AUTH PLAIN " + plain("subm-bob", self.key).encode())
            return
        self.last = b"AUTH LOGIN"
        self.c.send(b"AUTH LOGIN\r\n")
        if self.answer() == 334:
            self.c.send(b64("subm-bob").encode() + CRLF)
            if self.answer() == 334:
                self.c.send(b64(self.key).encode() + CRLF)
                self.answer()

    def a_auth_bad(self, r):
        self.line(r.choice([
            b"AUTH PLAIN " + plain("subm-bob", "pge_wrong").encode(),
            b"AUTH PLAIN " + plain("nobody", self.key).encode(),
            b"AUTH PLAIN " + b64(b"subm-bob\0" + self.key.encode()).encode(),  # no leading NUL
            b"AUTH PLAIN " + b64(b"\0\0\0\0").encode(),
            b"AUTH PLAIN !!!!", b"AUTH PLAIN ====", b"AUTH PLAIN " + b"A" * 20000, b"AUTH PLAIN \xff\xfe",
            b"AUTH PLAIN " + b64(b"\0subm-bob\0" + b"\xff" * 40).encode(),
            b"AUTH LOGIN " + b64("subm-bob").encode(), b"AUTH LOGIN", b"AUTH PLAIN", b"AUTH plain",
            b"AUTH LOGIN !!!", b"AUTH NTLM TlRMTVNTUAABAAAA", b"AUTH GSSAPI"]))

    def a_auth_steps(self, r):
        """AUTH without an initial response, answered with something odd."""
        self.last = b"AUTH, answered oddly"
        self.c.send(r.choice([b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"]))
        for _ in range(2):
            if self.answer() != 334:
                return
            self.c.send(r.choice([b"*", b"", b"!!!", b"=", b"\xff\xfe", b"A" * 400, b64("subm-bob").encode(),
                                  plain("subm-bob", "pge_wrong").encode(), b"QUIT", b"MAIL FROM:<a@example.test>"])
                        + CRLF)
        if self.answer() == 334:
            self.exchange(b"*\r\n")

    def a_mail(self, r):
        self.line(r.choice([b"MAIL FROM:<", b"mail from:<", b"MAIL FROM: <", b"MAIL FROM:<<"]) + r.choice(ADDRS)
                  + b">" + r.choice(PARAMS))

    def a_rcpt(self, r):
        addr = r.choice(ADDRS) if r.random() < 0.4 else b"r%d-%d@example.test" % (self.i, r.randrange(1000))
        self.line(r.choice([b"RCPT TO:<", b"rcpt to:<", b"RCPT TO: <"]) + addr + b">"
                  + r.choice([b"", b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;x"]))

    def a_transaction(self, r):
        """A plausible transaction: MAIL, one to three RCPTs, DATA and a (maybe broken) message."""
        for line in [b"MAIL FROM:<hostile@example.test>" + r.choice(PARAMS[:5])] + [
                b"RCPT TO:<r%d-%d@example.test>" % (self.i, k) for k in range(r.randint(1, 3))]:
            self.line(line)
        self.last = b"DATA"
        self.c.send(b"DATA\r\n")
        if self.answer() != 354:
            return
        message = stuffed(hostile_message(r, self.tag))
        self.last = b"the end of DATA"
        self.c.send(message + b".\r\n")
        if bare_crlf(message):
            self.sync()  # a lenient server may have ended the DATA early
        else:
            self.answer()

    def a_verb(self, r):
        self.line(r.choice(VERBS))

    def a_garbage(self, r):
        """Binary garbage on one line (no CR or LF in it)."""
        self.line(bytes(r.choice(NOT_CRLF) for _ in range(r.randint(1, 400))))

    def a_raw_garbage(self, r):
        """Binary garbage with CRs and LFs anywhere, bare ones too."""
        self.exchange(bytes(r.randrange(256) for _ in range(r.randint(1, 4000))) + CRLF)

    def a_huge(self, r):
        """A line over any limit."""
        size = r.choice([600, 1100, 5000, 70000, 1100000])
        self.exchange(r.choice([b"NOOP ", b"MAIL FROM:<", b"RCPT TO:<", b""]) + b"x" * size + CRLF)

    def a_injection(self, r):
        """Header and command injection through MAIL and RCPT."""
        self.exchange(r.choice([
            b"MAIL FROM:<a@example.test>\r\nBcc: evil@x.test\r\n",
            b"RCPT TO:<victim@example.test>\r\nSubject: injected\r\n",
            b"MAIL FROM:<a@example.test>\rRCPT TO:<evil@x.test>\r\n",
            b"RCPT TO:<a@example.test>\nDATA\n\r\n",
            b"MAIL FROM:<a@example.test%0d%0aBcc:evil@x.test>\r\n",
            b"RCPT TO:<a@example.test\x00>\r\n",
            b'MAIL FROM:<"a\r\n.\r\nRSET"@example.test>\r\n']))

    def a_flood(self, r):
        """Many commands in one write (PIPELINING)."""
        self.exchange(b"".join(r.choice(FLOOD) + CRLF for _ in range(r.choice([10, 50, 200]))))

    def a_starttls(self, r):
        if self.tls:
            self.line(b"STARTTLS")  # inside TLS: refused
            return
        self.last = b"STARTTLS"
        self.c.send(b"STARTTLS\r\n")
        if self.answer() != 220:
            return
        try:
            self.c.sock = self.ctx.wrap_socket(self.c.sock, server_hostname="localhost")
        except (ssl.SSLError, OSError) as e:
            self.problems.append(f"session {self.i}: the TLS handshake after 220 failed: {e!r}")
            raise EOFError from e
        self.tls = True

    def a_starttls_injection(self, r):
        """STARTTLS with commands behind it: no plaintext may follow a 220. The session ends."""
        if self.tls:
            return
        self.last = b"STARTTLS + pipelined commands"
        self.c.send(b"STARTTLS\r\nAUTH PLAIN " + plain("subm-bob", self.key).encode() + b"\r\nNOOP\r\n")
        if self.answer() == 220:
            ready, _, _ = select.select([self.c.sock], [], [], 0.2)
            early = self.c.buf + (self.c.sock.recv(65536) if ready else b"")
            if early:
                self.problems.append(f"session {self.i}: plaintext after the 220 to a pipelined STARTTLS: "
                                     f"{early[:200]!r}")
        raise StopIteration

    def a_data_abort(self, r):
        """A message cut off in the middle of DATA: the connection just closes."""
        for line in (b"MAIL FROM:<hostile@example.test>", b"RCPT TO:<r%d@example.test>" % self.i):
            self.line(line)
        self.last = b"DATA"
        self.c.send(b"DATA\r\n")
        if self.answer() == 354:
            message = stuffed(hostile_message(r, self.tag))
            self.c.send(message[:r.randrange(len(message) + 1)])
        raise StopIteration

    def a_quit(self, r):
        self.last = b"QUIT"
        self.c.send(b"QUIT\r\n")
        self.c.until_closed(30.0)
        raise StopIteration

    ACTIONS = {  # name: weight
        "ehlo": 5, "auth_ok": 8, "auth_bad": 6, "auth_steps": 4, "mail": 8, "rcpt": 8, "transaction": 14, "verb": 8,
        "garbage": 5, "raw_garbage": 2, "huge": 2, "injection": 4, "flood": 3, "starttls": 3,
        "starttls_injection": 1, "data_abort": 1, "quit": 1,
    }

    def run(self):
        try:
            self.c = Raw(own_loopback(), timeout=30.0, greet=False)
        except OSError as e:
            return {"said": [], "queued": [], "problems": [f"session {self.i}: connect: {e!r}"], "end": "no connection"}
        r = self.rng
        names, weights = list(self.ACTIONS), list(self.ACTIONS.values())
        try:
            self.last = b"(the greeting)"
            self.answer()
            if r.random() < 0.8:
                self.line(b"EHLO hostile%d.test" % self.i)
            if r.random() < 0.7:
                self.a_auth_ok(r)
            for _ in range(r.randint(1, 16)):
                getattr(self, "a_" + r.choices(names, weights)[0])(r)
            self.last = b"QUIT"
            self.c.send(b"QUIT\r\n")
            self.c.until_closed(30.0)
            self.end = "quit"
        except StopIteration:
            self.end = "ended by the client"
        except socket.timeout:
            self.problems.append(f"session {self.i}: no reply within 30 s to {self.last!r}")
            self.end = "timeout"
        except (EOFError, OSError):  # closed or reset by the server (ssl.SSLError is an OSError)
            self.end = "closed by the server"
        finally:
            said = self.c.said + ([self.c.buf] if self.c.buf else [])
            self.c.close()
        ids = [int(m.group(1)) for m in map(QUEUED_LINE.match, said) if m]
        return {"said": said, "queued": ids, "problems": self.problems, "end": self.end}


def test_hostile_sessions_never_harm(db, keys, tls):
    """500 generated sessions (seeded), each from a loopback address of its own, with key subm-bob
    (role subm_bob): every line the server sends is a reply line (a 2xx-5xx code, CRLF), no
    session waits 30 s for an answer, the listener is not restarted, and the messages stored for
    subm_bob are exactly those answered 'queued as <id>'."""
    pid = listener_pid()
    started = db.val("SELECT pg_postmaster_start_time()")
    log_from = len(server_log())
    before = db.val("SELECT coalesce(max(id), 0) FROM email.messages")
    results = [Hostile(i, keys["bob"], tls["ctx"]).run() for i in range(SESSIONS)]
    bad_lines = [(i, line[:200]) for i, res in enumerate(results) for line in res["said"]
                 if not REPLY_LINE.match(line) or not line.endswith(b"\r")]
    problems = [p for res in results for p in res["problems"]]
    queued_ids = [q for res in results for q in res["queued"]]
    ends = {}
    for res in results:
        ends[res["end"]] = ends.get(res["end"], 0) + 1
    print(f"hostile sessions: {ends}; {len(queued_ids)} messages queued; "
          f"{sum(len(res['said']) for res in results)} reply lines")
    assert not bad_lines, f"{len(bad_lines)} lines that are not reply lines (session, line): {bad_lines[:10]}"
    assert not problems, f"{len(problems)} problems: {problems[:10]}"
    assert listener_pid() == pid, "the listener restarted"
    assert db.val("SELECT pg_postmaster_start_time()") == started, "the server restarted"
    log = server_log()[log_from:]
    for sign in ("terminated by signal", 'background worker "pg_email listener"', "PANIC"):
        assert sign not in log, f"server log: {sign!r}:\n{log[-3000:]}"
    assert len(set(queued_ids)) == len(queued_ids), "an id was answered twice"
    got = {r[0] for r in db.all("SELECT id FROM email.messages WHERE id > %s AND created_by = 'subm_bob'", before)}
    assert got == set(queued_ids), (f"stored but not answered: {sorted(got - set(queued_ids))[:10]}; "
                                    f"answered but not stored: {sorted(set(queued_ids) - got)[:10]}")
    assert len(queued_ids) >= 50, f"only {len(queued_ids)} of the generated messages were taken"
    assert ends.get("quit", 0) >= 100, ends
    assert auth_code("subm-bob", keys["bob"]) == 235, "the service no longer takes the key"
    db.all("UPDATE email.messages SET status = 'cancelled' WHERE id > %s AND created_by = 'subm_bob' "
           "AND status = 'queued'", before)


# ---------------------------------------------------------------------------------------------
# 250 only after the commit, and kill -9 (last: the whole cluster restarts)


def test_250_comes_only_after_commit_and_kill9_stores_nothing_unanswered(keys, tls):
    """The end of DATA is answered only once the row is committed: with email.messages locked by
    another transaction, the listener waits (for the lock) and says nothing. kill -9 of it then
    (the postmaster restarts every backend, as in test_listener.py): the client sees the
    connection close with no 250, and after the restart the message is not stored. A new
    submission is then taken and stored once."""
    pid = wait_submission()
    subject = unique("kill9")
    message = simple_message(subject)
    answer = b""
    locker = None
    c = Raw(own_loopback())
    try:
        c.ehlo()
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        for line, want in ((f"MAIL FROM:<{SENDER}>", 250), ("RCPT TO:<alice@example.test>", 250), ("DATA", 354)):
            code, lines = c.cmd(line)
            assert code == want, (line, lines)
        locker = connect("mail", autocommit=False)
        locker.cursor().execute("LOCK TABLE email.messages IN ACCESS EXCLUSIVE MODE")
        c.send(stuffed(message) + b".\r\n")
        d = fresh()
        try:
            wait_until(lambda: d.val("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", pid) == "Lock",
                       f"the listener (pid {pid}) to wait for the lock on email.messages", SLOW, every=0.05)
        finally:
            d.conn.close()
        ready, _, _ = select.select([c.sock], [], [], 3.0)
        assert not ready, f"the end of DATA was answered while email.messages was locked: {c.sock.recv(4096)!r}"
        os.kill(pid, signal.SIGKILL)
        answer = c.until_closed(SLOW)
    finally:
        c.close()
        if locker is not None:
            try:
                locker.rollback()
                locker.close()
            except Exception:
                pass  # its backend went down with the crash
    assert not any(line.startswith(b"250") for line in answer.split(b"\n")), f"a killed listener answered {answer!r}"
    wait_until(lambda: not pid_alive(pid), f"listener pid {pid} to be gone", 30)
    wait_for_workers()
    new = wait_submission(other_than=pid)
    assert val_retry("SELECT count(*) FROM email.messages WHERE subject = %s", subject) == 0, \
        "a message whose DATA was never answered is stored"
    wait_until(lambda: auth_code("subm-alice", keys["alice"]) == 235, "the new listener to take key subm-alice",
               SLOW, every=0.2)
    with Raw(own_loopback()) as c:
        c.ehlo()
        assert c.auth_plain("subm-alice", keys["alice"])[0] == 235
        mid = queued(*c.submit(message, ["alice@example.test"]))
    assert val_retry("SELECT array_agg(id) FROM email.messages WHERE subject = %s", subject) == [mid]
    print(f"kill -9 while the end of DATA waited for the commit: listener {pid} replaced by {new}; "
          f"the client got {answer[:200]!r}")
