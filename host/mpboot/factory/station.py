"""The factory provisioning station (docs/FACTORY.md section 4): one board per port, many
at once, every step recorded.

    db = FactoryDB.open("factory.sqlite")
    station = Station(StationConfig(image=prepare(data), expect_keys=frozenset({keyhash}),
                                    serials=SerialPrefix("SN-"), station="st1", operator="alice"),
                      db, on_change=print)
    boards = station.run(["/dev/ttyACM0", "/dev/ttyACM1"], parallel=2)

Each board runs in its own thread and event loop (serial ports are independent; the
database serialises what must be serialised), in three phases so that serials follow the
order of the ports: the key check of every board (in parallel); then, in port order, a serial
for each board that passed (a refused board takes none; a board keeps the serial it has);
then the rest of every board's steps (in parallel). A board's outcome is provisioned, skipped
(recorded as provisioned earlier, and still sealed with its serial), refused (the wrong
bootloader build: its embedded keys are not the expected ones) or failed (with the reason).
Nothing here holds a private key: the image arrives signed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, TypeVar

from mpboot.errors import (
    BoardFailed,
    BoardRefused,
    CommandNotSupported,
    DeviceSilent,
    LinkError,
    MpbootError,
    PortError,
    SMPError,
    UsageError,
)
from mpboot.factory.db import BoardRecord, FactoryDB, SerialSource
from mpboot.flashing import Mark, PreparedImage, flash
from mpboot.smp.client import SMPClient
from mpboot.smp.messages import FactoryInfo, Policy, SlotState
from mpboot.transport.serial import SerialTransport

POLL_INTERVAL: Final = 0.25  # seconds between state reads while a board reboots
KEYS_OK: Final = "keys ok"  # a board's step between its key check and its serial (the batch's turn)

T = TypeVar("T")
X = TypeVar("X")


class ProvisionOutcome(StrEnum):
    PROVISIONED = "provisioned"
    SKIPPED = "skipped"  # provisioned earlier (recorded, sealed with its serial): left alone
    REFUSED = "refused"  # not the expected bootloader build: nothing written to it
    FAILED = "failed"


@dataclass(frozen=True)
class StationConfig:
    image: PreparedImage
    expect_keys: frozenset[bytes]  # key hashes the board must embed, exactly
    serials: SerialSource
    station: str
    operator: str
    labels: Mapping[str, str] = field(default_factory=dict)
    floor: int | None = None  # None: the image's security counter (0 without one)
    policy: Policy = Policy()
    baudrate: int = 115200
    framing: str = "raw"
    timeout: float = 5.0  # per SMP request
    confirm_timeout: float = 30.0  # for the app to confirm itself after its test boot
    reboot_timeout: float = 30.0  # for the board to answer again after a reset

    def __post_init__(self) -> None:
        counter = self.image.parsed.security_counter or 0
        if self.floor is not None and self.floor > counter:
            raise UsageError(f"--floor {self.floor} is above the image's security counter ({counter}): "
                             "the board would refuse to boot it")

    @property
    def target_floor(self) -> int:
        if self.floor is not None:
            return self.floor
        return self.image.parsed.security_counter or 0


@dataclass
class BoardStatus:
    """One port's row in the live table, and its outcome at the end."""

    port: str
    uid: bytes | None = None
    serial: str | None = None
    step: str = "waiting"
    progress: float | None = None  # upload fraction, while uploading
    outcome: ProvisionOutcome | None = None
    error: str = ""
    started: float = 0.0
    finished: float = 0.0
    recorded: bool = False  # this run created or took over the board's record

    @property
    def elapsed(self) -> float:
        end = self.finished or time.monotonic()
        return end - self.started if self.started else 0.0


@dataclass(frozen=True)
class _Checked:
    """What a board's key check found, for the phases after it."""

    info: FactoryInfo
    record: BoardRecord | None  # the board's record before this run touched it

    @property
    def done_before(self) -> bool:
        """Recorded provisioned: that record (who, when, what) stays whatever a later visit
        finds; its failures go to the audit log only."""
        return self.record is not None and self.record.result == ProvisionOutcome.PROVISIONED


def _hexes(hashes: Sequence[bytes] | frozenset[bytes]) -> str:
    return ",".join(sorted(h.hex() for h in hashes))


class Station:
    def __init__(self, config: StationConfig, db: FactoryDB,
                 on_change: Callable[[BoardStatus], None] | None = None) -> None:
        if not config.expect_keys:
            raise ValueError("expect_keys is empty: a station must know the key its boards embed")
        if config.image.hash is None:
            raise ValueError("the image has no SHA256 TLV: the board could not name it")
        self.cfg = config
        self.db = db
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stopping = False

    # --- running many boards ---------------------------------------------------------------

    def run(self, ports: Sequence[str], parallel: int | None = None) -> list[BoardStatus]:
        """Provision every port, at most `parallel` at once; the statuses in port order.
        Serials go to the boards in the order of `ports`: every board's key check comes
        first, then the serials (port order), then the rest (docs/FACTORY.md section 4)."""
        boards = [BoardStatus(p) for p in ports]
        workers = max(1, min(parallel or len(boards), len(boards))) if boards else 1
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provision")

        def each(fn: Callable[[X], T], items: Sequence[X]) -> list[T]:
            return [future.result() for future in [pool.submit(fn, item) for item in items]]

        try:
            checked = each(self._check_keys, boards)
            passed = [(st, found) for st, found in zip(boards, checked, strict=True) if found is not None]
            # serials: one board at a time, in port order (a sealed board has its own)
            passed = [(st, found) for st, found in passed if found.info.sealed or self._give_serial(st, found)]
            each(lambda pair: self._finish(*pair), passed)
        except KeyboardInterrupt:
            # Boards not started stay untouched; running ones stop at their next step (a
            # re-run finishes them). The threads end on their own; nothing waits for them.
            self._stopping = True
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return boards

    def provision(self, port: str) -> BoardStatus:
        return self.run([port])[0]

    def _check_keys(self, st: BoardStatus) -> _Checked | None:
        """Phase 1 (a worker thread): None when the board failed or was refused (ended)."""
        st.started = time.monotonic()
        return self._attempt(st, lambda: asyncio.run(self._examine(st)))

    def _give_serial(self, st: BoardStatus, found: _Checked) -> bool:
        """Phase 2 (the caller's thread, boards in port order): the board's serial (the one
        it has, else the next free one). False when that failed (the board ended)."""

        def give() -> str:
            self._start(st, found.info)
            self._step(st, "serial")
            serial = st.serial = self.db.assign_serial(found.info.uid, self.cfg.serials)
            self._audit(st, "serial", "ok", serial)
            return serial

        return self._attempt(st, give) is not None

    def _finish(self, st: BoardStatus, found: _Checked) -> None:
        """Phase 3 (a worker thread): every step after the serial, to the board's outcome."""
        outcome = self._attempt(st, lambda: asyncio.run(self._complete(st, found)))
        if outcome is not None:
            st.outcome = outcome
            st.step = "done"  # (a failed board keeps the step it failed at)
            self._close(st)

    def _attempt(self, st: BoardStatus, work: Callable[[], T]) -> T | None:
        """One phase of a board: its result, or None when the board failed or was refused
        (recorded, and its status ended)."""
        try:
            return work()
        except BoardRefused as err:
            self._end(st, ProvisionOutcome.REFUSED, str(err))
        except BoardFailed as err:
            self._end(st, ProvisionOutcome.FAILED, str(err))
        except (MpbootError, OSError) as err:
            self._end(st, ProvisionOutcome.FAILED, f"{st.step}: {err}")
        except Exception as err:  # a bug must not take the other boards down: record it
            self._end(st, ProvisionOutcome.FAILED, f"{st.step}: internal error {type(err).__name__}: {err}")
        return None

    def _close(self, st: BoardStatus) -> None:
        st.finished = time.monotonic()
        st.progress = None
        self._changed(st)

    def _start(self, st: BoardStatus, info: FactoryInfo) -> None:
        """This run now owns the board's record (created, or its station/operator/port
        updated), with the key hashes the board reported."""
        self.db.start(info.uid, station=self.cfg.station, operator=self.cfg.operator, port=st.port)
        self.db.update(info.uid, key_hash=_hexes(info.key_hashes))
        st.recorded = True

    def _end(self, st: BoardStatus, outcome: ProvisionOutcome, reason: str) -> None:
        st.outcome = outcome
        st.error = reason
        if st.uid is not None:  # (else never knew which board: nothing to record against)
            try:
                if st.recorded:  # (a board recorded provisioned earlier keeps that record)
                    self.db.update(st.uid, result=str(outcome), error=reason)
                self._audit(st, "refused" if outcome is ProvisionOutcome.REFUSED else "failed", "fail", reason)
            except MpbootError as err:
                st.error = f"{reason} (and the database: {err})"
        self._close(st)

    # --- one board -------------------------------------------------------------------------

    def _changed(self, st: BoardStatus) -> None:
        if self._on_change is not None:
            with self._lock:
                self._on_change(st)

    def _step(self, st: BoardStatus, step: str) -> None:
        if self._stopping:
            raise BoardFailed(f"interrupted before {step}")
        st.step = step
        st.progress = None
        self._changed(st)

    def _audit(self, st: BoardStatus, step: str, outcome: str, detail: str = "") -> None:
        self.db.audit(step=step, outcome=outcome, uid=st.uid, serial=st.serial, station=self.cfg.station,
                      operator=self.cfg.operator, port=st.port, detail=detail)

    @asynccontextmanager
    async def _client(self, port: str, timeout: float | None = None) -> AsyncIterator[SMPClient]:
        transport = SerialTransport(port, baudrate=self.cfg.baudrate, framing=self.cfg.framing)
        async with SMPClient(transport, timeout=timeout or self.cfg.timeout) as client:
            yield client

    async def _examine(self, st: BoardStatus) -> _Checked:
        """Connect and check the board's keys (BoardRefused when they are not the expected
        ones: nothing is written to it)."""
        cfg = self.cfg
        self._step(st, "connect")
        async with self._client(st.port) as c:
            try:
                info = await c.factory_info()
            except CommandNotSupported as err:
                raise BoardFailed(f"not an mpboot board with a factory area ({err})") from None
        st.uid = info.uid
        trust = (f", root set version {info.root_version}, revocation {info.revocation}"
                 if info.root_version is not None else "")
        self._audit(st, "connect", "ok", f"uid {info.uid.hex()}, mpboot {info.bootloader}, "
                                         f"MicroPython {info.firmware}, sealed {info.sealed}{trust}")

        self._step(st, "keys")
        found = _Checked(info, self.db.board(info.uid))
        have = frozenset(info.key_hashes)
        if have != cfg.expect_keys:
            if not found.done_before:
                self._start(st, info)
            extra, missing = have - cfg.expect_keys, cfg.expect_keys - have
            why = []
            if extra:
                why.append(f"embeds unexpected key {_hexes(extra)[:16]}")
            if missing:
                why.append(f"lacks expected key {_hexes(missing)[:16]}")
            raise BoardRefused(f"wrong bootloader build: {' and '.join(why)}")
        self._audit(st, "keys", "ok", _hexes(have))
        self._step(st, KEYS_OK)  # until the batch's serials are given out
        return found

    async def _complete(self, st: BoardStatus, found: _Checked) -> ProvisionOutcome:
        """After the key check (and the serial of a board not sealed): the board to its
        outcome."""
        cfg = self.cfg
        info, record, done_before = found.info, found.record, found.done_before
        if info.sealed:
            if record is None or record.serial is None or record.serial != info.serial:
                if not done_before:
                    self._start(st, info)
                mine = record.serial if record is not None and record.serial else "no serial"
                raise BoardFailed(f"sealed elsewhere as {info.serial!r}: this database gives it {mine}")
            st.serial = info.serial
            if done_before:
                # Done earlier: its record (who provisioned it, when) stays as it is; the
                # audit log notes this visit.
                self._step(st, "verify")
                async with self._client(st.port) as c:
                    await self._check(c, st, sealed=True, identity_only=True)
                self._audit(st, "skip", "ok", f"provisioned earlier as {info.serial}")
                return ProvisionOutcome.SKIPPED
            # Sealed by an earlier run that never recorded it: check everything, then record.
            self._start(st, info)
        else:
            await self._install(st)
            await self._write(st)

        self._step(st, "seal")
        async with self._client(st.port) as c:
            if not info.sealed:
                await c.seal(st.serial)
                self._audit(st, "seal", "ok")
            await self._check(c, st, sealed=True)
        self.db.update(info.uid, result=str(ProvisionOutcome.PROVISIONED), error=None,
                       image_hash=cfg.image.hash.hex() if cfg.image.hash else None,
                       image_version=cfg.image.version, labels=dict(cfg.labels),
                       provisioned_at=_now())
        self._audit(st, "done", "ok", f"serial {st.serial}")
        return ProvisionOutcome.PROVISIONED

    async def _install(self, st: BoardStatus) -> None:
        """The station's image runs on the board, confirmed by itself after its test boot."""
        cfg = self.cfg
        want = cfg.image.hash
        self._step(st, "image")
        async with self._client(st.port) as c:
            slots = await c.state()
            running = _running(slots)
            if running is not None and running.hash == want and running.confirmed:
                other = next((s for s in slots if not s.active and s.pending), None)
                if other is not None:
                    # Another image waits to boot (an earlier run, or anyone, marked it): the
                    # board would not run the station's image after its next reset.
                    try:
                        await c.erase(other.slot)
                    except SMPError as err:
                        raise BoardFailed(f"another image ({other.version}, slot {other.slot}) waits to boot "
                                          f"and cannot be erased ({err}): reset the board and run again") from None
                    self._audit(st, "upload", "ok", f"erased slot {other.slot} ({other.version}, pending)")
                self._audit(st, "upload", "ok", "already installed and confirmed")
                return
            if running is not None and running.hash == want:
                pass  # its test boot runs: wait for the app to confirm it
            else:
                present = next((s for s in slots if s.hash == want), None)
                if present is None:
                    self._step(st, "upload")

                    def progress(done: int, total: int) -> None:
                        st.progress = done / total if total else None
                        self._changed(st)

                    result = await flash(c, cfg.image, mark=Mark.TEST, reset=True, progress=progress)
                    up = result.upload
                    self._audit(st, "upload", "ok", "held already: marked for a test boot" if up is None else
                                f"{up.size} bytes in {up.elapsed:.1f} s"
                                + (f", resumed at {up.resumed_from}" if up.resumed_from else ""))
                else:
                    await c.state_write(want, confirm=False)
                    await c.reset()
                    self._audit(st, "upload", "ok", f"already in slot {present.slot}: marked for a test boot")
        self._step(st, "test-boot")
        self._audit(st, "test-boot", "ok", "reset into the test boot")
        await self._await_confirm(st)
        self._audit(st, "confirmed", "ok", f"version {cfg.image.version}")

    async def _read_state(self, st: BoardStatus) -> list[SlotState] | None:
        """A state read, or None while the board does not answer (it is resetting)."""
        try:
            async with self._client(st.port, timeout=min(1.0, self.cfg.timeout)) as c:
                return await c.state()
        except (DeviceSilent, PortError, LinkError):
            return None

    async def _await_confirm(self, st: BoardStatus, reverting: bool = False) -> None:
        cfg = self.cfg
        want = cfg.image.hash
        back_by = time.monotonic() + cfg.reboot_timeout
        confirm_by: float | None = None
        while True:
            slots = await self._read_state(st)
            now = time.monotonic()
            if slots is None:
                if now > back_by:
                    raise BoardFailed(f"the board did not answer within {cfg.reboot_timeout:.0f} s of its reset")
            else:
                back_by = now + cfg.reboot_timeout
                running = _running(slots)
                if running is not None and running.hash == want and running.confirmed:
                    return
                waiting = any(s.hash == want and s.pending and not s.active for s in slots)
                if not waiting:
                    if running is None or running.hash != want:
                        raise BoardFailed("the app did not confirm itself: the board reverted its test boot")
                    if confirm_by is None:
                        confirm_by = now + cfg.confirm_timeout
                    elif now > confirm_by:
                        await self._revert(st)
                        raise BoardFailed(f"the app did not confirm itself within {cfg.confirm_timeout:.0f} s "
                                          "(reset to revert it)")
            await asyncio.sleep(POLL_INTERVAL)  # the board restarts and its app starts

    async def _revert(self, st: BoardStatus) -> None:
        try:
            async with self._client(st.port) as c:
                await c.reset()
        except (LinkError, SMPError):
            pass  # the failure is reported either way; a board left on its test boot reverts at its next reset

    async def _write(self, st: BoardStatus) -> None:
        cfg = self.cfg
        image = cfg.image.parsed
        assert st.serial is not None
        async with self._client(st.port) as c:
            self._step(st, "identity")
            await c.set_identity(st.serial, vendor_id=image.vendor_id, class_id=image.class_id,
                                 labels=dict(cfg.labels))
            self._audit(st, "identity", "ok", f"serial {st.serial}" + (f", labels {dict(cfg.labels)}" if cfg.labels else ""))
            self._step(st, "floor")
            f = await c.raise_floor(cfg.target_floor)
            self._audit(st, "floor", "ok", f"floor {f.floor}")
            self._step(st, "policy")
            await c.set_policy(cfg.policy)
            self._audit(st, "policy", "ok", _policy_text(cfg.policy))
            self._step(st, "verify")
            await self._check(c, st, sealed=False)

    async def _check(self, c: SMPClient, st: BoardStatus, *, sealed: bool, identity_only: bool = False) -> None:
        """Read everything back; BoardFailed listing each difference."""
        cfg = self.cfg
        info = await c.factory_info()
        slots, uid, serial = await c.identity()
        node = (await c.os_info("n")).strip()
        bad = _differences(cfg, st, info, slots, uid, serial, node, sealed, identity_only)
        if bad:
            self._audit(st, "verify", "fail", "; ".join(bad))
            raise BoardFailed("read back differs: " + "; ".join(bad))
        self._audit(st, "verify", "ok", "sealed" if sealed else "before sealing")


def _differences(cfg: StationConfig, st: BoardStatus, info: FactoryInfo, slots: list[SlotState], uid: bytes | None,
                 serial: str | None, node: str, sealed: bool, identity_only: bool) -> list[str]:
    bad = []
    if info.uid != st.uid or uid != st.uid:
        bad.append(f"unique id {info.uid.hex()} / {uid.hex() if uid else None}, expected {st.uid.hex() if st.uid else '?'}")
    for where, got in (("factory info", info.serial), ("image state", serial), ("OS info", node)):
        if got != st.serial:
            bad.append(f"{where} serial {got!r}, expected {st.serial!r}")
    if info.sealed != sealed:
        bad.append("not sealed" if sealed else "sealed already")
    if frozenset(info.key_hashes) != cfg.expect_keys:
        bad.append("embedded keys changed")
    if identity_only:
        return bad
    image = cfg.image.parsed
    for name, got, want in (("vendor id", info.vendor_id, image.vendor_id), ("class id", info.class_id, image.class_id)):
        if want is not None and got != want:
            bad.append(f"{name} {got.hex() if got else None}, expected {want.hex()}")
    if info.labels != dict(cfg.labels):
        bad.append(f"labels {info.labels}, expected {dict(cfg.labels)}")
    if info.floor < cfg.target_floor:
        bad.append(f"floor {info.floor}, expected at least {cfg.target_floor}")
    want_policy = cfg.policy
    for name in ("no_downgrade", "test_boot", "no_repl"):
        if getattr(want_policy, name) and not getattr(info.policy, name):
            bad.append(f"policy {name.replace('_', '-')} is off")
    running = _running(slots)
    if running is None or running.hash != cfg.image.hash or not running.confirmed:
        bad.append("the station's image does not run confirmed")
    if any(s.pending and not s.active for s in slots):
        bad.append("another image waits to boot")
    if info.floor > (image.security_counter or 0):
        bad.append(f"floor {info.floor} above the image's counter: it would not boot again")
    return bad


def _running(slots: Sequence[SlotState]) -> SlotState | None:
    return next((s for s in slots if s.active), None)


def _policy_text(p: Policy) -> str:
    return ", ".join(f"{n}={'on' if v else 'off'}" for n, v in
                     (("no-downgrade", p.no_downgrade), ("test-boot", p.test_boot), ("no-repl", p.no_repl)))


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="microseconds")


__all__ = ["BoardStatus", "ProvisionOutcome", "Station", "StationConfig"]
