"""End to end: the factory station (`mpboot provision`, mpboot.factory.station) against
`mpboot sim` boards (the firmware on the MicroPython unix port serving SMP on ptys).

Eight boards provisioned in parallel by one command and the records checked; boards killed
(kill -9: the whole simulator, or only the device process as a power cut) at random points
and the command re-run: one board, one serial; a board with another embedded key refused and
recorded; a sealed board refuses changes; two stations at once never share a serial.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import KEYS_DIR, signing_key
from faultrelay import FaultRelay, Faults
from mpboot.cli import cli
from mpboot.errors import DeviceSilent, FactoryErrorCode, FactoryRefused, ImageRefused
from mpboot.factory.db import FactoryDB, SerialPrefix
from mpboot.factory.station import BoardStatus, ProvisionOutcome, Station, StationConfig
from mpboot.flashing import Mark, flash, prepare
from mpboot.sim import SimDevice
from mpboot.smp import SMPClient
from mpboot.smp.messages import Policy
from mpboot.transport.serial import SerialTransport
from simkit import make_app, sign_app
from simserve import MPBOOT, SimProcess

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
PUBLIC_KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem"  # what a station holds
OTHER_KEY = KEYS_DIR / "TEST-ONLY-rsa2048-untrusted.pem"
VID = bytes(range(16))
CID = bytes(range(16, 32))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("apps")
    key = signing_key(KEY.name)
    made = {
        "app": sign_app(make_app(out / "a1", "1.0.0", confirm=True, filler=20_000), key, "1.0.0",
                        security_counter=3, vendor_id=VID, class_id=CID),
        "old": sign_app(make_app(out / "a0", "0.9.0", confirm=True), key, "0.9.0", security_counter=3,
                        vendor_id=VID, class_id=CID),
        "lazy": sign_app(make_app(out / "a2", "1.0.0", confirm=False), key, "1.0.0", security_counter=3,
                         vendor_id=VID, class_id=CID),
    }
    paths = {}
    for name, data in made.items():
        paths[name] = out / f"{name}.img"
        paths[name].write_bytes(data)
    return paths


class Sims:
    """Simulated boards, each in its own state dir; all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, SimProcess] = {}

    def start(self, name: str, key: Path = KEY, *extra: str) -> SimProcess:
        sim = SimProcess(self.root / name, [key], *extra)
        sim.wait_for(r"serving SMP")
        self.procs[name] = sim
        return sim

    def uid(self, name: str) -> bytes:
        return SimDevice.open(self.root / name).uid

    def stop_all(self) -> None:
        for sim in self.procs.values():
            if sim.proc.poll() is None:
                sim.stop()


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[Sims]:
    s = Sims(tmp_path / "boards")
    try:
        yield s
    finally:
        s.stop_all()


def mpboot(*args: object) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="mpboot")
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def config(images: dict[str, Path], prefix: str = "SN-", station: str = "st1", **kw: Any) -> StationConfig:
    return StationConfig(image=prepare(images["app"].read_bytes()),
                         expect_keys=frozenset({signing_key(KEY.name).public().keyhash()}),
                         serials=SerialPrefix(prefix), station=station, operator="tester", **kw)


def factory(port: str) -> Any:
    """The board's factory info; a board still powering on (after a reset) is asked again
    until it answers."""

    async def read() -> Any:
        for _ in range(30):
            try:
                async with SMPClient(SerialTransport(port), timeout=1.0) as c:
                    return await c.factory_info()
            except DeviceSilent:
                continue
        raise AssertionError(f"{port}: no answer for 30 s")

    return asyncio.run(read())


def test_eight_boards_in_parallel_then_rerun_skips(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    db = tmp_path / "factory.sqlite"
    names = [f"b{i}" for i in range(8)]
    ports = [sims.start(n).path for n in names]
    args = ["provision", *(a for p in ports for a in ("--port", p)), "--image", images["app"],
            "--expect-key", PUBLIC_KEY, "--serial-prefix", "SN-", "--db", db, "--station-id", "line1",
            "--operator", "alice", "--parallel", 8, "--label", "hw=rev3"]
    r = mpboot(*args)
    assert r.exit_code == 0, r.output + r.stderr
    assert "8 provisioned of 8 boards" in r.stdout

    rows = json.loads(mpboot("provision", "report", "--db", db, "--json").stdout)
    assert len(rows) == 8
    uids = {sims.uid(n).hex(): p for n, p in zip(names, ports, strict=True)}
    assert {row["uid"] for row in rows} == set(uids)
    assert sorted(row["serial"] for row in rows) == [f"SN-{i:06d}" for i in range(1, 9)]
    image = prepare(images["app"].read_bytes())
    for row in rows:
        assert row["result"] == "provisioned" and row["error"] is None
        assert row["station"] == "line1" and row["operator"] == "alice"
        assert row["image_hash"] == image.hash.hex() and row["image_version"] == "1.0.0+0"
        assert row["key_hash"] == signing_key(KEY.name).public().keyhash().hex()
        assert row["labels"] == {"hw": "rev3"}
        # what the board says is what the record says
        info = factory(uids[row["uid"]])
        assert info.sealed and info.serial == row["serial"] and info.uid.hex() == row["uid"]
        assert info.labels == {"hw": "rev3"} and info.vendor_id == VID and info.class_id == CID
        assert info.floor >= 3 and info.policy == Policy(True, True, True)

    # every step of one board is in the audit log, in order
    with_db = FactoryDB.open(str(db))
    try:
        steps = [e.step for e in with_db.audit_log(bytes.fromhex(rows[0]["uid"]))]
    finally:
        with_db.close()
    order = ["connect", "keys", "serial", "upload", "test-boot", "confirmed", "identity", "floor", "policy",
             "verify", "seal", "verify", "done"]
    assert steps == order, steps

    csv_out = mpboot("provision", "report", "--db", db, "--csv").stdout.splitlines()
    assert csv_out[0].startswith("uid,serial,") and len(csv_out) == 9

    # the same command again (another station): nothing to do, nothing given out twice, and
    # the records still say who provisioned each board
    r = mpboot(*args, "--station-id", "line2")
    assert r.exit_code == 0, r.output + r.stderr
    assert "8 skipped of 8 boards" in r.stdout
    again = json.loads(mpboot("provision", "report", "--db", db, "--json").stdout)
    assert sorted(again, key=lambda x: x["uid"]) == sorted(rows, key=lambda x: x["uid"])


def test_sealed_board_refuses_changes(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    sim = sims.start("b")
    boards = Station(config(images), FactoryDB.open(str(tmp_path / "f.sqlite"))).run([sim.path])
    assert boards[0].outcome is ProvisionOutcome.PROVISIONED, boards[0].error
    serial = boards[0].serial
    assert serial is not None

    async def attempts() -> None:
        async with SMPClient(SerialTransport(sim.path)) as c:
            for change in (lambda: c.set_identity("EVIL-1"), lambda: c.raise_floor(99),
                           lambda: c.set_policy(Policy(False, False, False)), lambda: c.seal("EVIL-1")):
                with pytest.raises(FactoryRefused) as exc:
                    await change()
                assert exc.value.code is FactoryErrorCode.SEALED
            # sealing again with its own serial is the idempotent finish of a re-run
            assert (await c.seal(serial)).sealed
            # production policy: no permanent marks (test boots only), no downgrades
            old = prepare(images["old"].read_bytes())
            with pytest.raises(ImageRefused):
                await flash(c, old, mark=Mark.TEST)
            lazy = prepare(images["lazy"].read_bytes())
            await flash(c, lazy)  # same version: uploaded, not marked
            with pytest.raises(FactoryRefused) as exc:
                await c.state_write(lazy.hash, confirm=True)
            assert exc.value.code is FactoryErrorCode.TEST_BOOT_REQUIRED
            info = await c.factory_info()
            assert info.serial == serial and info.policy == Policy(True, True, True) and info.sealed

    asyncio.run(attempts())
    r = mpboot("flash", images["lazy"], "--port", sim.path, "--confirm", "--no-progress")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "test boot" in r.stderr

    # another station's database does not know this board: it is left alone
    other = Station(config(images, station="st9"), FactoryDB.open(str(tmp_path / "other.sqlite"))).run([sim.path])
    assert other[0].outcome is ProvisionOutcome.FAILED and "sealed elsewhere" in other[0].error
    assert factory(sim.path).serial == serial


def test_wrong_key_is_refused_and_recorded(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    good, bad = sims.start("good"), sims.start("bad", key=OTHER_KEY)
    db = tmp_path / "f.sqlite"
    r = mpboot("provision", "--port", good.path, "--port", bad.path, "--image", images["app"], "--expect-key", PUBLIC_KEY,
               "--serial-prefix", "SN-", "--db", db)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"provision: {bad.path} ({sims.uid('bad').hex()}): refused: "
                                                   "wrong bootloader build: embeds unexpected key")
    rows = {row["uid"]: row for row in json.loads(mpboot("provision", "report", "--db", db, "--json").stdout)}
    refused = rows[sims.uid("bad").hex()]
    assert refused["result"] == "refused" and refused["serial"] is None
    assert "wrong bootloader build" in refused["error"]
    assert rows[sims.uid("good").hex()]["result"] == "provisioned"
    # nothing was written to the refused board
    info = factory(bad.path)
    assert not info.sealed and info.serial is None and info.labels == {}

    async def images_on(port: str) -> list[Any]:
        async with SMPClient(SerialTransport(port)) as c:
            return await c.state()

    assert asyncio.run(images_on(bad.path)) == []


def test_app_that_never_confirms_fails_the_board(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    sim = sims.start("b")
    cfg = replace(config(images, confirm_timeout=2.0), image=prepare(images["lazy"].read_bytes()))
    boards = Station(cfg, FactoryDB.open(str(tmp_path / "f.sqlite"))).run([sim.path])
    assert boards[0].outcome is ProvisionOutcome.FAILED
    assert "did not confirm itself" in boards[0].error
    assert not factory(sim.path).sealed


def test_two_stations_at_once_never_share_a_serial(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    db = str(tmp_path / "shared.sqlite")
    ports = [sims.start(f"b{i}").path for i in range(4)]
    results: dict[str, list[BoardStatus]] = {}

    def station(name: str, mine: list[str]) -> None:
        results[name] = Station(config(images, station=name), FactoryDB.open(db)).run(mine, parallel=2)

    threads = [threading.Thread(target=station, args=(n, p)) for n, p in (("st1", ports[:2]), ("st2", ports[2:]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    boards = results["st1"] + results["st2"]
    assert all(b.outcome is ProvisionOutcome.PROVISIONED for b in boards), [b.error for b in boards]
    serials = [b.serial for b in boards]
    assert len(set(serials)) == 4 and all(s and s.startswith("SN-") for s in serials)


def test_serials_follow_the_order_of_the_ports(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    # Five boards, the third built with another key. The board on the first port answers only
    # once every other board is through its key check (waiting for the batch), or past its
    # serial: finishing order is not port order, serials still are.
    names = ["b0", "b1", "bad", "b3", "b4"]
    procs = [sims.start(n, key=OTHER_KEY if n == "bad" else KEY) for n in names]
    gate = threading.Event()
    with FaultRelay(procs[0].path, Faults(), gate=gate) as slow:
        ports = [slow.path, *(p.path for p in procs[1:])]
        status: dict[str, BoardStatus] = {}

        def on_change(st: BoardStatus) -> None:
            status[st.port] = st
            if all(p in status and (status[p].outcome is not None
                                    or status[p].step not in ("waiting", "connect", "keys", "serial"))
                   for p in ports[1:]):
                gate.set()

        db = FactoryDB.open(str(tmp_path / "f.sqlite"))
        boards = Station(config(images, timeout=60.0), db, on_change=on_change).run(ports)
    assert [b.outcome for b in boards] == [ProvisionOutcome.PROVISIONED, ProvisionOutcome.PROVISIONED, ProvisionOutcome.REFUSED,
                                           ProvisionOutcome.PROVISIONED, ProvisionOutcome.PROVISIONED], [b.error for b in boards]
    assert [b.serial for b in boards] == ["SN-000001", "SN-000002", None, "SN-000003", "SN-000004"]
    assert [factory(p).serial for p in ports[1:]] == ["SN-000002", None, "SN-000003", "SN-000004"]
    # the records too
    records = {b.uid: (b.serial, b.result) for b in db.boards()}
    assert [records[sims.uid(n)] for n in names] == [
        ("SN-000001", "provisioned"), ("SN-000002", "provisioned"), (None, "refused"),
        ("SN-000003", "provisioned"), ("SN-000004", "provisioned")]
    db.close()


def test_ports_glob_sorts_and_a_rerun_keeps_serials(images: dict[str, Path], sims: Sims, tmp_path: Path) -> None:
    # --port first, as given, then --ports-glob matches in sorted order (links named against
    # the order the boards were started in); the re-run skips every board, serials kept
    procs = [sims.start(f"b{i}") for i in range(4)]
    links = tmp_path / "ports"
    links.mkdir()
    for name, proc in zip(["ttyC", "ttyA", "ttyB"], procs[:3], strict=True):
        (links / name).symlink_to(proc.path)
    db = tmp_path / "f.sqlite"
    args = ["provision", "--port", procs[3].path, "--ports-glob", f"{links}/tty*", "--image", images["app"],
            "--expect-key", PUBLIC_KEY, "--serial-prefix", "SN-", "--db", db]
    r = mpboot(*args)
    assert r.exit_code == 0, r.output + r.stderr
    want = {procs[3].path: "SN-000001", procs[1].path: "SN-000002", procs[2].path: "SN-000003",
            procs[0].path: "SN-000004"}
    assert {p: factory(p).serial for p in want} == want
    r = mpboot(*args)
    assert r.exit_code == 0 and "4 skipped of 4 boards" in r.stdout, r.output + r.stderr
    assert {p: factory(p).serial for p in want} == want


KILL_STEPS = ("serial", "upload", "test-boot", "identity", "floor", "policy", "verify", "seal")


def _kill_runs(n: int) -> list[tuple[int, str, str]]:
    rng = random.Random(6)
    return [(seed, rng.choice(KILL_STEPS), rng.choice(("sim", "device"))) for seed in range(n)]


def _provision_with_a_kill(images: dict[str, Path], sims: Sims, db: str, seed: int, step: str, what: str) -> None:
    rng = random.Random(seed)
    sim = sims.start("b")
    at = rng.random()  # within the upload: the fraction acknowledged when the cut comes
    killed = threading.Event()

    def on_change(st: BoardStatus) -> None:
        if killed.is_set() or st.step != step:
            return
        if step == "upload" and (st.progress or 0) < at:
            return
        killed.set()
        if what == "sim":
            sim.kill9()  # the station loses the port
        else:
            pid = sim.device_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)  # a power cut: the simulator powers it on again

    first = Station(config(images), FactoryDB.open(db), on_change=on_change).run([sim.path])[0]
    assert killed.is_set(), (step, first)
    if what == "sim":
        sim = sims.start("b")  # the same board (state dir), on a new port
    second = Station(config(images), FactoryDB.open(db)).run([sim.path])[0]
    assert second.outcome in (ProvisionOutcome.PROVISIONED, ProvisionOutcome.SKIPPED), (step, what, first.error, second.error)
    assert second.serial == "SN-000001"  # never another one
    info = factory(sim.path)
    assert info.sealed and info.serial == "SN-000001"
    sim.stop()


@pytest.mark.parametrize(("seed", "step", "what"), _kill_runs(3))
def test_kill9_at_random_points_then_rerun(images: dict[str, Path], sims: Sims, tmp_path: Path,
                                           seed: int, step: str, what: str) -> None:
    db = str(tmp_path / "f.sqlite")
    _provision_with_a_kill(images, sims, db, seed, step, what)
    check = FactoryDB.open(db)
    try:
        boards = check.boards()
        assert len(boards) == 1 and boards[0].serial == "SN-000001" and boards[0].result == "provisioned"
        serials = {e.serial for e in check.audit_log() if e.step == "serial"}
        assert serials == {"SN-000001"}
    finally:
        check.close()


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "step", "what"), _kill_runs(24)[3:])
def test_kill9_soak(images: dict[str, Path], sims: Sims, tmp_path: Path, seed: int, step: str, what: str) -> None:
    test_kill9_at_random_points_then_rerun(images, sims, tmp_path, seed, step, what)


def test_two_stations_share_postgresql(images: dict[str, Path], sims: Sims, pg_server: Any) -> None:
    # A line with two stations on one PostgreSQL database (a real server from Debian's packages).
    url = pg_server.create_database("line1")
    ports = [sims.start(f"b{i}").path for i in range(2)]
    # two station processes at once, as on a line
    procs = [subprocess.Popen([MPBOOT, "provision", "--port", p, "--image", str(images["app"]), "--expect-key",
                               str(PUBLIC_KEY), "--serial-prefix", "PG-", "--db", url, "--station-id", f"st{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, p in enumerate(ports)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in out, out
    rows = json.loads(mpboot("provision", "report", "--db", url, "--json").stdout)
    assert sorted(row["serial"] for row in rows) == ["PG-000001", "PG-000002"]
    assert {row["station"] for row in rows} == {"st0", "st1"}
    assert {factory(p).serial for p in ports} == {"PG-000001", "PG-000002"}


def test_another_pending_image_is_cleared_before_sealing(images: dict[str, Path], sims: Sims,
                                                         tmp_path: Path) -> None:
    # The station's image already runs confirmed (an earlier run got that far), but another
    # image was marked for a test boot since: sealing now would leave the board booting it.
    sim = sims.start("b")
    app, lazy = prepare(images["app"].read_bytes()), prepare(images["lazy"].read_bytes())

    async def install(image: Any, reset: bool) -> None:
        async with SMPClient(SerialTransport(sim.path)) as c:
            await flash(c, image, mark=Mark.TEST, reset=reset)

    asyncio.run(install(app, True))
    sim.wait_for(r"CONFIRM True")
    sim.wait_for(r"serving SMP")
    asyncio.run(install(lazy, False))
    boards = Station(config(images), FactoryDB.open(str(tmp_path / "f.sqlite"))).run([sim.path])
    assert boards[0].outcome is ProvisionOutcome.PROVISIONED, boards[0].error

    async def slots() -> Any:
        async with SMPClient(SerialTransport(sim.path)) as c:
            return await c.state()

    listed = asyncio.run(slots())
    assert [(s.hash, s.active, s.confirmed) for s in listed] == [(app.hash, True, True)]
    assert not any(s.pending for s in listed)


def test_ctrl_c_stops_the_station_with_130_and_a_rerun_finishes(images: dict[str, Path], sims: Sims,
                                                                tmp_path: Path) -> None:
    """Ctrl-C mid-upload: exit 130 and one line saying how to go on; the same command again
    finishes every board with the serial it was given."""
    import sqlite3
    import time

    ports = [sims.start(f"b{i}", KEY, "--baud", "115200").path for i in range(2)]  # ~2 s per upload
    db = tmp_path / "f.sqlite"
    args = [MPBOOT, "provision", *(a for p in ports for a in ("--port", p)), "--image", str(images["app"]),
            "--expect-key", str(PUBLIC_KEY), "--serial-prefix", "SN-", "--db", str(db)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def serials_given() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                return con.execute("SELECT count(*) FROM audit WHERE step = 'serial'").fetchone()[0]
        except sqlite3.Error:
            return 0  # (not created yet)

    deadline = time.monotonic() + 60
    while serials_given() < 2:  # both boards have their serial: they are uploading now
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)  # (polling the records for that condition)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert err.splitlines() == ["mpboot: interrupted: boards not finished are finished by running the same "
                                "command again (provisioned boards are skipped)"], err
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {factory(p).serial for p in ports} == {"SN-000001", "SN-000002"}
