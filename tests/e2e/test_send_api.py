"""The HTTP send API (DESIGN.md "Apps that do not speak SQL"): the listener answers the send calls
of Resend, Postmark and SendGrid, so that their official SDKs work with only the base URL changed.
Part of `make test`, so CI runs it.

    SDKs          the providers' own clients, installed from PyPI (resend, postmarker) and npm
                  (resend, postmark, @sendgrid/mail; tests/e2e/sdk) send a message with every
                  field they have; the worker delivers it to a real Postfix and the Maildir copy
                  is parsed back: From, To, Cc, Reply-To, Subject, the custom header, the text
                  and HTML parts, the attachment and the inline image; Bcc only in the envelope
    keys          each request runs as its key's role (created_by), a second role sees none of
                  the first one's mail; a revoked key is refused at once; a wrong key 401/403 in
                  the provider's shape, and the SDK raises its own error class
    limits        rate => '5/s': of 50 requests the refused ones are 429 with Retry-After, and
                  exactly the accepted ones are stored; wrong keys from one address are cut off
    batches       all or nothing: one bad message stores none of the batch
    idempotency   the same Idempotency-Key twice: one message, the same id
    hostile input 1,000 generated requests per route: only 2xx, 4xx or 503, the listener stays
                  up, and every stored message was answered with its id

Every wait is generous (a loaded 2-core CI machine) and fails naming what it waited for."""
import base64
import email
import email.policy
import http.client
import json
import os
import random
import string
import subprocess
import threading
import time
import uuid

import psycopg2
import pytest

from conftest import LISTEN_PORT, SLOW, Db, connect, postfix_as_default, sending_keys, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
SDK_DIR = os.path.join(HERE, "sdk")
HOST = "127.0.0.1"
PF_PORT = 26590
PF_TRANSPORT = "sendapi_pf"
ROLES = ("sendapi_alice", "sendapi_bob")
TXT = b"Hello attachment\n"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
HTML = '<p>Hello <b>world</b></p><img src="cid:logo">'


def b64(data):
    return base64.b64encode(data).decode()


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def db(cluster):
    c = connect("mail")
    yield Db(c)
    c.close()


@pytest.fixture(scope="module")
def postfix(cluster):
    """A Postfix the mail database's default transport delivers to, for this module only."""
    with postfix_as_default("postfix-sendapi", PF_PORT, PF_TRANSPORT) as pf:
        yield pf


@pytest.fixture(scope="module")
def keys(cluster):
    """Two roles that may send, a key each, and a rate-limited key."""
    with sending_keys(ROLES, {"alice": ("sendapi-alice", "sendapi_alice", None),
                              "bob": ("sendapi-bob", "sendapi_bob", None),
                              "slow": ("sendapi-slow", "sendapi_alice", "5/s")}) as k:
        # The listener reads the keys again when they change; wait until it takes the new ones.
        wait_until(lambda: knows(k["alice"]), "the listener to know the new keys", SLOW, every=0.2)
        yield k


@pytest.fixture(scope="module")
def template(db):
    db.all("DELETE FROM email.templates WHERE name = 'sendapi-welcome'")
    db.all("INSERT INTO email.templates (name, subject, body, html) VALUES ('sendapi-welcome', "
           "'Welcome {{ name }}', 'Hello {{ name }}, welcome to {{ product }}.', "
           "'<p>Hello {{ name }}, welcome to <b>{{ product }}</b>.</p>')")
    yield "sendapi-welcome"


# ---------------------------------------------------------------------------------------------
# Clients


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def post(path, body, headers=None, raw=None, timeout=60.0):
    """One POST on a new connection; (status, headers, parsed JSON or raw bytes)."""
    conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=timeout)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        payload = r.read()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
    finally:
        conn.close()


def knows(key):
    """Whether the listener is up and takes this key (an empty message is then a 422)."""
    try:
        return post("/emails", {}, bearer(key))[0] == 422
    except OSError:
        return False


def node(sdk, call, key, message, options=None):
    """Runs tests/e2e/sdk/client.js: one call of a provider's Node SDK; its JSON outcome."""
    req = {"sdk": sdk, "call": call, "port": LISTEN_PORT, "key": key, "message": message, "options": options or {}}
    p = subprocess.run(["node", os.path.join(SDK_DIR, "client.js")], input=json.dumps(req), capture_output=True,
                       text=True, timeout=120, cwd=SDK_DIR)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the {sdk} SDK: {p.stdout!r} {p.stderr!r}"
    return json.loads(lines[-1])


def show(r):
    """An SDK outcome for an assertion message, with the server's answer when it has one."""
    body = ((r.get("own") or {}).get("response") or {}).get("body")
    return json.dumps({k: r.get(k) for k in ("ok", "result", "exception", "name", "message", "statusCode")} |
                      {"body": body})[:3000]


def resend_py(key):
    import resend
    resend.api_key = key
    resend.api_url = f"http://{HOST}:{LISTEN_PORT}"
    resend.default_http_client = resend.RequestsClient(timeout=60)
    return resend


def postmarker_client(key):
    from postmarker.core import PostmarkClient
    return PostmarkClient(server_token=key, root_api_url=f"http://{HOST}:{LISTEN_PORT}/", timeout=60)


# ---------------------------------------------------------------------------------------------
# What arrived


def delivered(pf, subject, n, timeout=SLOW):
    """The n Maildir copies (one per recipient) of the message with this subject."""
    found = []

    def arrived():
        found[:] = [m for m in pf.messages() if str(m["Subject"]) == subject]
        return len(found) >= n

    wait_until(arrived, f"{n} copies of {subject!r} in the Maildir", timeout)
    return found


def envelope_recipients(copies):
    return sorted(str(m["Delivered-To"]).lower() for m in copies)


def check_full_message(copies, *, text="Hello world", extra_header=("X-Test", "1")):
    """The fields every full SDK send sets, as they arrived."""
    m = copies[0]
    assert "carol@example.test" in str(m["Cc"])
    assert "replies@example.test" in str(m["Reply-To"])
    assert m["Bcc"] is None, "a Bcc header reached a recipient"
    for c in copies:
        assert c["Bcc"] is None
    assert str(m[extra_header[0]]) == extra_header[1]
    body = m.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content().strip() == text
    html = m.get_body(preferencelist=("html",))
    assert html is not None and 'cid:logo' in html.get_content()
    parts = {p.get_filename(): p for p in m.walk() if p.get_filename()}
    assert parts["hello.txt"].get_payload(decode=True) == TXT
    logo = parts["logo.png"]
    assert logo.get_payload(decode=True) == PNG
    assert logo["Content-ID"].strip("<>") == "logo"


def row(db, mid):
    return db.one("SELECT created_by, recipients, cc, bcc, reply_to, subject, tags, metadata, status "
                  "FROM email.messages WHERE id = %s", int(mid))


# ---------------------------------------------------------------------------------------------
# Keys


def test_api_key_functions(db, keys):
    assert keys["alice"].startswith("pge_") and len(keys["alice"]) >= 40
    rows = db.all("SELECT name, role, prefix, rate FROM email.api_keys WHERE name LIKE 'sendapi%%' ORDER BY name")
    assert rows == [("sendapi-alice", "sendapi_alice", keys["alice"][:12], None),
                    ("sendapi-bob", "sendapi_bob", keys["bob"][:12], None),
                    ("sendapi-slow", "sendapi_alice", keys["slow"][:12], "5/s")]
    # Only a hash is kept: the key is nowhere in the database.
    assert db.val("SELECT count(*) FROM email.api_key_hashes h JOIN email.api_keys k USING (name) "
                  "WHERE encode(h.hash, 'escape') LIKE %s", f"%{keys['alice'][4:]}%") == 0
    assert db.val("SELECT encode(hash, 'hex') FROM email.api_key_hashes WHERE name = 'sendapi-alice'") == \
        __import__("hashlib").sha256(keys["alice"].encode()).hexdigest()
    assert db.error("SELECT email.create_api_key('sendapi-alice', 'sendapi_alice')")[0] == "42710"
    assert db.error("SELECT email.create_api_key('bad name!', 'sendapi_alice')")[0] == "22023"
    assert db.error("SELECT email.create_api_key('sendapi-x', 'no_such_role_here')")[0] == "42704"
    code, msg = db.error("SELECT email.create_api_key('sendapi-x', 'sendapi_alice', rate => 'fast')")
    assert code == "22023" and "rate" in msg
    assert db.val("SELECT email.revoke_api_key('sendapi-nope')") is False


def test_wrong_missing_and_revoked_keys(db, keys):
    msg = {"from": "a@example.test", "to": "b@example.test", "subject": "s", "text": "t"}
    assert post("/emails", msg)[0] == 401
    status, _, body = post("/emails", msg, bearer("pge_wrongwrongwrongwrongwrongwrongwrong"))
    assert status == 403 and body["name"] == "invalid_api_key"
    status, _, body = post("/email", {"From": "a@example.test"}, {"X-Postmark-Server-Token": "wrong"})
    assert status == 401 and body["ErrorCode"] == 10
    status, _, body = post("/v3/mail/send", {}, bearer("wrong"))
    assert status in (401, 403) and body["errors"][0]["message"]

    # The SDKs raise their own errors.
    resend = resend_py("pge_wrong")
    with pytest.raises(resend.exceptions.InvalidApiKeyError):
        resend.Emails.send(msg)
    r = node("postmark", "send", "wrong", {"From": "a@example.test", "To": "b@example.test", "Subject": "s",
                                           "TextBody": "t"})
    assert r["ok"] is False and r["exception"] == "InvalidAPIKeyError", show(r)
    r = node("sendgrid", "send", "SG.wrong", {"from": "a@example.test", "to": "b@example.test", "subject": "s",
                                              "text": "t"})
    assert r["ok"] is False and r["statusCode"] in (401, 403), show(r)

    # A revoked key is refused from the next request on.
    key = db.val("SELECT email.create_api_key('sendapi-tmp', 'sendapi_alice')")
    wait_until(lambda: knows(key), "the listener to know the new key", SLOW, 0.2)
    db.all("SELECT email.revoke_api_key('sendapi-tmp')")
    status, _, body = post("/emails", msg, bearer(key))
    assert status == 403 and body["name"] == "invalid_api_key", body
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = 's' AND created_by = 'sendapi_alice'") == 0


# ---------------------------------------------------------------------------------------------
# Each SDK, end to end


def test_resend_python_sdk_end_to_end(db, keys, postfix):
    resend = resend_py(keys["alice"])
    subject = unique("resend-py")
    params = {
        "from": "Acme Sender <sender@example.test>",
        "to": ["alice@example.test", "bob@example.test"],
        "cc": ["carol@example.test"], "bcc": ["dave@example.test"], "reply_to": "replies@example.test",
        "subject": subject, "text": "Hello world", "html": HTML, "headers": {"X-Test": "1"},
        "attachments": [{"filename": "hello.txt", "content": b64(TXT), "content_type": "text/plain"},
                        {"filename": "logo.png", "content": b64(PNG), "content_type": "image/png",
                         "content_id": "logo"}],
        "tags": [{"name": "category", "value": "welcome"}],
    }
    idem = unique("idem")
    sent = resend.Emails.send(params, {"idempotency_key": idem})
    mid = int(sent["id"])
    r = row(db, mid)
    assert r[0] == "sendapi_alice"
    assert r[7] == {"category": "welcome"}
    # The same Idempotency-Key again: the same message, not a second one.
    again = resend.Emails.send(params, {"idempotency_key": idem})
    assert again["id"] == sent["id"]
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", subject) == 1
    # The same key with other content: refused, nothing stored.
    with pytest.raises(resend.exceptions.ResendError) as e:
        resend.Emails.send({**params, "text": "other"}, {"idempotency_key": idem})
    assert "idempotency" in str(e.value).lower()
    copies = delivered(postfix, subject, 4)
    assert envelope_recipients(copies) == ["alice@example.test", "bob@example.test", "carol@example.test",
                                           "dave@example.test"]
    check_full_message(copies)
    assert "Acme Sender" in str(copies[0]["From"])


def test_resend_node_sdk_end_to_end_and_batch(db, keys, postfix):
    subject = unique("resend-node")
    full = {
        "from": "Acme Sender <sender@example.test>", "to": ["alice@example.test"], "cc": ["carol@example.test"],
        "bcc": ["dave@example.test"], "replyTo": "replies@example.test", "subject": subject, "text": "Hello world",
        "html": HTML, "headers": {"X-Test": "1"},
        "attachments": [{"filename": "hello.txt", "content": b64(TXT), "contentType": "text/plain"},
                        {"filename": "logo.png", "content": b64(PNG), "contentType": "image/png", "contentId": "logo"}],
        "tags": [{"name": "env", "value": "test"}],
    }
    r = node("resend", "send", keys["alice"], full, {"idempotencyKey": unique("idem")})
    assert r["ok"], show(r)
    mid = int(r["result"]["id"])
    assert row(db, mid)[0] == "sendapi_alice"
    check_full_message(delivered(postfix, subject, 3))

    s1, s2 = unique("batch"), unique("batch")
    r = node("resend", "batch", keys["alice"], [
        {"from": "sender@example.test", "to": "alice@example.test", "subject": s1, "text": "one"},
        {"from": "sender@example.test", "to": ["bob@example.test"], "subject": s2, "text": "two"}])
    assert r["ok"], show(r)
    ids = [int(x["id"]) for x in r["result"]["data"]]
    assert [db.val("SELECT subject FROM email.messages WHERE id = %s", i) for i in ids] == [s1, s2]
    delivered(postfix, s2, 1)

    # One bad message: none of the batch is stored, and the error names the field.
    s3 = unique("batch")
    r = node("resend", "batch", keys["alice"], [
        {"from": "sender@example.test", "to": "alice@example.test", "subject": s3, "text": "one"},
        {"from": "sender@example.test", "to": "not an address", "subject": s3, "text": "two"}])
    assert r["ok"] is False and r["statusCode"] == 422 and r["name"] == "validation_error", show(r)
    assert "to" in r["message"]
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", s3) == 0


def test_resend_validation_error_names_the_field(keys):
    resend = resend_py(keys["alice"])
    with pytest.raises(resend.exceptions.ValidationError) as e:
        resend.Emails.send({"from": "sender@example.test", "to": "bob@", "subject": "s", "text": "t"})
    assert "to" in str(e.value)
    with pytest.raises(resend.exceptions.ResendError) as e:
        resend.Emails.send({"from": "sender@example.test", "to": "b@example.test", "subject": "s", "text": "t",
                            "attachments": [{"filename": "x", "path": "https://example.com/x.pdf"}]})
    assert "attachments" in str(e.value)


def test_postmark_node_sdk_end_to_end_batch_and_template(db, keys, postfix, template):
    subject = unique("postmark-node")
    full = {
        "From": "Acme Sender <sender@example.test>", "To": "alice@example.test, bob@example.test",
        "Cc": "carol@example.test", "Bcc": "dave@example.test", "ReplyTo": "replies@example.test",
        "Subject": subject, "TextBody": "Hello world", "HtmlBody": HTML, "Headers": [{"Name": "X-Test", "Value": "1"}],
        "Attachments": [{"Name": "hello.txt", "Content": b64(TXT), "ContentType": "text/plain"},
                        {"Name": "logo.png", "Content": b64(PNG), "ContentType": "image/png", "ContentID": "cid:logo"}],
        "Tag": "welcome", "Metadata": {"customer_id": "42"}, "MessageStream": "outbound", "TrackOpens": False,
    }
    r = node("postmark", "send", keys["bob"], full)
    assert r["ok"] and r["result"]["ErrorCode"] == 0 and r["result"]["Message"] == "OK", show(r)
    mid = int(r["result"]["MessageID"])
    got = row(db, mid)
    assert got[0] == "sendapi_bob" and got[6] == ["welcome"] and got[7] == {"customer_id": "42"}
    copies = delivered(postfix, subject, 4)
    check_full_message(copies)

    s1 = unique("pm-batch")
    r = node("postmark", "batch", keys["bob"], [
        {"From": "sender@example.test", "To": "alice@example.test", "Subject": s1, "TextBody": "one"},
        {"From": "sender@example.test", "To": "bob@example.test", "Subject": s1, "TextBody": "two"}])
    assert r["ok"] and [x["ErrorCode"] for x in r["result"]] == [0, 0], show(r)
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", s1) == 2

    # A batch with a bad message: 200 with one result per message, nothing stored.
    s2 = unique("pm-batch")
    r = node("postmark", "batch", keys["bob"], [
        {"From": "sender@example.test", "To": "alice@example.test", "Subject": s2, "TextBody": "one"},
        {"From": "sender@example.test", "To": "nobody", "Subject": s2, "TextBody": "two"}])
    assert r["ok"], show(r)
    codes = [x["ErrorCode"] for x in r["result"]]
    assert codes[1] == 300 and codes[0] != 0, r
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", s2) == 0

    # Templates: Postmark's TemplateAlias is a stored template's name.
    who = unique("ada")
    r = node("postmark", "template", keys["bob"], {
        "From": "sender@example.test", "To": "alice@example.test", "TemplateAlias": template,
        "TemplateModel": {"name": who, "product": "pg_email"}})
    assert r["ok"] and r["result"]["ErrorCode"] == 0, show(r)
    copies = delivered(postfix, f"Welcome {who}", 1)
    assert f"Hello {who}, welcome to pg_email." in copies[0].get_body(preferencelist=("plain",)).get_content()

    # A validation error is the SDK's input error, naming the field.
    r = node("postmark", "send", keys["bob"], {"From": "sender@example.test", "To": "x", "Subject": "s",
                                               "TextBody": "t"})
    assert r["ok"] is False and r["statusCode"] == 422 and r["exception"] == "InvalidEmailRequestError", show(r)
    assert "To" in r["message"]


def test_postmarker_python_sdk_end_to_end_and_template(db, keys, postfix, template):
    client = postmarker_client(keys["alice"])
    subject = unique("postmarker")
    sent = client.emails.send(
        From="Acme Sender <sender@example.test>", To=["alice@example.test", "bob@example.test"],
        Cc="carol@example.test", Bcc="dave@example.test", ReplyTo="replies@example.test", Subject=subject,
        TextBody="Hello world", HtmlBody=HTML, Headers={"X-Test": "1"},
        Attachments=[{"Name": "hello.txt", "Content": b64(TXT), "ContentType": "text/plain"},
                     {"Name": "logo.png", "Content": b64(PNG), "ContentType": "image/png", "ContentID": "cid:logo"}],
        Tag="postmarker", Metadata={"k": "v"})
    assert sent["ErrorCode"] == 0
    assert row(db, sent["MessageID"])[0] == "sendapi_alice"
    check_full_message(delivered(postfix, subject, 4))
    who = unique("grace")
    sent = client.emails.send_with_template(From="sender@example.test", To="bob@example.test",
                                            TemplateAlias=template, TemplateModel={"name": who, "product": "x"})
    assert sent["ErrorCode"] == 0
    delivered(postfix, f"Welcome {who}", 1)
    from postmarker.exceptions import ClientError
    with pytest.raises(ClientError) as e:
        client.emails.send(From="sender@example.test", To="nobody", Subject="s", TextBody="t")
    assert e.value.error_code == 300 and "To" in str(e.value)


def test_sendgrid_node_sdk_end_to_end_personalizations_and_sandbox(db, keys, postfix):
    subject = unique("sendgrid")
    full = {
        "from": {"email": "sender@example.test", "name": "Acme Sender"},
        "to": ["alice@example.test", "Bob <bob@example.test>"], "cc": "carol@example.test",
        "bcc": "dave@example.test", "replyTo": "replies@example.test", "subject": subject, "text": "Hello world",
        "html": HTML, "headers": {"X-Test": "1"},
        "attachments": [{"content": b64(TXT), "filename": "hello.txt", "type": "text/plain",
                         "disposition": "attachment"},
                        {"content": b64(PNG), "filename": "logo.png", "type": "image/png", "disposition": "inline",
                         "contentId": "logo"}],
        "categories": ["welcome"], "customArgs": {"customer_id": "42"},
    }
    r = node("sendgrid", "send", keys["alice"], full)
    assert r["ok"] and r["result"]["statusCode"] == 202, show(r)
    mid = int(r["result"]["headers"]["x-message-id"])
    got = row(db, mid)
    assert got[0] == "sendapi_alice" and got[6] == ["welcome"] and got[7] == {"customer_id": "42"}
    check_full_message(delivered(postfix, subject, 4))

    # Two personalizations: two messages, each with its own recipients and subject.
    s1, s2 = unique("sg-p"), unique("sg-p")
    r = node("sendgrid", "send", keys["alice"], {
        "from": "sender@example.test", "subject": "default", "text": "hello",
        "personalizations": [{"to": [{"email": "alice@example.test"}], "subject": s1},
                             {"to": [{"email": "bob@example.test"}], "subject": s2}]})
    assert r["ok"] and r["result"]["statusCode"] == 202, show(r)
    assert db.all("SELECT recipients FROM email.messages WHERE subject IN (%s, %s) ORDER BY id", s1, s2) == \
        [(["alice@example.test"],), (["bob@example.test"],)]

    # Sandbox mode checks and stores nothing.
    s3 = unique("sg-sandbox")
    r = node("sendgrid", "send", keys["alice"], {"from": "sender@example.test", "to": "alice@example.test",
                                                 "subject": s3, "text": "x",
                                                 "mailSettings": {"sandboxMode": {"enable": True}}})
    assert r["ok"] and r["result"]["statusCode"] == 200, show(r)
    assert db.val("SELECT count(*) FROM email.messages WHERE subject = %s", s3) == 0

    r = node("sendgrid", "send", keys["alice"], {"from": "sender@example.test", "to": "bad@", "subject": "s",
                                                 "text": "x"})
    assert r["ok"] is False and r["statusCode"] == 400, show(r)
    errors = r["own"]["response"]["body"]["errors"]
    assert errors and "to" in (errors[0].get("field") or "")


# ---------------------------------------------------------------------------------------------
# Every SDK's own errors: a wrong key and a rate limit


MINIMAL = {
    "resend": {"from": "sender@example.test", "to": "alice@example.test", "subject": "s", "text": "t"},
    "postmark": {"From": "sender@example.test", "To": "alice@example.test", "Subject": "s", "TextBody": "t"},
    "sendgrid": {"from": "sender@example.test", "to": "alice@example.test", "subject": "s", "text": "t"},
}


def sdk_error(sdk, key):
    """What each SDK raises (or returns) for a message refused with `key`: (kind, status)."""
    if sdk == "resend-py":
        resend = resend_py(key)
        try:
            resend.Emails.send(MINIMAL["resend"])
        except resend.exceptions.ResendError as e:
            return type(e).__name__, int(e.code)
        raise AssertionError("the Resend SDK did not raise")
    if sdk == "postmarker":
        from postmarker.exceptions import ClientError
        try:
            postmarker_client(key).emails.send(**MINIMAL["postmark"])
        except ClientError as e:
            return f"ClientError {e.error_code}", e.__cause__.response.status_code
        raise AssertionError("postmarker did not raise")
    provider = {"resend-node": "resend", "postmark-node": "postmark", "sendgrid-node": "sendgrid"}[sdk]
    r = node(provider, "send", key, MINIMAL[provider])
    assert r["ok"] is False, show(r)
    return (r["name"] if provider == "resend" else r["exception"]), int(r["statusCode"])


SDKS = ["resend-py", "resend-node", "postmarker", "postmark-node", "sendgrid-node"]
WRONG_KEY = {"resend-py": ("InvalidApiKeyError", 403), "resend-node": ("invalid_api_key", 403),
             "postmarker": ("ClientError 10", 401), "postmark-node": ("InvalidAPIKeyError", 401),
             "sendgrid-node": ("ResponseError", 401)}
RATE_LIMITED = {"resend-py": ("RateLimitError", 429), "resend-node": ("rate_limit_exceeded", 429),
                "postmarker": None, "postmark-node": ("RateLimitExceededError", 429),
                "sendgrid-node": ("ResponseError", 429)}


@pytest.mark.parametrize("sdk", SDKS)
def test_each_sdk_raises_its_own_error_for_a_wrong_key_and_a_rate_limit(db, keys, sdk):
    wrong = "pge_" + "x" * 43
    assert sdk_error(sdk, wrong) == WRONG_KEY[sdk]
    # A key allowed one request an hour: an empty request spends it, the SDK's call is then 429.
    name = f"sendapi-rl-{sdk}"
    db.all("DELETE FROM email.api_keys WHERE name = %s", name)
    key = db.val("SELECT email.create_api_key(%s, 'sendapi_alice', rate => '1/h')", name)
    wait_until(lambda: knows(key), "the listener to know the new key", SLOW, 0.2)
    kind, status = sdk_error(sdk, key)
    assert status == 429, (kind, status)
    if RATE_LIMITED[sdk]:
        assert (kind, status) == RATE_LIMITED[sdk]
    else:
        assert kind.startswith("ClientError"), kind
    db.all("DELETE FROM email.api_keys WHERE name = %s", name)


# ---------------------------------------------------------------------------------------------
# Roles, rates and abuse


def test_a_second_role_cannot_see_or_cancel_the_first_ones_mail(db, keys):
    subject = unique("private")
    status, _, body = post("/emails", {"from": "sender@example.test", "to": "alice@example.test",
                                       "subject": subject, "text": "t", "scheduled_at": "2099-01-01T00:00:00Z"},
                           bearer(keys["alice"]))
    assert status == 200, body
    mid = int(body["id"])
    c = connect("mail", autocommit=False)
    try:
        cur = c.cursor()
        cur.execute("SET ROLE sendapi_bob")
        cur.execute("SELECT count(*) FROM email.messages WHERE id = %s", (mid,))
        assert cur.fetchone()[0] == 0
        # Cancelling it fails: the message is not there for this role.
        try:
            cur.execute("SELECT email.cancel(%s)", (mid,))
            assert cur.fetchone()[0] in (False, 0)
        except psycopg2.Error as e:
            assert e.pgcode in ("42501", "42704"), e.pgerror
        c.rollback()
        cur = c.cursor()
        cur.execute("SET ROLE sendapi_alice")
        cur.execute("SELECT count(*) FROM email.messages WHERE id = %s", (mid,))
        assert cur.fetchone()[0] == 1
        c.rollback()
    finally:
        c.close()
    assert db.val("SELECT status::text FROM email.messages WHERE id = %s", mid) == "queued"
    db.all("SELECT email.cancel(%s)", mid)


def test_rate_limit_answers_429_and_stores_exactly_the_accepted(db, keys):
    subject = unique("rate")
    results = []
    lock = threading.Lock()

    def one(i):
        r = post("/emails", {"from": "sender@example.test", "to": "alice@example.test", "subject": subject,
                             "text": f"n{i}"}, bearer(keys["slow"]))
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 50
    ok = [int(b["id"]) for s, _, b in results if s == 200]
    limited = [(h, b) for s, h, b in results if s == 429]
    assert len(ok) + len(limited) == 50, [s for s, _, _ in results]
    assert limited, "50 requests at once under rate '5/s' were all accepted"
    assert 5 <= len(ok) < 50
    for h, b in limited:
        assert int(h["retry-after"]) >= 1 and b["name"] == "rate_limit_exceeded"
    stored = [r[0] for r in db.all("SELECT id FROM email.messages WHERE subject = %s ORDER BY id", subject)]
    assert stored == sorted(ok)
    # The Python SDK raises its own rate-limit error.
    resend = resend_py(keys["slow"])
    with pytest.raises(resend.exceptions.RateLimitError):
        for _ in range(20):
            resend.Emails.send({"from": "sender@example.test", "to": "alice@example.test", "subject": subject,
                                "text": "more"})
    db.all("UPDATE email.messages SET status = 'cancelled' WHERE subject = %s AND status = 'queued'", subject)


def test_last_used_at_is_noted(db, keys):
    db.all("UPDATE email.api_keys SET last_used_at = NULL WHERE name = 'sendapi-bob'")
    assert post("/emails", {}, bearer(keys["bob"]))[0] == 422
    db.wait("SELECT last_used_at IS NOT NULL FROM email.api_keys WHERE name = 'sendapi-bob'", timeout=SLOW)


def test_wrong_keys_from_one_address_are_cut_off(keys):
    ip = f"198.51.100.{random.randint(1, 250)}"
    hdr = {"X-Forwarded-For": ip}
    statuses = [post("/emails", {}, {**hdr, **bearer(f"pge_wrong{i}")})[0] for i in range(12)]
    assert statuses[:10] == [403] * 10 and statuses[10:] == [429, 429], statuses
    # Even the right key is refused from that address for now; another address is not affected.
    assert post("/emails", {}, {**hdr, **bearer(keys["alice"])})[0] == 429
    assert post("/emails", {}, {"X-Forwarded-For": "198.51.100.251", **bearer(keys["alice"])})[0] == 422


def test_body_limit(keys):
    # Declared too large: refused before the body is read.
    conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=60)
    try:
        conn.putrequest("POST", "/emails")
        for k, v in {**bearer(keys["alice"]), "Content-Type": "application/json",
                     "Content-Length": str(17 * 1024 * 1024)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["statusCode"] == 413
    finally:
        conn.close()
    # Chunked, no length declared: cut off at the limit.
    def chunks():
        piece = b"x" * (1024 * 1024)
        yield b'{"from": "a@example.test", "text": "'
        for _ in range(17):
            yield piece
        yield b'"}'
    conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=60)
    try:
        try:
            conn.request("POST", "/emails", body=chunks(), headers={**bearer(keys["alice"]),
                                                                   "Content-Type": "application/json"},
                         encode_chunked=True)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the listener answered and closed while the rest was being sent
        r = conn.getresponse()
        assert r.status == 413
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Hostile input


ROUTES = {
    "/emails": "resend", "/emails/batch": "resend", "/email": "postmark", "/email/batch": "postmark",
    "/email/withTemplate": "postmark", "/v3/mail/send": "sendgrid",
}


def valid_body(path, subject):
    if path == "/emails":
        return {"from": "sender@example.test", "to": "alice@example.test", "subject": subject, "text": "t"}
    if path == "/emails/batch":
        return [valid_body("/emails", subject), valid_body("/emails", subject)]
    if path == "/email":
        return {"From": "sender@example.test", "To": "alice@example.test", "Subject": subject, "TextBody": "t"}
    if path == "/email/batch":
        return [valid_body("/email", subject), valid_body("/email", subject)]
    if path == "/email/withTemplate":
        return {"From": "sender@example.test", "To": "alice@example.test", "TemplateAlias": "sendapi-welcome",
                "TemplateModel": {"name": "x", "product": subject}}
    return {"from": {"email": "sender@example.test"}, "subject": subject, "content": [{"type": "text/plain",
                                                                                        "value": "t"}],
            "personalizations": [{"to": [{"email": "alice@example.test"}]}]}


ODD_VALUES = [None, 0, -1, 1e308, True, "", " ", "x" * 5000, [], {}, [None], {"a": None}, "\r\nBcc: evil@x.test",
              "a@example.test\r\nX-Injected: 1", "\u0000", "é" * 300, "<script>", "a@b", "@", "a" * 70 + "@x.test",
              [1, 2, 3], {"email": None}, {"email": "a@example.test", "name": "Eve\r\nBcc: evil@x.test"},
              "2099-13-45T99:99:99Z", "in 1 minute", "cid:", "=?utf-8?b?AAAA?="]


def mutate(rng, value, depth=0):
    """A random variation of a JSON value: a field removed, retyped, replaced by an odd value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.random()
        if action < 0.25:
            del out[key]
        elif action < 0.6:
            out[key] = rng.choice(ODD_VALUES)
        elif action < 0.75:
            out[rng.choice(["X", "attachments", "Attachments", "headers", "Headers", "tags", "personalizations",
                            key.upper(), key + "\u0000"])] = rng.choice(ODD_VALUES)
        else:
            out[key] = mutate(rng, out[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = mutate(rng, out[i], depth + 1) if rng.random() < 0.6 else rng.choice(ODD_VALUES)
        if rng.random() < 0.1:
            out = out * rng.randint(2, 300)
        return out
    return rng.choice(ODD_VALUES)


def raw_variant(rng, data):
    action = rng.random()
    if action < 0.3:
        return data[: rng.randrange(len(data) + 1)]  # cut short
    if action < 0.5:
        b = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            b[rng.randrange(len(b))] = rng.randrange(256)  # invalid UTF-8, broken JSON
        return bytes(b)
    if action < 0.6:
        return b"[" * 5000 + b"]" * 5000  # deep nesting
    if action < 0.7:
        return ("".join(rng.choice(string.printable) for _ in range(rng.randint(0, 300)))).encode()
    return data


def test_hostile_requests_never_harm(db, keys, template):
    listener = db.val("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email listener'")
    assert listener
    before = db.val("SELECT coalesce(max(id), 0) FROM email.messages")
    rng = random.Random(20261130)
    answered_ids = set()
    statuses = {}
    for path, provider in ROUTES.items():
        conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=60)
        auth = {"X-Postmark-Server-Token": keys["bob"]} if provider == "postmark" else bearer(keys["bob"])
        for i in range(1000):
            subject = unique("hostile")
            body = valid_body(path, subject)
            data = json.dumps(mutate(rng, body) if rng.random() < 0.85 else body).encode()
            if rng.random() < 0.3:
                data = raw_variant(rng, data)
            try:
                conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **auth})
                r = conn.getresponse()
                payload = r.read()
            except (http.client.HTTPException, OSError) as e:
                raise AssertionError(f"{path}: the connection failed on request {i}: {e!r} (body {data[:200]!r})")
            assert 200 <= r.status < 300 or 400 <= r.status < 500 or r.status == 503, (path, r.status, payload[:300])
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.status in (200, 202):
                ids = ids_of(provider, r, payload)
                answered_ids.update(ids)
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(HOST, LISTEN_PORT, timeout=60)
        conn.close()
    assert db.val("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email listener'") == listener
    stored = {r[0] for r in db.all("SELECT id FROM email.messages WHERE id > %s AND created_by = 'sendapi_bob'",
                                   before)}
    # Every stored message was answered with its id, and every id answered is stored.
    assert stored == answered_ids, (len(stored), len(answered_ids))
    assert statuses.get(200, 0) + statuses.get(202, 0) > 100, statuses
    db.all("UPDATE email.messages SET status = 'cancelled' WHERE id > %s AND created_by = 'sendapi_bob' "
           "AND status = 'queued'", before)


def ids_of(provider, r, payload):
    if provider == "sendgrid":
        # X-Message-Id is the first message's id; X-Pg-Email-Ids lists every personalization's.
        return {int(i) for i in r.getheader("X-Pg-Email-Ids").split(",")} if r.status == 202 else set()
    body = json.loads(payload)
    if provider == "resend":
        return {int(x["id"]) for x in body["data"]} if "data" in body else {int(body["id"])}
    items = body if isinstance(body, list) else [body]
    return {int(x["MessageID"]) for x in items if x.get("ErrorCode") == 0}
