"""DKIM, end to end (DESIGN.md "DKIM", research/feedback_loop.md §6): email.add_dkim_key,
email.dkim_keys, email.remove_dkim_key, email.domain_setup, and the worker signing each message
whose From domain (or closest parent domain) has a key. Signatures are checked with dkimpy
(python3-dkim; python3-nacl for Ed25519), its DNS answered with the TXT values pg_email returned.

    keys          generated RSA 2048 / Ed25519; imported PKCS#1 / PKCS#8 PEM publish the public key
                  `cryptography` derives; bad keys, algorithms, domains, selectors → 22023 (the key
                  text never in the error or the server log), a second (domain, selector) → 42710;
                  no key material in email.dkim_keys; a plain role may not add or remove keys
    signing       capture://, file://, smtp:// through a real Postfix (the Maildir copy verifies);
                  relaxed/relaxed, h= from … list-unsubscribe-post; a changed body byte or signed
                  header fails, an added unsigned header or refolding does not; RSA + Ed25519 →
                  two signatures (newest key per algorithm); the closest parent domain signs;
                  no key or a removed key → no signature
    domain_setup  a TXT per key (its dns_value), SPF (a:/ip4:/include:), DMARC

Taken as given beyond DESIGN.md: dns_value is exactly `v=DKIM1; k=rsa|ed25519; p=<base64>`;
errors start `invalid private_key:` / `invalid algorithm:` / `invalid domain:` / `invalid
selector:`; RSA under 1024 bits, a public, encrypted or EC key, or a key of the other algorithm
is an invalid private_key (1024 bits is accepted); mail queued after add/remove_dkim_key committed
is built with the new keys; parent domains follow label boundaries (notd1.example is not under
d1.example). Domains are unique per test (never example.org, the other modules' sender) and
every key is removed at the end of its test."""
import base64
import email
import email.policy
import json
import os
import re
import secrets
import shutil
import time
import uuid

import dkim
import psycopg2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import E2E_DIR, PORT, SLOW, Db, connect, send, server_log, wait_until
from fakes import Fake
from servers import Postfix

CAP = "dkimcap"  # capture:// transport: the final bytes land in email.captured
PF_TRANSPORT = "dkim_pf"  # smtp:// to the module's Postfix
PF_PORT = 26560
# What h= must cover (DESIGN.md "DKIM"); absent ones are signed as empty, which is legal.
SIGNED = ("from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version", "content-type",
          "list-unsubscribe", "list-unsubscribe-post")
DNS_VALUE_RE = re.compile(r"v=DKIM1; k=(rsa|ed25519); p=([A-Za-z0-9+/]+={0,2})")


# ---------------------------------------------------------------------------------------------
# Keys, computed independently with `cryptography`


def rsa_key(bits=2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(key, fmt="pkcs8"):
    """The private key as unencrypted PEM text: PKCS#1 ("BEGIN RSA PRIVATE KEY") or PKCS#8."""
    form = serialization.PrivateFormat.TraditionalOpenSSL if fmt == "pkcs1" else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode()


def public_b64(key):
    """The p= value of a private key's DKIM record: base64 of the DER SubjectPublicKeyInfo (RSA)
    or of the raw 32-byte public key (Ed25519)."""
    pub = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode()


def dns_value(key):
    k = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={k}; p={public_b64(key)}"


def key_lines(text):
    """The lines of a PEM (or any key text) long enough to be recognisable: none may show up in
    an error message or the server log."""
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= 16 and not line.startswith("-----")]


def ed25519_seed_b64(key):
    return base64.b64encode(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())).decode()


# ---------------------------------------------------------------------------------------------
# DNS for dkimpy, and the keys a test adds


class Dns:
    """A stand-in for DNS, passed to dkimpy as dnsfunc: the TXT value pg_email returned for each
    published name, b"" for any other name. `asked` lists the names dkimpy looked up."""

    def __init__(self):
        self.records = {}
        self.asked = []

    def publish(self, name, value):
        self.records[name.lower().rstrip(".")] = value

    def __call__(self, name, timeout=5):
        n = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        self.asked.append(n)
        value = self.records.get(n)
        return value.encode() if value is not None else b""


def domain(tag="d"):
    return f"{tag}{uuid.uuid4().hex[:8]}.example"


class Keys:
    """The DKIM keys one test adds through email.add_dkim_key: each is checked against its
    email.dkim_keys row, published in `dns`, and removed again on exit."""

    def __init__(self, db):
        self.db = db
        self.dns = Dns()
        self.added = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for d, s in self.added:
            self.db.all("SELECT email.remove_dkim_key(%s, %s)", d, s)

    def add(self, d, selector, private_key=None, algorithm=None):
        """email.add_dkim_key with the given arguments (the contract's defaults for the others);
        returns the TXT value it returned, after checking it and the email.dkim_keys row."""
        args = {"domain": d, "selector": selector}
        if private_key is not None:
            args["private_key"] = private_key
        if algorithm is not None:
            args["algorithm"] = algorithm
        value = self.db.val(f"SELECT email.add_dkim_key({', '.join(f'{k} => %s' for k in args)})", *args.values())
        self.added.append((d, selector))
        m = DNS_VALUE_RE.fullmatch(value or "")
        assert m, f"add_dkim_key returned {value!r}, not 'v=DKIM1; k=rsa|ed25519; p=<base64>'"
        alg = algorithm or "rsa-sha256"
        assert m.group(1) == alg.split("-")[0], (alg, value)
        row = self.db.one("SELECT algorithm, dns_name, dns_value, created_at IS NOT NULL FROM email.dkim_keys "
                          "WHERE domain = %s AND selector = %s", d, selector)
        assert row == (alg, f"{selector}._domainkey.{d}", value, True), row
        self.dns.publish(f"{selector}._domainkey.{d}", value)
        return value


@pytest.fixture
def keys(mail):
    with Keys(mail) as k:
        yield k


# ---------------------------------------------------------------------------------------------
# Sending, and reading a message's bytes


@pytest.fixture(scope="module")
def cap(cluster):
    d = Db(connect("mail"))
    d.all("SELECT email.add_transport(%s, 'capture://')", CAP)
    d.conn.close()
    return CAP


def wait_sent(db, mid):
    """Waits until message mid has left the queue; fails unless it was sent (with last_error)."""
    row = []

    def done():
        row[:] = db.one("SELECT status::text, last_error FROM email.messages WHERE id = %s", mid)
        return row[0] not in ("queued", "sending")

    wait_until(done, f"message {mid} to be sent", SLOW, every=0.05)
    assert row[0] == "sent", f"message {mid} is {row[0]}: {row[1]}"


def captured(db, sender, **kw):
    """Sends a message from `sender` through the capture transport (kw: more email.send
    arguments) and returns its bytes as captured."""
    mid = send(db, CAP, sender=sender, **kw)
    wait_sent(db, mid)
    raw = db.val("SELECT raw FROM email.captured WHERE message_id = %s ORDER BY id DESC LIMIT 1", mid)
    assert raw is not None, f"message {mid} is sent but nothing was captured"
    return bytes(raw)


def split_message(raw):
    """(header block, line end, body) of a message with CRLF or LF line ends."""
    eol = b"\r\n" if b"\r\n" in raw else b"\n"
    head, sep, body = raw.partition(eol + eol)
    assert sep, f"no end of header in {raw[:300]!r}"
    return head, eol, body


def header_fields(raw):
    """The header fields as dkimpy reads them: [(name, value with its folding)] top to bottom."""
    return [(n.decode("ascii"), v) for n, v in dkim.rfc822_parse(raw)[0]]


def signatures(raw):
    """The DKIM-Signature fields, top first, each as {tag: value} (str), unfolded; whitespace is
    removed from h=, bh= and b=."""
    out = []
    for name, value in header_fields(raw):
        if name.lower() != "dkim-signature":
            continue
        tags = {}
        for spec in re.sub(rb"\r?\n", b"", value).decode("ascii").split(";"):
            if spec.strip():
                k, _, v = spec.partition("=")
                k, v = k.strip(), v.strip()
                tags[k] = re.sub(r"\s+", "", v) if k in ("h", "bh", "b") else v
        out.append(tags)
    return out


def only_signature(raw):
    """The message's one DKIM-Signature, as signatures() gives it."""
    sigs = signatures(raw)
    assert len(sigs) == 1, f"expected one DKIM-Signature, found {len(sigs)}: {sigs}\n{raw[:2000]!r}"
    return sigs[0]


def signed_headers(sig):
    return [h.strip().lower() for h in sig["h"].split(":")]


def verdict(raw, dns, idx=0):
    """dkimpy's verdict on the idx-th DKIM-Signature (top first): (True, "") or (False, why)."""
    d = dkim.DKIM(raw, minkey=1024)
    try:
        ok = d.verify(idx=idx, dnsfunc=dns)
    except dkim.DKIMException as e:
        return False, f"{type(e).__name__}: {e}"
    return (True, "") if ok else (False, "the signature (b=) does not verify")


def assert_verifies(raw, dns, idx=0):
    ok, why = verdict(raw, dns, idx)
    assert ok, f"DKIM signature {idx} does not verify: {why}\n{raw[:3000].decode(errors='replace')}"


def assert_fails(raw, dns, idx=0, why=None):
    ok, reason = verdict(raw, dns, idx)
    assert not ok, "an altered message still verifies"
    if why is not None:
        assert why in reason, reason


def replace_field(raw, name, value):
    """raw with the (only) header field `name`, continuation lines included, replaced by
    `name: value` (bytes)."""
    head, eol, body = split_message(raw)
    out, found, skipping = [], 0, False
    for line in head.split(eol):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name.lower().encode()
        if skipping:
            found += 1
            out.append(name.encode() + b": " + value)
        else:
            out.append(line)
    assert found == 1, f"{found} {name} fields in {head!r}"
    return eol.join(out) + eol + eol + body


def refold_field(raw, name):
    """raw with the header field `name` unfolded, its spaces doubled and refolded before its
    last word: the same field for relaxed canonicalization, different bytes."""
    head, eol, body = split_message(raw)
    value = next(v for n, v in dkim.rfc822_parse(raw)[0] if n.decode().lower() == name.lower())
    words = re.sub(rb"\r?\n", b"", value).split()
    assert len(words) >= 2, f"{name}: {value!r} has too few words to refold"
    new = b"  ".join(words[:-1]) + b"  " + eol + b"\t " + words[-1] + b"  "
    return replace_field(raw, name, new)


def change_body_byte(raw):
    """raw with one letter or digit of the body changed (which any body canonicalization sees)."""
    head, eol, body = split_message(raw)
    spots = [i for i, c in enumerate(body) if chr(c).isalnum()]
    assert spots, f"no letter in the body {body!r}"
    i = spots[len(spots) // 2]
    new = b"x" if body[i:i + 1] != b"x" else b"y"
    return head + eol + eol + body[:i] + new + body[i + 1:]


def pad_body_lines(raw):
    """raw with white space appended to every body line: the same body for relaxed
    canonicalization (not for simple)."""
    head, eol, body = split_message(raw)
    return head + eol + eol + body.replace(eol, b" \t" + eol)


# ---------------------------------------------------------------------------------------------
# Signing


def test_generated_rsa_key_signs_relaxed_and_tampering_is_detected(mail, cap, keys):
    d = domain()
    value = keys.add(d, "s2024")
    pub = serialization.load_der_public_key(base64.b64decode(DNS_VALUE_RE.fullmatch(value).group(2)))
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    subject = f"dkim rsa {uuid.uuid4().hex[:8]}"
    raw = captured(mail, f"DKIM Test <news@{d}>", subject=subject, body="A body to sign.\nSecond line, 12345.\n",
                   cc="cc@example.test", reply_to=f"Help <help@{d}>")
    sigs = signatures(raw)
    assert len(sigs) == 1, sigs
    sig = sigs[0]
    assert (sig["v"], sig["a"], sig["c"], sig["d"], sig["s"]) == ("1", "rsa-sha256", "relaxed/relaxed", d, "s2024"), sig
    h = signed_headers(sig)
    assert set(SIGNED) <= set(h), f"h= lacks {set(SIGNED) - set(h)}: {sig['h']}"
    assert "x-foo" not in h and "dkim-signature" not in h
    assert_verifies(raw, keys.dns)
    assert keys.dns.asked[-1] == f"s2024._domainkey.{d}"
    assert dkim.verify(raw, dnsfunc=keys.dns)

    # The signature can fail: the body, each signed header present, or the key
    assert_fails(change_body_byte(raw), keys.dns, why="body hash mismatch")
    assert_fails(replace_field(raw, "Subject", f"{subject} (changed)".encode()), keys.dns)
    for name, new in [("From", f"Mallory <news@{d}>"), ("To", "other@example.test"), ("Cc", "eve@example.test"),
                      ("Reply-To", "evil@example.test"), ("Message-ID", f"<forged@{d}>")]:
        assert_fails(replace_field(raw, name, new.encode()), keys.dns)
    head, eol, body = split_message(raw)
    assert_fails(head + eol + b"Subject: a second subject" + eol + eol + body, keys.dns)
    other = Dns()
    other.publish(f"s2024._domainkey.{d}", dns_value(rsa_key()))
    assert_fails(raw, other)
    assert_fails(raw, Dns())  # no record at all

    # ... but not for what relaxed/relaxed and h= leave out
    assert_verifies(b"X-Foo: bar" + eol + raw, keys.dns)
    assert_verifies(b"Received: from relay.example.test by mx.example.test; Thu, 1 Jan 2026 00:00:00 +0000" + eol + raw,
                    keys.dns)
    assert_verifies(refold_field(raw, "Subject"), keys.dns)
    assert_verifies(pad_body_lines(raw), keys.dns)
    assert_verifies(raw.replace(b"\r\n", b"\n"), keys.dns)


def test_generated_ed25519_key_signs(mail, cap, keys):
    d = domain()
    value = keys.add(d, "ed1", algorithm="ed25519-sha256")
    assert len(base64.b64decode(DNS_VALUE_RE.fullmatch(value).group(2))) == 32
    raw = captured(mail, f"news@{d}", body="Ed25519 body.\n")
    sig = only_signature(raw)
    assert (sig["a"], sig["c"], sig["d"], sig["s"]) == ("ed25519-sha256", "relaxed/relaxed", d, "ed1"), sig
    assert set(SIGNED) <= set(signed_headers(sig)), sig["h"]
    assert_verifies(raw, keys.dns)
    assert_fails(change_body_byte(raw), keys.dns, why="body hash mismatch")
    assert_fails(replace_field(raw, "Subject", b"changed"), keys.dns)


def test_rsa_and_ed25519_keys_give_two_signatures(mail, cap, keys):
    d = domain()
    keys.add(d, "rsa1")
    keys.add(d, "ed1", algorithm="ed25519-sha256")
    raw = captured(mail, f"Both <both@{d}>", body="Two signatures.\n")
    sigs = signatures(raw)
    assert len(sigs) == 2, sigs
    assert sorted((s["a"], s["s"]) for s in sigs) == [("ed25519-sha256", "ed1"), ("rsa-sha256", "rsa1")], sigs
    for i, s in enumerate(sigs):
        assert s["d"] == d and s["c"] == "relaxed/relaxed", s
        assert set(SIGNED) <= set(signed_headers(s)), s["h"]
        assert_verifies(raw, keys.dns, idx=i)
        assert_fails(change_body_byte(raw), keys.dns, idx=i, why="body hash mismatch")
        assert_fails(replace_field(raw, "Subject", b"changed"), keys.dns, idx=i)


def test_newest_key_per_algorithm_signs(mail, cap, keys):
    d = domain()
    keys.add(d, "old")
    keys.add(d, "new")
    sig = only_signature(captured(mail, f"rot@{d}"))
    assert (sig["a"], sig["s"]) == ("rsa-sha256", "new"), sig
    assert mail.val("SELECT email.remove_dkim_key(%s, 'new')", d) is True
    raw = captured(mail, f"rot@{d}")
    sig = only_signature(raw)
    assert (sig["a"], sig["s"]) == ("rsa-sha256", "old"), sig
    assert_verifies(raw, keys.dns)


IMPORTS = [
    ("rsa-pkcs1-2048", lambda: rsa_key(2048), "pkcs1", None),
    ("rsa-pkcs8-2048", lambda: rsa_key(2048), "pkcs8", None),
    ("rsa-pkcs1-1024", lambda: rsa_key(1024), "pkcs1", "rsa-sha256"),
    ("ed25519-pkcs8", ed25519.Ed25519PrivateKey.generate, "pkcs8", "ed25519-sha256"),
]


@pytest.mark.parametrize("make,fmt,algorithm", [c[1:] for c in IMPORTS], ids=[c[0] for c in IMPORTS])
def test_imported_key_publishes_its_public_key_and_signs(mail, cap, keys, make, fmt, algorithm):
    key = make()
    text = pem(key, fmt)
    assert text.startswith("-----BEGIN RSA PRIVATE KEY-----" if fmt == "pkcs1" else "-----BEGIN PRIVATE KEY-----")
    d = domain()
    value = keys.add(d, "imp", private_key=text, algorithm=algorithm)
    assert value == dns_value(key), "p= is not the public key of the private key given"
    raw = captured(mail, f"Imported <imp@{d}>", body="Signed with an imported key.\n")
    sig = only_signature(raw)
    assert (sig["a"], sig["d"], sig["s"]) == (algorithm or "rsa-sha256", d, "imp"), sig
    assert_verifies(raw, keys.dns)
    # and the signature was made with that very key: a record of another key does not verify it
    other = Dns()
    other.publish(f"imp._domainkey.{d}", dns_value(make()))
    assert_fails(raw, other)


@pytest.fixture(scope="module")
def postfix(cluster):
    pf = Postfix(os.path.join(E2E_DIR, "postfix-dkim"), PF_PORT)
    pf.start()
    d = Db(connect("mail"))
    d.all("SELECT email.add_transport(%s, %s)", PF_TRANSPORT, f"smtp://127.0.0.1:{PF_PORT}?tls=none")
    d.conn.close()
    yield pf
    pf.stop()


def test_folded_utf8_subject_attachment_and_list_unsubscribe_survive_postfix(mail, cap, keys, postfix):
    d = domain()
    keys.add(d, "mx1")
    subject = ("Grüße aus Köln – Ihre Bestellung ist unterwegs, schöne Grüße! " * 3)[:150].strip()
    assert len(subject) >= 140 and not subject.isascii()
    pdf = b"%PDF-1.4\n" + secrets.token_bytes(3000) + b"\n%%EOF\n"
    args = dict(subject=subject, body=("Grüße, das ist der Text. " * 12) + "\nZweite Zeile.\n",
                html="<p>Grüße <b>aus Köln</b></p>" * 5, list_unsubscribe=True,
                attachments=json.dumps([{"filename": "a.pdf", "content_type": "application/pdf",
                                         "content": base64.b64encode(pdf).decode()}]))
    sender = f"Zoë Köhler <news@{d}>"

    raw = captured(mail, sender, recipients=f"reader-{uuid.uuid4().hex[:8]}@example.test", **args)
    sig = only_signature(raw)
    h = signed_headers(sig)
    assert "list-unsubscribe" in h and "list-unsubscribe-post" in h, sig["h"]
    names = {n.lower() for n, _ in header_fields(raw)}
    assert {"list-unsubscribe", "list-unsubscribe-post", "subject"} <= names, names
    assert_verifies(raw, keys.dns)
    assert_fails(replace_field(raw, "List-Unsubscribe-Post", b"List-Unsubscribe=One-Clack"), keys.dns)

    postfix.clear()
    mid = send(mail, PF_TRANSPORT, sender=sender, recipients=f"Le Ser <reader-{uuid.uuid4().hex[:8]}@example.test>",
               **args)
    wait_sent(mail, mid)
    message_id = mail.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    found = []

    def arrived():
        found[:] = [r for r in postfix.raw_messages()
                    if email.message_from_bytes(r, policy=email.policy.default)["Message-ID"] == message_id]
        return bool(found)

    wait_until(arrived, f"message {message_id} in the Maildir", SLOW)
    delivered = found[0]
    m = email.message_from_bytes(delivered, policy=email.policy.default)
    assert " ".join(str(m["Subject"]).split()) == " ".join(subject.split())
    assert [p.get_filename() for p in m.iter_attachments()] == ["a.pdf"]
    assert next(m.iter_attachments()).get_content() == pdf
    assert m["List-Unsubscribe"] and m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    names = [n.lower() for n, _ in header_fields(delivered)]
    assert "received" in names and "return-path" in names, f"Postfix added no trace headers: {names}"
    sig = only_signature(delivered)
    assert (sig["d"], sig["s"]) == (d, "mx1")
    assert_verifies(delivered, keys.dns)
    assert_fails(change_body_byte(delivered), keys.dns, why="body hash mismatch")


def test_file_transport_message_is_signed(mail, keys):
    out = os.path.join(E2E_DIR, "dkim-files")
    os.makedirs(out, exist_ok=True)
    shutil.chown(out, "postgres")
    mail.all("SELECT email.add_transport('dkim_files', %s)", f"file://{out}")
    d = domain()
    keys.add(d, "f1", algorithm="ed25519-sha256")
    mid = send(mail, "dkim_files", sender=f"files@{d}")
    wait_sent(mail, mid)
    message_id = mail.val("SELECT message_id FROM email.messages WHERE id = %s", mid)
    with open(os.path.join(out, message_id.strip("<>") + ".eml"), "rb") as f:
        raw = f.read()
    sig = only_signature(raw)
    assert (sig["a"], sig["d"], sig["s"]) == ("ed25519-sha256", d, "f1")
    assert_verifies(raw, keys.dns)


def test_parent_domain_key_signs_subdomains_and_no_key_no_signature(mail, cap, keys):
    parent = domain("p")
    raw = captured(mail, f"nokey@{parent}")
    assert signatures(raw) == [] and b"dkim-signature" not in raw.lower()

    keys.add(parent, "top")
    for sender in (f"x@{parent}", f"x@news.{parent}", f"x@a.b.{parent}"):
        raw = captured(mail, sender)
        sig = only_signature(raw)
        assert (sig["d"], sig["s"]) == (parent, "top"), (sender, sig)
        assert_verifies(raw, keys.dns)
    # the closest parent wins
    keys.add(f"a.{parent}", "sub")
    for sender in (f"x@a.{parent}", f"x@b.a.{parent}"):
        raw = captured(mail, sender)
        sig = only_signature(raw)
        assert (sig["d"], sig["s"]) == (f"a.{parent}", "sub"), (sender, sig)
        assert_verifies(raw, keys.dns)
    # a domain that merely ends with the same letters is no subdomain; an unrelated one has no key
    for sender in (f"x@not{parent}", f"x@{domain('u')}"):
        raw = captured(mail, sender)
        assert signatures(raw) == [], (sender, raw[:2000])


def test_removed_key_no_longer_signs(mail, cap, keys):
    d = domain()
    keys.add(d, "gone")
    assert len(signatures(captured(mail, f"r@{d}"))) == 1
    assert mail.val("SELECT email.remove_dkim_key(%s, %s)", d, "gone") is True
    assert mail.val("SELECT count(*) FROM email.dkim_keys WHERE domain = %s", d) == 0
    raw = captured(mail, f"r@{d}")
    assert signatures(raw) == [] and b"dkim-signature" not in raw.lower()
    assert mail.val("SELECT email.remove_dkim_key(%s, %s)", d, "gone") is False
    assert mail.val("SELECT email.remove_dkim_key(%s, %s)", domain(), "never") is False


# ---------------------------------------------------------------------------------------------
# Refusals


def sql_error(db, q, *args):
    """Runs q, which must fail: (SQLSTATE, primary message)."""
    try:
        db.all(q, *args)
    except psycopg2.Error as e:
        return e.pgcode, e.diag.message_primary or ""
    raise AssertionError(f"expected an error from: {q} {args}")


def bad_keys():
    """(what, key text, algorithm) that add_dkim_key must refuse as an invalid private_key."""
    good = pem(rsa_key(2048), "pkcs1")
    lines = good.splitlines()
    cut = "\n".join(lines[:3] + lines[9:]) + "\n"  # base64 lines cut out of the middle
    short = "\n".join(lines[:-4] + [lines[-4][:30], lines[-1]]) + "\n"  # cut off mid-line
    noise = base64.encodebytes(secrets.token_bytes(600)).decode()
    enc = rsa_key(2048).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"passphrase")).decode()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    return [
        ("rsa lines cut out", cut, "rsa-sha256"),
        ("rsa cut mid-line", short, "rsa-sha256"),
        ("armoured noise", f"-----BEGIN RSA PRIVATE KEY-----\n{noise}-----END RSA PRIVATE KEY-----\n", "rsa-sha256"),
        ("pkcs8 noise", f"-----BEGIN PRIVATE KEY-----\n{noise}-----END PRIVATE KEY-----\n", "ed25519-sha256"),
        ("garbage", f"garbage-{uuid.uuid4().hex}-not-a-key-at-all", "rsa-sha256"),
        ("empty", "", "rsa-sha256"),
        ("rsa 512 bits", pem(rsa_key(512), "pkcs1"), "rsa-sha256"),
        ("rsa 768 bits", pem(rsa_key(768), "pkcs8"), "rsa-sha256"),
        ("encrypted pkcs8", enc, "rsa-sha256"),
        ("public key", rsa_key(2048).public_key().public_bytes(serialization.Encoding.PEM,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
         "rsa-sha256"),
        ("ec key as rsa", pem(ec_key, "pkcs8"), "rsa-sha256"),
        ("ec key as ed25519", pem(ec_key, "pkcs8"), "ed25519-sha256"),
        ("ed25519 key as rsa", pem(ed, "pkcs8"), "rsa-sha256"),
        ("rsa key as ed25519", good, "ed25519-sha256"),
    ]


def test_bad_private_key_refused_without_showing_it(mail):
    """Each argument bound as a parameter (psycopg 3 binds server-side), so the log's STATEMENT
    line shows $3 where the key was: whatever key text is in the log came from pg_email."""
    import psycopg
    log_from = len(server_log())
    shown = []
    d = domain()
    with psycopg.connect(host="127.0.0.1", port=PORT, dbname="mail", user="postgres", autocommit=True) as c:
        for what, text, algorithm in bad_keys():
            try:
                c.execute("SELECT email.add_dkim_key(%s, %s, %s, %s)", [d, "bad", text, algorithm])
                raise AssertionError(f"{what}: accepted")
            except psycopg.Error as e:
                diag = e.diag
                message = "\n".join(x for x in (str(e), diag.message_primary, diag.message_detail, diag.message_hint,
                                                 diag.context, diag.internal_query) if x)
                assert e.sqlstate == "22023", (what, e.sqlstate, message)
                assert (diag.message_primary or "").startswith("invalid private_key:"), (what, message)
                if text:
                    assert text not in message and text.strip() not in message, (what, message)
                leaked = [line for line in key_lines(text) if line in message]
                assert not leaked, f"{what}: the error shows key lines {leaked}: {message}"
                shown.append((what, text))
    assert mail.val("SELECT count(*) FROM email.dkim_keys WHERE domain = %s", d) == 0
    time.sleep(0.3)
    log = server_log()[log_from:]
    assert "invalid private_key" in log, "the refusals are not in the server log: looking at the wrong log?"
    for what, text in shown:
        leaked = [line for line in key_lines(text) if line in log]
        assert not leaked, f"{what}: the server log shows key lines {leaked}"


def test_bad_algorithm_domain_selector_and_duplicates_refused(mail, keys):
    d = domain()
    for alg in ("rsa-sha1", "ed448-sha256", "hmac", ""):
        code, msg = sql_error(mail, "SELECT email.add_dkim_key(%s, 'sel', NULL, %s)", d, alg)
        assert code == "22023" and msg.startswith("invalid algorithm:"), (alg, code, msg)
    for bad in ("exa mple.org", "", "a..b.example", "x@y.example", "semi;colon.example"):
        code, msg = sql_error(mail, "SELECT email.add_dkim_key(%s, 'sel')", bad)
        assert code == "22023" and msg.startswith("invalid domain:"), (bad, code, msg)
    for bad in ("", "bad selector", "sel;x", "sel..x", "s=1"):
        code, msg = sql_error(mail, "SELECT email.add_dkim_key(%s, %s)", d, bad)
        assert code == "22023" and msg.startswith("invalid selector:"), (bad, code, msg)
    assert mail.val("SELECT count(*) FROM email.dkim_keys WHERE domain = %s", d) == 0

    first = keys.add(d, "sel")
    for alg in ("rsa-sha256", "ed25519-sha256"):
        code, msg = sql_error(mail, "SELECT email.add_dkim_key(%s, 'sel', NULL, %s)", d, alg)
        assert code == "42710", (alg, code, msg)
    assert mail.all("SELECT selector, dns_value FROM email.dkim_keys WHERE domain = %s", d) == [("sel", first)]
    # the same selector under another domain is another key
    keys.add(domain(), "sel", algorithm="ed25519-sha256")


# ---------------------------------------------------------------------------------------------
# domain_setup


def test_domain_setup_lists_dkim_spf_and_dmarc_records(api):
    def setup(d):
        return api.all("SELECT record_type, name, value, purpose FROM email.domain_setup(%s)", d)

    def spf(rows, d):
        found = [r for r in rows if r[1] == d and r[2].startswith("v=spf1")]
        assert len(found) == 1, rows
        assert found[0][0] == "TXT" and found[0][3], found
        assert found[0][2].startswith("v=spf1 ") and found[0][2].endswith(" ~all"), found
        return found[0][2]

    with Keys(api) as k:
        d = domain()
        k.add(d, "r1")
        k.add(d, "e1", algorithm="ed25519-sha256")
        k.add(f"sub.{d}", "s1")  # another domain's key: not listed for d
        api.all("SELECT email.add_transport('ds_smtp', 'smtp://u:pw@mail.x.org:587', is_default => true)")
        rows = setup(d)
        published = set(api.all("SELECT dns_name, dns_value FROM email.dkim_keys WHERE domain = %s", d))
        assert len(published) == 2
        dkim_rows = [r for r in rows if "._domainkey." in r[1]]
        assert {(r[1], r[2]) for r in dkim_rows} == published and len(dkim_rows) == 2, rows
        assert all(r[0] == "TXT" and r[3] for r in dkim_rows), dkim_rows
        assert {r[1] for r in dkim_rows} == {f"r1._domainkey.{d}", f"e1._domainkey.{d}"}
        assert "a:mail.x.org" in spf(rows, d).split(), rows
        dmarc = [r for r in rows if r[1] == f"_dmarc.{d}"]
        assert len(dmarc) == 1 and dmarc[0][0] == "TXT" and dmarc[0][3], rows
        assert dmarc[0][2].startswith("v=DMARC1; p=none"), rows

        api.all("SELECT email.add_transport('ds_ip', 'smtp://127.0.0.1:2525?tls=none', is_default => true)")
        assert "ip4:127.0.0.1" in spf(setup(d), d).split()
        api.all("SELECT email.add_transport('ds_sg', 'sendgrid+api://SG.key@default', is_default => true)")
        assert "include:sendgrid.net" in spf(setup(d), d).split()

        # no key yet: SPF and DMARC only
        other = domain()
        rows = setup(other)
        assert not [r for r in rows if "._domainkey." in r[1]], rows
        spf(rows, other)
        assert [r[1] for r in rows if r[2].startswith("v=DMARC1")] == [f"_dmarc.{other}"], rows


# ---------------------------------------------------------------------------------------------
# Privileges


@pytest.fixture
def reader(mail):
    """Role pge_dkim_reader: may use schema email and read email.dkim_keys, nothing else."""
    role = "pge_dkim_reader"

    def drop():
        if mail.val("SELECT 1 FROM pg_roles WHERE rolname = %s", role):
            mail.all(f"DROP OWNED BY {role} CASCADE")
            mail.all(f"DROP ROLE {role}")

    drop()
    mail.all(f"CREATE ROLE {role} LOGIN")
    mail.all(f"GRANT USAGE ON SCHEMA email TO {role}")
    mail.all(f"GRANT SELECT ON email.dkim_keys TO {role}")
    c = connect("mail", user=role)
    try:
        yield Db(c)
    finally:
        c.close()
        drop()


def test_no_private_key_in_dkim_keys_and_only_the_owner_adds_keys(mail, keys, reader):
    d = domain()
    rsa_private = rsa_key(2048)
    rsa_pem = pem(rsa_private, "pkcs1")
    ed = ed25519.Ed25519PrivateKey.generate()
    keys.add(d, "k1", private_key=rsa_pem)
    keys.add(d, "k2", private_key=pem(ed, "pkcs8"), algorithm="ed25519-sha256")
    keys.add(d, "k3")  # generated
    # A line of the private PEM that holds only modulus bytes can equal a stretch of the
    # published public key's base64: such lines are public, not secret.
    published = public_b64(rsa_private)
    secrets_ = [line for line in key_lines(rsa_pem) if line not in published]
    secrets_ += key_lines(pem(ed, "pkcs8")) + [ed25519_seed_b64(ed)]
    for db, who in ((mail, "the owner"), (reader, "pge_dkim_reader")):
        with db.conn.cursor() as cur:
            cur.execute("SELECT * FROM email.dkim_keys WHERE domain = %s", (d,))
            cols = [c.name for c in cur.description]
            rows = cur.fetchall()
        assert len(rows) == 3, (who, rows)
        assert {"domain", "selector", "algorithm", "dns_name", "dns_value", "created_at"} <= set(cols), cols
        assert not [c for c in cols if "private" in c or "secret" in c], f"{who} sees columns {cols}"
        shown = json.dumps(rows, default=str)
        assert "PRIVATE KEY" not in shown, who
        assert not [s for s in secrets_ if s in shown], f"{who} sees private key material in email.dkim_keys"
    # no column named like a private key anywhere in schema email is readable by the role
    readable = reader.all("""SELECT c.relname, a.attname FROM pg_attribute a
                             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = 'email' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                               AND a.attnum > 0 AND NOT a.attisdropped
                               AND (a.attname ILIKE '%private%' OR a.attname ILIKE '%secret%')
                               AND has_column_privilege(c.oid, a.attnum, 'SELECT')""")
    assert readable == [], readable
    for q, args in [("SELECT email.add_dkim_key(%s, 'evil')", (domain(),)),
                    ("SELECT email.add_dkim_key(%s, 'evil', %s)", (domain(), rsa_pem)),
                    ("SELECT email.remove_dkim_key(%s, 'k1')", (d,))]:
        code, msg = sql_error(reader, q, *args)
        assert code == "42501", (q, code, msg)
    assert mail.val("SELECT count(*) FROM email.dkim_keys WHERE domain = %s", d) == 3


def test_ses_raw_mime_is_signed_without_date_and_message_id_and_other_apis_are_not(mail, keys):
    """SES takes our MIME as it is (Content.Raw) but rewrites Date and Message-ID, so its
    signatures leave them out; the other provider APIs build their own MIME from fields, so
    nothing of ours is signed for them."""
    d = domain()
    keys.add(d, "ses1")
    with Fake("ses", 27120) as ses, Fake("resend", 27121) as resend:
        mail.all("SELECT email.add_transport('dkim_ses', %s)",
                 "ses+api://AKIDEXAMPLE:wJalr%2FXUtnFEMI%2BK7MDENG@127.0.0.1:27120?scheme=http&region=eu-west-1")
        mail.all("SELECT email.add_transport('dkim_resend', 'resend+api://test-key@127.0.0.1:27121?scheme=http')")
        mid = send(mail, "dkim_ses", sender=f"Shop <shop@{d}>", subject="SES raw ✓", list_unsubscribe=True)
        wait_sent(mail, mid)
        raw = base64.b64decode(ses.accepted[-1]["json"]["Content"]["Raw"]["Data"])
        sig = only_signature(raw)
        assert sig["d"] == d and sig["c"] == "relaxed/relaxed", sig
        h = signed_headers(sig)
        assert "date" not in h and "message-id" not in h, h
        assert {"from", "to", "subject", "content-type", "list-unsubscribe"} <= set(h), h
        assert_verifies(raw, keys.dns)
        # What SES does to the message: a new Message-ID and Date still verify.
        rewritten = replace_field(replace_field(raw, "Message-ID", b"<0100018c-ses@email.amazonses.com>"),
                                  "Date", b"Tue, 1 Dec 2026 00:00:00 +0000")
        assert rewritten != raw
        assert_verifies(rewritten, keys.dns)
        assert_fails(replace_field(raw, "Subject", b"SES raw changed"), keys.dns)

        mid = send(mail, "dkim_resend", sender=f"Shop <shop@{d}>")
        wait_sent(mail, mid)
        assert "DKIM-Signature" not in json.dumps(resend.accepted[-1]["json"])
