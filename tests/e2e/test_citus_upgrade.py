"""Updating pg_email on a Citus cluster (README, "Scaling out with Citus", Upgrades), on a 3-node
cluster of its own: 0.1.0 installed on the coordinator (and so on every node) holding data of
every kind is updated with the README's steps, then distributed, and the mail it held is sent;
then a distributed installation goes through a test-only update that changes the kinds of object
a real upgrade script changes (a column and an index on the sharded outbox, a column on a
co-located table, on a reference table and on a per-node table, a constraint, functions) and back,
and every node, shard and row follows.

Skipped, saying why, when Citus is not installed (as test_citus.py)."""
import os
import shutil
import subprocess

import psycopg2
import pytest

from conftest import E2E_DIR, PGBIN, PORT, ROOT, SLOW, Db, wait_until
from test_citus import pytestmark  # noqa: F401 (the skip when Citus is not installed)
from test_upgrade import CATALOG, OLD, TABLES, fill

CITUS_SH = os.path.join(ROOT, "scripts", "citus-cluster.sh")
BASE = PORT + 45  # coordinator; worker nodes on BASE + 1 and BASE + 2
DIR = os.path.join(E2E_DIR, "citus-upgrade")
TEST_VERSION = "0.2.1-citus-test"
SCRIPTS = [os.path.join(ROOT, "tests", "e2e", "citus_upgrade", f)
           for f in (f"pg_email--0.2.0--{TEST_VERSION}.sql", f"pg_email--{TEST_VERSION}--0.2.0.sql")]
CONF = [
    "pg_email.workers = 1",
    "pg_email.poll_interval = '250ms'",
    "pg_email.default_sender = 'citus upgrade tests <tests@example.org>'",
]
# The README's steps, run on the coordinator.
PAUSE = ["SELECT run_command_on_all_nodes('ALTER SYSTEM SET pg_email.paused = on')",
         "SELECT run_command_on_all_nodes('SELECT pg_reload_conf()')"]
RESUME = ["SELECT run_command_on_all_nodes('ALTER SYSTEM RESET pg_email.paused')",
          "SELECT run_command_on_all_nodes('SELECT pg_reload_conf()')"]
VERSIONS = "SELECT array_agg(result ORDER BY nodeid) FROM run_command_on_all_nodes($$SELECT extversion FROM pg_extension WHERE extname = 'pg_email'$$)"
# One digest of every node's catalog of schema email (test_upgrade.CATALOG), by node.
DIGESTS = "SELECT array_agg(CASE WHEN success THEN result END ORDER BY nodeid) FROM run_command_on_all_nodes(%s)"
DIGEST = f"SELECT md5(string_agg(x, E'\\n' ORDER BY x)) FROM ({CATALOG.replace('ORDER BY 1', '')}) c(x)"


def node(port):
    c = psycopg2.connect(host="127.0.0.1", port=port, dbname="app", user="postgres")
    c.autocommit = True
    return Db(c)


def run(db, statements):
    for q in statements:
        db.all(q)


def placements(db, table, query):
    """{result: number of placements of table} for query run on each placement (%s: the shard)."""
    return dict(db.all("SELECT result, count(*) FROM run_command_on_placements(%s, %s) GROUP BY 1", table, query))


def column_on_every_placement(db, table, column):
    q = ("SELECT count(*) FROM pg_attribute WHERE attrelid = '%s'::regclass AND attname = '" + column
         + "' AND NOT attisdropped")
    return placements(db, table, q)


def pause(db):
    """The README's pause, then a wait until every node's postmaster has read the configuration
    again (a new session's pg_conf_load_time moved): from then on each worker has the signal, and
    takes the setting before it next looks at the extension's version or claims."""
    q = "SELECT array_agg(result ORDER BY nodeid) FROM run_command_on_all_nodes('SELECT pg_conf_load_time()')"
    before = db.val(q)
    run(db, PAUSE)
    wait_until(lambda: all(a != b for a, b in zip(db.val(q), before)), "every node to reload its configuration")


def wait_paused(db):
    q = ("SELECT bool_and(result::int > 0) FROM run_command_on_all_nodes($$SELECT count(*) FROM "
         "pg_stat_activity WHERE backend_type = 'pg_email worker' AND query LIKE '%paused%'$$)")
    wait_until(lambda: db.val(q), "every node's worker paused")


@pytest.fixture(scope="module")
def coord():
    extdir = os.path.join(subprocess.run([os.path.join(PGBIN, "pg_config"), "--sharedir"], capture_output=True,
                                         text=True, check=True).stdout.strip(), "extension")
    installed = [os.path.join(extdir, os.path.basename(s)) for s in SCRIPTS]
    subprocess.run(["bash", CITUS_SH, "start", DIR, str(BASE), "app", *CONF], check=True)
    try:
        for s in SCRIPTS:
            shutil.copy(s, extdir)
        yield node(BASE)
    finally:
        for s in installed:
            if os.path.exists(s):
                os.remove(s)
        subprocess.run(["bash", CITUS_SH, "stop", DIR], check=False)


def test_0_1_0_on_citus_is_updated_with_the_readme_steps_then_distributed(coord):
    coord.all(f"CREATE EXTENSION pg_email VERSION '{OLD}'")
    assert coord.val(VERSIONS) == [OLD] * 3, "Citus creates the extension on every node"
    fill(coord)
    before = {name: coord.val(q) for name, q in TABLES.items()}
    queued = coord.val("SELECT array_agg(id ORDER BY id) FROM email.messages WHERE status = 'queued'")
    assert len(queued) == 5

    pause(coord)
    coord.all("ALTER EXTENSION pg_email UPDATE")
    assert coord.val(VERSIONS) == ["0.2.0"] * 3
    wait_paused(coord)  # until the update the workers wait for it; then they stay paused
    assert {name: coord.val(q) for name, q in TABLES.items()} == before
    digests = coord.val(DIGESTS, DIGEST)
    assert None not in digests and len(set(digests)) == 1, f"the nodes' catalogs differ after the update: {digests}"

    assert coord.val("SELECT email.distribute()") == "distributed: email.messages in 32 shards on 2 worker nodes"
    assert {name: coord.val(q) for name, q in TABLES.items()} == before, "distribute kept every row"
    assert coord.val("SELECT count(*) FROM email.messages WHERE status = 'queued'") == 5, "paused: nothing sent yet"
    run(coord, RESUME)
    q = "SELECT count(*) FROM email.messages WHERE id = ANY(%s) AND status = 'sent'"
    wait_until(lambda: coord.val(q, queued) == len(queued), "the mail queued at 0.1.0 sent after distribute", SLOW)
    assert coord.val("SELECT count(*) FROM email.captured WHERE message_id = ANY(%s)", queued) == len(queued)


def test_a_distributed_installation_is_updated_on_every_node_shard_and_row(coord):
    if coord.val("SELECT extversion FROM pg_extension WHERE extname = 'pg_email'") != "0.2.0":
        pytest.skip("the previous test did not leave a distributed 0.2.0 installation")
    digests = coord.val(DIGESTS, DIGEST)
    assert None not in digests and len(digests) == 3, digests
    rows = {name: coord.val(q) for name, q in TABLES.items()}
    shards = coord.val("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'email.messages'::regclass")

    pause(coord)
    wait_paused(coord)
    coord.all(f"ALTER EXTENSION pg_email UPDATE TO '{TEST_VERSION}'")
    assert coord.val(VERSIONS) == [TEST_VERSION] * 3
    # Each shard of the outbox and of its co-located receipts got the column, with its index.
    assert column_on_every_placement(coord, "email.messages", "upgrade_note") == {"1": shards}
    assert column_on_every_placement(coord, "email.receipts", "upgrade_flag") == {"1": shards}
    assert placements(coord, "email.messages", "SELECT count(*) FROM pg_index WHERE indrelid = '%s'::regclass "
                      "AND strpos(pg_get_indexdef(indexrelid), '(upgrade_note)') > 0") == {"1": shards}
    # The reference table's placement on every node (coordinator included) got its column.
    assert column_on_every_placement(coord, "email.transports", "upgrade_weight") == {"1": 3}
    assert coord.val("SELECT array_agg(upgrade_weight) FROM email.transports") == [1, 1, 1]
    code, _ = coord.error("INSERT INTO email.suppressions (address, reason) VALUES (repeat('x', 1000) || '@x.org', 'bounced')")
    assert code == "23514", "the new constraint holds on the reference table"
    # The per-node table and the functions changed on every node, once.
    per_node = ("SELECT array_agg(result ORDER BY nodeid) FROM run_command_on_all_nodes($$SELECT count(*) FROM "
                "pg_attribute WHERE attrelid = 'email.inbound'::regclass AND attname = 'upgrade_seen'$$)")
    assert coord.val(per_node) == ["1"] * 3
    assert coord.val("SELECT array_agg(result ORDER BY nodeid) FROM run_command_on_all_nodes("
                     "'SELECT email.upgrade_probe() || (strpos(pg_get_functiondef(''email._may_act_on_all''::regproc), "
                     "''AND true'') > 0)')") == ["citus-testtrue"] * 3
    # Every row is still there.
    assert coord.val("SELECT count(*) FROM email.messages WHERE upgrade_note IS NULL") == \
        coord.val("SELECT count(*) FROM email.messages")

    coord.all("ALTER EXTENSION pg_email UPDATE TO '0.2.0'")
    assert coord.val(VERSIONS) == ["0.2.0"] * 3
    assert coord.val(DIGESTS, DIGEST) == digests, "back at 0.2.0, every node's catalog is as it was"
    assert column_on_every_placement(coord, "email.messages", "upgrade_note") == {"0": shards}
    assert {name: coord.val(q) for name, q in TABLES.items()} == rows
    run(coord, RESUME)
    mids = [node(p).val("SELECT email.send(recipients => 'after@x.test', subject => 'after the update', body => 'b')")
            for p in (BASE, BASE + 1, BASE + 2)]
    q = "SELECT count(*) FROM email.messages WHERE id = ANY(%s) AND status = 'sent'"
    wait_until(lambda: coord.val(q, mids) == len(mids), "mail queued on every node after the update sent", SLOW)
