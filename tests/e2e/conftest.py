"""End-to-end fixtures: one throwaway PostgreSQL cluster, started as user postgres with pg_email
preloaded, shared by the whole session. Database `mail` has the worker; database `api` has the
extension but no worker, so rows queued there stay exactly as email.send stored them.

With E2E_CITUS=1 the session's cluster is a Citus cluster instead (scripts/citus-cluster.sh: a
coordinator on E2E_PORT, worker nodes on E2E_PORT + 1 and + 2, no listener), and both databases
are distributed with email.distribute() before the first test. `make test` so runs the tests
marked `on_citus` (the single-node tests of the behaviour a distributed outbox must keep) a second
time, through the coordinator."""
import collections
import contextlib
import os
import signal
import subprocess
import time
import uuid

import psycopg2
import psycopg2.extensions
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E2E_DIR = os.environ.get("E2E_DIR", os.path.join(ROOT, ".e2e"))
PORT = int(os.environ.get("E2E_PORT", "5499"))
# The listener worker (HTTP: webhooks, tracking, unsubscribe) of database `mail`.
LISTEN_PORT = PORT + 11
LISTEN_URL = f"http://127.0.0.1:{LISTEN_PORT}"
INBOUND_PORT = PORT + 12  # the listener's SMTP/LMTP service (bounce, complaint and reply mail)
# The listener's SMTP submission service, on every interface so that a test can connect from an
# address that is not loopback (STARTTLS is then required before AUTH).
SUBMISSION_PORT = PORT + 13
CLUSTER_DIR = os.path.join(E2E_DIR, "pg")
CLUSTER_SH = os.path.join(ROOT, "scripts", "cluster.sh")
CITUS = os.environ.get("E2E_CITUS") == "1"
CITUS_SH = os.path.join(ROOT, "scripts", "citus-cluster.sh")
PGBIN = "/usr/lib/postgresql/15/bin"
# How long a wait may take before a test fails: generous, for a loaded 2-core CI machine.
SLOW = 120.0
CONF = [
    "pg_email.retry_base = '1s'",
    "pg_email.retry_max = '4s'",
    "pg_email.lease = '20s'",
    "pg_email.max_attempts = 50",
    "pg_email.workers = 2",
    "pg_email.poll_interval = '250ms'",
    "pg_email.default_sender = 'pg_email tests <tests@example.org>'",
    "log_min_messages = info",
    f"pg_email.listen_address = '127.0.0.1:{LISTEN_PORT}'",
    f"pg_email.inbound_address = '127.0.0.1:{INBOUND_PORT}'",
    f"pg_email.submission_address = '0.0.0.0:{SUBMISSION_PORT}'",
]


def connect(db="mail", user="postgres", autocommit=True):
    c = psycopg2.connect(host="127.0.0.1", port=PORT, dbname=db, user=user)
    c.autocommit = autocommit
    return c


class Db:
    """A small helper over one autocommit connection."""

    def __init__(self, conn):
        self.conn = conn

    def all(self, q, *args):
        with self.conn.cursor() as cur:
            cur.execute(q, args if args else None)
            return cur.fetchall() if cur.description else []

    def one(self, q, *args):
        rows = self.all(q, *args)
        return rows[0] if rows else None

    def val(self, q, *args):
        row = self.one(q, *args)
        return row[0] if row else None

    def error(self, q, *args):
        """Runs q, which must fail; returns (sqlstate, message)."""
        try:
            self.all(q, *args)
        except psycopg2.Error as e:
            if not self.conn.autocommit:
                self.conn.rollback()
            return e.pgcode, e.pgerror or ""
        raise AssertionError(f"expected an error from: {q} {args}")

    def wait(self, q, *args, timeout=15.0, expect=True):
        """Polls q until its value equals expect; returns the time it took."""
        start = time.monotonic()
        while True:
            v = self.val(q, *args)
            if v == expect:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out waiting for {q} {args}: last value {v!r}")
            time.sleep(0.02)


def worker_pids(db):
    """Pids of the running pg_email workers."""
    return [r[0] for r in db.all("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_email worker'")]


def fresh(db="mail", timeout=SLOW):
    """A new connection, retried while the server restarts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Db(connect(db))
        except psycopg2.OperationalError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not accept connections within {timeout:.0f} s: {e}")
            time.sleep(0.1)


def val_retry(q, *args, db="mail", timeout=SLOW):
    """q's value on a fresh connection, retried while the server restarts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            d = fresh(db, timeout=timeout)
            try:
                return d.val(q, *args)
            finally:
                d.conn.close()
        except psycopg2.Error as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"query kept failing for {timeout:.0f} s: {q}: {e}")
            time.sleep(0.1)


def wait_until(pred, what, timeout=SLOW, every=0.05):
    """Polls pred() until it is true; AssertionError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def send(db, transport=None, **kw):
    """email.send with named arguments from kw (values go as query parameters); returns the id.
    Unless given: recipients 'ok@example.test', a unique subject 't-...', body 'hello', and the
    default transport."""
    args = {"recipients": "ok@example.test", "subject": f"t-{uuid.uuid4().hex[:10]}", "body": "hello", **kw}
    if transport is not None:
        args["transport"] = transport
    cols = ", ".join(f"{k} => %s" for k in args)
    return db.val(f"SELECT email.send({cols})", *args.values())


def status(db, mid):
    """The message's status as text (None when there is no such row)."""
    return db.val("SELECT status::text FROM email.messages WHERE id = %s", mid)


def wait_status(db, mid, expect, timeout=60.0):
    """Waits until the message has status `expect`; returns the time it took."""
    return db.wait("SELECT status::text FROM email.messages WHERE id = %s", mid, expect=expect, timeout=timeout)


def kill_workers():
    """SIGKILLs every pg_email worker. The postmaster treats that as a crash: it ends every
    backend and restarts the server (crash recovery), as after a power cut of the workers."""
    d = fresh()
    pids = worker_pids(d)
    d.conn.close()
    assert pids, "no pg_email worker to kill"
    for p in pids:
        os.kill(p, signal.SIGKILL)
    return pids


def restart_immediate():
    """Stops the e2e cluster with `pg_ctl -m immediate` (no shutdown checkpoint, backends
    SIGQUIT) and starts it again: a crash of the whole server."""
    subprocess.run(["bash", CLUSTER_SH, "restart", CLUSTER_DIR, "immediate"], check=True)


def wait_for_workers(n=2, timeout=SLOW):
    """Waits until n pg_email workers are running (after a start or a crash)."""
    q = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_email worker'"
    wait_until(lambda: val_retry(q, timeout=timeout) >= n, f"{n} pg_email workers", timeout, every=0.1)


def sink_counts(sink, settle=1.0):
    """How often each Message-ID reached smtp-sink (a Counter), read after `settle` seconds."""
    time.sleep(settle)
    return collections.Counter(sink.message_ids())


def check_crash_copies(db, sink, tag, crashes):
    """The duplicate rule of DESIGN.md principle 2, message by message, for the messages tagged
    `tag`: each reached the sink at least once, and more than once only for a crash during which
    it was in flight (status 'sending').

    Which crashes caught a message in flight is read from committed rows, so it is exact and does
    not race with the kill: a claim commits status 'sending' with attempts + 1, and its outcome
    commits the new status with a receipt carrying that attempt number (queue::complete, one
    transaction). A claim with no receipt was therefore cut short by a crash. A snapshot of the
    'sending' rows taken just before a kill is not exact: rows claimed between the snapshot and
    the kill are missed, and after the restart each worker requeues and resends what its slot
    left claimed (the start-up reap) before a second snapshot could see them.

    Asserts, for every message: copies seen >= 1; copies <= 1 + claims cut short; claims cut
    short <= crashes. And in total: claims cut short <= crashes x workers x max_in_flight, the
    most that can be in flight at the crashes. Returns (copies Counter, {Message-ID: cut short})."""
    rows = db.all("""SELECT m.message_id, m.attempts - (SELECT count(DISTINCT r.attempt) FROM email.receipts r
                                                        WHERE r.message_id = m.id AND r.attempt IS NOT NULL)
                     FROM email.messages m WHERE %s = ANY(m.tags)""", tag)
    assert rows, f"no message tagged {tag}"
    cut_short = dict(rows)
    copies = sink_counts(sink)
    missing = [m for m in cut_short if copies[m] == 0]
    assert not missing, f"{len(missing)} of {len(rows)} messages never reached the sink, e.g. {missing[:5]}"
    over = [(m, copies[m], c) for m, c in cut_short.items() if copies[m] > 1 + c]
    assert not over, ("sent more often than once plus once per crash that caught it in flight "
                      f"(Message-ID, copies, crashes in flight): {over[:10]} ({len(over)} in all)")
    assert max(cut_short.values()) <= crashes, f"a message was in flight at more than {crashes} crashes"
    in_flight = int(db.val("SHOW pg_email.max_in_flight")) * int(db.val("SHOW pg_email.workers"))
    assert sum(cut_short.values()) <= crashes * in_flight, (sum(cut_short.values()), crashes, in_flight)
    return copies, cut_short


def all_despite_deadlocks(db, q, *args, attempts=10):
    """db.all(q, *args), tried again (up to `attempts` times) when PostgreSQL ends it as the victim
    of a deadlock with a worker that is writing back outcomes of the same rows."""
    for attempt in range(attempts):
        try:
            return db.all(q, *args)
        except psycopg2.errors.DeadlockDetected:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def empty(db):
    """Empties db's outbox: queued rows are cancelled, then (waiting up to SLOW until no worker
    holds a row) email.messages is truncated with its receipts, attachments and captures."""
    deadline = time.monotonic() + SLOW
    while True:
        all_despite_deadlocks(db, "UPDATE email.messages SET status = 'cancelled' WHERE status = 'queued'")
        left = db.val("SELECT count(*) FROM email.messages WHERE status IN ('queued', 'sending')")
        if left == 0:
            break
        assert time.monotonic() < deadline, f"{left} messages still queued or sending after {SLOW:.0f} s"
        time.sleep(0.2)
    db.all("TRUNCATE email.messages CASCADE")


@pytest.fixture
def empty_outbox(mail):
    """`mail` with an empty outbox of its own (see `empty`). A fault test so measures its own
    messages on a table without the dead rows and index entries of the tests before it."""
    empty(mail)
    return mail


@contextlib.contextmanager
def postfix_as_default(folder, port, transport):
    """A Postfix (servers.Postfix, in E2E_DIR/folder, on port) that database `mail`'s default
    transport (named `transport`) delivers to while the block runs; the default before it is
    restored afterwards, on a new connection (a test may have broken the module's own)."""
    from servers import Postfix

    pf = Postfix(os.path.join(E2E_DIR, folder), port)
    pf.start()
    try:
        d = fresh()
        try:
            before = d.val("SELECT name FROM email.transports WHERE is_default")
            d.all("SELECT email.add_transport(%s, %s, is_default => true)", transport, f"smtp://127.0.0.1:{port}?tls=none")
        finally:
            d.conn.close()
        yield pf
        d = fresh()
        try:
            d.all("UPDATE email.transports SET is_default = false WHERE name = %s", transport)
            if before:
                d.all("UPDATE email.transports SET is_default = true WHERE name = %s", before)
        finally:
            d.conn.close()
    finally:
        pf.stop()


@contextlib.contextmanager
def sending_keys(roles, keys):
    """New roles `roles` of database `mail` that may send (email.grant_send) and cancel their mail,
    and API keys: `keys` maps a label to (key name, role, rate or None). Yields {label: key}.
    Afterwards the keys, the roles' mail and the roles are gone (on a new connection, as
    postfix_as_default)."""
    names = [name for name, _, _ in keys.values()]
    d = fresh()
    try:
        d.all("DELETE FROM email.api_keys WHERE name = ANY(%s)", names)
        for role in roles:
            d.all(f"DROP ROLE IF EXISTS {role}")
            d.all(f"CREATE ROLE {role}")
            d.all("SELECT email.grant_send(%s)", role)
            d.all(f"GRANT EXECUTE ON FUNCTION email.cancel TO {role}")
        made = {label: d.val("SELECT email.create_api_key(%s, %s, rate => %s)", name, role, rate)
                for label, (name, role, rate) in keys.items()}
    finally:
        d.conn.close()
    yield made
    d = fresh()
    try:
        d.all("DELETE FROM email.api_keys WHERE name = ANY(%s)", names)
        for role in roles:
            d.all(f"DROP OWNED BY {role}")
            all_despite_deadlocks(d, "DELETE FROM email.messages WHERE created_by = %s", role)
            d.all(f"DROP ROLE {role}")
    finally:
        d.conn.close()


def server_log():
    with open(os.path.join(CLUSTER_DIR, "n0" if CITUS else "", "server.log"), errors="replace") as f:
        return f.read()


def pytest_configure(config):
    config.addinivalue_line("markers", "on_citus: also run against a distributed outbox (E2E_CITUS=1)")


@pytest.fixture(scope="session")
def cluster():
    if CITUS:
        yield from citus_cluster()
        return
    subprocess.run(["bash", CLUSTER_SH, "start", CLUSTER_DIR, str(PORT), "mail", *CONF], check=True)
    admin = Db(connect("postgres"))
    admin.all("CREATE DATABASE api")
    for db in ("mail", "api"):
        Db(connect(db)).all("CREATE EXTENSION pg_email")
    yield
    subprocess.run(["bash", CLUSTER_SH, "stop", CLUSTER_DIR], check=False)


def citus_cluster():
    """The E2E_CITUS=1 cluster: coordinator and two worker nodes, `mail` (whose outbox the nodes'
    workers drain) and `api` (no worker) each a Citus database with email.distribute() run."""
    conf = [c for c in CONF if not c.startswith(("pg_email.listen_address", "pg_email.inbound_address",
                                                 "pg_email.submission_address"))]
    # Tracked links need a public URL (the listener's would be it); a session's SET LOCAL reaches
    # the shards' INSERT trigger (README, Citus).
    conf += [f"pg_email.public_url = '{LISTEN_URL}'", "citus.propagate_set_commands = 'local'"]
    subprocess.run(["bash", CITUS_SH, "start", CLUSTER_DIR, str(PORT), "mail", *conf], check=True)
    try:
        nodes = (PORT, PORT + 1, PORT + 2)
        for p, db, q in [(p, db, q) for p in nodes for db, q in (("postgres", "CREATE DATABASE api"),
                                                                 ("api", "CREATE EXTENSION citus"))]:
            c = psycopg2.connect(host="127.0.0.1", port=p, dbname=db, user="postgres")
            c.autocommit = True
            Db(c).all(q)
            c.close()
        api = Db(connect("api"))
        api.all("SELECT citus_set_coordinator_host('127.0.0.1', %s)", PORT)
        for p in nodes[1:]:
            api.all("SELECT citus_add_node('127.0.0.1', %s)", p)
        for db in ("mail", "api"):
            d = Db(connect(db))
            d.all("CREATE EXTENSION pg_email")
            assert d.val("SELECT email.distribute()").startswith("distributed:"), db
            d.conn.close()
        api.conn.close()
        yield
    finally:
        subprocess.run(["bash", CITUS_SH, "stop", CLUSTER_DIR], check=False)


@pytest.fixture
def api(cluster):
    """The worker-less database, with a default capture transport and no leftovers."""
    c = connect("api")
    db = Db(c)
    db.all("TRUNCATE email.messages, email.receipts, email.suppressions, email.templates, email.template_versions, email.transports CASCADE")
    db.all("SELECT email.add_transport('cap', 'capture://', is_default => true)")
    yield db
    c.close()


@pytest.fixture
def mail(cluster):
    """The database the worker serves."""
    c = connect("mail")
    yield Db(c)
    c.close()
