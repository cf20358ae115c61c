"""`mpboot sync --log postgresql://...`: the attempt log as a PostgreSQL table, on a real server
(tests/pgserver.py; skips only when PostgreSQL is not installed).

What must hold: the table has the SQLite log's columns (created when missing, extended when an
older mpboot made it), records read back as written, and what reverted where is shared by the
stations that log to one database; a bad URL, an unreachable server or a refused login is one
line and exit 2 before any device."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pgserver
import pytest
from mpboot.errors import DatabaseError
from mpboot.keys import load_signing_key
from mpboot.sync import _COLUMNS, SQLITE_SCHEMA, Attempt, AttemptLog, SyncResult
from simkit import make_app, sign_app

KEYS = Path(__file__).parent / "keys"
MPBOOT = str(Path(sys.executable).parent / "mpboot")
H1, H2 = "aa" * 32, "bb" * 32


@pytest.fixture
def url(pg_server: pgserver.PgServer) -> str:
    """A new, empty database (a schema that is the only one its connections see)."""
    return pg_server.create_schema(f"t_{uuid.uuid4().hex[:16]}")


def sql(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Plain SQL on the database, bypassing AttemptLog."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(statement, params or None)
        return cur.fetchall() if cur.description is not None else []


def columns(url: str) -> dict[str, str]:
    return dict(sql(url, "SELECT column_name, data_type FROM information_schema.columns "
                         "WHERE table_name = 'attempts' AND table_schema = current_schema()"))


def closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_table_has_the_sqlite_columns_and_records_read_back(url: str, tmp_path: Path) -> None:
    log = AttemptLog(url)
    assert log.target == url and log.path is None
    a = Attempt(1, "dev-a", "AA:BB", uid="01", serial="SN-1", root_version=2, revocation=2**32 - 1,
                from_version="1.0.0", to_version="1.2.0", image="a.img", image_hash=H1, bytes=1234,
                resumed_from=512, reconnects=2, result=SyncResult.UPDATED, started=1764780000.123456,
                seconds=2.5)
    b = Attempt(1, "dev-b", "CC:DD", result=SyncResult.FAILED, error="link lost")
    log.write(a)
    log.write(b)
    log.close()
    rows = sql(url, f"SELECT {', '.join(_COLUMNS)} FROM attempts ORDER BY id")
    assert [dict(zip(_COLUMNS, row, strict=True)) for row in rows] == [
        {c: x.record()[c] for c in _COLUMNS} for x in (a, b)]
    assert rows[0][_COLUMNS.index("started")] == 1764780000.123456  # not a 4-byte REAL
    # the same columns as a SQLite log, integers and reals as wide as SQLite's
    with sqlite3.connect(tmp_path / "log.sqlite") as db:
        db.execute(SQLITE_SCHEMA)
        sqlite_columns = [row[1] for row in db.execute("PRAGMA table_info(attempts)")]
    db.close()
    kinds = columns(url)
    assert sorted(kinds) == sorted(sqlite_columns)
    assert {kinds[c] for c in ("pass_no", "bytes", "root_version", "revocation")} == {"bigint"}
    assert {kinds[c] for c in ("started", "seconds")} == {"double precision"}
    # opening it again changes nothing, and the postgres:// scheme is the same database
    again = AttemptLog("postgres://" + url.removeprefix("postgresql://"))
    assert again.reverted().on("01") == frozenset()
    again.close()
    assert len(sql(url, "SELECT id FROM attempts")) == 2


def test_stations_sharing_a_database_hold_back_what_reverted_at_either(url: str) -> None:
    north, south = AttemptLog(url), AttemptLog(url)  # two stations, both open
    north.write(Attempt(1, "dev-01", "AA", uid="01", image_hash=H1, result=SyncResult.REVERTED))
    north.write(Attempt(1, "dev-02", "BB", uid="02", image_hash=H1, result=SyncResult.REVERTED))
    south.write(Attempt(1, "dev-02", "CC", uid="02", image_hash=H1, result=SyncResult.UPDATED))  # took later
    south.write(Attempt(1, "dev-03", "DD", uid="03", image_hash=H2, result=SyncResult.FAILED))
    for station in (south, north):
        memory = station.reverted()
        assert memory.on("01") == frozenset({bytes.fromhex(H1)})
        assert memory.on("02") == memory.on("03") == frozenset()
    north.close()
    south.close()
    third = AttemptLog(url)  # a station that joins later reads it all
    assert third.reverted().on("01") == frozenset({bytes.fromhex(H1)})
    third.close()


def test_stations_creating_the_table_at_once(url: str) -> None:
    n = 4
    barrier = threading.Barrier(n)
    opened: list[AttemptLog] = []
    errors: list[BaseException] = []

    def station() -> None:
        barrier.wait()
        try:
            opened.append(AttemptLog(url))
        except BaseException as err:  # (reported below)
            errors.append(err)

    threads = [threading.Thread(target=station) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == n
    for i, log in enumerate(opened):
        log.write(Attempt(1, f"dev-{i}", "AA", uid=f"0{i}", image_hash=H1, result=SyncResult.REVERTED))
        log.close()
    assert len(sql(url, "SELECT id FROM attempts")) == n


OLD_TABLE = """CREATE TABLE attempts (
    id BIGSERIAL PRIMARY KEY, pass_no BIGINT NOT NULL, device TEXT NOT NULL, address TEXT NOT NULL,
    uid TEXT, from_version TEXT, to_version TEXT, image TEXT, bytes BIGINT NOT NULL,
    resumed_from BIGINT NOT NULL, reconnects BIGINT NOT NULL, result TEXT NOT NULL, error TEXT,
    started DOUBLE PRECISION NOT NULL, seconds DOUBLE PRECISION NOT NULL)"""


def test_a_table_of_an_older_mpboot_gets_the_missing_columns(url: str) -> None:
    sql(url, OLD_TABLE)
    sql(url, "INSERT INTO attempts (pass_no, device, address, uid, bytes, resumed_from, reconnects, "
             "result, started, seconds) VALUES (1, 'd', 'AA', '01', 10, 0, 0, 'reverted', 1.0, 1.0)")
    log = AttemptLog(url)
    kinds = columns(url)
    assert set(kinds) == {"id", *_COLUMNS}
    assert (kinds["serial"], kinds["image_hash"], kinds["note"], kinds["root_version"],
            kinds["revocation"]) == ("text", "text", "text", "bigint", "bigint")
    assert log.reverted().on("01") == frozenset()  # no image hash: nothing to hold
    log.write(Attempt(2, "d", "AA", uid="01", serial="SN-9", image_hash="cc" * 32, result=SyncResult.REVERTED,
                      note="n", root_version=1, revocation=0))
    log.close()
    assert AttemptLog(url).reverted().on("01") == frozenset({b"\xcc" * 32})
    assert sql(url, "SELECT uid, serial, note FROM attempts ORDER BY id") == [("01", None, None),
                                                                            ("01", "SN-9", "n")]


def test_a_station_role_that_may_only_select_and_insert(url: str, pg_server: pgserver.PgServer) -> None:
    AttemptLog(url).close()  # the table, made by an administrator's run
    schema = url.rsplit("%3D", 1)[1]
    role = f"station_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url()
    sql(admin, f'CREATE ROLE "{role}" LOGIN')
    sql(admin, f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    sql(admin, f'GRANT SELECT, INSERT ON "{schema}".attempts TO "{role}"')
    sql(admin, f'GRANT USAGE ON SEQUENCE "{schema}".attempts_id_seq TO "{role}"')
    station = url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    log = AttemptLog(station)
    log.write(Attempt(1, "d", "AA", uid="01", image_hash=H1, result=SyncResult.REVERTED))
    assert log.reverted().on("01") == frozenset({bytes.fromhex(H1)})
    log.close()
    # a role that may not write: the record fails, one line (never a silent loss)
    reader = f"reader_{uuid.uuid4().hex[:12]}"
    sql(admin, f'CREATE ROLE "{reader}" LOGIN')
    sql(admin, f'GRANT USAGE ON SCHEMA "{schema}" TO "{reader}"')
    sql(admin, f'GRANT SELECT ON "{schema}".attempts TO "{reader}"')
    log = AttemptLog(url.replace("postgresql://postgres@", f"postgresql://{reader}@", 1))
    with pytest.raises(DatabaseError) as caught:
        log.write(Attempt(1, "d", "AA", result=SyncResult.FAILED))
    assert str(caught.value).startswith(f"--log postgresql://{reader}@127.0.0.1:{pg_server.port}/postgres?"
                                        "options=-csearch_path%3Dt_")
    assert ": cannot record an attempt: permission denied for table attempts" in str(caught.value)
    assert "\n" not in str(caught.value)
    log.close()


def test_a_cut_connection_is_reconnected_and_the_record_kept(url: str) -> None:
    log = AttemptLog(url)
    log.write(Attempt(1, "d", "AA", uid="01", image_hash=H1, result=SyncResult.REVERTED))
    assert sql(url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()") == [(1,)]
    log.write(Attempt(1, "d", "AA", uid="02", image_hash=H1, result=SyncResult.REVERTED))
    assert sql(url, "SELECT uid FROM attempts ORDER BY id") == [("01",), ("02",)]  # once each
    log.close()


def test_a_server_that_cannot_be_reached_again_stops_the_run_with_one_line(
        url: str, pg_server: pgserver.PgServer) -> None:
    schema = url.rsplit("%3D", 1)[1]
    role = f"station_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url()
    sql(admin, f'CREATE ROLE "{role}" LOGIN')
    sql(admin, f'GRANT ALL ON SCHEMA "{schema}" TO "{role}"')
    log = AttemptLog(url.replace("postgresql://postgres@", f"postgresql://{role}@", 1))
    log.write(Attempt(1, "d", "AA", uid="01", result=SyncResult.FAILED))
    sql(admin, f'ALTER ROLE "{role}" NOLOGIN')  # from now on every new connection is refused
    sql(admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    with pytest.raises(DatabaseError) as caught:
        log.write(Attempt(1, "d", "AA", uid="02", result=SyncResult.FAILED))
    message = str(caught.value)
    assert message.startswith(f"--log: cannot connect to PostgreSQL postgresql://{role}@")
    assert "not permitted to log in" in message and "\n" not in message
    log.close()
    assert sql(url, "SELECT uid FROM attempts") == [("01",)]


# --- errors ------------------------------------------------------------------------------------


def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    port = closed_port()
    with pytest.raises(DatabaseError) as caught:
        AttemptLog(f"postgresql://alice:s3cret@127.0.0.1:{port}/fleet")
    message = str(caught.value)
    assert message.startswith(f"--log: cannot connect to PostgreSQL postgresql://alice:***@127.0.0.1:{port}/fleet: ")
    assert "\n" not in message and "s3cret" not in message
    with pytest.raises(DatabaseError) as caught:
        AttemptLog(f"postgres://127.0.0.1:{port}/fleet?user=bob&password=s3cret")
    assert "password=***" in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize("mangle, says", [
    (lambda u: u.replace("postgresql://postgres@", "postgresql://nobody_here@", 1), 'role "nobody_here" does not exist'),
    (lambda u: u.rsplit("/", 1)[0] + "/no_such_db", 'database "no_such_db" does not exist'),
    (lambda u: u.replace("127.0.0.1:", "127.0.0.1:notaport", 1), "invalid"),
    (lambda u: u + "&bogus_option=1", "bogus_option"),
])
def test_a_bad_url_or_a_refused_login_is_one_line(pg_server: pgserver.PgServer, mangle: Any, says: str) -> None:
    good = pg_server.create_schema(f"t_{uuid.uuid4().hex[:16]}")
    with pytest.raises(DatabaseError, match="^--log: ") as caught:
        AttemptLog(mangle(good))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_without_psycopg_the_factory_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg: ImportError
    with pytest.raises(DatabaseError) as caught:
        AttemptLog("postgresql://localhost/fleet")
    assert str(caught.value) == ("--log: PostgreSQL records need psycopg 3, which is not installed: "
                                 "pip install 'mpboot[postgres]'")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("repo")
    key = load_signing_key(KEYS / "TEST-ONLY-rsa2048.pem")
    (d / "a-1.0.0.img").write_bytes(sign_app(make_app(d / "src", "x", confirm=True), key, "1.0.0"))
    return d


def test_cli_a_log_server_that_cannot_be_reached_stops_sync_before_any_device(repo: Path) -> None:
    port = closed_port()
    proc = subprocess.run([MPBOOT, "sync", str(repo), "--udp", "127.0.0.1:9", "--log",
                           f"postgresql://alice:s3cret@127.0.0.1:{port}/fleet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # not even the repository line: nothing happened
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--log: cannot connect to PostgreSQL postgresql://alice:***@127.0.0.1" in lines[0]
    assert "s3cret" not in proc.stderr


def test_cli_sync_logs_to_postgresql(repo: Path, url: str) -> None:
    port = closed_port()  # (UDP: nothing answers there, so no device in range)
    proc = subprocess.run([MPBOOT, "sync", str(repo), "--udp", f"127.0.0.1:{port}", "--timeout", "0.5",
                           "--retries", "0", "--log", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "pass 1: 0 devices" in proc.stdout
    assert set(columns(url)) == {"id", *_COLUMNS}  # the table, made by sync (no device met: no row)


def test_a_looping_station_learns_another_stations_revert_at_its_next_pass(url: str) -> None:
    import asyncio

    from mpboot.sync import DirSource, Found, Syncer

    class NoDevices:
        async def scan(self, seconds: float) -> list[Found]:
            return []

        def transport(self, address: str) -> object:
            raise AssertionError("no device to reach")

    here, there = AttemptLog(url), AttemptLog(url)
    syncer = Syncer(DirSource([]), NoDevices(), log=here)  # type: ignore[arg-type]
    asyncio.run(syncer.run_pass())
    assert syncer.reverted.on("07") == frozenset()
    there.write(Attempt(1, "dev-07", "EE", uid="07", image_hash=H2, result=SyncResult.REVERTED))
    asyncio.run(syncer.run_pass())
    assert syncer.reverted.on("07") == frozenset({bytes.fromhex(H2)})
    sql(url, "DELETE FROM attempts")  # the table pruned: what this station learned stays
    asyncio.run(syncer.run_pass())
    assert syncer.reverted.on("07") == frozenset({bytes.fromhex(H2)})
    there.write(Attempt(1, "dev-07", "EE", uid="07", image_hash=H2, result=SyncResult.UPDATED))
    asyncio.run(syncer.run_pass())  # it ran confirmed at another station since: forgotten
    assert syncer.reverted.on("07") == frozenset()
    here.close()
    there.close()

