"""Self-test of servers.py (no PostgreSQL needed). Run with Debian's python, from the repository root:
    /usr/bin/python3 -m pytest -p no:cacheprovider -q tests/e2e/test_servers_selftest.py
Ports 26000-26999 only."""
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest

import live
import servers
from servers import AioSmtp, Blackhole, Postfix, SmtpSink, make_ca

BASE = f"/var/tmp/pg_email-servers-selftest-{os.getpid()}"

REJECT = {
    "busy@example.test": "450 4.2.0 Mailbox busy, try later",
    "nouser@example.test": "550 5.1.1 No such user",
}


@pytest.fixture(scope="module", autouse=True)
def base_dir():
    os.makedirs(BASE, exist_ok=True)
    os.chmod(BASE, 0o755)
    yield BASE
    # Whatever happened, nothing may be left running.
    live.stop_all()
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _mentions(p, BASE)]
    shutil.rmtree(BASE, ignore_errors=True)
    assert not leftovers, f"processes left behind: {leftovers}"


def _mentions(pid, text):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
    return not zombie and (text.encode() in env or text.encode() in cmd)


@pytest.fixture(scope="module")
def certs():
    return make_ca(os.path.join(BASE, "certs"))


def client_ctx(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def msg(subject="hello", mid=None, to="someone@example.test"):
    mid = mid or f"<{uuid.uuid4()}@selftest.example.test>"
    return (
        f"From: sender@example.org\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
        f"\r\nbody of {subject}\r\n.leading dot\r\n"
    ).encode()


def port_closed(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


# --- Postfix ----------------------------------------------------------------------------------


def test_postfix_delivers_and_rejects():
    with Postfix(os.path.join(BASE, "pf1"), 26101, reject=REJECT) as pf:
        with smtplib.SMTP("127.0.0.1", 26101, timeout=10) as s:
            refused = s.sendmail("sender@example.org", ["a@example.test", "b@x.test"], msg("one"))
            assert refused == {}
            s.sendmail("sender@example.org", ["c@example.test"], msg("two"))
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                s.sendmail("sender@example.org", ["busy@example.test"], msg("busy"))
            code, text = e.value.recipients["busy@example.test"]
            assert code == 450 and b"4.2.0" in text and b"Mailbox busy, try later" in text
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                s.sendmail("sender@example.org", ["nouser@example.test"], msg("nouser"))
            code, text = e.value.recipients["nouser@example.test"]
            assert code == 550 and b"5.1.1" in text and b"No such user" in text
            # Mixed: the good recipient still gets it.
            refused = s.sendmail("sender@example.org", ["d@example.test", "nouser@example.test"], msg("mixed"))
            assert refused["nouser@example.test"][0] == 550
            # Other domains are not relayed (nothing gets stuck in the queue).
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                s.sendmail("sender@example.org", ["z@elsewhere.invalid"], msg("relay"))
            assert e.value.recipients["z@elsewhere.invalid"][0] == 554
        got = pf.wait_for(4)
        time.sleep(0.3)
        got = pf.messages()
        assert len(got) == 4
        delivered = sorted(m["Delivered-To"] for m in got)
        assert delivered == ["a@example.test", "b@x.test", "c@example.test", "d@example.test"]
        assert {m["Subject"] for m in got} == {"one", "two", "mixed"}
        one = next(m for m in got if m["Subject"] == "one")
        assert one["Return-Path"] == "<sender@example.org>"
        assert ".leading dot" in one.get_content()
        assert "postfix-e2e-26101" in pf.log()
        pf.clear()
        assert pf.messages() == []
    assert port_closed(26101)
    assert servers._procs_with_env("MAIL_CONFIG", pf.config_dir) == []


def test_postfix_set_reject():
    with Postfix(os.path.join(BASE, "pf2"), 26102, reject=REJECT) as pf:
        pf.set_reject({"busy@example.test": "451 4.3.0 Try again", "new@x.test": "554 5.7.1 Go away"})
        with smtplib.SMTP("127.0.0.1", 26102, timeout=10) as s:
            s.ehlo()
            s.mail("sender@example.org")
            assert s.rcpt("busy@example.test")[0] == 451
            assert s.rcpt("new@x.test")[0] == 554
            assert s.rcpt("nouser@example.test")[0] == 250
            s.rset()
        pf.set_reject({})
        with smtplib.SMTP("127.0.0.1", 26102, timeout=10) as s:
            assert s.sendmail("sender@example.org", ["busy@example.test", "new@x.test"], msg("ok")) == {}
        assert len(pf.wait_for(2)) == 2


def test_postfix_two_instances_at_once():
    a = Postfix(os.path.join(BASE, "pfa"), 26103)
    b = Postfix(os.path.join(BASE, "pfb"), 26104, reject={"x@x.test": "550 5.1.1 nope"})
    try:
        a.start()
        b.start()
        for port, subject in ((26103, "for-a"), (26104, "for-b")):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("sender@example.org", ["x@x.test" if port == 26103 else "y@x.test"], msg(subject))
        assert [m["Subject"] for m in a.wait_for(1)] == ["for-a"]
        assert [m["Subject"] for m in b.wait_for(1)] == ["for-b"]
        b.stop()
        assert port_closed(26104)
        # a is unaffected by b's stop
        with smtplib.SMTP("127.0.0.1", 26103, timeout=10) as s:
            s.sendmail("sender@example.org", ["z@example.test"], msg("again"))
        assert len(a.wait_for(2)) == 2
    finally:
        a.stop()
        b.stop()
    assert port_closed(26103)
    assert servers._procs_with_env("MAIL_CONFIG", a.config_dir) == []
    assert servers._procs_with_env("MAIL_CONFIG", b.config_dir) == []


def test_postfix_restart_starts_empty():
    pf = Postfix(os.path.join(BASE, "pf3"), 26105)
    with pf:
        with smtplib.SMTP("127.0.0.1", 26105, timeout=10) as s:
            s.sendmail("sender@example.org", ["a@example.test"], msg("first"))
        pf.wait_for(1)
    with pf:
        assert pf.messages() == []
        with smtplib.SMTP("127.0.0.1", 26105, timeout=10) as s:
            s.sendmail("sender@example.org", ["a@example.test"], msg("second"))
        assert [m["Subject"] for m in pf.wait_for(1)] == ["second"]


def test_postfix_wait_for_times_out():
    with Postfix(os.path.join(BASE, "pf4"), 26106) as pf:
        with pytest.raises(AssertionError):
            pf.wait_for(1, timeout=0.5)


# --- aiosmtpd ---------------------------------------------------------------------------------


def test_aiosmtp_plain_with_auth():
    with AioSmtp(26201, auth=("alice", "s3cret")) as srv:
        with smtplib.SMTP("127.0.0.1", 26201, timeout=10) as s:
            s.ehlo()
            assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("sender@example.org", ["a@example.test"], msg("unauthenticated"))
            assert e.value.smtp_code == 530
        for mech in ("PLAIN", "LOGIN"):
            with smtplib.SMTP("127.0.0.1", 26201, timeout=10) as s:
                s.ehlo()
                with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                    s.login("alice", "wrong", initial_response_ok=True) if mech == "PLAIN" else \
                        s.auth("LOGIN", lambda challenge=None, _n=[0]: _login_answers("alice", "wrong", _n))
                assert e.value.smtp_code == 535
                assert b"5.7.8 Authentication credentials invalid" in e.value.smtp_error
        with smtplib.SMTP("127.0.0.1", 26201, timeout=10) as s:
            s.login("alice", "s3cret")
            s.sendmail("sender@example.org", ["a@example.test", "b@x.test"], msg("plain-auth"))
        with smtplib.SMTP("127.0.0.1", 26201, timeout=10) as s:
            s.ehlo()
            n = [0]
            code, _ = s.auth("LOGIN", lambda challenge=None: _login_answers("alice", "s3cret", n))
            assert code == 235
            s.sendmail("sender@example.org", ["c@example.test"], msg("login-auth"))
        got = srv.wait_for(2)
        assert got[0]["mail_from"] == "sender@example.org"
        assert got[0]["rcpt_tos"] == ["a@example.test", "b@x.test"]
        assert got[0]["auth_user"] == "alice" and got[1]["auth_user"] == "alice"
        assert got[0]["tls"] is False
        assert isinstance(got[0]["data"], bytes) and b"Subject: plain-auth\r\n" in got[0]["data"]
        assert b"\r\n.leading dot\r\n" in got[0]["data"]


def _login_answers(user, password, n):
    n[0] += 1
    return user if n[0] == 1 else password


def test_aiosmtp_plain_no_auth_and_reject():
    with AioSmtp(26202, reject=REJECT) as srv:
        with smtplib.SMTP("127.0.0.1", 26202, timeout=10) as s:
            s.ehlo()
            assert "auth" not in s.esmtp_features
            assert "starttls" not in s.esmtp_features
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                s.sendmail("sender@example.org", ["busy@example.test"], msg("busy"))
            assert e.value.recipients["busy@example.test"] == (450, b"4.2.0 Mailbox busy, try later")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                s.sendmail("sender@example.org", ["NoUser@example.test"], msg("nouser"))
            assert e.value.recipients["NoUser@example.test"] == (550, b"5.1.1 No such user")
            refused = s.sendmail("sender@example.org", ["ok@example.test", "nouser@example.test"], msg("mixed"))
            assert refused == {"nouser@example.test": (550, b"5.1.1 No such user")}
            # Connection reuse beyond aiosmtpd's default per-session command limit (20).
            for i in range(25):
                s.sendmail("sender@example.org", ["ok@example.test"], msg(f"reuse-{i}"))
        got = srv.wait_for(26)
        assert got[0]["rcpt_tos"] == ["ok@example.test"] and got[0]["auth_user"] is None
        srv.clear()
        assert srv.messages == []
        with pytest.raises(AssertionError):
            srv.wait_for(1, timeout=0.3)


def test_aiosmtp_starttls(certs):
    with AioSmtp(26203, tls="starttls", auth=("bob", "pw"), cert=(certs["cert"], certs["key"])) as srv:
        with smtplib.SMTP("localhost", 26203, timeout=10) as s:
            s.ehlo()
            assert "starttls" in s.esmtp_features
            assert "auth" not in s.esmtp_features  # only after STARTTLS
            s.starttls(context=client_ctx(certs["ca"]))
            s.ehlo()
            assert "starttls" not in s.esmtp_features
            assert "PLAIN" in s.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login("bob", "nope")
            assert e.value.smtp_code == 535
            s.login("bob", "pw")
            s.sendmail("sender@example.org", ["a@example.test"], msg("starttls"))
        # 127.0.0.1 is in the certificate too.
        with smtplib.SMTP("127.0.0.1", 26203, timeout=10) as s:
            s.starttls(context=client_ctx(certs["ca"]))
            s.login("bob", "pw")
            s.sendmail("sender@example.org", ["b@example.test"], msg("starttls-ip"))
        # A client trusting only the other CA refuses the certificate.
        with smtplib.SMTP("localhost", 26203, timeout=10) as s:
            with pytest.raises(ssl.SSLCertVerificationError):
                s.starttls(context=client_ctx(certs["other_ca"]))
        got = srv.wait_for(2)
        assert [m["tls"] for m in got] == [True, True]
        assert [m["auth_user"] for m in got] == ["bob", "bob"]
        assert len(srv.messages) == 2


def test_aiosmtp_implicit_tls(certs):
    with AioSmtp(26204, tls="implicit", auth=("carol", "pw"), cert=(certs["cert"], certs["key"])) as srv:
        with smtplib.SMTP_SSL("localhost", 26204, timeout=10, context=client_ctx(certs["ca"])) as s:
            s.ehlo()
            assert "starttls" not in s.esmtp_features
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login("carol", "bad")
            assert e.value.smtp_code == 535
            s.login("carol", "pw")
            s.sendmail("sender@example.org", ["a@example.test"], msg("implicit"))
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL("localhost", 26204, timeout=10, context=client_ctx(certs["other_ca"]))
        # A plain-text client gets no greeting it could understand.
        with socket.create_connection(("127.0.0.1", 26204), timeout=2) as raw:
            raw.sendall(b"EHLO x\r\n")
            try:
                data = raw.recv(100)
            except (socket.timeout, ConnectionResetError):
                data = b""
            assert not data.startswith(b"220")
        got = srv.wait_for(1)
        assert got[0]["tls"] is True and got[0]["auth_user"] == "carol"


def test_aiosmtp_implicit_tls_without_auth(certs):
    with AioSmtp(26205, tls="implicit", cert=(certs["other_cert"], certs["other_key"])) as srv:
        with smtplib.SMTP_SSL("localhost", 26205, timeout=10, context=client_ctx(certs["other_ca"])) as s:
            s.ehlo()
            assert "auth" not in s.esmtp_features
            s.sendmail("sender@example.org", ["a@example.test"], msg("implicit-noauth"))
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL("localhost", 26205, timeout=10, context=client_ctx(certs["ca"]))
        assert srv.wait_for(1)[0]["auth_user"] is None


def test_aiosmtp_restart_same_port():
    srv = AioSmtp(26206)
    for _ in range(2):
        with srv:
            with smtplib.SMTP("127.0.0.1", 26206, timeout=10) as s:
                s.sendmail("sender@example.org", ["a@example.test"], msg("x"))
        assert port_closed(26206)
    assert len(srv.messages) == 2


# --- certificates -----------------------------------------------------------------------------


def test_make_ca_files(certs):
    for k in ("ca", "cert", "key", "other_ca", "other_cert", "other_key"):
        assert os.path.isfile(certs[k])
        assert os.stat(certs[k]).st_mode & 0o777 == 0o644
    assert os.stat(os.path.dirname(certs["ca"])).st_mode & 0o777 == 0o755

    def openssl(*args):
        return subprocess.run(["openssl", *args], capture_output=True, text=True)

    assert openssl("verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", certs["ca"], certs["cert"]).returncode == 0
    assert openssl("verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", certs["other_ca"], certs["other_cert"]).returncode == 0
    assert openssl("verify", "-CAfile", certs["ca"], certs["other_cert"]).returncode != 0
    assert openssl("verify", "-CAfile", certs["other_ca"], certs["cert"]).returncode != 0
    leaf = openssl("x509", "-in", certs["cert"], "-noout", "-text").stdout
    assert "Version: 3" in leaf
    assert "DNS:localhost" in leaf and "IP Address:127.0.0.1" in leaf
    assert "CA:FALSE" in leaf and "TLS Web Server Authentication" in leaf
    assert "Digital Signature, Key Encipherment" in leaf
    assert "sha256WithRSAEncryption" in leaf
    ca = openssl("x509", "-in", certs["ca"], "-noout", "-text").stdout
    assert "Version: 3" in ca and "CA:TRUE" in ca and "Certificate Sign" in ca
    assert openssl("x509", "-in", certs["cert"], "-noout", "-checkend", str(29 * 86400)).returncode == 0
    assert openssl("x509", "-in", certs["cert"], "-noout", "-checkend", str(31 * 86400)).returncode != 0
    # The postgres server process must be able to read the CA file.
    r = subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", f"cat {certs['ca']} > /dev/null"], capture_output=True)
    assert r.returncode == 0, f"postgres cannot read {certs['ca']}: {r.stderr!r}"


# --- Blackhole --------------------------------------------------------------------------------


def test_blackhole():
    with Blackhole(26301) as bh:
        c = socket.create_connection(("127.0.0.1", 26301), timeout=2)
        try:
            c.settimeout(0.5)
            with pytest.raises(socket.timeout):
                c.recv(1)
            c.sendall(b"EHLO x\r\n")
            with pytest.raises(socket.timeout):
                c.recv(1)
        finally:
            c.close()
        with pytest.raises((socket.timeout, smtplib.SMTPServerDisconnected)):
            smtplib.SMTP("127.0.0.1", 26301, timeout=0.5)
        assert bh.connections >= 2
    assert port_closed(26301)


def test_blackhole_stop_closes_connections():
    bh = Blackhole(26302).start()
    c = socket.create_connection(("127.0.0.1", 26302), timeout=2)
    try:
        time.sleep(0.2)
        bh.stop()
        c.settimeout(2)
        assert c.recv(1) == b""  # EOF once stopped
    finally:
        c.close()
        bh.stop()


# --- smtp-sink --------------------------------------------------------------------------------


def test_smtp_sink_records_message_ids():
    with SmtpSink(26401, os.path.join(BASE, "sink1")) as sink:
        ids = [f"<sink-{i}-{uuid.uuid4().hex}@selftest.example.test>" for i in range(50)]
        with smtplib.SMTP("127.0.0.1", 26401, timeout=10) as s:
            for i, mid in enumerate(ids):
                s.sendmail("sender@example.org", [f"r{i}@example.test"], msg(f"m{i}", mid=mid))
        got = sink.wait_for(50)
        assert len(got) == 50
        assert sorted(got) == sorted(ids)
        # Duplicates are reported as such.
        with smtplib.SMTP("127.0.0.1", 26401, timeout=10) as s:
            s.sendmail("sender@example.org", ["a@example.test"], msg("dup", mid=ids[0]))
        got = sink.wait_for(51)
        assert got.count(ids[0]) == 2 and len(got) == 51
        # An aborted transaction leaves nothing behind.
        raw = socket.create_connection(("127.0.0.1", 26401), timeout=5)
        f = raw.makefile("rb")
        f.readline()
        for line in (b"EHLO x", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.test>", b"DATA"):
            raw.sendall(line + b"\r\n")
            while True:
                reply = f.readline()
                if reply[3:4] != b"-":
                    break
        raw.sendall(b"Message-ID: <aborted@x>\r\n\r\nhalf a message\r\n")
        f.close()
        raw.close()
        time.sleep(0.5)
        assert len(sink.message_ids()) == 51 and "<aborted@x>" not in sink.message_ids()
    assert port_closed(26401)


def test_smtp_sink_under_load():
    n_threads, per_thread = 60, 20
    with SmtpSink(26402, os.path.join(BASE, "sink2")) as sink:
        errors = []
        sent = []
        lock = threading.Lock()

        def worker(t):
            try:
                for i in range(per_thread):
                    mid = f"<load-{t}-{i}@selftest.example.test>"
                    # A new connection per message: stresses accept/backlog.
                    with smtplib.SMTP("127.0.0.1", 26402, timeout=30) as s:
                        s.sendmail("sender@example.org", ["a@example.test"], msg("load", mid=mid))
                    with lock:
                        sent.append(mid)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        got = sink.wait_for(n_threads * per_thread)
        assert sorted(got) == sorted(sent)


def test_port_in_use_fails_fast():
    with Blackhole(26501):
        for make in (
            lambda: Postfix(os.path.join(BASE, "pf-busy"), 26501),
            lambda: SmtpSink(26501, os.path.join(BASE, "sink-busy")),
            lambda: AioSmtp(26501),
        ):
            server = make()
            t = time.monotonic()
            with pytest.raises(OSError):
                server.start()
            assert time.monotonic() - t < 2
            assert not server.running
