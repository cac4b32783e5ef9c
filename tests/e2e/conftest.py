"""End-to-end fixtures: one throwaway PostgreSQL cluster, started as user postgres with pg_email
preloaded, shared by the whole session. Database `mail` has the worker; database `api` has the
extension but no worker, so rows queued there stay exactly as email.send stored them."""
import os
import subprocess
import time

import psycopg2
import psycopg2.extensions
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E2E_DIR = os.environ.get("E2E_DIR", os.path.join(ROOT, ".e2e"))
PORT = int(os.environ.get("E2E_PORT", "5499"))
CLUSTER_DIR = os.path.join(E2E_DIR, "pg")
CONF = [
    "pg_email.retry_base = '1s'",
    "pg_email.retry_max = '4s'",
    "pg_email.lease = '20s'",
    "pg_email.max_attempts = 50",
    "pg_email.workers = 2",
    "pg_email.poll_interval = '250ms'",
    "pg_email.default_sender = 'pg_email tests <tests@example.org>'",
    "log_min_messages = info",
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


def fresh(db="mail"):
    """A new connection, retried while the server restarts."""
    for _ in range(300):
        try:
            return Db(connect(db))
        except psycopg2.OperationalError:
            time.sleep(0.1)
    raise AssertionError("server did not come back")


def server_log():
    with open(os.path.join(CLUSTER_DIR, "server.log"), errors="replace") as f:
        return f.read()


@pytest.fixture(scope="session")
def cluster():
    subprocess.run(["bash", os.path.join(ROOT, "scripts/cluster.sh"), "start", CLUSTER_DIR, str(PORT), "mail", *CONF], check=True)
    admin = Db(connect("postgres"))
    admin.all("CREATE DATABASE api")
    for db in ("mail", "api"):
        Db(connect(db)).all("CREATE EXTENSION pg_email")
    yield
    subprocess.run(["bash", os.path.join(ROOT, "scripts/cluster.sh"), "stop", CLUSTER_DIR], check=False)


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
