"""`mpboot sync`: the phone-style fleet tool.

Devices in the field are mostly out of reach; now and then one comes within range of a phone
or a gateway. Each pass scans for devices advertising the SMP service and, for each one found
(up to `max_parallel` at once): reads who it is (mpboot group 64: vendor/class id, counter
floor) and what it runs (image state); picks the newest image of the repository the device
will accept; uploads it (the device resumes a partial upload from an earlier meeting, also
after it rebooted: the session is persisted); marks it for a test boot; resets; reconnects;
and waits for the new app to confirm itself. A device already current costs a connection and
two reads. Every attempt is recorded (JSON lines, SQLite, or a PostgreSQL table that stations
share) and each pass ends with a summary.

Results: `updated` (the new image runs, confirmed), `current` (it runs the newest image in the
repository for it), `ahead` (it runs a version newer than every image in the repository for
it), `held` (the newest image for it reverted on it before: not sent again until a newer one
appears), `reverted` (the new image did not confirm itself: the device went back to the old
one, or was reset back to it when it did not confirm in time), `no-image` (nothing in the
repository fits this device), `failed` (the link or the device failed; the next meeting
resumes). `exit_status` sums a pass up: 1 when an attempt failed or reverted, else 0.

Images come from an ImageSource: a directory of signed images (DirSource, load_repo), or a
TUF repository through mirrors (mpboot.tufsource.TufSource: `mpboot sync --repo URL`), which
refreshes its metadata at the start of each pass and downloads only the image it sends.

Which image reverted on which device (by uid and image hash) is remembered for the life of a
Syncer (the passes of `--loop`) and, with a log, across runs: `AttemptLog.reverted` reads it
back.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from mpboot.errors import (
    DatabaseError,
    ImageRejected,
    LinkError,
    MpbootError,
    PortError,
    SMPError,
    UsageError,
    reason,
)
from mpboot.factory.db import Postgres, is_postgres_url
from mpboot.flashing import Mark, PreparedImage, flash_with_retries, prepare
from mpboot.image import ImageKind, TlvType
from mpboot.smp.client import SMPClient
from mpboot.smp.messages import DeviceInfo, SlotState
from mpboot.transport import Transport

IMAGE_SUFFIXES = (".img", ".bin", ".signed")
RESUME_MIN = 4096  # an opening reply above this is a resumed session, not the first chunk's end


class SyncResult(StrEnum):
    UPDATED = "updated"
    CURRENT = "current"
    AHEAD = "ahead"  # runs a version newer than anything in the repository for it
    HELD = "held"  # the image it would get reverted on it before: waiting for a newer one
    REVERTED = "reverted"
    NO_IMAGE = "no-image"
    DUPLICATE = "duplicate"  # the same device (uid) met at another address in this pass: left to it
    FAILED = "failed"


FAILURES = frozenset({SyncResult.REVERTED, SyncResult.FAILED})  # what makes a pass's exit status 1


@dataclass(frozen=True)
class Found:
    """A device seen advertising the SMP service."""

    name: str
    address: str
    rssi: int | None = None


class Radio(Protocol):
    """How sync reaches devices: a scan, and a transport to one of them."""

    async def scan(self, seconds: float) -> list[Found]: ...

    def transport(self, address: str) -> Transport: ...


# --- the repository ----------------------------------------------------------------------------


def _version_key(text: str) -> tuple[int, ...]:
    """A device's version string ("1.2.3", "1.2.3.4") as a comparable tuple."""
    parts = []
    for p in text.split("."):
        try:
            parts.append(int(p))
        except ValueError:
            return (-1,)
    return tuple(parts + [0] * (4 - len(parts)))


class ImageFacts:
    """What `plan` and the log need of an image, without its bytes: an image of a directory
    (RepoImage) or a target of a TUF repository (mpboot.tufsource.TufImage). Subclasses
    provide the attributes below."""

    vendor_id: bytes | None
    class_id: bytes | None
    counter: int  # SEC_CNT (0 when absent)

    @property
    def name(self) -> str:  # what the log and the lines call it
        raise NotImplementedError

    @property
    def hash(self) -> bytes | None:  # its SHA256 TLV: how the device names images
        raise NotImplementedError

    @property
    def key(self) -> tuple[int, ...]:  # (major, minor, revision, build)
        raise NotImplementedError

    @property
    def version(self) -> str:
        """As the device writes it in image state: "a.b.c", ".build" appended when non-zero."""
        major, minor, revision, build = self.key
        return f"{major}.{minor}.{revision}" + (f".{build}" if build else "")

    def meant_for(self, info: DeviceInfo) -> bool:
        """Its vendor and class are the device's (where the device checks them)."""
        if info.vendor_id is not None and self.vendor_id != info.vendor_id:
            return False
        return info.class_id is None or self.class_id == info.class_id

    def fits(self, info: DeviceInfo) -> bool:
        """The device would take it: meant for it, with a security counter not below the
        device's floor."""
        return self.meant_for(info) and self.counter >= info.floor


@dataclass(frozen=True)
class RepoImage(ImageFacts):
    """A signed image of a directory (load_repo), read whole."""

    path: Path
    image: PreparedImage
    vendor_id: bytes | None
    class_id: bytes | None
    counter: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hash(self) -> bytes | None:
        return self.image.hash

    @property
    def key(self) -> tuple[int, ...]:
        v = self.image.parsed.header.version
        return (v.major, v.minor, v.revision, v.build)


def load_repo(directory: Path) -> tuple[list[RepoImage], list[str]]:
    """The signed images in `directory` (by suffix), and a line per file skipped and why."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory of signed images")
    images: list[RepoImage] = []
    skipped: list[str] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix not in IMAGE_SUFFIXES:
            continue
        try:
            img = prepare(path.read_bytes())
        except ImageRejected as err:
            skipped.append(f"{path.name}: {err}")
            continue
        if img.hash is None:
            skipped.append(f"{path.name}: no SHA256 TLV (the device names images by it)")
            continue
        if img.parsed.kind != ImageKind.APP:
            skipped.append(f"{path.name}: not an app (MPBOOT_KIND {img.parsed.kind}): the app's slots refuse it")
            continue
        tlv = {t.type: t.value for t in img.parsed.protected}
        sec = tlv.get(TlvType.SEC_CNT)
        images.append(RepoImage(path, img, tlv.get(TlvType.UUID_VID), tlv.get(TlvType.UUID_CID),
                                int.from_bytes(sec, "little") if sec else 0))
    return images, skipped


def choose(repo: Sequence[ImageFacts], info: DeviceInfo, running: SlotState | None) -> ImageFacts | None:
    """The newest image the device accepts, if it is newer than what runs (by version; an
    image with the running image's hash is never sent again)."""
    fitting = [r for r in repo if r.fits(info)]
    if not fitting:
        return None
    best = max(fitting, key=lambda r: r.key)
    if running is not None and (best.hash == running.hash
                                or best.key <= _version_key(running.version)):
        return None
    return best


@dataclass(frozen=True)
class Plan:
    """What a meeting does: send `image` (`result` None), or nothing, with the result and a
    note saying why (`image` then names the image held back, if any)."""

    image: ImageFacts | None
    result: SyncResult | None
    note: str | None = None


def plan(repo: Sequence[ImageFacts], info: DeviceInfo, running: SlotState | None,
         reverted: frozenset[bytes] = frozenset()) -> Plan:
    """What to do with a device running `running` (confirmed, or nothing): the newest image
    that fits it (`choose`) unless its hash is in `reverted` (it reverted on this device
    before: held, with no fall back to an older image); else why nothing is sent."""
    best = choose(repo, info, running)
    if best is not None:
        if best.hash in reverted:
            return Plan(best, SyncResult.HELD, f"{best.version} reverted on this device before; waiting for a newer image")
        return Plan(best, None)
    mine = [r for r in repo if r.meant_for(info)]
    if not mine:
        return Plan(None, SyncResult.NO_IMAGE, "nothing in the repository is for this device's vendor and class")
    newest = max(mine, key=lambda r: r.key)
    if running is not None and _version_key(running.version) > newest.key and all(
            r.hash != running.hash for r in mine):
        return Plan(None, SyncResult.AHEAD, f"runs {running.version}, newer than anything in the repository "
                                        f"for it (newest {newest.version})")
    if not any(r.fits(info) for r in mine):
        return Plan(None, SyncResult.NO_IMAGE, f"every image for this device is below its security-counter "
                                           f"floor {info.floor}")
    return Plan(None, SyncResult.CURRENT)


class NothingFor(Exception):
    """An image source has nothing for this device, and says why (the attempt's note: result
    no-image)."""


class ImageSource(Protocol):
    """Where a Syncer's images come from: a directory (DirSource) or a TUF repository
    (mpboot.tufsource.TufSource). Its methods block (the Syncer runs them in a thread); its
    errors are MpbootErrors."""

    def begin_pass(self) -> None:
        """At the start of each pass, before the scan (a TUF repository refreshes its
        metadata here: an error ends the pass before any device is met)."""

    def candidates(self, info: DeviceInfo) -> Sequence[ImageFacts]:
        """The images that may be meant for this device (`plan` picks); NothingFor when the
        source has nothing for it by rule."""

    def load(self, image: ImageFacts) -> PreparedImage:
        """The image's bytes, checked (a TUF target: downloaded and verified), before any of
        them is sent."""


class DirSource:
    """The images of a directory, read once (load_repo): what `mpboot sync REPO_DIR` uses."""

    def __init__(self, images: Sequence[RepoImage]) -> None:
        self.images = list(images)

    def begin_pass(self) -> None:
        pass

    def candidates(self, info: DeviceInfo) -> Sequence[ImageFacts]:
        return self.images

    def load(self, image: ImageFacts) -> PreparedImage:
        assert isinstance(image, RepoImage)
        return image.image


class Reverted:
    """Which images (by hash) reverted on which devices (by uid, hex): `plan` holds them back.
    An image that later ran confirmed on the device (updated) is forgotten."""

    def __init__(self) -> None:
        self._on: dict[str, set[bytes]] = {}

    def learn(self, uid: object, image_hash: object, result: object) -> None:
        """One attempt's outcome (uid and image hash in hex, as the log holds them)."""
        if not isinstance(uid, str) or not isinstance(image_hash, str):
            return  # (a record from before logs had image hashes: nothing to hold)
        try:
            digest = bytes.fromhex(image_hash)
        except ValueError:
            return  # (edited by hand)
        if result == SyncResult.REVERTED:
            self._on.setdefault(uid, set()).add(digest)
        elif result == SyncResult.UPDATED:
            self._on.get(uid, set()).discard(digest)

    def on(self, uid: str) -> frozenset[bytes]:
        return frozenset(self._on.get(uid, ()))


# --- the log -----------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One meeting with one device."""

    pass_no: int
    device: str  # advertised name
    address: str
    uid: str | None = None  # hex
    serial: str | None = None  # the serial the factory gave it (group 64), if provisioned
    root_version: int | None = None  # its trust state (docs/KEYS.md): root set version...
    revocation: int | None = None  # ...and revocation number (None: a device that does not say)
    from_version: str | None = None
    to_version: str | None = None
    image: str | None = None  # file name in the repository
    image_hash: str | None = None  # hex: SHA256 TLV of that image (what reverted memory keys on)
    bytes: int = 0  # image bytes sent in this attempt (what earlier meetings sent excluded)
    resumed_from: int = 0  # the offset the device's persisted upload was at
    reconnects: int = 0  # links lost and re-established during the attempt
    result: SyncResult = SyncResult.FAILED
    error: str | None = None
    note: str | None = None  # why nothing was sent (held, ahead, no-image), when it is no error
    started: float = field(default_factory=time.time)  # Unix time
    seconds: float = 0.0

    def record(self) -> dict[str, object]:
        d = asdict(self)
        d["result"] = str(self.result)
        return d


_COLUMNS = ("pass_no", "device", "address", "uid", "serial", "root_version", "revocation", "from_version",
            "to_version", "image", "image_hash", "bytes", "resumed_from", "reconnects", "result", "error", "note",
            "started", "seconds")
# Columns later than the first logs, with their types (added to an older SQLite log when it is opened).
_ADDED_COLUMNS = {"serial": "TEXT", "image_hash": "TEXT", "note": "TEXT", "root_version": "INTEGER",
                  "revocation": "INTEGER"}

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    pass_no INTEGER NOT NULL,
    device TEXT NOT NULL,
    address TEXT NOT NULL,
    uid TEXT,
    serial TEXT,
    root_version INTEGER,
    revocation INTEGER,
    from_version TEXT,
    to_version TEXT,
    image TEXT,
    image_hash TEXT,
    bytes INTEGER NOT NULL,
    resumed_from INTEGER NOT NULL,
    reconnects INTEGER NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    note TEXT,
    started REAL NOT NULL,
    seconds REAL NOT NULL
)
"""


# The same table on PostgreSQL (`--log postgresql://...`: stations sharing one database). Integers
# are BIGINT and reals DOUBLE PRECISION, as wide as SQLite's (a Unix time in PostgreSQL's 4-byte
# REAL would lose its seconds).
POSTGRES_SCHEMA = (SQLITE_SCHEMA.replace("CREATE TABLE IF NOT EXISTS", "CREATE TABLE")
                   .replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY")
                   .replace(" INTEGER", " BIGINT").replace(" REAL", " DOUBLE PRECISION"))
_POSTGRES_TYPES = {"TEXT": "TEXT", "INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION"}
# The advisory lock that makes stations opening one new database create (or extend) the table
# one after the other (an arbitrary constant: "mpbL").
_POSTGRES_LOG_LOCK = 0x6D70624C


class AttemptLog:
    """Where attempts go: SQLite for a `.sqlite`/`.db` path, the `attempts` table of a
    PostgreSQL database for a `postgresql://...` / `postgres://...` URL (stations sharing one
    database share what reverted where), JSON lines otherwise (appended)."""

    def __init__(self, path: Path | str | None) -> None:
        """Opens (creates) the log now, so a bad path or URL, an unreachable server or a refused
        login is an error (one line, exit 2) before any device."""
        self.path: Path | None = None
        self.target = ""  # for messages: the path, or the URL without its password
        self._db: sqlite3.Connection | None = None
        self._pg: Postgres | None = None
        self._pg_read = 0  # the newest row id reverted() / learn_newer() read
        if path is None:
            return
        if isinstance(path, str) and is_postgres_url(path):
            self._pg = self._open_postgres(path)
            self.target = self._pg.target
            return
        self.path = path = Path(path)
        self.target = str(path)
        try:
            if path.suffix in (".sqlite", ".sqlite3", ".db"):
                self._db = sqlite3.connect(path)
                self._db.execute(SQLITE_SCHEMA)
                have = {row[1] for row in self._db.execute("PRAGMA table_info(attempts)")}
                for column, kind in _ADDED_COLUMNS.items():
                    if column not in have:  # a log written before this column
                        self._db.execute(f"ALTER TABLE attempts ADD COLUMN {column} {kind}")
                self._db.commit()
            else:
                with open(path, "ab+") as f:
                    if f.tell() > 0:
                        f.seek(-1, 2)
                        if f.read(1) != b"\n":
                            f.write(b"\n")  # a run killed mid-line: the next record starts afresh
        except (OSError, sqlite3.Error) as err:
            raise UsageError(f"--log {path}: cannot use it: {reason(err)}") from None

    @staticmethod
    def _open_postgres(url: str) -> Postgres:
        """Connects, and creates the table (or adds the columns an older mpboot did not write)
        only when it must: a station's role that may only SELECT and INSERT on an existing,
        current table is enough."""
        try:
            pg = Postgres(url)
        except DatabaseError as err:  # psycopg missing, or no connection: one line
            raise DatabaseError(f"--log: {err}") from None
        try:
            with pg.session(f"--log {pg.target}: cannot use it") as tx:
                tx("SELECT pg_advisory_xact_lock(?)", (_POSTGRES_LOG_LOCK,))
                if not pg.has_table(tx, "attempts"):
                    tx(POSTGRES_SCHEMA)
                have = {name for (name,) in tx(
                    "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('attempts') "
                    "AND attnum > 0 AND NOT attisdropped")}
                for column, kind in _ADDED_COLUMNS.items():
                    if column not in have:  # a table written before this column
                        tx(f"ALTER TABLE attempts ADD COLUMN {column} {_POSTGRES_TYPES[kind]}")
        except BaseException:
            pg.close()
            raise
        return pg

    def reverted(self) -> Reverted:
        """What the log says reverted where (records oldest first; lines that are not JSON,
        and records without an image hash, are skipped). On PostgreSQL: at every station that
        logs to the same database."""
        memory = Reverted()
        query = ("SELECT uid, image_hash, result FROM attempts WHERE result IN (?, ?) "
                 "AND image_hash IS NOT NULL ORDER BY id")
        params = (SyncResult.REVERTED.value, SyncResult.UPDATED.value)
        if self._pg is not None:
            self.learn_newer(memory)
            return memory
        if self.path is None:
            return memory
        try:
            if self._db is not None:
                for uid, image_hash, result in self._db.execute(query, params):
                    memory.learn(uid, image_hash, result)
                return memory
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if '"image_hash"' not in line:
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict):
                        memory.learn(rec.get("uid"), rec.get("image_hash"), rec.get("result"))
        except (OSError, sqlite3.Error, ValueError) as err:
            raise UsageError(f"--log {self.path}: cannot read it: {reason(err)}") from None
        return memory

    def learn_newer(self, memory: Reverted) -> None:
        """On PostgreSQL: teaches `memory` the reverts and updates recorded (by any station)
        since the last read, in order. Other logs are this station's own: nothing to learn."""
        if self._pg is None:
            return
        rows = self._postgres(f"--log {self.target}: cannot read it",
                              "SELECT id, uid, image_hash, result FROM attempts WHERE id > ? AND result IN (?, ?) "
                              "AND image_hash IS NOT NULL ORDER BY id",
                              (self._pg_read, SyncResult.REVERTED.value, SyncResult.UPDATED.value))
        for row_id, uid, image_hash, result in rows:
            memory.learn(uid, image_hash, result)
            self._pg_read = max(self._pg_read, row_id)

    def write(self, attempt: Attempt) -> None:
        """Appends one record. On PostgreSQL a failure (after one reconnection) is a
        DatabaseError, one line."""
        rec = attempt.record()
        insert = f"INSERT INTO attempts ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
        if self._pg is not None:
            self._postgres(f"--log {self.target}: cannot record an attempt", insert, [rec[c] for c in _COLUMNS])
            return
        if self.path is None:
            return
        if self._db is not None:
            self._db.execute(insert, [rec[c] for c in _COLUMNS])
            self._db.commit()
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")

    def _postgres(self, what: str, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        """One statement in its own transaction. A connection found cut (a server restart, a
        network cut since the last call) is reconnected and the statement tried once more: a
        station that runs for hours does not stop for one cut."""
        assert self._pg is not None
        for last in (False, True):
            try:
                with self._pg.session(what) as tx:
                    return tx(sql, params)
            except DatabaseError as err:
                conn = self._pg.conn
                if last or not (conn.closed or conn.broken):
                    if str(err).startswith("--log"):
                        raise
                    raise DatabaseError(f"--log: {err}") from None  # (it could not connect again)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._pg is not None:
            self._pg.close()
            self._pg = None


# --- the sync ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncOptions:
    scan_seconds: float = 5.0
    max_parallel: int = 2
    retries: int = 5  # links lost per attempt that are reconnected and resumed
    timeout: float = 5.0  # SMP reply timeout
    confirm_timeout: float = 30.0  # for the new app to confirm itself after the reset
    reconnect_timeout: float = 20.0  # to find the device again after a reset or a lost link
    window: int | None = None


Event = Callable[[Attempt, str], None]  # progress lines for people: (attempt, text)


class _Lost(LinkError):
    """The device did not come back within the reconnect timeout."""


class Syncer:
    def __init__(self, repo: Sequence[RepoImage] | ImageSource, radio: Radio, options: SyncOptions = SyncOptions(),
                 log: AttemptLog | None = None, event: Event | None = None) -> None:
        """`repo`: the images of a directory (load_repo), or an ImageSource."""
        self.source: ImageSource = DirSource(repo) if isinstance(repo, Sequence) else repo
        self.radio = radio
        self.opt = options
        self.log = log or AttemptLog(None)
        self.event = event or (lambda a, text: None)
        self.passes = 0
        self.reverted = self.log.reverted()  # outlives passes; with a log, runs
        self._meeting: dict[str, str] = {}  # uid (hex) -> the address it is being updated through

    async def run_pass(self) -> list[Attempt]:
        """One scan, then every device found, `max_parallel` at a time. The image source
        begins the pass first: its error (a TUF repository refused or unreachable) ends the
        pass before the scan, with no device met."""
        self.passes += 1
        self._meeting.clear()
        if self.passes > 1:
            # Stations sharing a database learn each other's reverts between passes of --loop:
            # the rows written since the last read (this station's too, harmlessly), on top
            # of what this one remembers (a pruned table forgets nothing here).
            self.log.learn_newer(self.reverted)
        await asyncio.to_thread(self.source.begin_pass)
        found = await self.radio.scan(self.opt.scan_seconds)
        gate = asyncio.Semaphore(max(1, self.opt.max_parallel))

        async def one(dev: Found) -> Attempt:
            async with gate:
                return await self.sync_device(dev)

        return list(await asyncio.gather(*(one(d) for d in found)))

    async def sync_device(self, dev: Found) -> Attempt:
        a = Attempt(self.passes, dev.name, dev.address)
        t0 = time.monotonic()
        try:
            await self._sync(dev, a)
        except (MpbootError, SMPError) as err:
            a.result = SyncResult.FAILED
            a.error = str(err) or type(err).__name__
        a.seconds = round(time.monotonic() - t0, 3)
        why = a.error or a.note
        self.event(a, f"{a.result}" + (f": {why}" if why else ""))
        self.reverted.learn(a.uid, a.image_hash, a.result)
        self.log.write(a)
        return a

    # -- steps --

    def _client(self, dev: Found) -> SMPClient:
        return SMPClient(self.radio.transport(dev.address), timeout=self.opt.timeout)

    async def _sync(self, dev: Found, a: Attempt) -> None:
        async with self._client(dev) as client:
            info = await client.device_info()
            slots = await client.state()
        a.uid = info.uid.hex()
        a.serial = info.serial
        other = self._meeting.setdefault(a.uid, dev.address)
        if other != dev.address:
            # Two attempts on one board would share its one upload session and reset each
            # other. The same host at two addresses (a hostname and its IP) is one board met
            # twice; two hosts reporting one uid is a conflict the operator must see (a clone,
            # or a device claiming another's identity to keep it from being updated).
            if await asyncio.to_thread(same_host, other, dev.address):
                a.result, a.note = SyncResult.DUPLICATE, f"the same device as {other}: met through that address"
            else:
                a.result = SyncResult.FAILED
                a.error = (f"{other} reports the same uid {a.uid}: two devices claiming one identity; "
                           "not updated through this address")
            return
        a.root_version, a.revocation = info.root_version, info.revocation
        running = next((s for s in slots if s.active), None)
        a.from_version = running.version if running else None
        if running is not None and not running.confirmed:
            # Met on a test boot (a previous meeting reset it and lost the link): see it through.
            target = await self._named(info, running.hash)
            a.to_version = running.version
            a.image = target.name if target else None
            a.image_hash = running.hash.hex()
            old = next((s for s in slots if not s.active and s.confirmed), None)
            a.from_version = old.version if old else None
            await self._await_confirm(dev, a, running.hash, old.hash if old else None)
            return
        try:
            offered = await asyncio.to_thread(self.source.candidates, info)
        except NothingFor as why:
            a.result, a.note = SyncResult.NO_IMAGE, str(why)
            return
        p = plan(offered, info, running, self.reverted.on(a.uid))
        choice = p.image
        if choice is not None:
            a.to_version, a.image = choice.version, choice.name
            a.image_hash = choice.hash.hex() if choice.hash else None
        if p.result is not None:
            a.result, a.note = p.result, p.note
            return
        assert choice is not None  # (a plan without a result sends an image)
        self.event(a, f"{a.from_version or 'nothing'} -> {choice.version} ({choice.name})")
        await self._upload(dev, a, choice)
        await self._await_confirm(dev, a, choice.hash, running.hash if running else None)

    async def _named(self, info: DeviceInfo, image_hash: bytes) -> ImageFacts | None:
        """The source's image with this hash, if it can say (for the log only)."""
        try:
            offered = await asyncio.to_thread(self.source.candidates, info)
        except (NothingFor, MpbootError):
            return None
        return next((r for r in offered if r.hash == image_hash), None)

    async def _upload(self, dev: Found, a: Attempt, choice: ImageFacts) -> None:
        """Load the image from the source (an error: nothing is sent), then upload, mark for
        test and reset, reconnecting and resuming after lost links
        (mpboot.flashing.flash_with_retries)."""
        img = await asyncio.to_thread(self.source.load, choice)
        acked: list[int] = []

        def progress(done: int, total: int) -> None:
            acked.append(done)

        def on_retry(n: int, err: Exception) -> None:
            a.reconnects = n
            self.event(a, f"link lost ({err}); reconnecting ({n}/{self.opt.retries})")

        done = None
        try:
            done = await flash_with_retries(lambda: self._client(dev), img, retries=self.opt.retries,
                                            mark=Mark.TEST, reset=True, progress=progress,
                                            window=self.opt.window, on_retry=on_retry)
        finally:
            if done is not None and done.upload is None:  # the device held it already
                a.bytes = 0
            elif done is not None and done.reconnects == 0:  # one connection: the device said
                a.resumed_from = done.upload.resumed_from
                a.bytes = done.upload.size - a.resumed_from
            elif acked:
                # The first reply answers the opening request: the offset a persisted session
                # resumed at (checkpoints are 32 KiB apart), or just the first chunk's end.
                a.resumed_from = acked[0] if acked[0] > RESUME_MIN else 0
                a.bytes = max(acked) - a.resumed_from

    async def _wait_seen(self, dev: Found) -> None:
        """Until the device advertises again (after a reset or a lost link)."""
        deadline = time.monotonic() + self.opt.reconnect_timeout
        one = getattr(self.radio, "seen", None)  # a radio that can look for one device alone
        while time.monotonic() < deadline:
            wait = min(2.0, max(0.5, deadline - time.monotonic()))
            if one is not None:
                t0 = time.monotonic()
                if await one(dev.address, wait):
                    return
                # (an address that fails at once, one that no longer resolves: not a busy loop)
                await asyncio.sleep(max(0.0, min(wait, UdpRadio.PROBE_S) - (time.monotonic() - t0)))
                continue
            seen = await self.radio.scan(wait)
            if any(f.address == dev.address for f in seen):
                return
        raise _Lost(f"{dev.name} did not come back within {self.opt.reconnect_timeout:.0f} s")

    async def _state(self, dev: Found) -> list[SlotState]:
        async with self._client(dev) as client:
            return await client.state()

    async def _await_confirm(self, dev: Found, a: Attempt, new: bytes | None, old: bytes | None) -> None:
        """After the reset: the new image runs confirmed (updated), or the old one runs again
        (reverted). An app that does not confirm itself in time is reset back to the old image
        (what the watchdog does on a board), and the device reported reverted."""
        deadline = time.monotonic() + self.opt.confirm_timeout
        while True:
            await self._wait_seen(dev)
            try:
                slots = await self._state(dev)
            except LinkError:
                if time.monotonic() > deadline:
                    raise
                continue
            running = next((s for s in slots if s.active), None)
            if running is not None and running.hash == new and running.confirmed:
                a.result = SyncResult.UPDATED
                return
            waiting = next((s for s in slots if s.hash == new and s.pending and not s.active), None)
            if waiting is not None:
                # still marked and not running: the reset never happened (the link went first)
                a.result = SyncResult.FAILED
                a.error = "the device did not reset into the new image (it is still pending)"
                return
            if running is None or running.hash != new:
                a.result = SyncResult.REVERTED
                a.error = "the new image did not confirm itself; the device runs the old one"
                return
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)  # the app confirms itself soon after it starts
        self.event(a, f"not confirmed within {self.opt.confirm_timeout:.0f} s: resetting to revert")
        async with self._client(dev) as client:
            await client.reset()
        await self._wait_seen(dev)
        slots = await self._state(dev)
        running = next((s for s in slots if s.active), None)
        a.result = SyncResult.REVERTED if running is None or running.hash != new else SyncResult.FAILED
        a.error = (f"the new image did not confirm itself within {self.opt.confirm_timeout:.0f} s; "
                   + ("reset back to the old image" if a.result is SyncResult.REVERTED
                      else "it still runs unconfirmed after a reset"))


def summary_rows(attempts: Sequence[Attempt]) -> list[tuple[str, ...]]:
    """Rows of the end-of-pass table: device, from, to, bytes, result, time, note."""
    rows = []
    for a in sorted(attempts, key=lambda x: x.device):
        note = a.error or a.note or (f"resumed at {a.resumed_from}" if a.resumed_from else "")
        if a.reconnects:
            note = (note + "; " if note else "") + f"{a.reconnects} reconnect{'s' if a.reconnects != 1 else ''}"
        rows.append((a.device + (f" ({a.serial})" if a.serial else ""), a.from_version or "-", a.to_version or "-", str(a.bytes), str(a.result),
                     f"{a.seconds:.1f}s", note))
    return rows


def exit_status(attempts: Sequence[Attempt]) -> int:
    """A pass's exit status: 1 when an attempt failed or reverted (something was tried and
    the device does not run it), 0 otherwise (every update tried succeeded, or there was
    nothing to do: current, ahead, held, no-image, or no device in range)."""
    return 1 if any(a.result in FAILURES for a in attempts) else 0


class BleRadio:
    """The Radio over bleak (the platform's backend, or Bumble: mpboot.ble.select)."""

    def __init__(self, backend: object = None) -> None:
        self.backend = backend

    async def scan(self, seconds: float) -> list[Found]:
        from mpboot import ble

        # A device without a name in its advertisement goes by its address.
        return [Found(f.name or f.address, f.address, f.rssi) for f in await ble.scan(seconds, self.backend)]

    def transport(self, address: str) -> Transport:
        from mpboot.transport.ble import BleTransport

        return BleTransport(address, backend=self.backend)


def same_host(a: str, b: str) -> bool:
    """Whether two device addresses ("HOST:PORT", "[V6]:PORT", or a radio's address) name one
    host and port: equal, or resolving to a common IP address."""
    if a == b:
        return True
    import socket

    from mpboot.transport.udp import parse_address

    def ips(text: str) -> set[tuple[str, int]]:
        try:
            host, port = parse_address(text)
            return {(i[4][0], port) for i in socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)}
        except (ValueError, OSError, UnicodeError):
            return set()

    return bool(ips(a) & ips(b))


class UdpRadio:
    """The Radio for devices on a network (SMP over UDP, docs/PROTOCOL.md "SMP over UDP"):
    a list of addresses instead of advertisements. A scan asks each address for its MCUmgr
    parameters, `PROBES` at a time; the devices that answer within the scan's time are found
    (one being reset answers again once it serves). `seen` asks one address alone: what
    sync waits on after a reset. A probe that fails on this side (no socket, an address the
    system cannot use) is a `warn` line, not a device silently absent."""

    PROBE_S = 1.0  # the longest one probe waits for its answer (a LAN answers in milliseconds)
    PROBES = 64  # probes in flight at once: one socket each, far below the usual 1024 fds

    def __init__(self, addresses: Sequence[tuple[str, int]], mtu: int = 1500,
                 warn: Callable[[str], None] | None = None) -> None:
        self.addresses = list(dict.fromkeys(addresses))  # (in order; each once)
        self.mtu = mtu
        self.warn = warn or (lambda text: None)
        self._warned: set[str] = set()

    @staticmethod
    def name(address: tuple[str, int]) -> str:
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def seen(self, address: str, seconds: float) -> bool:
        """Whether the device at `address` answers within min(seconds, PROBE_S)."""
        wait = min(seconds, self.PROBE_S)
        try:
            async with SMPClient(self.transport(address), timeout=wait) as client:
                await client.params(wait)
            return True
        except PortError as err:  # (this side: no socket, an unusable address): said once
            if address not in self._warned:  # (per address: a resolver's wording may vary)
                self._warned.add(address)
                self.warn(f"{address}: {err}")
            return False
        except (MpbootError, SMPError, OSError):
            return False

    async def scan(self, seconds: float) -> list[Found]:
        names = [self.name(a) for a in self.addresses]
        gate = asyncio.Semaphore(self.PROBES)  # (per scan: each asyncio.run has its own loop)

        async def one(name: str) -> bool:
            async with gate:
                return await self.seen(name, seconds)

        answered = await asyncio.gather(*(one(n) for n in names))
        return [Found(n, n) for n, ok in zip(names, answered) if ok]

    def transport(self, address: str) -> Transport:
        from mpboot.transport.udp import UdpTransport, parse_address

        host, port = parse_address(address)
        return UdpTransport(host, port, mtu=self.mtu)
