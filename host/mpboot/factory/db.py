"""The factory station's records (docs/FACTORY.md section 3): boards, serials and the audit log.

One implementation for SQLite (a file path: the default, nothing to install) and PostgreSQL
(`postgresql://...`, through psycopg 3: `pip install 'mpboot[postgres]'`, so that the stations
of a line share one database). The two differ only in SQL dialect details (`_Dialect`).

What the database itself guarantees, whatever the station code does:
- `boards.serial` is UNIQUE: no serial ever belongs to two boards;
- `audit` is append-only: triggers make every UPDATE and DELETE (and TRUNCATE) fail;
- the schema is versioned: migrations are numbered, applied in order inside one transaction
  when a database is opened, and listed in `schema_migrations`; a database written by a newer
  mpboot (a version this code does not know) is refused rather than misread.

`FactoryDB.open(url, read_only=True)` (reports) writes nothing, ever: SQLite is opened with a
`mode=ro` URI (no switch to WAL, no migration), PostgreSQL sessions are
`default_transaction_read_only`; a schema older than this code is refused (SchemaTooOld), not
migrated. It works on a read-only file in a read-only directory, and for a PostgreSQL role
that may only SELECT.

Serial assignment (`FactoryDB.assign_serial`) runs in a write transaction (`BEGIN IMMEDIATE` on
SQLite: one writer at a time across processes; on PostgreSQL the board's row is locked and a
serial another station took meanwhile makes the UPDATE fail on the UNIQUE constraint, which is
retried with the next free serial). A board that has a serial keeps it.

Every method holds one lock, so a FactoryDB may be shared by the threads of a station.
Timestamps are ISO 8601 UTC text (`2026-05-20T16:27:24.123456Z`).
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import time
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from mpboot.errors import (
    DatabaseError,
    InputFileError,
    SchemaTooNew,
    SchemaTooOld,
    SerialsExhausted,
    UsageError,
)

# --- values ------------------------------------------------------------------------------------


class BoardResult(StrEnum):
    """`boards.result`."""

    IN_PROGRESS = "in-progress"
    PROVISIONED = "provisioned"
    REFUSED = "refused"
    FAILED = "failed"


class Step(StrEnum):
    """`audit.step`."""

    CONNECT = "connect"
    KEYS = "keys"
    SERIAL = "serial"
    UPLOAD = "upload"
    TEST_BOOT = "test-boot"
    CONFIRMED = "confirmed"
    IDENTITY = "identity"
    FLOOR = "floor"
    POLICY = "policy"
    VERIFY = "verify"
    SEAL = "seal"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"
    SKIP = "skip"


class AuditOutcome(StrEnum):
    """`audit.outcome`."""

    OK = "ok"
    FAIL = "fail"


# `boards` columns in the schema's order (docs/FACTORY.md): the order of report rows. (In a
# table, `labels` sits last: migration 2 added it.)
BOARD_COLUMNS = ("uid", "serial", "result", "key_hash", "image_hash", "image_version", "station",
                 "operator", "port", "labels", "created_at", "updated_at", "provisioned_at", "error")
AUDIT_COLUMNS = ("id", "at", "station", "operator", "port", "uid", "serial", "step", "outcome",
                 "detail")


@dataclass(frozen=True)
class BoardRecord:
    """One row of `boards`. uid as bytes (hex in the database); timestamps ISO 8601 UTC."""

    uid: bytes
    serial: str | None
    result: BoardResult
    key_hash: str | None  # hex, comma-separated
    image_hash: str | None  # hex
    image_version: str | None
    station: str | None
    operator: str | None
    port: str | None
    labels: dict[str, str]  # empty when none were recorded
    created_at: str
    updated_at: str
    provisioned_at: str | None
    error: str | None


@dataclass(frozen=True)
class AuditEntry:
    """One row of `audit`."""

    id: int
    at: str
    station: str | None
    operator: str | None
    port: str | None
    uid: bytes | None
    serial: str | None
    step: str
    outcome: AuditOutcome
    detail: str  # "" when none


def utc_now() -> str:
    """The current time as the records hold it: ISO 8601 UTC with microseconds and a `Z`."""
    return _iso(datetime.now(UTC))


def _iso(t: datetime | str) -> str:
    """An aware datetime, or ISO 8601 text with a time zone, as the records hold times."""
    if isinstance(t, str):
        t = datetime.fromisoformat(t)  # ValueError when it is not ISO 8601
    if t.tzinfo is None:
        raise ValueError("a time without a time zone: give an aware datetime (UTC)")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- serial sources ----------------------------------------------------------------------------

SERIAL_MAX = 32  # bytes: the device's limit (docs/FACTORY.md section 2)
PREFIX_DIGITS = 6
_SERIAL_RE = re.compile(r"[\x21-\x7e]{1,32}")
_PREFIX_DIGITS_RE = re.compile(f"[0-9]{{{PREFIX_DIGITS}}}")


def serial_problem(serial: str) -> str | None:
    """Why the device would refuse `serial` (1-32 bytes of printable ASCII without spaces), or
    None when it is valid."""
    if not serial:
        return "empty"
    if len(serial) > SERIAL_MAX:
        return f"longer than {SERIAL_MAX} characters"
    if not _SERIAL_RE.fullmatch(serial):
        return "not printable ASCII without spaces (0x21-0x7E)"
    return None


class SerialSource:
    """Where new serials come from: a `SerialList` or a `SerialPrefix`."""

    def describe(self) -> str:
        raise NotImplementedError


class SerialList(SerialSource):
    """Serials taken in list order (`--serials FILE`): each board gets the first one no board
    has. `origin` names the list in messages ("no serials left in FILE")."""

    def __init__(self, serials: Sequence[str], origin: str = "the serial list") -> None:
        if isinstance(serials, str):
            raise TypeError("SerialList takes a sequence of serials, not one string")
        if not serials:
            raise UsageError(f"{origin}: no serials")
        seen: set[str] = set()
        for serial in serials:
            problem = serial_problem(serial)
            if problem is not None:
                raise UsageError(f"{origin}: serial {serial!r} is {problem}")
            if serial in seen:
                raise UsageError(f"{origin}: serial {serial!r} is listed twice")
            seen.add(serial)
        self.serials: tuple[str, ...] = tuple(serials)
        self.origin = origin

    def describe(self) -> str:
        return self.origin

    def __repr__(self) -> str:
        return f"SerialList({len(self.serials)} serials from {self.origin})"


class SerialPrefix(SerialSource):
    """Serials `PREFIX000001`, `PREFIX000002`, ... (`--serial-prefix PREFIX`): each new board
    gets the one after the highest already used with that prefix."""

    def __init__(self, prefix: str) -> None:
        if not prefix:
            raise UsageError("serial prefix is empty")
        if len(prefix) + PREFIX_DIGITS > SERIAL_MAX:
            raise UsageError(f"serial prefix {prefix!r} is too long: at most "
                             f"{SERIAL_MAX - PREFIX_DIGITS} characters (+ {PREFIX_DIGITS} digits "
                             f"make a serial of at most {SERIAL_MAX})")
        if serial_problem(prefix) is not None:
            raise UsageError(f"serial prefix {prefix!r} is not printable ASCII without spaces "
                             "(0x21-0x7E)")
        self.prefix = prefix

    def serial(self, number: int) -> str:
        if not 1 <= number < 10**PREFIX_DIGITS:
            raise ValueError(f"serial number {number} does not fit {PREFIX_DIGITS} digits")
        return f"{self.prefix}{number:0{PREFIX_DIGITS}d}"

    def number(self, serial: str) -> int | None:
        """The number of a serial made from this prefix, None for any other serial."""
        if not serial.startswith(self.prefix):
            return None
        digits = serial[len(self.prefix):]
        return int(digits) if _PREFIX_DIGITS_RE.fullmatch(digits) else None

    def describe(self) -> str:
        return f"prefix {self.prefix!r}"

    def __repr__(self) -> str:
        return f"SerialPrefix({self.prefix!r})"


def serial_list_from_file(path: Path) -> SerialList:
    """One serial per line, in order; blank lines and lines starting with `#` are ignored.
    UsageError (InputFileError) when the file cannot be read, has a serial the device would
    refuse, lists one twice, or lists none."""
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not ASCII text (serials are printable ASCII)") from None
    except OSError as err:
        raise InputFileError(f"{path}: {err.strerror or err}") from None
    serials: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        serial = line.strip()
        if not serial or serial.startswith("#"):
            continue
        problem = serial_problem(serial)
        if problem is not None:
            raise InputFileError(f"{path}:{number}: serial {serial!r} is {problem}")
        if serial in first_line:
            raise InputFileError(f"{path}:{number}: serial {serial!r} is a duplicate "
                                 f"(also on line {first_line[serial]})")
        first_line[serial] = number
        serials.append(serial)
    if not serials:
        raise InputFileError(f"{path}: no serials (one per line; blank lines and # comments "
                             "are ignored)")
    return SerialList(serials, origin=str(path))


# --- dialects and migrations -------------------------------------------------------------------

Params: TypeAlias = Sequence[object]
Row: TypeAlias = tuple[Any, ...]

_BOARDS_V1 = """CREATE TABLE boards (
  uid            TEXT PRIMARY KEY,
  serial         TEXT UNIQUE,
  result         TEXT NOT NULL,
  key_hash       TEXT,
  image_hash     TEXT,
  image_version  TEXT,
  station        TEXT,
  operator       TEXT,
  port           TEXT,
  created_at     TEXT NOT NULL,
  updated_at     TEXT NOT NULL,
  provisioned_at TEXT,
  error          TEXT
)"""

_AUDIT = """CREATE TABLE audit (
  id       {id},
  at       TEXT NOT NULL,
  station  TEXT,
  operator TEXT,
  port     TEXT,
  uid      TEXT,
  serial   TEXT,
  step     TEXT NOT NULL,
  outcome  TEXT NOT NULL,
  detail   TEXT
)"""

_SCHEMA_MIGRATIONS = ("CREATE TABLE IF NOT EXISTS schema_migrations "
                      "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")

APPEND_ONLY = "audit is append-only"

# Migration N is MIGRATIONS[N - 1]: the statements that take the schema from version N-1 to N.
# Append new migrations at the end, for both dialects; never change a released one.
SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        _BOARDS_V1,
        _AUDIT.format(id="INTEGER PRIMARY KEY AUTOINCREMENT"),
        "CREATE INDEX audit_uid ON audit (uid)",
        (f"CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
         f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"),
        (f"CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
         f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"),
    ),
    (
        "ALTER TABLE boards ADD COLUMN labels TEXT",
    ),
)

POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        _BOARDS_V1,
        _AUDIT.format(id="BIGSERIAL PRIMARY KEY"),
        "CREATE INDEX audit_uid ON audit (uid)",
        ("CREATE FUNCTION mpboot_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
         f"BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$"),
        ("CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit "
         "FOR EACH ROW EXECUTE FUNCTION mpboot_audit_append_only()"),
        ("CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
         "FOR EACH STATEMENT EXECUTE FUNCTION mpboot_audit_append_only()"),
    ),
    (
        "ALTER TABLE boards ADD COLUMN labels TEXT",
    ),
)

assert len(SQLITE_MIGRATIONS) == len(POSTGRES_MIGRATIONS)
SCHEMA_VERSION = len(SQLITE_MIGRATIONS)  # what this code writes and understands

# PostgreSQL: the advisory lock that makes two stations opening one new database migrate it
# one after the other (an arbitrary constant: "mpbF").
_PG_MIGRATION_LOCK = 0x6D706246
_SERIAL_TRIES = 1000  # PostgreSQL: UNIQUE conflicts with other stations before giving up


class _Tx(Protocol):
    def __call__(self, sql: str, params: Params = ()) -> list[Row]: ...


class _Dialect(Protocol):
    """What differs between SQLite and PostgreSQL. SQL is written with `?` placeholders."""

    name: str
    target: str  # the database, for messages (a path, or a URL without its password)
    migrations: tuple[tuple[str, ...], ...]
    for_update: str  # row lock suffix of a SELECT ("" where the transaction locks already)

    def transaction(self, write: bool) -> AbstractContextManager[_Tx]: ...
    def has_table(self, tx: _Tx, name: str) -> bool: ...
    def migration_lock(self, tx: _Tx) -> None: ...
    def is_serial_conflict(self, err: BaseException) -> bool: ...
    def is_retryable(self, err: BaseException) -> bool: ...
    def driver_errors(self) -> tuple[type[BaseException], ...]: ...
    def ensure_connected(self) -> None: ...
    def close(self) -> None: ...


class _SQLite:
    name = "sqlite"
    migrations = SQLITE_MIGRATIONS
    for_update = ""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.target = path
        if read_only:
            self.conn = self._open_read_only(path)
            return
        # Autocommit mode (isolation_level=None): transactions are the explicit BEGINs below.
        self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                    check_same_thread=False)
        try:
            self.conn.execute("PRAGMA busy_timeout = 30000")
            # Switching a new file to WAL needs an exclusive lock, and SQLite does not wait for
            # it (no busy handler): stations opening a fresh database together retry it.
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    self.conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as err:
                    if "locked" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
            # Every commit on disk before it returns: a serial written to a board must never
            # be forgotten by a power cut (and given to the next board).
            self.conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            self.conn.close()
            raise

    @staticmethod
    def _open_read_only(path: str) -> sqlite3.Connection:
        """`mode=ro`: SQLite refuses every write. A WAL database (as stations leave it) needs
        its `-shm` file even to be read; in a directory we may not write, where no station
        has it open (which keeps a `-shm` there), SQLite cannot create one: such a file is
        read `immutable` (no locks; a station that opened it during the read would not be
        seen, as by any snapshot)."""
        uri = Path(path).absolute().as_uri()
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            conn = sqlite3.connect(uri + query, uri=True, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # reads the file
                return conn
            except sqlite3.OperationalError as err:
                conn.close()
                name = getattr(err, "sqlite_errorname", "")
                if "immutable" in query or not name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self, write: bool) -> Iterator[_Tx]:
        # BEGIN IMMEDIATE takes the write lock now (waiting up to the busy timeout for another
        # process's writer), so what the transaction reads cannot change before it writes.
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

        def tx(sql: str, params: Params = ()) -> list[Row]:
            return self.conn.execute(sql, tuple(params)).fetchall()

        try:
            yield tx
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the error that got us here is the one to report
            raise

    def has_table(self, tx: _Tx, name: str) -> bool:
        return bool(tx("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    def migration_lock(self, tx: _Tx) -> None:
        pass  # BEGIN IMMEDIATE

    def is_serial_conflict(self, err: BaseException) -> bool:
        return isinstance(err, sqlite3.IntegrityError) and "boards.serial" in str(err)

    def is_retryable(self, err: BaseException) -> bool:
        return False

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def ensure_connected(self) -> None:
        pass

    def close(self) -> None:
        self.conn.close()


def _redact(url: str) -> str:
    """The URL without its password (user:PASSWORD@ or ?password=), for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit(parts._replace(query=query))
    except ValueError:
        return "(the PostgreSQL URL given)"


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


CONNECT_TIMEOUT_S = 10
SILENT_PEER: tuple[tuple[str, int], ...] = (
    ("keepalives", 1), ("keepalives_idle", 10), ("keepalives_interval", 5), ("keepalives_count", 3),
    ("tcp_user_timeout", 30_000),  # milliseconds
)


class Postgres:
    """A PostgreSQL session through psycopg 3: the one-line hint when psycopg is missing, the
    password kept out of messages (`target`), reconnection after a cut. Public for the other
    records kept on PostgreSQL (`mpboot sync --log postgresql://...`, mpboot.sync)."""

    name = "postgresql"
    migrations = POSTGRES_MIGRATIONS
    for_update = " FOR UPDATE"

    def __init__(self, url: str, read_only: bool = False) -> None:
        try:
            import psycopg
            import psycopg.errors
        except ImportError:
            raise DatabaseError("PostgreSQL records need psycopg 3, which is not installed: "
                                "pip install 'mpboot[postgres]'") from None
        self.psycopg: Any = psycopg
        self.url = url
        self.target = _redact(url)
        self.read_only = read_only
        self.conn = self._connect()

    def _connect(self) -> Any:
        psycopg = self.psycopg
        extra: dict[str, object] = {}
        # Bounds for a network that goes silent (a station runs for hours): to connect, and
        # (TCP keepalives, tcp_user_timeout: data left unacknowledged) for a session whose
        # path stopped carrying packets, which would otherwise block a call for as long as the
        # kernel retransmits (about 15 minutes). Not bounded: a server whose kernel still
        # acknowledges while PostgreSQL itself hangs. A URL's own settings win.
        for name, value in (("connect_timeout", CONNECT_TIMEOUT_S), *SILENT_PEER):
            if name not in self.url:
                extra[name] = value
        try:
            conn = psycopg.connect(self.url, autocommit=True, **extra)
        except psycopg.Error as err:
            raise DatabaseError(f"cannot connect to PostgreSQL {self.target}: "
                                f"{_one_line(err)}") from None
        if self.read_only:
            try:  # every transaction of this session read-only: the server refuses writes
                conn.execute("SET default_transaction_read_only = on")
            except psycopg.Error as err:
                conn.close()
                raise DatabaseError(f"PostgreSQL {self.target}: cannot make the session read-only: "
                                    f"{_one_line(err)}") from None
        return conn

    def ensure_connected(self) -> None:
        # A station runs for hours: after a server restart or a network cut the connection is
        # broken, and the next call (not the one that failed) connects again.
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = self._connect()

    @contextmanager
    def transaction(self, write: bool) -> Iterator[_Tx]:
        with self.conn.transaction(), self.conn.cursor() as cur:
            def tx(sql: str, params: Params = ()) -> list[Row]:
                cur.execute(sql.replace("?", "%s"), tuple(params) if params else None)
                return cur.fetchall() if cur.description is not None else []

            yield tx

    def has_table(self, tx: _Tx, name: str) -> bool:
        return tx("SELECT to_regclass(?)", (name,))[0][0] is not None  # (on the search path)

    def migration_lock(self, tx: _Tx) -> None:
        tx("SELECT pg_advisory_xact_lock(?)", (_PG_MIGRATION_LOCK,))

    def is_serial_conflict(self, err: BaseException) -> bool:
        errors = self.psycopg.errors
        return (isinstance(err, errors.UniqueViolation)
                and getattr(err.diag, "table_name", None) == "boards"
                and "serial" in (getattr(err.diag, "constraint_name", None) or ""))

    def is_retryable(self, err: BaseException) -> bool:
        errors = self.psycopg.errors
        return isinstance(err, (errors.SerializationFailure, errors.DeadlockDetected))

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        return (self.psycopg.Error,)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def session(self, what: str) -> Iterator[_Tx]:
        """One transaction, after reconnecting when the connection broke; psycopg errors become
        one-line DatabaseErrors "WHAT: reason" (WHAT names the database: see `target`)."""
        try:
            self.ensure_connected()
            with self.transaction(write=True) as tx:
                yield tx
        except self.psycopg.Error as err:
            raise DatabaseError(f"{what}: {_one_line(err)}") from None


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


# --- the database ------------------------------------------------------------------------------


class _Conflict(Exception):
    """assign_serial: another station's transaction won (rolled back: try again)."""


class _Unset(Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET  # update(): "leave this column as it is"

_HEX_RE = re.compile(r"[0-9a-f]+")
_KEY_HASH_RE = re.compile(r"[0-9a-f]+(,[0-9a-f]+)*")


def _uid_hex(uid: bytes) -> str:
    if not isinstance(uid, (bytes, bytearray)):
        raise TypeError(f"uid must be bytes, not {type(uid).__name__}")
    if not uid:
        raise ValueError("uid is empty")
    return bytes(uid).hex()


def _labels_text(labels: Mapping[str, str] | None) -> str | None:
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a mapping of text to text (stored as a JSON object), "
                        f"not {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("labels map text to text")
    return json.dumps(dict(labels), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(text)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


_BOARD_SELECT = f"SELECT {', '.join(BOARD_COLUMNS)} FROM boards"
_AUDIT_SELECT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit"


def _board(row: Row) -> BoardRecord:
    d = dict(zip(BOARD_COLUMNS, row, strict=True))
    return BoardRecord(uid=bytes.fromhex(d["uid"]), serial=d["serial"], result=BoardResult(d["result"]),
                       key_hash=d["key_hash"], image_hash=d["image_hash"],
                       image_version=d["image_version"], station=d["station"],
                       operator=d["operator"], port=d["port"], labels=_labels(d["labels"]),
                       created_at=d["created_at"], updated_at=d["updated_at"],
                       provisioned_at=d["provisioned_at"], error=d["error"])


def _audit_entry(row: Row) -> AuditEntry:
    d = dict(zip(AUDIT_COLUMNS, row, strict=True))
    return AuditEntry(id=int(d["id"]), at=d["at"], station=d["station"], operator=d["operator"],
                      port=d["port"], uid=bytes.fromhex(d["uid"]) if d["uid"] else None,
                      serial=d["serial"], step=d["step"], outcome=AuditOutcome(d["outcome"]),
                      detail=d["detail"] or "")


class FactoryDB:
    """The factory records: `FactoryDB.open(path_or_url)`. Thread-safe: one lock around each
    call. Use as a context manager, or `close()` it."""

    def __init__(self, dialect: _Dialect, read_only: bool = False) -> None:
        """Use `FactoryDB.open`."""
        self._dialect: _Dialect | None = dialect
        self._lock = threading.RLock()
        self.target = dialect.target
        self.read_only = read_only

    @classmethod
    def open(cls, url: str, *, read_only: bool = False) -> FactoryDB:
        """A filesystem path (SQLite; the file is created) or `postgresql://...` /
        `postgres://...` (psycopg 3). Migrates the schema to the current version.
        DatabaseError (one line) when it cannot be opened, reached or migrated, and
        SchemaTooNew for a database of a newer mpboot.

        `read_only` (reports): nothing is written, ever (the file is not created; every write
        method raises DatabaseError); a schema older than this code is SchemaTooOld instead
        of being migrated."""
        if not isinstance(url, str) or not url:
            raise DatabaseError("no factory database given (a file path or postgresql://...)")
        dialect: _Dialect
        if is_postgres_url(url):
            dialect = Postgres(url, read_only)
        else:
            try:
                dialect = _SQLite(url, read_only)
            except sqlite3.Error as err:
                raise DatabaseError(f"cannot open the factory database {url}: "
                                    f"{_one_line(err)}") from None
        db = cls(dialect, read_only)
        try:
            if read_only:
                db._check_schema()
            else:
                db._migrate()
        except BaseException:
            dialect.close()
            raise
        return db

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._dialect is not None:
                self._dialect.close()
                self._dialect = None

    # -- plumbing --

    @contextmanager
    def _op(self, what: str, write: bool, conflicts: bool = False) -> Iterator[_Tx]:
        """One call: the lock, one transaction, driver errors made one-line DatabaseErrors.
        With `conflicts`, a UNIQUE violation on boards.serial or a serialization failure (the
        transaction was rolled back: try again) is a _Conflict."""
        with self._lock:
            dialect = self._dialect
            if dialect is None:
                raise DatabaseError(f"the factory database {self.target} is closed")
            if write and self.read_only:
                raise DatabaseError(f"factory database {self.target}: {what}: it is open read-only")
            try:
                dialect.ensure_connected()
                with dialect.transaction(write) as tx:
                    yield tx
            except dialect.driver_errors() as err:
                if conflicts and (dialect.is_serial_conflict(err) or dialect.is_retryable(err)):
                    raise _Conflict() from None
                raise DatabaseError(f"factory database {self.target}: {what}: "
                                    f"{_one_line(err)}") from None

    def _migrate(self) -> None:
        dialect = self._dialect
        assert dialect is not None
        with self._op("cannot migrate the schema", write=True) as tx:
            dialect.migration_lock(tx)
            tx(_SCHEMA_MIGRATIONS)
            applied = {int(v) for (v,) in tx("SELECT version FROM schema_migrations")}
            current = max(applied, default=0)
            self._refuse_newer(current)
            for version, statements in enumerate(dialect.migrations, 1):
                if version in applied:
                    continue
                for statement in statements:
                    tx(statement)
                tx("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                   (version, utc_now()))

    def _refuse_newer(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the factory database {self.target} has schema version {current}, newer "
                f"than this mpboot knows ({SCHEMA_VERSION}): upgrade mpboot")

    def _check_schema(self) -> None:
        """Read-only: the schema must be the one this code reads; nothing is migrated."""
        dialect = self._dialect
        assert dialect is not None
        with self._op("cannot read the schema version", write=False) as tx:
            if not dialect.has_table(tx, "schema_migrations"):
                raise DatabaseError(f"{self.target} holds no factory records (no schema_migrations "
                                    "table): not a database of mpboot provision")
            current = int(tx("SELECT MAX(version) FROM schema_migrations")[0][0] or 0)
        self._refuse_newer(current)
        if current < SCHEMA_VERSION:
            raise SchemaTooOld(
                f"the factory database {self.target} has schema version {current}, older than "
                f"this mpboot's ({SCHEMA_VERSION}): opened read-only, it is not migrated (a "
                "station with this mpboot migrates it when it opens it)")

    # -- API --

    def schema_version(self) -> int:
        with self._op("cannot read the schema version", write=False) as tx:
            rows = tx("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)

    def board(self, uid: bytes) -> BoardRecord | None:
        key = _uid_hex(uid)
        with self._op("cannot read a board", write=False) as tx:
            rows = tx(f"{_BOARD_SELECT} WHERE uid = ?", (key,))
        return _board(rows[0]) if rows else None

    def start(self, uid: bytes, *, station: str, operator: str, port: str) -> BoardRecord:
        """Records an attempt on a board: a new board is inserted (in-progress); a known one
        gets this station, operator, port and updated_at (its result and serial are kept)."""
        key = _uid_hex(uid)
        now = utc_now()
        with self._op("cannot record a board", write=True) as tx:
            tx("INSERT INTO boards (uid, result, station, operator, port, created_at, updated_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO UPDATE SET "
               "station = excluded.station, operator = excluded.operator, port = excluded.port, "
               "updated_at = excluded.updated_at",
               (key, BoardResult.IN_PROGRESS.value, station, operator, port, now, now))
            rows = tx(f"{_BOARD_SELECT} WHERE uid = ?", (key,))
        return _board(rows[0])

    def assign_serial(self, uid: bytes, source: SerialSource) -> str:
        """The board's serial: the one it has, else the next free one from `source` (given to
        it in the same transaction). The board must have been `start`ed. SerialsExhausted
        when the source has none left."""
        key = _uid_hex(uid)
        if not isinstance(source, (SerialList, SerialPrefix)):
            raise TypeError(f"not a serial source: {source!r}")
        for _ in range(_SERIAL_TRIES):
            try:
                with self._op("cannot assign a serial", write=True, conflicts=True) as tx:
                    rows = tx(f"SELECT serial FROM boards WHERE uid = ?{self._for_update()}",
                              (key,))
                    if not rows:
                        raise DatabaseError(f"board {key} is not in the records (start it first)")
                    if rows[0][0] is not None:
                        return str(rows[0][0])
                    serial = self._next_serial(tx, source)
                    tx("UPDATE boards SET serial = ?, updated_at = ? WHERE uid = ?",
                       (serial, utc_now(), key))
                    return serial
            except _Conflict:
                continue  # another station took that serial between our read and our write
        raise DatabaseError(f"factory database {self.target}: could not assign a serial to "
                            f"board {key}: {_SERIAL_TRIES} conflicts with other stations")

    def _for_update(self) -> str:
        return self._dialect.for_update if self._dialect is not None else ""

    def _next_serial(self, tx: _Tx, source: SerialList | SerialPrefix) -> str:
        if isinstance(source, SerialList):
            used = {row[0] for row in tx("SELECT serial FROM boards WHERE serial IS NOT NULL")}
            for serial in source.serials:
                if serial not in used:
                    return serial
            raise SerialsExhausted(f"no serials left in {source.origin} (all "
                                   f"{len(source.serials)} are taken)")
        width = len(source.prefix) + PREFIX_DIGITS
        rows = tx("SELECT serial FROM boards WHERE length(serial) = ? AND substr(serial, 1, ?) = ?",
                  (width, len(source.prefix), source.prefix))
        numbers = [n for (s,) in rows if (n := source.number(s)) is not None]
        following = max(numbers, default=0) + 1
        if following >= 10**PREFIX_DIGITS:
            raise SerialsExhausted(f"no serials left with prefix {source.prefix!r} "
                                   f"({source.serial(10**PREFIX_DIGITS - 1)} is taken)")
        return source.serial(following)

    def update(self, uid: bytes, *,
               result: BoardResult | str | _Unset = UNSET,
               key_hash: str | None | _Unset = UNSET,
               image_hash: str | None | _Unset = UNSET,
               image_version: str | None | _Unset = UNSET,
               labels: Mapping[str, str] | None | _Unset = UNSET,
               error: str | None | _Unset = UNSET,
               provisioned_at: datetime | str | None | _Unset = UNSET) -> None:
        """Sets the given columns (and updated_at) of a started board; the others are kept.
        key_hash: lower-case hex, comma-separated; image_hash: lower-case hex; labels: a
        mapping (stored as a JSON object); provisioned_at: an aware datetime or ISO 8601 text
        with a time zone (stored as UTC, like `utc_now()`)."""
        key = _uid_hex(uid)
        sets: dict[str, object] = {}
        if not isinstance(result, _Unset):
            sets["result"] = BoardResult(result).value
        if not isinstance(key_hash, _Unset):
            if key_hash is not None and not _KEY_HASH_RE.fullmatch(key_hash):
                raise ValueError(f"key_hash must be lower-case hex, comma-separated: {key_hash!r}")
            sets["key_hash"] = key_hash
        if not isinstance(image_hash, _Unset):
            if image_hash is not None and not _HEX_RE.fullmatch(image_hash):
                raise ValueError(f"image_hash must be lower-case hex: {image_hash!r}")
            sets["image_hash"] = image_hash
        if not isinstance(image_version, _Unset):
            sets["image_version"] = image_version
        if not isinstance(labels, _Unset):
            sets["labels"] = _labels_text(labels)
        if not isinstance(error, _Unset):
            sets["error"] = error
        if not isinstance(provisioned_at, _Unset):
            sets["provisioned_at"] = None if provisioned_at is None else _iso(provisioned_at)
        sets["updated_at"] = utc_now()
        assignments = ", ".join(f"{column} = ?" for column in sets)
        with self._op("cannot update a board", write=True) as tx:
            if not tx("SELECT uid FROM boards WHERE uid = ?", (key,)):
                raise DatabaseError(f"board {key} is not in the records (start it first)")
            tx(f"UPDATE boards SET {assignments} WHERE uid = ?", (*sets.values(), key))

    def audit(self, *, step: Step | str, outcome: AuditOutcome | str, uid: bytes | None,
              serial: str | None, station: str, operator: str, port: str,
              detail: str = "") -> None:
        """Appends one audit row (now)."""
        row = (utc_now(), station, operator, port, None if uid is None else _uid_hex(uid), serial,
               Step(step).value, AuditOutcome(outcome).value, detail or None)
        with self._op("cannot append to the audit log", write=True) as tx:
            tx("INSERT INTO audit (at, station, operator, port, uid, serial, step, outcome, detail) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def boards(self) -> list[BoardRecord]:
        """Every board, first seen first."""
        with self._op("cannot read the boards", write=False) as tx:
            rows = tx(f"{_BOARD_SELECT} ORDER BY created_at, uid")
        return [_board(row) for row in rows]

    def audit_log(self, uid: bytes | None = None) -> list[AuditEntry]:
        """The audit rows (of one board, or all), oldest first."""
        with self._op("cannot read the audit log", write=False) as tx:
            if uid is None:
                rows = tx(f"{_AUDIT_SELECT} ORDER BY id")
            else:
                rows = tx(f"{_AUDIT_SELECT} WHERE uid = ? ORDER BY id", (_uid_hex(uid),))
        return [_audit_entry(row) for row in rows]


# --- reports -----------------------------------------------------------------------------------

ReportRow: TypeAlias = dict[str, object]


def report_rows(db: FactoryDB) -> list[ReportRow]:
    """One dict per board, keys in the schema's column order (BOARD_COLUMNS): uid in hex,
    labels a dict (None when none), the other values text or None as stored."""
    rows: list[ReportRow] = []
    for b in db.boards():
        rows.append({"uid": b.uid.hex(), "serial": b.serial, "result": b.result.value,
                     "key_hash": b.key_hash, "image_hash": b.image_hash,
                     "image_version": b.image_version, "station": b.station,
                     "operator": b.operator, "port": b.port, "labels": b.labels or None,
                     "created_at": b.created_at, "updated_at": b.updated_at,
                     "provisioned_at": b.provisioned_at, "error": b.error})
    return rows


def _columns(rows: Sequence[Mapping[str, object]]) -> list[str]:
    return list(rows[0]) if rows else list(BOARD_COLUMNS)


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def write_csv(rows: Sequence[Mapping[str, object]], out: TextIO) -> None:
    """A header line (the columns), then one line per row; None is empty, labels JSON text."""
    columns = _columns(rows)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])


def write_json(rows: Sequence[Mapping[str, object]], out: TextIO) -> None:
    """A JSON list of objects (keys in column order), then a newline."""
    json.dump([dict(row) for row in rows], out, indent=2, ensure_ascii=False)
    out.write("\n")


__all__ = [
    "AUDIT_COLUMNS", "BOARD_COLUMNS", "SCHEMA_VERSION", "UNSET", "AuditEntry", "AuditOutcome",
    "BoardRecord", "BoardResult", "FactoryDB", "Postgres", "SerialList", "SerialPrefix", "SerialSource", "Step",
    "is_postgres_url", "report_rows", "serial_list_from_file", "serial_problem", "utc_now",
    "write_csv", "write_json",
]
