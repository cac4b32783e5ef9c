"""Real SMTP servers for the pg_email end-to-end tests.

Everything here listens on 127.0.0.1 only and is meant to run under Debian's /usr/bin/python3
(which has python3-aiosmtpd), as root.

    Postfix(base_dir, port, reject=None)    a private Postfix instance delivering into a Maildir (or relaying)
    AioSmtp(port, tls=..., auth=..., ...)   an aiosmtpd server in a thread of this process
    make_ca(dir)                            a test CA + server cert, and an unrelated second CA
    Blackhole(port)                         accepts TCP connections and never says a word
    SmtpSink(port, base_dir)                Postfix's smtp-sink, recording every Message-ID

All classes have start()/stop() and are context managers (live.Server). start() returns only
once the port answers; stop() is idempotent and leaves no process or thread behind. As a safety
net every server still running when the interpreter exits is stopped (live.stop_all).
"""
import asyncio
import email
import email.parser
import email.policy
import os
import pwd
import logging
import resource
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time

from live import HOST, Server

__all__ = ["Postfix", "AioSmtp", "make_ca", "Blackhole", "SmtpSink", "HeldReplies"]

POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = "/usr/sbin/smtp-sink"
OPENSSL = "/usr/bin/openssl"


def _wait_for_port(port, timeout, *, banner=True, alive=None, what="server"):
    """Polls until 127.0.0.1:port accepts a connection (and, with banner, sends a 220 greeting,
    to which we politely answer QUIT). alive() -> str|None reports an early death."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(f"{what} on port {port} died during start-up: {dead}")
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as s:
                if not banner:
                    return
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(1024)
                    except OSError:
                        pass
                    return
                last = f"unexpected greeting {data[:200]!r}"
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} on port {port} not ready after {timeout}s: {last}")
        time.sleep(0.05)


def _check_port_free(port):
    """Fails fast (OSError EADDRINUSE) when 127.0.0.1:port is taken, instead of letting the
    server find out slowly (Postfix's fatal errors sleep, aiosmtpd waits for ready_timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise OSError(e.errno, f"127.0.0.1:{port} is not free: {e.strerror}") from None


def _poll(fn, n, timeout, what):
    """Calls fn() until it returns a list of at least n items; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        items = fn()
        if len(items) >= n:
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: expected at least {n} message(s) within {timeout}s, got {len(items)}")
        time.sleep(0.05)


def _run(cmd, *, check=True, timeout=120, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}")
    return p


def _backdate(path, seconds=10):
    """Postfix refuses to trust a configuration or lookup table file modified less than a
    second ago: it re-reads it every 300 ms until it is old enough, which made every start
    take 2 s. Files written by us are complete, so we simply make them look old."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is as good as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _procs_with_env(var, value):
    """PIDs of processes whose environment contains var=value (Postfix daemons inherit
    MAIL_CONFIG from the master, which is how we find every process of one instance)."""
    needle = f"{var}={value}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(d))
    return pids


def _kill_and_wait(pids, timeout=5.0):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p)]
            if not pids:
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------------------------

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{host}:{port} inet n    -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
virtual   unix  -       n       n       -       -       virtual
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
showq     unix  n       -       n       -       -       showq
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# The delivery agents of a relaying instance (Postfix(relay=...)).
_MASTER_CF_DELIVERY = """\
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
"""


class Postfix(Server):
    """A private Postfix instance (config, queue, data, Maildir and log all under base_dir),
    listening on 127.0.0.1:port without TLS. Mail for any recipient in `domains` is accepted
    from 127.0.0.0/8 and delivered by virtual(8) into one shared Maildir, base_dir/Maildir.
    Other domains are refused at RCPT time (554 5.7.1 Relay access denied), so nothing ever
    sits in the queue waiting for DNS. `reject` maps recipient addresses to access(5) answers
    given at RCPT time, e.g. {"busy@example.test": "450 4.2.0 Mailbox busy, try later"}.

    base_dir must be under /var/tmp or the checkout's .e2e/ (not /tmp) and every directory above it
    must be searchable by user postfix. start() wipes the instance's own sub-directories
    (etc, queue, data, Maildir, maillog) so each start begins with an empty queue and Maildir.

    relay = {domain: nexthop} makes a relay of it: mail for those domains is accepted from
    127.0.0.0/8 too (relay_domains) and passed on by transport_maps, e.g. {"nowhere.test":
    "smtp:[127.0.0.1]:2525", "bounces.test": "lmtp:inet:[127.0.0.1]:2424"}; the smtp and lmtp
    delivery agents are then in master.cf. Mail Postfix writes itself (bounces) is routed the same
    way. main_cf = {parameter: value} adds main.cf parameters or replaces the defaults above (two
    instances that talk to each other need different `myhostname`s, or Postfix sees a loop).
    """

    DEFAULT_DOMAINS = ("example.test", "x.test")

    def __init__(self, base_dir, port, reject=None, *, domains=DEFAULT_DOMAINS, relay=None, main_cf=None,
                 start_timeout=60.0):
        self.base_dir = os.path.abspath(base_dir)
        self.port = int(port)
        self.reject = dict(reject or {})
        self.domains = tuple(domains)
        self.relay = dict(relay or {})
        self.main_cf = dict(main_cf or {})
        self.start_timeout = start_timeout
        self.config_dir = os.path.join(self.base_dir, "etc")
        self.queue_dir = os.path.join(self.base_dir, "queue")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.maildir = os.path.join(self.base_dir, "Maildir")
        self.maillog = os.path.join(self.base_dir, "maillog")
        self.reject_map = os.path.join(self.config_dir, "reject_recipients")
        self.transport_map = os.path.join(self.config_dir, "transport")
        self.host = HOST

    def __repr__(self):
        return f"<Postfix {self.host}:{self.port} {self.base_dir}>"

    # -- configuration -----------------------------------------------------------------------

    def _main_cf(self):
        pf = pwd.getpwnam("postfix")
        b = self.base_dir
        params = [
            ("compatibility_level", "3.6"),
            ("config_directory", self.config_dir),
            ("queue_directory", self.queue_dir),
            ("data_directory", self.data_dir),
            ("mail_owner", "postfix"),
            ("setgid_group", "postdrop"),
            ("syslog_name", f"postfix-e2e-{self.port}"),
            ("maillog_file", self.maillog),
            ("maillog_file_prefixes", b),
            ("myhostname", "localhost.test"),
            ("mydomain", "localhost.test"),
            ("myorigin", "localhost.test"),
            ("mydestination", ""),
            ("relay_domains", ""),
            ("relayhost", ""),
            ("inet_interfaces", HOST),
            ("inet_protocols", "ipv4"),
            ("mynetworks", "127.0.0.0/8"),
            ("smtpd_banner", "$myhostname ESMTP Postfix (pg_email e2e)"),
            ("smtpd_tls_security_level", "none"),
            ("smtp_tls_security_level", "none"),
            ("smtpd_sasl_auth_enable", "no"),
            # No DNS, no peer name lookups: the machine has no network.
            ("smtpd_peername_lookup", "no"),
            ("disable_dns_lookups", "yes"),
            ("smtp_dns_support_level", "disabled"),
            ("smtp_host_lookup", "native"),
            # No system files: aliases, local delivery, biff.
            ("alias_maps", ""),
            ("alias_database", ""),
            ("local_recipient_maps", ""),
            ("biff", "no"),
            ("append_dot_mydomain", "no"),
            # Accept anything in our domains, refuse relaying elsewhere, then the reject map.
            ("virtual_mailbox_domains", ", ".join(self.domains)),
            ("virtual_mailbox_base", b),
            ("virtual_mailbox_maps", "static:Maildir/"),
            ("virtual_uid_maps", f"static:{pf.pw_uid}"),
            ("virtual_gid_maps", f"static:{pf.pw_gid}"),
            ("virtual_minimum_uid", "1"),
            ("smtpd_relay_restrictions", "reject_unauth_destination"),
            ("smtpd_recipient_restrictions", f"check_recipient_access texthash:{self.reject_map}, permit"),
            ("smtpd_client_restrictions", ""),
            ("smtpd_helo_restrictions", ""),
            ("smtpd_sender_restrictions", ""),
            ("message_size_limit", "100000000"),
            ("virtual_mailbox_limit", "0"),
            ("mailbox_size_limit", "0"),
            # Fast and forgiving.
            ("in_flow_delay", "0s"),
            ("smtpd_error_sleep_time", "0s"),
            ("smtpd_soft_error_limit", "1000"),
            ("smtpd_hard_error_limit", "1000"),
            ("smtpd_client_connection_count_limit", "0"),
            ("smtpd_client_connection_rate_limit", "0"),
            ("smtpd_client_message_rate_limit", "0"),
            ("smtpd_client_recipient_rate_limit", "0"),
            ("queue_run_delay", "1s"),
            ("minimal_backoff_time", "1s"),
            ("maximal_backoff_time", "2s"),
            ("notify_classes", ""),
        ]
        given = {}
        if self.relay:
            given.update(relay_domains=", ".join(self.relay), transport_maps=f"texthash:{self.transport_map}",
                         lmtp_host_lookup="native")
        given.update(self.main_cf)
        if given:  # replaced in place, the rest appended
            params = [(k, given.pop(k, v)) for k, v in params] + list(given.items())
        return "".join(f"{k} = {v}\n" for k, v in params)

    def _write_transport_map(self):
        with open(self.transport_map, "w") as f:
            for domain, nexthop in self.relay.items():
                if any(c.isspace() for c in domain + nexthop) or not nexthop:
                    raise ValueError(f"bad relay entry {domain!r}: {nexthop!r}")
                f.write(f"{domain.lower()} {nexthop}\n")
        os.chmod(self.transport_map, 0o644)
        _backdate(self.transport_map)

    def _write_reject_map(self):
        tmp = self.reject_map + ".tmp"
        with open(tmp, "w") as f:
            for addr, answer in self.reject.items():
                if any(c.isspace() for c in addr) or not answer.strip():
                    raise ValueError(f"bad reject entry {addr!r}: {answer!r}")
                f.write(f"{addr.lower()} {answer.strip()}\n")
        os.chmod(tmp, 0o644)
        _backdate(tmp)
        os.replace(tmp, self.reject_map)

    def _postfix(self, *args, check=True, timeout=120):
        return _run([POSTFIX, "-c", self.config_dir, *args], check=check, timeout=timeout)

    # -- life cycle --------------------------------------------------------------------------

    def _kill_leftovers(self):
        """Stops whatever still runs with this config dir (e.g. after a crashed test run)."""
        self._stop()

    def _start(self):
        if self.base_dir.startswith("/tmp/") or self.base_dir == "/tmp":
            raise ValueError("Postfix base_dir must not be under /tmp (use /var/tmp or .e2e)")
        sock_path = os.path.join(self.queue_dir, "private", "proxymap")
        if len(sock_path) > 100:
            raise ValueError(f"base_dir too long for UNIX socket paths: {sock_path}")
        pf = pwd.getpwnam("postfix")
        os.makedirs(self.base_dir, mode=0o755, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        self._kill_leftovers()
        _check_port_free(self.port)
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.maildir):
            shutil.rmtree(d, ignore_errors=True)
        if os.path.exists(self.maillog):
            os.unlink(self.maillog)

        os.makedirs(self.config_dir, mode=0o755)
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(self._main_cf())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(_MASTER_CF.format(host=HOST, port=self.port))
            if self.relay:
                f.write(_MASTER_CF_DELIVERY)
        _backdate(os.path.join(self.config_dir, "main.cf"))
        _backdate(os.path.join(self.config_dir, "master.cf"))
        self._write_reject_map()
        if self.relay:
            self._write_transport_map()
        os.makedirs(self.queue_dir, mode=0o755)
        os.makedirs(self.data_dir, mode=0o700)
        os.chown(self.data_dir, pf.pw_uid, pf.pw_gid)
        for sub in ("", "tmp", "new", "cur"):
            p = os.path.join(self.maildir, sub)
            os.makedirs(p, mode=0o700, exist_ok=True)
            os.chown(p, pf.pw_uid, pf.pw_gid)

        # `postfix start` runs post-install create-missing (queue sub-directories with their
        # owners), postsuper, then `master -w`, which returns once the master is initialised.
        p = self._postfix("start", check=False, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"postfix start failed ({p.returncode}):\n{p.stdout}\n{self.log()[-4000:]}")
        _wait_for_port(self.port, self.start_timeout, alive=self._master_dead, what="postfix")

    def _master_pid(self):
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _master_dead(self):
        pid = self._master_pid()
        if pid is None or not _pid_alive(pid):
            return "master is not running; log:\n" + self.log()[-4000:]
        return None

    def _stop(self):
        master = self._master_pid()
        if master is not None and _pid_alive(master):
            # What `postfix -c DIR stop` does (SIGTERM to the master, which takes its process
            # group down with it; SIGKILL to the group if that takes over 5 s), minus the
            # script's one-second polling granularity.
            try:
                os.kill(master, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5
            while _pid_alive(master) and time.monotonic() < deadline:
                time.sleep(0.01)
            if _pid_alive(master):
                try:
                    os.killpg(master, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                _kill_and_wait([master])
        # Anything of this instance still around (e.g. a daemon that left the group).
        _kill_and_wait(_procs_with_env("MAIL_CONFIG", self.config_dir))

    def set_reject(self, reject):
        """Replaces the recipient reject map and reloads Postfix. Returns once a fresh SMTP
        session sees the new answers."""
        old = self.reject
        self.reject = dict(reject or {})
        self._write_reject_map()
        if not self._running:
            return
        old_smtpd = self._daemon_pids("smtpd")
        self._postfix("reload")
        # Right after a reload an old smtpd, idle in accept(), may still take one more
        # connection with the old map. Wait (briefly) for the old ones to exit; one still busy
        # with a session keeps the old map until that session ends.
        deadline = time.monotonic() + 5
        while any(_pid_alive(p) for p in old_smtpd) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Then check that new sessions get the new answers, for changed and dropped entries.
        probe = {}
        for a in set(old) | set(self.reject):
            answer = self.reject.get(a)
            code = answer.split()[0] if answer else "250"
            local, at, domain = a.rpartition("@")
            if local and at and domain.lower() in self.domains and len(code) == 3 and code.isdigit():
                probe[a] = int(code)
        if not probe:
            return
        deadline = time.monotonic() + 15
        while True:
            seen = self._probe_rcpt(list(probe))
            ok = all(seen[a] == probe[a] for a in probe)
            if ok:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"reject map not in effect after reload: {seen}")
            time.sleep(0.1)

    def _daemon_pids(self, name):
        out = []
        for pid in _procs_with_env("MAIL_CONFIG", self.config_dir):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == name:
                        out.append(pid)
            except OSError:
                pass
        return out

    def _probe_rcpt(self, addrs):
        out = {}
        with smtplib.SMTP(HOST, self.port, timeout=10) as s:
            s.ehlo("probe.test")
            for a in addrs:
                s.mail("probe@example.test")
                code, _ = s.rcpt(a)
                out[a] = code
                s.rset()
        return out

    # -- results -----------------------------------------------------------------------------

    def _message_files(self):
        files = []
        for sub in ("new", "cur"):
            d = os.path.join(self.maildir, sub)
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for n in names:
                p = os.path.join(d, n)
                try:
                    files.append((os.stat(p).st_mtime_ns, n, p))
                except FileNotFoundError:
                    pass
        files.sort()
        return [p for _, _, p in files]

    def raw_messages(self):
        """The delivered messages as bytes, oldest first."""
        out = []
        for p in self._message_files():
            try:
                with open(p, "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                pass
        return out

    def messages(self):
        """The delivered messages, oldest first: one per recipient (virtual(8) writes a copy
        per recipient, adding Delivered-To and Return-Path)."""
        return [email.message_from_bytes(b, policy=email.policy.default) for b in self.raw_messages()]

    def wait_for(self, n, timeout=10.0):
        """Polls until at least n messages were delivered; returns messages()."""
        _poll(self._message_files, n, timeout, f"Postfix on port {self.port}")
        return self.messages()

    def clear(self):
        """Deletes every delivered message."""
        for p in self._message_files():
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def log(self):
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------------------------
# aiosmtpd
# --------------------------------------------------------------------------------------------


class _DropLoginDataWarning:
    """aiosmtpd 1.4 logs "Session.login_data is deprecated" on every successful AUTH (its own
    code sets that attribute); keep that noise out of test logs."""

    def filter(self, record):
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_DropLoginDataWarning())


class _AioHandler:
    def __init__(self, owner):
        self.owner = owner

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.owner.auth is None:
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.owner.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        answer = self.owner.reject.get(address.lower())
        if answer:
            return answer
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        gate = self.owner.hold
        if gate is not None:  # answer only once the test opens the gate (or after 60 s)
            with self.owner._lock:
                self.owner.held += 1
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 60)
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        data = envelope.original_content
        if data is None:
            data = envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        msg = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": bytes(data),
            "auth_user": session.auth_data if session.authenticated else None,
            "tls": tls,
            "mail_options": list(envelope.mail_options),
            "smtp_utf8": bool(envelope.smtp_utf8),
        }
        with self.owner._lock:
            self.owner.messages.append(msg)
        return "250 2.0.0 Message accepted for delivery"


class AioSmtp(Server):
    """An aiosmtpd server on 127.0.0.1:port in a background thread of the test process.

    tls: "none" (plain), "starttls" (STARTTLS offered, not required) or "implicit" (TLS from
    the first byte). cert = (certfile, keyfile) is required unless tls == "none".
    auth = (user, password): AUTH PLAIN/LOGIN advertised (only after STARTTLS when
    tls == "starttls"), wrong credentials get "535 5.7.8 Authentication credentials invalid",
    and MAIL before a successful AUTH gets "530 5.7.0 Authentication required". Without auth
    no AUTH is advertised. reject maps recipient addresses to answers given at RCPT time.

    .messages is a list of dicts {"mail_from", "rcpt_tos", "data" (bytes, as received, CRLF),
    "auth_user" (str|None), "tls" (bool), "mail_options", "smtp_utf8"} appended for each
    accepted message.
    """

    def __init__(self, port, *, tls="none", auth=None, cert=None, reject=None, ready_timeout=10.0):
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be none, starttls or implicit, not {tls!r}")
        if tls != "none" and cert is None:
            raise ValueError(f"tls={tls!r} needs cert=(certfile, keyfile)")
        self.port = int(port)
        self.host = HOST
        self.tls = tls
        self.auth = tuple(auth) if auth is not None else None
        self.cert = cert
        self.reject = {k.lower(): v for k, v in (reject or {}).items()}
        self.ready_timeout = ready_timeout
        self.messages = []
        self._lock = threading.Lock()
        self._controller = None
        # None, or a threading.Event: DATA is then answered only once the event is set (or
        # after 60 s); .held counts the messages that waited for it.
        self.hold = None
        self.held = 0

    def __repr__(self):
        return f"<AioSmtp {self.host}:{self.port} tls={self.tls} auth={self.auth is not None}>"

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult
        user, password = self.auth
        login = getattr(auth_data, "login", None)
        pw = getattr(auth_data, "password", None)
        if login is not None and pw is not None:
            login = login.decode("utf-8", "replace") if isinstance(login, bytes) else login
            pw = pw.decode("utf-8", "replace") if isinstance(pw, bytes) else pw
            if secrets.compare_digest(login.encode(), user.encode()) and secrets.compare_digest(pw.encode(), password.encode()):
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    def _ssl_context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert[0], self.cert[1])
        return ctx

    def _start(self):
        from aiosmtpd.controller import Controller

        _check_port_free(self.port)
        kwargs = dict(
            hostname=HOST,
            port=self.port,
            ready_timeout=self.ready_timeout,
            server_hostname="localhost",   # EHLO name; avoids socket.getfqdn() (DNS)
            ident="pg_email e2e aiosmtpd",
            data_size_limit=None,          # no SIZE limit
            command_call_limit=None,       # no per-session command limit (connection reuse)
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=300,
        )
        if self.auth is not None:
            kwargs["authenticator"] = self._authenticator
        if self.tls == "starttls":
            kwargs["tls_context"] = self._ssl_context()
            kwargs["require_starttls"] = False
            kwargs["auth_require_tls"] = True
        elif self.tls == "implicit":
            kwargs["ssl_context"] = self._ssl_context()
            # aiosmtpd only knows about STARTTLS-TLS; the implicit socket is TLS already.
            kwargs["auth_require_tls"] = False
        else:
            kwargs["auth_require_tls"] = False
        self._controller = Controller(_AioHandler(self), **kwargs)
        # Controller.start() binds, then makes its own connection (TLS-wrapped with an
        # unverified client context for implicit TLS) to trigger the lazy SMTP factory.
        self._controller.start()
        self._check_ready()

    def _check_ready(self):
        """Our own readiness check: the greeting must arrive (through TLS if implicit)."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=5) as raw:
                    s = raw
                    if self.tls == "implicit":
                        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                        ctx.check_hostname = False
                        ctx.verify_mode = ssl.CERT_NONE
                        s = ctx.wrap_socket(raw)
                    line = s.recv(1024)
                    if line.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(1024)
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"aiosmtpd on port {self.port} does not greet")
            time.sleep(0.05)

    def _stop(self):
        c, self._controller = self._controller, None
        if c is not None:
            try:
                c.stop()
            except AssertionError:
                pass

    def set_reject(self, reject):
        """Replaces the RCPT reject map; takes effect for the next RCPT command."""
        self.reject = {k.lower(): v for k, v in (reject or {}).items()}

    def wait_for(self, n, timeout=10):
        """Polls until at least n messages were accepted; returns a copy of .messages."""
        return _poll(lambda: list(self.messages), n, timeout, f"AioSmtp on port {self.port}")

    def clear(self):
        with self._lock:
            self.messages.clear()


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------

_OPENSSL_CNF = """\
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ leaf_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def _make_ca_pair(d, prefix, ca_name):
    """Creates prefix-ca.pem/.key (self-signed CA) and prefix-server.pem/.key signed by it."""
    cnf = os.path.join(d, "openssl.cnf")
    ca_key, ca_pem = os.path.join(d, f"{prefix}ca.key"), os.path.join(d, f"{prefix}ca.pem")
    key, csr, pem = (os.path.join(d, f"{prefix}server.{e}") for e in ("key", "csr", "pem"))
    _run([OPENSSL, "req", "-x509", "-config", cnf, "-extensions", "ca_ext", "-newkey", "rsa:2048",
          "-nodes", "-sha256", "-days", "30", "-subj", f"/O=pg_email tests/CN={ca_name}",
          "-set_serial", "0x" + secrets.token_hex(15), "-keyout", ca_key, "-out", ca_pem])
    _run([OPENSSL, "req", "-new", "-config", cnf, "-newkey", "rsa:2048", "-nodes", "-sha256",
          "-subj", "/O=pg_email tests/CN=localhost", "-keyout", key, "-out", csr])
    _run([OPENSSL, "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-sha256",
          "-days", "30", "-set_serial", "0x" + secrets.token_hex(15), "-extfile", cnf,
          "-extensions", "leaf_ext", "-out", pem])
    os.unlink(csr)
    return ca_pem, ca_key, pem, key


def make_ca(dir):
    """Generates (with the openssl CLI) a test CA and a server certificate for localhost /
    127.0.0.1 signed by it, plus an unrelated second CA with its own server certificate for the
    same names. RSA 2048, SHA-256, 30 days, X509v3 (CA: basicConstraints CA:TRUE + keyCertSign;
    leaf: CA:FALSE, digitalSignature+keyEncipherment, serverAuth, SAN DNS:localhost,
    IP:127.0.0.1). Files are chmod 644 and dir 755 so the postgres user can read them (the
    directories above dir must be searchable too). Returns paths:
    {"ca", "cert", "key", "other_ca", "other_cert", "other_key", "ca_key", "other_ca_key"}."""
    d = os.path.abspath(dir)
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    with open(os.path.join(d, "openssl.cnf"), "w") as f:
        f.write(_OPENSSL_CNF)
    ca, ca_key, cert, key = _make_ca_pair(d, "", "pg_email test CA")
    other_ca, other_ca_key, other_cert, other_key = _make_ca_pair(d, "other-", "pg_email unknown CA")
    for name in os.listdir(d):
        os.chmod(os.path.join(d, name), 0o644)
    return {
        "ca": ca,
        "cert": cert,
        "key": key,
        "other_ca": other_ca,
        "other_cert": other_cert,
        "other_key": other_key,
        "ca_key": ca_key,
        "other_ca_key": other_ca_key,
    }


# --------------------------------------------------------------------------------------------
# Blackhole
# --------------------------------------------------------------------------------------------


class _Listener(Server):
    """A TCP listener on 127.0.0.1:port whose accepted connections go to `_accepted` (on the
    listener's thread); `_stop` closes the listener and every connection kept in `_conns`."""

    def __init__(self, port):
        self.port = int(port)
        self.host = HOST
        self._sock = None
        self._conns = []
        self._thread = None
        self._stopping = threading.Event()

    def _accepted(self, c):
        raise NotImplementedError

    def _start(self):
        self._stopping.clear()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.port))
        s.listen(512)
        s.settimeout(0.1)
        self._sock = s
        self._thread = threading.Thread(target=self._loop, name=f"{type(self).__name__}-{self.port}", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stopping.is_set():
            try:
                c, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            self._conns.append(c)
            self._accepted(c)

    def _stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self._conns = []


class Blackhole(_Listener):
    """Accepts TCP connections on 127.0.0.1:port and never sends a byte (nor reads one);
    connections stay open until stop(). .connections counts accepted connections."""

    def __init__(self, port):
        super().__init__(port)
        self.connections = 0

    def _accepted(self, c):
        self.connections += 1


class HeldReplies(_Listener):
    """An SMTP server that offers PIPELINING (RFC 2920) and holds its replies to MAIL and RCPT
    until the client has sent DATA, as a pipelining server may: a client that waits for each
    reply before its next command gets no reply at all. `reject` maps a MAIL FROM or RCPT TO
    address to its reply; with `open_data_anyway` DATA is answered 354 even when no recipient was
    taken (RFC 2920 says a client must be ready for that). `.messages` holds (sender, recipients,
    data) of each message accepted; `.commands` every command line, in order."""

    def __init__(self, port, *, reject=None, open_data_anyway=False):
        super().__init__(port)
        self.reject = dict(reject or {})
        self.open_data_anyway = open_data_anyway
        self.messages = []
        self.commands = []

    def _accepted(self, c):
        threading.Thread(target=self._session, args=(c,), daemon=True).start()

    def _session(self, c):
        def say(*lines):
            c.sendall("".join(line + "\r\n" for line in lines).encode())

        def address(cmd):
            return cmd[cmd.find("<") + 1:cmd.find(">")] if "<" in cmd else ""

        held, sender, rcpts = [], None, []
        with c, c.makefile("rb") as f:
            c.settimeout(30)
            try:
                say("220 held.test ESMTP")
                for raw in f:
                    cmd = raw.decode("utf-8", "replace").rstrip("\r\n")
                    self.commands.append(cmd)
                    verb = cmd.split(" ", 1)[0].split(":", 1)[0].upper()
                    if verb in ("EHLO", "HELO"):
                        say("250-held.test", "250-PIPELINING", "250 8BITMIME")
                    elif verb == "MAIL":
                        sender = None if address(cmd) in self.reject else address(cmd)
                        held.append(self.reject.get(address(cmd), "250 2.1.0 Ok"))
                    elif verb == "RCPT":
                        if sender is None:
                            held.append("503 5.5.1 Error: need MAIL command")
                        elif address(cmd) in self.reject:
                            held.append(self.reject[address(cmd)])
                        else:
                            rcpts.append(address(cmd))
                            held.append("250 2.1.5 Ok")
                    elif verb == "DATA":
                        if not (rcpts or self.open_data_anyway):
                            say(*held, "554 5.5.1 Error: no valid recipients")
                        else:
                            say(*held, "354 End data with <CR><LF>.<CR><LF>")
                            data = b""
                            for line in f:
                                self.commands.append(line.decode("utf-8", "replace").rstrip("\r\n"))
                                if line == b".\r\n":
                                    break
                                data += line
                            if rcpts:
                                self.messages.append((sender, rcpts, data))
                                say(f"250 2.0.0 Ok: queued as H{len(self.messages)}")
                            else:
                                say("554 5.5.1 Error: no valid recipients")
                        held, sender, rcpts = [], None, []
                    elif verb == "RSET":
                        say(*held, "250 2.0.0 Ok")
                        held, sender, rcpts = [], None, []
                    elif verb == "NOOP":
                        say("250 2.0.0 Ok")
                    elif verb == "QUIT":
                        say("221 2.0.0 Bye")
                        return
                    else:
                        say("502 5.5.2 Error: command not recognized")
            except OSError:
                return


# --------------------------------------------------------------------------------------------
# smtp-sink
# --------------------------------------------------------------------------------------------

# Written by smtp-sink (-S) in front of each message in the shared dump file.
_SINK_MARK = "=====pg_email-smtp-sink-message====="


class SmtpSink(Server):
    """Postfix's smtp-sink on 127.0.0.1:port, as fast as it gets, recording every message.

    smtp-sink runs with -D (shared dump file): each transaction is captured to an unlinked
    temporary file and appended to base_dir/sink/dump, in one go, only after the final "." was
    received and before "250" is answered; aborted transactions leave nothing. Each record
    starts with a marker line (-S). message_ids() therefore lists the Message-ID of every
    message accepted so far, duplicates included. Up to `concurrency` sessions are served at
    once (-m); further connections wait in the listen backlog (`backlog`), never refused.
    AUTH is not advertised (-a) unless auth=True (smtp-sink then answers any AUTH with 250).
    """

    def __init__(self, port, base_dir, *, concurrency=500, backlog=4096, auth=False, extra_args=()):
        self.port = int(port)
        self.host = HOST
        self.base_dir = os.path.abspath(base_dir)
        self.sink_dir = os.path.join(self.base_dir, "sink")
        self.dump = os.path.join(self.sink_dir, "dump")
        self.out = os.path.join(self.base_dir, "smtp-sink.out")
        self.pidfile = os.path.join(self.base_dir, "smtp-sink.pid")
        self.concurrency = int(concurrency)
        self.backlog = int(backlog)
        self.auth = auth
        self.extra_args = list(extra_args)
        self._proc = None

    def __repr__(self):
        return f"<SmtpSink {self.host}:{self.port} {self.base_dir}>"

    def _kill_stale(self):
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError):
            return
        if b"smtp-sink" in cmd and f"{HOST}:{self.port}".encode() in cmd:
            _kill_and_wait([pid])

    def _start(self):
        os.makedirs(self.base_dir, mode=0o755, exist_ok=True)
        self._kill_stale()
        _check_port_free(self.port)
        shutil.rmtree(self.sink_dir, ignore_errors=True)
        os.makedirs(self.sink_dir, mode=0o755)
        cmd = [SMTP_SINK, "-4", "-h", "localhost.test", "-m", str(self.concurrency), "-t", "300",
               "-D", self.dump.replace("%", "%%"), "-S", _SINK_MARK + "\\n"]
        if not self.auth:
            cmd.append("-a")
        if os.geteuid() == 0:
            pf = pwd.getpwnam("postfix")
            os.chown(self.sink_dir, pf.pw_uid, pf.pw_gid)
            cmd += ["-u", "postfix"]
        cmd += self.extra_args + [f"{HOST}:{self.port}", str(self.backlog)]

        def raise_fd_limit():
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = max(soft, 4 * self.concurrency + 64)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
            except (ValueError, OSError):
                pass

        out = open(self.out, "wb")
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          preexec_fn=raise_fd_limit, start_new_session=True)
        finally:
            out.close()
        with open(self.pidfile, "w") as f:
            f.write(f"{self._proc.pid}\n")
        _wait_for_port(self.port, 15, alive=self._dead, what="smtp-sink")

    def _dead(self):
        if self._proc is not None and self._proc.poll() is not None:
            return f"exit status {self._proc.returncode}: {self.output()[-2000:]}"
        return None

    def _stop(self):
        p, self._proc = self._proc, None
        if p is not None:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass

    def output(self):
        """smtp-sink's own stdout/stderr (warnings such as 'lost connection')."""
        try:
            with open(self.out, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def raw_messages(self):
        """Every captured message (headers and body as received, LF line ends), preceded by
        smtp-sink's X-Client-Addr/X-Mail-Args/X-Rcpt-Args/Received lines."""
        try:
            with open(self.dump, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        mark = _SINK_MARK.encode() + b"\n"
        chunks = data.split(mark)[1:]
        # A complete record ends with an empty line (from the final "."); the last one may
        # still be being appended.
        if chunks and not chunks[-1].endswith(b"\n\n"):
            chunks.pop()
        return chunks

    def message_ids(self):
        """Message-ID header of every message received so far (with duplicates), in arrival
        order; a message without one contributes None."""
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        ids = []
        for chunk in self.raw_messages():
            mid = parser.parsebytes(chunk).get("Message-ID")
            ids.append(" ".join(str(mid).split()) if mid is not None else None)
        return ids

    def count(self):
        return len(self.raw_messages())

    def wait_for(self, n, timeout=10.0):
        return _poll(self.message_ids, n, timeout, f"smtp-sink on port {self.port}")

    def clear(self):
        """Forgets everything captured so far (smtp-sink re-opens the dump file per message)."""
        try:
            os.unlink(self.dump)
        except FileNotFoundError:
            pass
