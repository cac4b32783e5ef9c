"""Self-test of the fakes package: the five provider fakes accept the documented request shapes,
refuse the others with the provider's own errors, and honour fail_next / reject_address / set_down.
No PostgreSQL needed; from the repository root:

    /usr/bin/python3 -m pytest -p no:cacheprovider -q tests/e2e/test_fakes_selftest.py
"""
import base64
import datetime
import email.message
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fakes import Fake

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_next_port = iter(range(27000, 28000))


def free_port():
    for p in _next_port:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise RuntimeError("no free port in 27000-27999")


@pytest.fixture
def start():
    started = []

    def _start(provider, **kw):
        f = Fake(provider, free_port(), **kw).start()
        started.append(f)
        return f

    yield _start
    for f in started:
        f.stop()


def call(url, body=b"", headers=None, method="POST"):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with OPENER.open(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def jcall(url, obj, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    st, hd, body = call(url, json.dumps(obj).encode(), h)
    return st, hd, (json.loads(body) if body else None)


B64 = base64.b64encode(b"hello\x00world").decode()

# ------------------------------------------------------------------------------------- SendGrid

SG_AUTH = {"Authorization": "Bearer test-key"}


def sg_body(**over):
    b = {
        "personalizations": [{"to": [{"email": "to@example.test", "name": "To"}, {"email": "t2@example.test"}],
                              "cc": [{"email": "cc@example.test"}]}],
        "from": {"email": "from@example.test", "name": "Sender"},
        "reply_to": {"email": "reply@example.test"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "hi"}, {"type": "text/html", "value": "<p>hi</p>"}],
        "attachments": [{"content": B64, "filename": "a.bin", "type": "application/octet-stream"},
                        {"content": B64, "filename": "logo.png", "type": "image/png",
                         "disposition": "inline", "content_id": "logo"}],
        "categories": ["welcome"],
        "custom_args": {"message_id": "42"},
        "headers": {"X-Custom": "yes"},
    }
    b.update(over)
    return b


def sg_err(field):
    return lambda body: body["errors"][0]["field"] == field


def test_sendgrid_success_and_record(start):
    f = start("sendgrid")
    st, hd, body = call(f.endpoint, json.dumps(sg_body()).encode(),
                        dict(SG_AUTH, **{"Content-Type": "application/json"}))
    assert st == 202 and body == b""
    assert hd["x-message-id"]
    [r] = f.wait_for(1)
    assert r["method"] == "POST" and r["path"] == "/v3/mail/send" and r["query"] == {}
    assert r["headers"]["authorization"] == "Bearer test-key"
    assert r["json"]["subject"] == "Hello" and r["form"] is None
    assert r["status"] == 202 and r["response"] == b"" and isinstance(r["at"], float)
    assert r["message_id"] == hd["x-message-id"]
    assert f.requests == [r]


@pytest.mark.parametrize("mutate,field", [
    (lambda b: b.pop("from"), "from"),
    (lambda b: b.update({"from": {"email": "Sender <from@example.test>"}}), "from.email"),
    (lambda b: b.pop("subject"), "subject"),
    (lambda b: b.update({"personalizations": []}), "personalizations"),
    (lambda b: b["personalizations"][0].update({"to": []}), "personalizations.0.to"),
    (lambda b: b["personalizations"][0]["to"].append({"email": "nope"}), "personalizations.0.to.2.email"),
    (lambda b: b["personalizations"][0]["cc"].append({"email": "TO@example.test"}), "personalizations.0.cc.1.email"),
    (lambda b: b.update({"content": []}), "content"),
    (lambda b: b.update({"content": [{"type": "text/html", "value": "<p>x</p>"},
                                     {"type": "text/plain", "value": "x"}]}), "content"),
    (lambda b: b["content"][0].update({"value": ""}), "content.0.value"),
    (lambda b: b["attachments"][0].update({"content": "not base64!"}), "attachments.0.content"),
    (lambda b: b["attachments"][0].pop("filename"), "attachments.0.filename"),
    (lambda b: b["attachments"][1].pop("content_id"), "attachments.1.content_id"),
    (lambda b: b["attachments"][0].update({"disposition": "embedded"}), "attachments.0.disposition"),
    (lambda b: b.update({"categories": [str(i) for i in range(11)]}), "categories"),
    (lambda b: b.update({"custom_args": {"n": 1}}), "custom_args"),
    (lambda b: b.update({"headers": {"reply-TO": "x@example.test"}}), "headers.reply-TO"),
    (lambda b: b.update({"headers": {"DKIM-Signature": "v=1"}}), "headers.DKIM-Signature"),
    (lambda b: b.update({"personalizations": [{"to": [{"email": f"r{i}-{j}@example.test"} for i in range(500)]}
                                              for j in range(3)]}), "personalizations"),
    (lambda b: b.update({"replyto": {"email": "x@example.test"}}), "replyto"),
])
def test_sendgrid_invalid_shapes(start, mutate, field):
    f = start("sendgrid")
    b = sg_body()
    mutate(b)
    st, _, body = jcall(f.endpoint, b, SG_AUTH)
    assert st == 400, body
    assert body["errors"][0]["field"] == field and body["errors"][0]["help"] is None
    assert f.accepted == [] and f.requests[0]["status"] == 400


def test_sendgrid_subject_per_personalization(start):
    f = start("sendgrid")
    b = sg_body()
    del b["subject"]
    b["personalizations"][0]["subject"] = "Per-recipient"
    assert jcall(f.endpoint, b, SG_AUTH)[0] == 202
    b["mail_settings"] = {"sandbox_mode": {"enable": True}}
    assert jcall(f.endpoint, b, SG_AUTH)[0] == 200   # sandbox mode answers 200


def test_sendgrid_auth_and_content_type(start):
    f = start("sendgrid")
    denied = {"errors": [{"message": "The provided authorization grant is invalid, expired, or revoked",
                          "field": None, "help": None}]}
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXk="}):
        st, _, body = jcall(f.endpoint, sg_body(), h)
        assert (st, body) == (401, denied)
    st, _, body = call(f.endpoint, json.dumps(sg_body()).encode(), SG_AUTH)  # urllib: form-urlencoded
    assert st == 400 and "application/json" in json.loads(body)["errors"][0]["message"]
    st, _, body = call(f.endpoint, b"{not json", dict(SG_AUTH, **{"Content-Type": "application/json"}))
    assert st == 400 and json.loads(body)["errors"][0]["message"] == "Bad Request"
    st, _, body = jcall(f.url + "/v3/mail/sendx", sg_body(), SG_AUTH)
    assert st == 404
    assert len(f.requests) == 6 and f.accepted == []


def test_sendgrid_fail_next_and_reject(start):
    f = start("sendgrid")
    f.fail_next(429, retry_after="7")
    # an invalid request does not use up the scripted failure
    assert jcall(f.endpoint, sg_body(), {"Authorization": "Bearer nope"})[0] == 401
    st, hd, body = jcall(f.endpoint, sg_body(), SG_AUTH)
    assert st == 429 and hd["retry-after"] == "7"
    assert hd["x-ratelimit-limit"] and hd["x-ratelimit-remaining"] == "0"
    assert int(hd["x-ratelimit-reset"]) >= int(time.time())
    assert body == {"errors": [{"message": "too many requests", "field": None, "help": None}]}
    f.fail_next(503, n=2)
    assert [jcall(f.endpoint, sg_body(), SG_AUTH)[0] for _ in range(3)] == [503, 503, 202]
    assert "retry-after" not in f.requests[2]["response_headers"]
    f.reject_address("T2@Example.Test")
    st, _, body = jcall(f.endpoint, sg_body(), SG_AUTH)
    assert (st, body) == (400, {"errors": [{"message": "Does not contain a valid address.",
                                            "field": "personalizations.0.to.1.email", "help": None}]})
    f.clear_rejections()
    f.reject_address("cc@example.test")
    assert jcall(f.endpoint, sg_body(), SG_AUTH)[2]["errors"][0]["field"] == "personalizations.0.cc.0.email"
    assert len(f.accepted) == 1 and [r["status"] for r in f.requests] == [401, 429, 503, 503, 202, 400, 400]


# ------------------------------------------------------------------------------------- Postmark

PM_H = {"X-Postmark-Server-Token": "test-key", "Accept": "application/json"}


def pm_body(**over):
    b = {"From": "Sender <from@example.test>", "To": "to@example.test, \"Doe, Jane\" <jane@example.test>",
         "Cc": "cc@example.test", "Subject": "Hello", "Tag": "welcome", "HtmlBody": "<p>hi</p>",
         "TextBody": "hi", "ReplyTo": "reply@example.test",
         "Headers": [{"Name": "X-Custom", "Value": "yes"}],
         "Attachments": [{"Name": "a.bin", "Content": B64, "ContentType": "application/octet-stream"},
                         {"Name": "logo.png", "Content": B64, "ContentType": "image/png",
                          "ContentID": "cid:logo"}],
         "Metadata": {"message_id": "42"}, "MessageStream": "outbound"}
    b.update(over)
    return b


def test_postmark_success(start):
    f = start("postmark")
    st, _, body = jcall(f.endpoint, pm_body(), PM_H)
    assert st == 200
    assert body["To"] == pm_body()["To"] and body["ErrorCode"] == 0 and body["Message"] == "OK"
    uuid.UUID(body["MessageID"])
    datetime.datetime.fromisoformat(body["SubmittedAt"])
    [r] = f.wait_for(1)
    assert r["json"]["Subject"] == "Hello" and r["headers"]["x-postmark-server-token"] == "test-key"
    assert r["response"] == body


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: b.pop("From"), "From"),
    (lambda b: b.update({"From": "not-an-address"}), "From"),
    (lambda b: b.pop("To"), "recipients"),
    (lambda b: b.update({"To": "a@example.test, , b@example.test"}), "To"),
    (lambda b: b.update({"To": ", ".join(f"r{i}@example.test" for i in range(50))}), "50"),
    (lambda b: (b.pop("HtmlBody"), b.pop("TextBody")), "TextBody or HtmlBody"),
    (lambda b: b.update({"To": ["to@example.test"]}), "To"),
    (lambda b: b.update({"Tag": ["a", "b"]}), "Tag"),
    (lambda b: b.update({"Headers": {"X-Custom": "yes"}}), "Headers"),
    (lambda b: b["Attachments"][0].update({"Content": "%%%"}), "base64"),
    (lambda b: b["Attachments"][0].pop("ContentType"), "ContentType"),
    (lambda b: b.update({"Metadata": {"k": 1}}), "Metadata"),
    (lambda b: b.update({"textBody": "x"}), "textBody"),
])
def test_postmark_invalid_shapes(start, mutate, needle):
    f = start("postmark")
    b = pm_body()
    mutate(b)
    st, _, body = jcall(f.endpoint, b, PM_H)
    assert st == 422 and body["ErrorCode"] == 300 and needle in body["Message"], body
    assert f.accepted == []


def test_postmark_auth_headers(start):
    f = start("postmark")
    denied = {"ErrorCode": 10, "Message": "Request does not contain a valid Server token."}
    assert jcall(f.endpoint, pm_body(), {"Accept": "application/json"})[::2] == (401, denied)
    assert jcall(f.endpoint, pm_body(), dict(PM_H, **{"X-Postmark-Server-Token": "x"}))[::2] == (401, denied)
    st, _, body = jcall(f.endpoint, pm_body(), {"X-Postmark-Server-Token": "test-key"})  # no Accept
    assert st == 422 and body["ErrorCode"] == 300
    st, _, body = call(f.endpoint, json.dumps(pm_body()).encode(), PM_H)  # form-urlencoded
    assert st == 422 and json.loads(body)["ErrorCode"] == 300
    st, _, body = call(f.endpoint, b"{", dict(PM_H, **{"Content-Type": "application/json"}))
    assert st == 422 and json.loads(body)["ErrorCode"] == 402


def test_postmark_fail_next_and_reject(start):
    f = start("postmark")
    f.fail_next(422)
    assert jcall(f.endpoint, pm_body(), PM_H)[::2] == (422, {"ErrorCode": 300, "Message": "Invalid request"})
    f.fail_next(429, retry_after="2")
    st, hd, body = jcall(f.endpoint, pm_body(), PM_H)
    assert st == 429 and hd["retry-after"] == "2" and "Message" in body
    f.fail_next(500)
    assert jcall(f.endpoint, pm_body(), PM_H)[0] == 500
    f.reject_address("JANE@example.test")
    st, _, body = jcall(f.endpoint, pm_body(), PM_H)
    assert st == 422 and body["ErrorCode"] == 406
    assert body["Message"] == ("You tried to send to recipient(s) that have been marked as inactive. Found "
                               "inactive addresses: jane@example.test. Inactive recipients are ones that have "
                               "generated a hard bounce, a spam complaint, or a manual suppression.")
    assert f.accepted == []
    # pg_email posts one message per call; the batch endpoint is not part of the fake
    st, _, body = jcall(f.url + "/email/batch", [pm_body()], PM_H)
    assert (st, body) == (404, {"ErrorCode": 0, "Message": "Not found."})
    assert f.accepted == []


# --------------------------------------------------------------------------------------- Resend

RS_H = {"Authorization": "Bearer test-key"}


def rs_body(**over):
    b = {"from": "Sender <from@example.test>", "to": ["to@example.test", "Jane <jane@example.test>"],
         "cc": "cc@example.test", "bcc": ["bcc@example.test"], "reply_to": "reply@example.test",
         "subject": "Hello", "html": "<p>hi</p>", "text": "hi", "headers": {"X-Custom": "yes"},
         "attachments": [{"content": B64, "filename": "a.bin"},
                         {"content": B64, "filename": "logo.png", "content_type": "image/png",
                          "content_id": "logo"}],
         "tags": [{"name": "category", "value": "welcome_mail-1"}]}
    b.update(over)
    return b


def test_resend_success(start):
    f = start("resend")
    st, _, body = jcall(f.endpoint, rs_body(), RS_H)
    assert st == 200 and set(body) == {"id"}
    uuid.UUID(body["id"])
    st, _, body2 = jcall(f.endpoint, rs_body(to="single@example.test", cc=None), RS_H)
    assert st == 200 and body2["id"] != body["id"]
    assert [r["json"]["to"] for r in f.wait_for(2)] == [rs_body()["to"], "single@example.test"]


@pytest.mark.parametrize("mutate,status,name", [
    (lambda b: b.pop("subject"), 422, "missing_required_field"),
    (lambda b: b.pop("from"), 422, "missing_required_field"),
    (lambda b: b.pop("to"), 422, "missing_required_field"),
    (lambda b: b.update({"from": "from at example"}), 422, "validation_error"),
    (lambda b: b.update({"to": [f"r{i}@example.test" for i in range(51)]}), 422, "validation_error"),
    (lambda b: (b.pop("html"), b.pop("text")), 422, "validation_error"),
    (lambda b: b.update({"tags": [{"name": "has space", "value": "x"}]}), 422, "validation_error"),
    (lambda b: b.update({"tags": [{"name": "ok", "value": "a.b"}]}), 422, "validation_error"),
    (lambda b: b.update({"headers": {"X-N": 1}}), 422, "validation_error"),
    (lambda b: b.update({"replyTo": "x@example.test"}), 422, "validation_error"),
    (lambda b: b["attachments"][0].update({"content": "***"}), 422, "invalid_attachment"),
    (lambda b: b["attachments"][0].pop("content"), 422, "invalid_attachment"),
])
def test_resend_invalid_shapes(start, mutate, status, name):
    f = start("resend")
    b = rs_body()
    mutate(b)
    st, _, body = jcall(f.endpoint, b, RS_H)
    assert (st, body["statusCode"], body["name"]) == (status, status, name), body
    assert f.accepted == []


def test_resend_auth_and_idempotency(start):
    f = start("resend")
    assert jcall(f.endpoint, rs_body())[::2] == (401, {"statusCode": 401, "name": "missing_api_key",
                                                        "message": "Missing API key in the authorization header"})
    assert jcall(f.endpoint, rs_body(), {"Authorization": "Bearer bad"})[::2] == (
        403, {"statusCode": 403, "message": "API key is invalid", "name": "invalid_api_key"})
    st, _, body = call(f.endpoint, json.dumps(rs_body()).encode(), RS_H)  # form-urlencoded
    assert st == 422 and json.loads(body)["name"] == "validation_error"
    st, _, body = jcall(f.endpoint, rs_body(), dict(RS_H, **{"Idempotency-Key": "k" * 257}))
    assert st == 400 and body["name"] == "invalid_idempotency_key"
    ik = dict(RS_H, **{"Idempotency-Key": "msg-1"})
    f.fail_next(500)
    st, _, body = jcall(f.endpoint, rs_body(), ik)
    assert st == 500 and body["name"] == "application_error"
    st, _, first = jcall(f.endpoint, rs_body(), ik)
    assert st == 200
    # key order differs, same content: a replay, same id, nothing new accepted
    st, _, again = jcall(f.endpoint, dict(reversed(list(rs_body().items()))), ik)
    assert (st, again) == (200, first) and f.requests[-1]["idempotent_replay"]
    st, _, body = jcall(f.endpoint, rs_body(subject="Other"), ik)
    assert st == 409 and body["name"] == "invalid_idempotent_request"
    assert len(f.accepted) == 1


def test_resend_fail_next_and_reject(start):
    f = start("resend")
    f.fail_next(429, retry_after="3")
    st, hd, body = jcall(f.endpoint, rs_body(), RS_H)
    assert (st, body) == (429, {"statusCode": 429, "message": "Too many requests", "name": "rate_limit_exceeded"})
    assert hd["retry-after"] == "3" and hd["ratelimit-limit"] and hd["ratelimit-remaining"] == "0"
    assert hd["ratelimit-reset"]
    f.reject_address("bcc@EXAMPLE.test")
    st, _, body = jcall(f.endpoint, rs_body(), RS_H)
    assert (st, body) == (422, {"statusCode": 422, "name": "validation_error",
                                "message": "Invalid `to` field. The email address needs to follow the "
                                           "`email@example.com` or `Name <email@example.com>` format: "
                                           "bcc@example.test"})
    assert jcall(f.endpoint, rs_body(bcc=None), RS_H)[0] == 200


# -------------------------------------------------------------------------------------- Mailgun

def multipart(fields, files=(), boundary="----fakeBoundary7MA4YWxkTrZu0gW"):
    out = []
    for name, value in fields:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                   + value.encode() + b"\r\n")
    for name, filename, ctype, content in files:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
                   f'\r\nContent-Type: {ctype}\r\n\r\n'.encode() + content + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


MG_AUTH = {"Authorization": "Basic " + base64.b64encode(b"api:test-key").decode()}
BINARY = bytes(range(256)) + b"\r\n--not-a-boundary\r\n\x00"

MG_FIELDS = [("from", "Sender <from@example.test>"), ("to", "to@example.test"),
             ("to", "Jane <jane@example.test>, bob@example.test"), ("cc", "cc@example.test"),
             ("subject", "Héllo"), ("text", "line 1\r\nline 2"), ("html", "<p>hi</p>"),
             ("o:tag", "welcome"), ("o:tag", "t2"), ("o:testmode", "yes"),
             ("o:deliverytime", "Thu, 13 Oct 2011 18:02:00 +0000"), ("h:X-Custom", "yes"),
             ("v:my-var", '{"id": 42}')]
MG_FILES = [("attachment", "a.bin", "application/octet-stream", BINARY),
            ("attachment", "b.txt", "text/plain", b"second"),
            ("inline", "logo.png", "image/png", b"\x89PNG")]


def mg_send(f, fields=MG_FIELDS, files=MG_FILES, headers=MG_AUTH, url=None):
    body, ctype = multipart(fields, files)
    st, hd, raw = call(url or f.endpoint, body, dict(headers, **{"Content-Type": ctype}))
    try:
        return st, hd, json.loads(raw)
    except ValueError:
        return st, hd, raw


def test_mailgun_success(start):
    f = start("mailgun")
    st, _, body = mg_send(f)
    assert st == 200 and body["message"] == "Queued. Thank you."
    assert re.fullmatch(r"<[^@]+@mg\.example\.test>", body["id"])
    [r] = f.wait_for(1)
    assert r["path"] == "/v3/mg.example.test/messages" and r["json"] is None
    assert r["form"]["to"] == ["to@example.test", "Jane <jane@example.test>, bob@example.test"]
    assert r["form"]["subject"] == ["Héllo"] and r["form"]["text"] == ["line 1\r\nline 2"]
    assert r["form"]["o:tag"] == ["welcome", "t2"] and r["form"]["h:X-Custom"] == ["yes"]
    assert [(x["field"], x["filename"], x["content_type"]) for x in r["files"]] == [
        ("attachment", "a.bin", "application/octet-stream"), ("attachment", "b.txt", "text/plain"),
        ("inline", "logo.png", "image/png")]
    assert r["files"][0]["content"] == BINARY


def without(name):
    return [(k, v) for k, v in MG_FIELDS if k != name]


@pytest.mark.parametrize("fields,files,needle", [
    (without("from"), MG_FILES, "'from' parameter is missing"),
    (without("to"), MG_FILES, "'to' parameter is missing"),
    (without("subject"), MG_FILES, "'subject' parameter is missing"),
    ([(k, v) for k, v in MG_FIELDS if k not in ("text", "html")], MG_FILES, "Need at least one of"),
    (MG_FIELDS + [("to", "not an address")], MG_FILES, "to parameter is not a valid address"),
    (MG_FIELDS + [("v:big", "x" * (16 * 1024 + 1))], MG_FILES, "16 KB"),
    (MG_FIELDS + [("h:X-Big", "x" * (16 * 1024 + 1))], MG_FILES, "16 KB"),
    (MG_FIELDS + [("o:tag", "3"), ("o:tag", "4")], MG_FILES, "tags"),
    (MG_FIELDS + [("attachment", "inline text")], MG_FILES, "file part"),
    (MG_FIELDS + [("o:deliverytime", "tomorrow")], MG_FILES, "deliverytime"),
    (MG_FIELDS + [("reply-to", "x@example.test")], MG_FILES, "Unknown parameter"),
])
def test_mailgun_invalid_shapes(start, fields, files, needle):
    f = start("mailgun")
    st, _, body = mg_send(f, fields, files)
    assert st == 400 and needle in body["message"], body
    assert f.accepted == [] and f.requests[0]["form"] is not None


def test_mailgun_auth_domain_content_type(start):
    f = start("mailgun")
    for h in ({}, {"Authorization": "Basic " + base64.b64encode(b"api:wrong").decode()},
              {"Authorization": "Basic " + base64.b64encode(b"user:test-key").decode()},
              {"Authorization": "Bearer test-key"}):
        st, _, body = mg_send(f, headers=h)
        assert (st, body) == (401, b"Forbidden")
    st, _, body = mg_send(f, url=f.url + "/v3/other.example/messages")
    assert (st, body) == (404, {"message": "Domain not found: other.example"})
    form = urllib.parse.urlencode(MG_FIELDS).encode()
    st, _, body = call(f.endpoint, form, dict(MG_AUTH, **{"Content-Type": "application/x-www-form-urlencoded"}))
    assert st == 400 and "multipart/form-data" in json.loads(body)["message"]
    st, _, body = call(f.endpoint, json.dumps(dict(MG_FIELDS)).encode(),
                       dict(MG_AUTH, **{"Content-Type": "application/json"}))
    assert st == 400
    st, _, body = call(f.endpoint, b"--x\r\nContent-Disposition: form-data; name=\"from\"\r\n\r\nabc",
                       dict(MG_AUTH, **{"Content-Type": "multipart/form-data; boundary=x"}))
    assert st == 400 and "Malformed" in json.loads(body)["message"]
    assert f.accepted == [] and len(f.requests) == 8


def test_mailgun_fail_next_and_reject(start):
    f = start("mailgun")
    f.fail_next(429, retry_after="5")
    st, hd, body = mg_send(f)
    assert st == 429 and hd["retry-after"] == "5" and "message" in body
    f.fail_next(500)
    assert mg_send(f)[0] == 500
    f.reject_address("Bob@Example.Test")
    assert mg_send(f)[::2] == (400, {"message": "to parameter is not a valid address. please check "
                                                "documentation: bob@example.test"})
    f.clear_rejections()
    assert mg_send(f)[0] == 200 and len(f.accepted) == 1


# ------------------------------------------------------------------------------------------ SES

def ses_send(f, obj=None, *, raw_body=None, content_type="application/json", access_key=None,
             secret_key=None, region=None, token=None, tamper=None, query=""):
    body = raw_body if raw_body is not None else json.dumps(obj).encode()
    url = f.endpoint + query
    req = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": content_type})
    SigV4Auth(Credentials(access_key or f.access_key, secret_key or f.secret_key, token), "ses",
              region or f.region).add_auth(req)
    headers = dict(req.headers.items())
    if tamper:
        body, headers = tamper(body, headers)
    st, hd, raw = call(url, body, headers)
    return st, hd, (json.loads(raw) if raw else None)


def ses_simple(**over):
    b = {"FromEmailAddress": "Sender <from@example.test>",
         "Destination": {"ToAddresses": ["to@example.test"], "CcAddresses": ["cc@example.test"],
                         "BccAddresses": ["bcc@example.test"]},
         "ReplyToAddresses": ["reply@example.test"],
         "Content": {"Simple": {"Subject": {"Data": "Hello", "Charset": "UTF-8"},
                                "Body": {"Text": {"Data": "hi"}, "Html": {"Data": "<p>hi</p>"}},
                                "Headers": [{"Name": "X-Custom", "Value": "yes"}]}},
         "EmailTags": [{"Name": "category", "Value": "welcome"}], "ConfigurationSetName": "default"}
    b.update(over)
    return b


def mime_bytes():
    m = email.message.EmailMessage()
    m["From"] = "Sender <from@example.test>"
    m["To"] = "to@example.test, Jane <jane@example.test>"
    m["Subject"] = "Raw hello"
    m.set_content("hi")
    m.add_attachment(BINARY, maintype="application", subtype="octet-stream", filename="a.bin")
    return bytes(m)


def test_ses_simple_and_raw(start):
    f = start("ses")
    st, hd, body = ses_send(f, ses_simple())
    assert st == 200 and set(body) == {"MessageId"} and body["MessageId"]
    r = f.wait_for(1)[0]
    assert r["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert r["json"]["Destination"]["ToAddresses"] == ["to@example.test"] and r["mime"] is None
    raw = {"Content": {"Raw": {"Data": base64.b64encode(mime_bytes()).decode()}}}
    st, _, body = ses_send(f, raw)
    assert st == 200
    r = f.wait_for(2)[1]
    assert isinstance(r["mime"], email.message.EmailMessage) and r["mime"]["Subject"] == "Raw hello"
    [att] = list(r["mime"].iter_attachments())
    assert att.get_content() == BINARY
    # recipients of a Raw message without Destination come from its headers
    f.reject_address("jane@example.test")
    st, hd, body = ses_send(f, raw)
    assert st == 400 and hd["x-amzn-errortype"] == "MessageRejected"
    assert body == {"message": "Email address is not verified. The following identities failed the check "
                               "in region EU-WEST-1: jane@example.test"}


def test_ses_signature_enforced(start):
    f = start("ses")
    mismatch = {"message": "The request signature we calculated does not match the signature you provided."}

    def flip_body(body, headers):
        return body.replace(b"Hello", b"Jello"), headers

    def flip_sig(body, headers):
        a = headers["Authorization"]
        return body, dict(headers, Authorization=a[:-1] + ("0" if a[-1] != "0" else "1"))

    def drop_auth(body, headers):
        headers = dict(headers)
        del headers["Authorization"]
        return body, headers

    def change_date(body, headers):
        d = headers["X-Amz-Date"]
        return body, dict(headers, **{"X-Amz-Date": d[:-3] + ("00Z" if d[-3:] != "00Z" else "01Z")})

    for tamper in (flip_body, flip_sig, change_date):
        st, hd, body = ses_send(f, ses_simple(), tamper=tamper)
        assert (st, hd["x-amzn-errortype"], body) == (403, "InvalidSignatureException", mismatch)
    st, hd, body = ses_send(f, ses_simple(), secret_key="wrong-secret")
    assert (st, hd["x-amzn-errortype"], body) == (403, "InvalidSignatureException", mismatch)
    st, hd, _ = ses_send(f, ses_simple(), region="us-east-1")
    assert st == 403 and hd["x-amzn-errortype"] == "InvalidSignatureException"
    st, hd, _ = ses_send(f, ses_simple(), access_key="AKIDOTHER")
    assert st == 403 and hd["x-amzn-errortype"] == "UnrecognizedClientException"
    st, hd, _ = ses_send(f, ses_simple(), token="session")
    assert st == 403 and hd["x-amzn-errortype"] == "UnrecognizedClientException"
    st, hd, _ = ses_send(f, ses_simple(), tamper=drop_auth)
    assert st == 403 and hd["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    assert f.accepted == [] and [r["status"] for r in f.requests] == [403] * 8


def test_ses_signed_query_string(start):
    f = start("ses")
    st, _, _ = ses_send(f, ses_simple(), query="?z=1&a=x%20y&a=b")
    assert st == 200
    assert "\na=b&a=x%20y&z=1\n" in f.requests[-1]["sigv4"]["canonical_request"]
    assert f.requests[-1]["query"] == {"z": ["1"], "a": ["x y", "b"]}


def test_ses_session_token(start):
    f = start("ses", session_token="tok")
    assert ses_send(f, ses_simple(), token="tok")[0] == 200
    assert ses_send(f, ses_simple())[0] == 403


@pytest.mark.parametrize("obj", [
    ses_simple(Content={"Simple": ses_simple()["Content"]["Simple"], "Raw": {"Data": "eA=="}}),
    ses_simple(Content={}),
    ses_simple(Destination={"ToAddresses": [f"r{i}@example.test" for i in range(49)],
                            "CcAddresses": ["cc@example.test", "cc2@example.test"]}),
    ses_simple(Destination={"ToAddresses": "to@example.test"}),
    ses_simple(Destination={"ToAddresses": []}),
    ses_simple(FromEmailAddress="nobody"),
    {k: v for k, v in ses_simple().items() if k != "FromEmailAddress"},
    ses_simple(EmailTags=[{"Name": "bad tag", "Value": "x"}]),
    ses_simple(Content={"Raw": {"Data": "!!not base64!!"}}),
    ses_simple(Content={"Simple": {"Subject": {"Data": "x"}, "Body": {}}}),
    ses_simple(Content={"Simple": dict(ses_simple()["Content"]["Simple"],
                                       Headers=[{"Name": f"X-{i}", "Value": "v"} for i in range(16)])}),
    ses_simple(Destinations={"ToAddresses": ["to@example.test"]}),
])
def test_ses_invalid_shapes(start, obj):
    f = start("ses")
    st, hd, body = ses_send(f, obj)
    assert st == 400 and hd["x-amzn-errortype"] == "BadRequestException" and body["message"], body
    assert f.accepted == []


def test_ses_wrong_content_type_and_errors(start):
    f = start("ses")
    st, hd, _ = ses_send(f, ses_simple(), content_type="application/x-www-form-urlencoded")
    assert st == 400 and hd["x-amzn-errortype"] == "BadRequestException"
    f.fail_next(429, retry_after="4")
    st, hd, body = ses_send(f, ses_simple())
    assert (st, hd["x-amzn-errortype"], hd["retry-after"], body) == (
        429, "TooManyRequestsException", "4", {"message": "Maximum sending rate exceeded."})
    f.fail_next(500)
    st, hd, _ = ses_send(f, ses_simple())
    assert st == 500 and hd["x-amzn-errortype"] == "InternalServiceErrorException"
    f.reject_address("CC@example.test")
    st, hd, body = ses_send(f, ses_simple())
    assert st == 400 and hd["x-amzn-errortype"] == "MessageRejected" and body["message"].endswith("cc@example.test")
    assert f.accepted == []


# ------------------------------------------------------------------- pg_email_id (custom data)

def _send_with_id(f, provider, pg_email_id):
    """A valid request of `provider` carrying pg_email_id (a str; None: the key is left out) beside
    other custom data, the way pg_email sends it."""
    with_id = {} if pg_email_id is None else {"pg_email_id": pg_email_id}
    if provider == "sendgrid":
        return jcall(f.endpoint, sg_body(custom_args=dict({"message_id": "42"}, **with_id)), SG_AUTH)[0]
    if provider == "postmark":
        return jcall(f.endpoint, pm_body(Metadata=dict({"message_id": "42"}, **with_id)), PM_H)[0]
    if provider == "resend":
        tags = [{"name": "category", "value": "welcome"}] + [{"name": k, "value": v} for k, v in with_id.items()]
        return jcall(f.endpoint, rs_body(tags=tags), RS_H)[0]
    if provider == "mailgun":
        return mg_send(f, MG_FIELDS + [(f"v:{k}", v) for k, v in with_id.items()])[0]
    tags = [{"Name": "category", "Value": "welcome"}] + [{"Name": k, "Value": v} for k, v in with_id.items()]
    return ses_send(f, ses_simple(EmailTags=tags))[0]


@pytest.mark.parametrize("provider", ["sendgrid", "postmark", "resend", "mailgun", "ses"])
def test_pg_email_id_is_accepted_and_recorded(start, provider):
    f = start(provider)
    ok = 202 if provider == "sendgrid" else 200
    assert _send_with_id(f, provider, "1001") == ok
    assert _send_with_id(f, provider, None) == ok
    assert [r["pg_email_id"] for r in f.wait_for(2)] == [1001, None]


def test_sendgrid_personalization_custom_args_override_the_messages(start):
    f = start("sendgrid")
    b = sg_body(custom_args={"pg_email_id": "1"})
    b["personalizations"][0]["custom_args"] = {"pg_email_id": "2"}
    assert jcall(f.endpoint, b, SG_AUTH)[0] == 202
    assert f.wait_for(1)[0]["pg_email_id"] == 2


# -------------------------------------------------------------------------------------- generic

def test_set_down_keepalive_and_stop(start):
    f = start("resend")
    conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=5)
    body = json.dumps(rs_body()).encode()
    hdrs = dict(RS_H, **{"Content-Type": "application/json"})
    for _ in range(2):  # kept alive across requests
        conn.request("POST", "/emails", body, hdrs)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    f.set_down(True)
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("POST", "/emails", body, hdrs)
        conn.getresponse()
    conn.close()
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
        call(f.endpoint, body, hdrs)
    assert len(f.requests) == 2 and f.dropped >= 1
    f.set_down(False)
    assert call(f.endpoint, body, hdrs)[0] == 200
    f.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", f.port), timeout=2).close()
    f.stop()  # idempotent
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == f"fake-resend-{f.port}"]


def test_wait_for_concurrency_and_context_manager():
    with Fake("postmark", free_port()) as f:
        assert f.wait_for(0) == []
        with pytest.raises(AssertionError):
            f.wait_for(1, timeout=0.2)
        threads = [threading.Thread(target=jcall, args=(f.endpoint, pm_body(Subject=str(i)), PM_H))
                   for i in range(20)]
        for t in threads:
            t.start()
        got = f.wait_for(20)
        for t in threads:
            t.join()
        assert sorted(int(r["json"]["Subject"]) for r in got) == list(range(20))
        assert len(f.requests) == 20 and len({r["message_id"] for r in got}) == 20
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", f.port), timeout=2).close()


def test_unknown_provider_rejected():
    with pytest.raises(ValueError):
        Fake("mandrill", 27999)
