"""Golden SQL tests (tests/pg_regress/): for each sql/NAME.sql, a fresh database on the e2e cluster
gets CREATE EXTENSION pg_email and setup.sql, then psql runs the file with its statements echoed;
the output must equal expected/NAME.out line for line. A failure shows the unified diff and leaves
the output in .e2e/golden/NAME.out. GOLDEN_UPDATE=1 rewrites the expected files instead (review
the diff before committing it). See tests/pg_regress/README.md."""
import difflib
import glob
import os
import re
import subprocess

import pytest

from conftest import E2E_DIR, PGBIN, PORT, ROOT, Db, connect

REGRESS = os.path.join(ROOT, "tests", "pg_regress")
CASES = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(REGRESS, "sql", "*.sql")))
PSQL = [f"{PGBIN}/psql", "-X", "--no-psqlrc", "-q", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
        "-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=default", "-v", "SHOW_CONTEXT=never"]
# The server's messages in English and every client setting fixed, whatever the caller's environment.
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
       "PGCLIENTENCODING": "UTF8", "PGTZ": "UTC", "PGDATESTYLE": "ISO, MDY", "PAGER": "", "PSQL_PAGER": ""}


def psql(db, script, *extra):
    """Runs script (a file) through psql on stdin, as pg_regress does, so errors carry no
    'psql:file:line:' prefix; returns stdout and stderr interleaved."""
    with open(script, "rb") as f:
        r = subprocess.run(PSQL + ["-d", db, *extra], stdin=f, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=ENV, timeout=300)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def test_every_case_has_an_expected_file():
    """Each sql/NAME.sql has its expected/NAME.out, and no expected file is left without a case."""
    outs = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(REGRESS, "expected", "*.out")))
    assert CASES, "no golden cases in tests/pg_regress/sql"
    if os.environ.get("GOLDEN_UPDATE") != "1":
        assert outs == CASES


@pytest.mark.parametrize("name", CASES)
def test_golden(cluster, name):
    """The output of sql/NAME.sql, run in a fresh database with pg_email, equals expected/NAME.out."""
    assert re.fullmatch(r"[a-z0-9_]+", name), f"case names are lower-case words: {name}"
    db = f"golden_{name}"
    admin = Db(connect("postgres"))
    admin.all(f"DROP DATABASE IF EXISTS {db}")
    admin.all(f"CREATE DATABASE {db}")
    try:
        c = connect(db)
        Db(c).all("CREATE EXTENSION pg_email")
        c.close()
        code, out = psql(db, os.path.join(REGRESS, "setup.sql"), "-v", "ON_ERROR_STOP=1")
        assert code == 0, f"setup.sql failed:\n{out}"
        code, out = psql(db, os.path.join(REGRESS, "sql", f"{name}.sql"), "-a")
        assert code == 0, f"psql failed ({code}):\n{out}"
    finally:
        admin.all(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.conn.close()
    expected_path = os.path.join(REGRESS, "expected", f"{name}.out")
    if os.environ.get("GOLDEN_UPDATE") == "1":
        with open(expected_path, "w", encoding="utf-8") as f:
            f.write(out)
        return
    results = os.path.join(E2E_DIR, "golden")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"{name}.out"), "w", encoding="utf-8") as f:
        f.write(out)
    try:
        with open(expected_path, encoding="utf-8") as f:
            expected = f.read()
    except FileNotFoundError:
        pytest.fail(f"no {expected_path}: run with GOLDEN_UPDATE=1 to write it, then review it")
    if out != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), out.splitlines(keepends=True),
                                            f"tests/pg_regress/expected/{name}.out", f".e2e/golden/{name}.out"))
        pytest.fail(f"output of tests/pg_regress/sql/{name}.sql differs from the expected file:\n{diff}", pytrace=False)
