"""The factory records (mpboot.factory.db, docs/FACTORY.md section 3), on SQLite and on a real
PostgreSQL server (tests/pgserver.py; those cases skip only when PostgreSQL is not installed).

What must hold whatever the station code does: one serial never goes to two boards (also with
two stations, i.e. processes, assigning at once), a board keeps its serial, the audit log is
append-only at the SQL level, and the schema migrates forward and refuses to be read by an
older mpboot."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pgserver
import pytest
from click.testing import CliRunner
from mpboot.cli import cli
from mpboot.errors import (
    DatabaseError,
    InputFileError,
    MpbootError,
    SchemaTooNew,
    SchemaTooOld,
    SerialsExhausted,
    UsageError,
)
from mpboot.factory.db import (
    BOARD_COLUMNS,
    POSTGRES_MIGRATIONS,
    SCHEMA_VERSION,
    SQLITE_MIGRATIONS,
    AuditOutcome,
    BoardResult,
    FactoryDB,
    SerialList,
    SerialPrefix,
    is_postgres_url,
    report_rows,
    serial_list_from_file,
    write_csv,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
MPBOOT = str(Path(sys.executable).parent / "mpboot")

# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database: a SQLite file, or on the test server a new schema (the URL makes
    it the only one a connection sees: a new database, 100 times faster to make)."""
    if request.param == "sqlite":
        return str(tmp_path / "factory.sqlite")
    server: pgserver.PgServer = request.getfixturevalue("pg_server")
    return server.create_schema(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture
def db(db_url: str) -> Iterator[FactoryDB]:
    with FactoryDB.open(db_url) as opened:
        yield opened


class Raw:
    """Plain SQL on the database, bypassing FactoryDB (what a careless script could do)."""

    def __init__(self, url: str) -> None:
        self.postgres = is_postgres_url(url)
        self.conn: Any
        if self.postgres:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
            self.error: type[Exception] = psycopg.Error
        else:
            self.conn = sqlite3.connect(url, isolation_level=None)
            self.error = sqlite3.Error

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            cur = self.conn.execute(sql.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description is not None else []
        return list(self.conn.execute(sql, params).fetchall())

    def columns(self, table: str) -> list[str]:
        cur = self.conn.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        return [d[0] for d in cur.description]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def raw(db_url: str) -> Iterator[Raw]:
    r = Raw(db_url)
    yield r
    r.close()


def uid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def start(db: FactoryDB, n: int, station: str = "st1") -> None:
    db.start(uid(n), station=station, operator="alice", port=f"/dev/ttyACM{n}")


# --- schema and migrations ---------------------------------------------------------------------


def test_new_database_has_the_current_schema(db: FactoryDB, raw: Raw) -> None:
    assert db.schema_version() == SCHEMA_VERSION == 2
    assert raw.execute("SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,)]
    assert set(raw.columns("boards")) == set(BOARD_COLUMNS)
    assert raw.columns("audit") == ["id", "at", "station", "operator", "port", "uid", "serial",
                                    "step", "outcome", "detail"]
    applied = raw.execute("SELECT applied_at FROM schema_migrations")
    assert all(datetime.fromisoformat(a).tzinfo is not None for (a,) in applied)


def test_opening_again_applies_nothing(db_url: str, raw: Raw) -> None:
    FactoryDB.open(db_url).close()
    before = raw.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    with FactoryDB.open(db_url) as db:
        assert db.schema_version() == 2
    assert raw.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version") == before


def make_version_1(raw: Raw) -> None:
    """A database as an mpboot with only migration 1 left it, with a board and an audit row."""
    migration_1 = (POSTGRES_MIGRATIONS if raw.postgres else SQLITE_MIGRATIONS)[0]
    raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for statement in migration_1:
        raw.execute(statement)
    raw.execute("INSERT INTO schema_migrations VALUES (1, '2026-01-01T00:00:00.000000Z')")
    raw.execute("INSERT INTO boards (uid, serial, result, station, created_at, updated_at) "
                "VALUES ('0a0b', 'OLD-1', 'provisioned', 'st0', '2026-01-01T00:00:00.000000Z', "
                "'2026-01-01T00:00:01.000000Z')")
    raw.execute("INSERT INTO audit (at, uid, serial, step, outcome) "
                "VALUES ('2026-01-01T00:00:01.000000Z', '0a0b', 'OLD-1', 'done', 'ok')")


def test_a_version_1_database_is_migrated_and_keeps_its_data(db_url: str, raw: Raw) -> None:
    make_version_1(raw)
    with pytest.raises(raw.error):
        raw.execute("SELECT labels FROM boards")

    with FactoryDB.open(db_url) as db:
        assert db.schema_version() == 2
        assert "labels" in raw.columns("boards")
        old = db.board(b"\x0a\x0b")
        assert old is not None
        assert (old.serial, old.result, old.station, old.labels) == ("OLD-1", BoardResult.PROVISIONED,
                                                                     "st0", {})
        assert [(e.step, e.serial) for e in db.audit_log(b"\x0a\x0b")] == [("done", "OLD-1")]
        db.update(b"\x0a\x0b", labels={"hw": "rev2"})
        new = db.board(b"\x0a\x0b")
        assert new == replace(old, labels={"hw": "rev2"}, updated_at=new.updated_at)  # type: ignore[union-attr]
        # The old serial still counts: nobody else gets it.
        start(db, 1)
        assert db.assign_serial(uid(1), SerialList(["OLD-1", "NEW-1"])) == "NEW-1"
    versions = raw.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert versions[0] == (1, "2026-01-01T00:00:00.000000Z") and versions[1][0] == 2


def test_a_database_newer_than_the_code_is_refused(db_url: str, raw: Raw) -> None:
    FactoryDB.open(db_url).close()
    raw.execute("INSERT INTO schema_migrations VALUES (3, '2027-01-01T00:00:00.000000Z')")
    with pytest.raises(SchemaTooNew) as caught:
        FactoryDB.open(db_url)
    message = str(caught.value)
    assert "\n" not in message
    assert "schema version 3" in message and "(2)" in message and "upgrade mpboot" in message
    assert isinstance(caught.value, DatabaseError) and isinstance(caught.value, MpbootError)
    # Nothing was changed by the refused open.
    assert raw.execute("SELECT MAX(version) FROM schema_migrations") == [(3,)]


# --- audit -------------------------------------------------------------------------------------


def test_audit_is_append_only(db: FactoryDB, raw: Raw) -> None:
    for step in ("connect", "keys", "serial"):
        db.audit(step=step, outcome="ok", uid=uid(1), serial=None, station="st1",
                 operator="alice", port="/dev/ttyACM0", detail=f"{step} done")
    db.audit(step="failed", outcome=AuditOutcome.FAIL, uid=None, serial=None, station="st1",
             operator="alice", port="/dev/ttyACM1")
    before = raw.execute("SELECT * FROM audit ORDER BY id")
    assert len(before) == 4

    for sql in ("UPDATE audit SET outcome = 'fail' WHERE id = 1", "UPDATE audit SET detail = NULL",
                "DELETE FROM audit WHERE id = 2", "DELETE FROM audit"):
        with pytest.raises(raw.error, match="append-only"):
            raw.execute(sql)
    if raw.postgres:  # row triggers do not see TRUNCATE: a statement trigger does
        with pytest.raises(raw.error, match="append-only"):
            raw.execute("TRUNCATE audit")
    assert raw.execute("SELECT * FROM audit ORDER BY id") == before

    log = db.audit_log()
    assert [e.step for e in log] == ["connect", "keys", "serial", "failed"]
    assert [e.id for e in log] == sorted(e.id for e in log)
    assert log[0].uid == uid(1) and log[0].detail == "connect done" and log[0].outcome is AuditOutcome.OK
    assert log[3].uid is None and log[3].detail == "" and log[3].outcome is AuditOutcome.FAIL
    assert [e.step for e in db.audit_log(uid(1))] == ["connect", "keys", "serial"]
    assert all(datetime.fromisoformat(e.at).utcoffset() == UTC.utcoffset(None) for e in log)


def test_audit_refuses_unknown_steps_and_outcomes(db: FactoryDB) -> None:
    common: dict[str, Any] = {"uid": uid(1), "serial": None, "station": "s", "operator": "o",
                              "port": "p"}
    with pytest.raises(ValueError):
        db.audit(step="teleport", outcome="ok", **common)
    with pytest.raises(ValueError):
        db.audit(step="connect", outcome="maybe", **common)
    assert db.audit_log() == []


# --- boards ------------------------------------------------------------------------------------


def test_start_and_update_a_board(db: FactoryDB) -> None:
    assert db.board(uid(1)) is None
    first = db.start(uid(1), station="st1", operator="alice", port="/dev/ttyACM0")
    assert (first.uid, first.serial, first.result) == (uid(1), None, BoardResult.IN_PROGRESS)
    assert (first.station, first.operator, first.port) == ("st1", "alice", "/dev/ttyACM0")
    assert first.created_at == first.updated_at and first.created_at.endswith("Z")

    db.update(uid(1), result="provisioned", key_hash="aa11,bb22", image_hash="cc33",
              image_version="1.2.3+4", labels={"hw": "rev2", "lot": "7"}, error="none",
              provisioned_at=datetime(2026, 5, 20, 18, 0, tzinfo=UTC))
    db.update(uid(1), error=None)  # only what is given changes
    b = db.board(uid(1))
    assert b is not None
    assert (b.result, b.key_hash, b.image_hash, b.image_version, b.labels, b.error) == (
        BoardResult.PROVISIONED, "aa11,bb22", "cc33", "1.2.3+4", {"hw": "rev2", "lot": "7"}, None)
    assert b.provisioned_at == "2026-05-20T18:00:00.000000Z"
    assert b.updated_at > first.updated_at

    # A re-run from another station: station/operator/port change, the rest is kept.
    again = db.start(uid(1), station="st2", operator="bob", port="/dev/ttyACM5")
    assert (again.station, again.operator, again.port) == ("st2", "bob", "/dev/ttyACM5")
    assert (again.result, again.labels, again.created_at) == (b.result, b.labels, first.created_at)

    db.update(uid(1), provisioned_at="2026-05-20T20:00:00+02:00")  # stored as UTC
    assert db.board(uid(1)).provisioned_at == "2026-05-20T18:00:00.000000Z"  # type: ignore[union-attr]


def test_update_refuses_misuse(db: FactoryDB) -> None:
    with pytest.raises(DatabaseError, match="not in the records"):
        db.update(uid(9), result="failed")
    start(db, 1)
    with pytest.raises(ValueError):
        db.update(uid(1), result="done")
    with pytest.raises(ValueError):
        db.update(uid(1), image_hash="ABCD")  # lower-case hex only
    with pytest.raises(ValueError):
        db.update(uid(1), provisioned_at=datetime(2026, 1, 1))  # naive
    with pytest.raises(TypeError):
        db.update(uid(1), labels='{"a": "b"}')  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        db.board("0102")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        db.update(uid(1), serial="X")  # type: ignore[call-arg]  # serials: assign_serial only
    assert db.board(uid(1)).result is BoardResult.IN_PROGRESS  # type: ignore[union-attr]


def test_boards_in_order_of_first_seen(db: FactoryDB) -> None:
    for n in (5, 3, 9):
        start(db, n)
    start(db, 5, station="st2")
    assert [b.uid for b in db.boards()] == [uid(5), uid(3), uid(9)]


def test_a_closed_database_says_so(db_url: str) -> None:
    db = FactoryDB.open(db_url)
    db.close()
    db.close()  # twice is fine
    with pytest.raises(DatabaseError, match="closed"):
        db.boards()


# --- serials -----------------------------------------------------------------------------------


def test_a_board_keeps_its_serial_on_every_rerun(db_url: str) -> None:
    with FactoryDB.open(db_url) as db:
        start(db, 1)
        start(db, 2)
        s1 = db.assign_serial(uid(1), SerialPrefix("SN-"))
        assert s1 == "SN-000001"
        assert db.assign_serial(uid(1), SerialPrefix("SN-")) == s1
        start(db, 1, station="st2")
        assert db.assign_serial(uid(1), SerialList(["OTHER-1"])) == s1  # whatever the source
        assert db.assign_serial(uid(2), SerialPrefix("SN-")) == "SN-000002"
    with FactoryDB.open(db_url) as db:  # the station killed and run again
        start(db, 1)
        assert db.assign_serial(uid(1), SerialPrefix("SN-")) == s1
        assert db.board(uid(1)).serial == s1  # type: ignore[union-attr]


def test_assigning_needs_a_started_board(db: FactoryDB) -> None:
    with pytest.raises(DatabaseError, match="not in the records"):
        db.assign_serial(uid(1), SerialPrefix("SN-"))


def test_serial_list_in_file_order_then_exhausted(db: FactoryDB, tmp_path: Path) -> None:
    path = tmp_path / "serials.txt"
    path.write_text("# line 2\n\nC-3\n  A-1  \n# B-0\nB-2\n")
    source = serial_list_from_file(path)
    assert source.serials == ("C-3", "A-1", "B-2")
    start(db, 1)
    db.assign_serial(uid(1), SerialList(["A-1"]))  # another source took A-1 earlier
    got = []
    for n in (2, 3):
        start(db, n)
        got.append(db.assign_serial(uid(n), source))
    assert got == ["C-3", "B-2"]
    start(db, 4)
    with pytest.raises(SerialsExhausted) as caught:
        db.assign_serial(uid(4), source)
    assert str(caught.value).startswith(f"no serials left in {path}")
    assert isinstance(caught.value, UsageError)
    assert db.board(uid(4)).serial is None  # type: ignore[union-attr]


def test_serial_prefix_numbering(db: FactoryDB) -> None:
    prefix = SerialPrefix("SN-2026-")
    for n in (1, 2, 3):
        start(db, n)
    assert [db.assign_serial(uid(n), prefix) for n in (1, 2, 3)] == [
        "SN-2026-000001", "SN-2026-000002", "SN-2026-000003"]
    # Serials that only look alike do not count: other lengths, non-digits, another case.
    for n, serial in ((4, "SN-2026-000099X"), (5, "SN-2026-0000999"), (6, "SN-2026-ABCDEF"),
                      (7, "sn-2026-000500"), (8, "SN-2026-00009")):
        start(db, n)
        assert db.assign_serial(uid(n), SerialList([serial])) == serial
    start(db, 10)
    assert db.assign_serial(uid(10), prefix) == "SN-2026-000004"
    # Next after the highest used with that prefix (a gap below stays a gap).
    start(db, 11)
    db.assign_serial(uid(11), SerialList(["SN-2026-000040"]))
    start(db, 12)
    assert db.assign_serial(uid(12), prefix) == "SN-2026-000041"
    start(db, 13)
    assert db.assign_serial(uid(13), SerialPrefix("sn-2026-")) == "sn-2026-000501"


def test_serial_prefix_exhausted(db: FactoryDB) -> None:
    start(db, 1)
    db.assign_serial(uid(1), SerialList(["Q999999"]))
    start(db, 2)
    with pytest.raises(SerialsExhausted, match="no serials left with prefix 'Q'"):
        db.assign_serial(uid(2), SerialPrefix("Q"))


def test_the_database_refuses_a_duplicate_serial(db: FactoryDB, raw: Raw) -> None:
    start(db, 1)
    serial = db.assign_serial(uid(1), SerialPrefix("SN-"))
    now = "2026-01-01T00:00:00.000000Z"
    with pytest.raises(raw.error):
        raw.execute("INSERT INTO boards (uid, serial, result, created_at, updated_at) "
                    "VALUES (?, ?, 'in-progress', ?, ?)", ("ffff", serial, now, now))
    start(db, 2)
    with pytest.raises(raw.error):
        raw.execute("UPDATE boards SET serial = ? WHERE uid = ?", (serial, uid(2).hex()))
    assert [b.serial for b in db.boards()] == [serial, None]


def test_serial_sources_validate(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty"):
        SerialPrefix("")
    with pytest.raises(UsageError, match="too long"):
        SerialPrefix("P" * 27)
    assert SerialPrefix("P" * 26).serial(1) == "P" * 26 + "000001"  # 32 bytes: the device's limit
    for bad in ("A B", "SN\u00e9", "TAB\t"):
        with pytest.raises(UsageError, match="printable ASCII"):
            SerialPrefix(bad)
    with pytest.raises(UsageError, match="no serials"):
        SerialList([])
    with pytest.raises(UsageError, match="twice"):
        SerialList(["A", "B", "A"])
    with pytest.raises(UsageError, match="longer than 32"):
        SerialList(["X" * 33])
    with pytest.raises(TypeError):
        SerialList("ABC")

    def from_file(text: str | bytes) -> SerialList:
        path = tmp_path / "s.txt"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return serial_list_from_file(path)

    with pytest.raises(InputFileError, match=r"s\.txt:4: serial 'A' is a duplicate \(also on line 1\)"):
        from_file("A\nB\n#A\nA\n")
    with pytest.raises(InputFileError, match="no serials"):
        from_file("# only comments\n\n   \n")
    with pytest.raises(InputFileError, match=r"s\.txt:2: serial 'B 2' is not printable ASCII"):
        from_file("A\nB 2\n")
    with pytest.raises(InputFileError, match="not ASCII"):
        from_file("A\nB\u00e9\n".encode())
    with pytest.raises(InputFileError, match="missing"):
        serial_list_from_file(tmp_path / "missing.txt")
    with pytest.raises(InputFileError):
        serial_list_from_file(tmp_path)  # a directory


# --- concurrency -------------------------------------------------------------------------------

# A station: opens the database, says "ready", waits for "go" (so that both start at once),
# then, per board: starts it, talks to it for `pause` seconds (away from the database, as a
# real station talks to the board), and assigns it a serial. Prints {uid: serial}.
# The pause makes two stations on SQLite interleave: without it, SQLite's busy handler (it
# sleeps 1, 2, 5... ms between tries) lets one station run all its transactions first. On
# PostgreSQL the stations interleave without it, and collide more often (the UNIQUE retries).
STATION = r"""
import json, sys, time
from pathlib import Path
from mpboot.factory.db import FactoryDB, SerialPrefix, serial_list_from_file
url, kind, arg, first, count, name, pause = sys.argv[1:]
source = SerialPrefix(arg) if kind == "prefix" else serial_list_from_file(Path(arg))
with FactoryDB.open(url) as db:
    print("ready", flush=True)
    sys.stdin.readline()
    out = {}
    for n in range(int(first), int(first) + int(count)):
        uid = n.to_bytes(8, "big")
        db.start(uid, station=name, operator="op", port=f"port{n}")
        if float(pause):
            time.sleep(float(pause))  # the board's I/O (not synchronisation)
        out[uid.hex()] = db.assign_serial(uid, source)
print(json.dumps(out), flush=True)
"""


def _two_stations(url: str, kind: str, arg: str, firsts: tuple[int, int],
                  count: int) -> list[dict[str, str]]:
    pause = "0" if is_postgres_url(url) else "0.001"
    stations = [subprocess.Popen([sys.executable, "-c", STATION, url, kind, arg, str(first),
                                  str(count), f"st{i}", pause],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                for i, first in enumerate(firsts)]
    try:
        for st in stations:
            assert st.stdout is not None and st.stdout.readline().strip() == "ready"
        for st in stations:  # both are connected and waiting: go
            assert st.stdin is not None
            st.stdin.write("go\n")
            st.stdin.flush()
        results = []
        for st in stations:
            out, _ = st.communicate(timeout=60)
            assert st.returncode == 0
            results.append(json.loads(out))
        return results
    finally:
        for st in stations:
            if st.poll() is None:
                st.kill()
                st.wait()


@pytest.mark.parametrize("kind", ["prefix", "list"])
def test_two_stations_never_give_one_serial_twice(db_url: str, kind: str, tmp_path: Path) -> None:
    FactoryDB.open(db_url).close()  # created and migrated
    if kind == "prefix":
        arg = "CC-"
        expected = {f"CC-{n:06d}" for n in range(1, 101)}
    else:
        serials = [f"L{n:03d}-{uuid.uuid4().hex[:6]}" for n in range(100)]
        (tmp_path / "serials.txt").write_text("# the line's serials\n" + "\n".join(serials) + "\n")
        arg = str(tmp_path / "serials.txt")
        expected = set(serials)
    a, b = _two_stations(db_url, kind, arg, firsts=(1000, 2000), count=50)

    assert len(a) == len(b) == 50 and not set(a) & set(b)
    given = {**a, **b}
    assert len(set(given.values())) == 100  # all distinct
    assert set(given.values()) == expected  # and nothing skipped or invented
    with FactoryDB.open(db_url) as db:
        boards = db.boards()
    assert {b.uid.hex(): b.serial for b in boards} == given  # each uid: exactly its one serial


def test_two_stations_on_the_same_boards_agree(db_url: str, raw: Raw) -> None:
    """The same 50 boards seen by two stations at once: each board gets one serial, and both
    stations report that one. (And the two create and migrate the new database at once.)"""
    a, b = _two_stations(db_url, "prefix", "SAME-", firsts=(1, 1), count=50)
    assert a == b
    assert sorted(a.values()) == [f"SAME-{n:06d}" for n in range(1, 51)]
    with FactoryDB.open(db_url) as db:
        assert {b.uid.hex(): b.serial for b in db.boards()} == a
    assert raw.execute("SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,)]


@pytest.mark.parametrize("sharing", ["one FactoryDB", "one FactoryDB per thread"])
def test_threads_never_give_one_serial_twice(db_url: str, sharing: str, tmp_path: Path) -> None:
    threads_n, per_thread = 4, 25
    serials = [f"T-{n:04d}" for n in range(threads_n * per_thread + 5)]
    sources = [SerialPrefix("TP-"), SerialList(serials, origin="the test list")]
    shared = FactoryDB.open(db_url)
    dbs = [shared if sharing == "one FactoryDB" else FactoryDB.open(db_url)
           for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    results: list[dict[bytes, tuple[str, str]]] = [{} for _ in range(threads_n)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for k in range(per_thread):
                u = uid(10_000 * (i + 1) + k)
                dbs[i].start(u, station=f"t{i}", operator="op", port=f"p{k}")
                # (asked twice: the second answer is the board's serial, kept)
                results[i][u] = (dbs[i].assign_serial(u, sources[0]),
                                 dbs[i].assign_serial(u, sources[0]))
                v = uid(20_000_000 + 10_000 * (i + 1) + k)
                dbs[i].start(v, station=f"t{i}", operator="op", port=f"q{k}")
                results[i][v] = (dbs[i].assign_serial(v, sources[1]), "")
        except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    try:
        assert not errors, errors
        given = {u: s for r in results for u, s in r.items()}
        assert len(given) == 2 * threads_n * per_thread
        prefix_serials = [s for s, again in given.values() if again]
        assert all(s == again for s, again in given.values() if again)  # kept on the re-ask
        assert sorted(prefix_serials) == [f"TP-{n:06d}" for n in range(1, threads_n * per_thread + 1)]
        list_serials = [s for s, again in given.values() if not again]
        assert sorted(list_serials) == serials[:threads_n * per_thread]
        assert {b.uid: b.serial for b in shared.boards()} == {u: s for u, (s, _) in given.items()}
    finally:
        for d in {id(d): d for d in dbs}.values():
            d.close()


# --- reports -----------------------------------------------------------------------------------


def test_reports(db: FactoryDB) -> None:
    start(db, 1)
    start(db, 2)
    db.assign_serial(uid(1), SerialPrefix("SN-"))
    db.update(uid(1), result=BoardResult.PROVISIONED, labels={"hw": "rev2, \"b\""},
              provisioned_at=datetime(2026, 5, 20, tzinfo=UTC))
    db.update(uid(2), result=BoardResult.REFUSED, error="embedded key 1234 is not the expected one")
    rows = report_rows(db)
    assert [list(r) for r in rows] == [list(BOARD_COLUMNS)] * 2
    assert rows[0]["uid"] == uid(1).hex() and rows[0]["serial"] == "SN-000001"
    assert rows[0]["labels"] == {"hw": "rev2, \"b\""} and rows[1]["labels"] is None
    assert rows[1]["result"] == "refused" and rows[1]["serial"] is None

    out = io.StringIO()
    write_csv(rows, out)
    parsed = list(csv.reader(io.StringIO(out.getvalue())))
    assert parsed[0] == list(BOARD_COLUMNS)
    assert len(parsed) == 3
    first = dict(zip(parsed[0], parsed[1], strict=True))
    assert first["serial"] == "SN-000001" and first["provisioned_at"] == "2026-05-20T00:00:00.000000Z"
    assert json.loads(first["labels"]) == {"hw": "rev2, \"b\""}
    second = dict(zip(parsed[0], parsed[2], strict=True))
    assert second["serial"] == "" and second["error"].startswith("embedded key")

    out = io.StringIO()
    write_json(rows, out)
    data = json.loads(out.getvalue())
    assert isinstance(data, list) and [list(d) for d in data] == [list(BOARD_COLUMNS)] * 2
    assert data[0]["labels"] == {"hw": "rev2, \"b\""} and data[1]["serial"] is None


def test_empty_reports() -> None:
    out = io.StringIO()
    write_csv([], out)
    assert out.getvalue() == ",".join(BOARD_COLUMNS) + "\n"
    out = io.StringIO()
    write_json([], out)
    assert json.loads(out.getvalue()) == []


# --- read-only (reports) -----------------------------------------------------------------------


def report(db_url: str, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["provision", "report", "--db", db_url, *args], prog_name="mpboot")
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def test_read_only_open_reads_and_never_writes(db_url: str) -> None:
    with FactoryDB.open(db_url) as db:
        start(db, 1)
        version = db.schema_version()
    with FactoryDB.open(db_url, read_only=True) as ro:
        assert [b.uid for b in ro.boards()] == [uid(1)] and ro.schema_version() == version
        with pytest.raises(DatabaseError, match="read-only") as caught:
            start(ro, 2)
        assert "\n" not in str(caught.value)
        # below the library's own refusal, the connection itself is read-only
        with pytest.raises(DatabaseError, match="read.?only"), ro._op("probe", write=False) as tx:
            tx("INSERT INTO audit (at, step, outcome) VALUES ('2026-01-01T00:00:00.000000Z', 'connect', 'ok')")
    with FactoryDB.open(db_url) as db:
        assert [b.uid for b in db.boards()] == [uid(1)] and db.audit_log() == []


def test_a_report_on_an_older_schema_says_so_instead_of_migrating(db_url: str, raw: Raw) -> None:
    make_version_1(raw)
    with pytest.raises(SchemaTooOld) as caught:
        FactoryDB.open(db_url, read_only=True)
    assert isinstance(caught.value, DatabaseError)
    r = report(db_url)
    assert r.exit_code == 2 and r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line and "schema version 1, older than this mpboot's (2)" in line, line
    assert raw.execute("SELECT MAX(version) FROM schema_migrations") == [(1,)]  # not migrated
    with pytest.raises(raw.error):
        raw.execute("SELECT labels FROM boards")


def test_a_report_on_a_database_without_records_says_so(db_url: str, raw: Raw) -> None:
    raw.execute("CREATE TABLE other (x INTEGER)")
    r = report(db_url)
    assert r.exit_code == 2 and "no factory records" in r.stderr and "\n" not in r.stderr.strip(), r.stderr


def no_write_access() -> list[str]:
    """A command prefix under which files and directories without write permission for their
    owner cannot be written: as root, without the capabilities that override file
    permissions (setpriv); as anyone else, nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_report_on_a_read_only_sqlite_file_in_a_read_only_directory(tmp_path: Path) -> None:
    folder = tmp_path / "records"
    folder.mkdir()
    path = folder / "factory.sqlite"
    with FactoryDB.open(str(path)) as db:  # WAL mode, as a station leaves it
        start(db, 1)
        db.assign_serial(uid(1), SerialPrefix("SN-"))
    before = (sorted(os.listdir(folder)), path.read_bytes())
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        runs = [subprocess.run([*no_write_access(), MPBOOT, "provision", "report", "--db", str(path), *args],
                               capture_output=True, text=True, timeout=60) for args in (["--json"], [])]
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    for r in runs:
        assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    assert [row["serial"] for row in json.loads(runs[0].stdout)] == ["SN-000001"]
    assert "SN-000001" in runs[1].stdout and "1 board in" in runs[1].stdout
    assert (sorted(os.listdir(folder)), path.read_bytes()) == before


def test_report_with_a_select_only_postgresql_role(pg_server: pgserver.PgServer) -> None:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    url = pg_server.create_schema(schema)
    with FactoryDB.open(url) as db:
        start(db, 1)
        db.assign_serial(uid(1), SerialPrefix("SN-"))
    role = f"reader_{uuid.uuid4().hex[:12]}"
    admin = Raw(pg_server.url())
    try:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    finally:
        admin.close()
    reader = url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    r = report(reader, "--json")
    assert r.exit_code == 0, r.stderr
    assert [row["serial"] for row in json.loads(r.stdout)] == ["SN-000001"]


# --- errors ------------------------------------------------------------------------------------


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="cannot open the factory database") as caught:
        FactoryDB.open(str(tmp_path / "no" / "such" / "dir" / "f.sqlite"))
    assert "\n" not in str(caught.value)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database file" * 100)
    with pytest.raises(DatabaseError, match="not a database"):
        FactoryDB.open(str(junk))
    with pytest.raises(DatabaseError):
        FactoryDB.open("")


def test_postgres_unreachable_is_one_line() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatabaseError) as caught:
        FactoryDB.open(f"postgresql://alice:s3cret@127.0.0.1:{port}/factory")
    message = str(caught.value)
    assert message.startswith(f"cannot connect to PostgreSQL postgresql://alice:***@127.0.0.1:{port}")
    assert "\n" not in message and "s3cret" not in message
    with pytest.raises(DatabaseError) as caught:
        FactoryDB.open(f"postgres://127.0.0.1:{port}/factory?user=bob&password=s3cret")
    assert "password=***" in str(caught.value) and "s3cret" not in str(caught.value)


def test_postgres_without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg: ImportError
    with pytest.raises(DatabaseError, match=r"pip install 'mpboot\[postgres\]'") as caught:
        FactoryDB.open("postgres://localhost/factory")
    assert "\n" not in str(caught.value)


def test_postgres_url_schemes(pg_server: pgserver.PgServer) -> None:
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:16]}")
    assert url.startswith("postgresql://")
    with FactoryDB.open(url) as db:
        start(db, 1)
    with FactoryDB.open("postgres://" + url.removeprefix("postgresql://")) as db:
        assert [b.uid for b in db.boards()] == [uid(1)]


def test_postgres_reconnects_after_the_connection_drops(pg_server: pgserver.PgServer) -> None:
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:16]}")
    with FactoryDB.open(url) as db:
        start(db, 1)
        admin = Raw(url)
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            admin.close()
        with pytest.raises(DatabaseError) as caught:  # the call that meets the cut fails...
            db.boards()
        assert "\n" not in str(caught.value)
        assert [b.uid for b in db.boards()] == [uid(1)]  # ...and the next one connects again
