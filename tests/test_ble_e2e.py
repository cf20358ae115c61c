"""End to end over BLE: `mpboot sim --ble` devices on the simulated air (host/mpboot/sim/air.py,
Bumble controllers linked over TCP HCI), and the host tools through bleak with the Bumble
backend: scan, flash with a test boot and confirm; links dropped at random points and
resumed; `mpboot sync` over three devices (one dropping twice, one already current), a
partial upload resumed at the next meeting after the device rebooted, a test image that never
confirms reported as reverted (exit 1, whole lines through a pipe) and then held, across runs
through the log and across the passes of --loop, until a newer image appears; and smpclient's
own BLE transport updating the device.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from blekit import BleSim
from click.testing import CliRunner
from conftest import KEYS_DIR, signing_key
from simkit import make_app, sign_app
from simserve import MPBOOT

from mpboot.cli import cli
from mpboot.flashing import prepare
from mpboot.sim.air import AirThread

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
ATT_WRITE_COMMAND = 0x52


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("apps")
    key = signing_key(KEY.name)
    made = {
        "1.0.0": sign_app(make_app(out / "a1", "1.0.0", confirm=True, filler=2000), key, "1.0.0"),
        "2.0.0": sign_app(make_app(out / "a2", "2.0.0", confirm=True, filler=160_000), key, "2.0.0"),
        "2.1.0-noconfirm": sign_app(make_app(out / "a3", "2.1.0", confirm=False, filler=3000), key, "2.1.0"),
        "2.2.0": sign_app(make_app(out / "a4", "2.2.0", confirm=True, filler=3000), key, "2.2.0"),
    }
    paths = {}
    for name, data in made.items():
        paths[name] = out / f"{name}.img"
        paths[name].write_bytes(data)
    return paths


@pytest.fixture
def air() -> Any:
    with AirThread(trace=True) as a:
        yield a


def mpboot(*args: object, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="mpboot", env=env)
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def ok(*args: object) -> str:
    result = mpboot(*args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return str(result.stdout)


def ble(sim: BleSim, air: AirThread) -> list[str]:
    return ["--ble", sim.name, "--ble-backend", f"bumble:{air.spec}"]


def state(sim: BleSim, air: AirThread) -> dict[str, dict[str, Any]]:
    return {s["version"]: s for s in json.loads(ok("state", *ble(sim, air), "--json"))["images"]}


def c2p_payload(air: AirThread) -> int:
    """ATT payload bytes the centrals wrote (write commands) since the trace was cleared."""
    return sum(len(r.value) for r in air.trace() if r.direction == "c2p" and r.opcode == ATT_WRITE_COMMAND)


def start(tmp_path: Path, name: str, air: AirThread) -> BleSim:
    sim = BleSim(tmp_path / name, [KEY], radio=air.spec, name=name)
    sim.wait_for(r"serving SMP over BLE")
    return sim


def install(sim: BleSim, air: AirThread, image: Path, version: str) -> None:
    """Make `image` the device's confirmed image, over BLE."""
    ok("flash", image, *ble(sim, air), "--confirm", "--reset", "--no-progress")
    sim.wait_for(rf"mpboot: slot \d version {version}\+0$")
    sim.wait_for(r"serving SMP over BLE")


def test_scan_flash_test_boot_confirm(images: dict[str, Path], tmp_path: Path, air: AirThread) -> None:
    sim = start(tmp_path, "dev-a", air)
    try:
        found = json.loads(ok("scan", "--seconds", "1", "--json", "--ble-backend", f"bumble:{air.spec}"))
        assert {"name": "dev-a", "address": sim.address} in [{k: d[k] for k in ("name", "address")} for d in found]
        assert all(isinstance(d["rssi"], int) for d in found)
        install(sim, air, images["1.0.0"], "1.0.0")
        out = ok("flash", images["2.1.0-noconfirm"], *ble(sim, air), "--test", "--reset")
        assert "marked for a test boot" in out and "device reset" in out
        sim.wait_for(r"mpboot: slot \d version 2\.1\.0\+0 test boot")
        sim.wait_for(r"serving SMP over BLE")
        s = state(sim, air)
        assert s["2.1.0"]["active"] and not s["2.1.0"]["confirmed"] and s["1.0.0"]["confirmed"]
        ok("confirm", *ble(sim, air))
        s = state(sim, air)
        assert s["2.1.0"]["active"] and s["2.1.0"]["confirmed"]
        assert ok("echo", "over the air", *ble(sim, air)).strip() == "over the air"
    finally:
        sim.stop()


def test_links_dropped_at_random_points_resume(images: dict[str, Path], tmp_path: Path, air: AirThread) -> None:
    sim = start(tmp_path, "dev-b", air)
    try:
        image = images["2.0.0"]
        size = image.stat().st_size
        writes = size // 244
        rng = random.Random(5)
        # The flash's own reads (params) come first on the first connection; then the upload.
        drops = [rng.randrange(5, writes // 2), rng.randrange(5, writes // 2), rng.randrange(5, writes // 3)]
        air.drop_after(sim.address, drops)
        air.clear_trace()
        result = mpboot("flash", image, *ble(sim, air), "--test", "--retries", "5", "--no-progress")
        assert result.exit_code == 0, result.output + result.stderr
        assert "marked for a test boot" in result.stdout
        assert "power on 2" not in sim.output()  # the device never restarted: links were lost, not power
        s = state(sim, air)
        assert s["2.0.0"]["pending"] and not s["2.0.0"]["active"]
        # resumed, not restarted: what crossed the air is the image once plus the requests in
        # flight when each link went (a window of 4 x 2 KiB at most per drop)
        sent = c2p_payload(air)
        assert size < sent < size + len(drops) * 4 * 2048 + 4096, (sent, size)
        assert len({r.conn for r in air.trace()}) >= 1 + len(drops)
    finally:
        sim.stop()


def test_link_lost_more_often_than_retries_fails_in_one_line(images: dict[str, Path], tmp_path: Path,
                                                              air: AirThread) -> None:
    sim = start(tmp_path, "dev-c", air)
    try:
        air.drop_after(sim.address, [40, 40])
        result = mpboot("flash", images["2.0.0"], *ble(sim, air), "--retries", "1", "--no-progress")
        assert result.exit_code == 3
        lines = result.stderr.strip().splitlines()
        # one notice per reconnect, then the error in one line
        assert lines == ["mpboot: link lost (BLE link to dev-c lost); reconnecting (1/1)",
                         "mpboot: error: BLE link to dev-c lost"], lines
    finally:
        sim.stop()


def sync(repo: Path, air: AirThread, *args: object) -> Any:
    return mpboot("sync", repo, "--seconds", "1.5", "--ble-backend", f"bumble:{air.spec}", *args)


def test_sync_three_devices(images: dict[str, Path], tmp_path: Path, air: AirThread) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("1.0.0", "2.0.0"):
        (repo / images[name].name).write_bytes(images[name].read_bytes())
    sims = {n: start(tmp_path, n, air) for n in ("sync-a", "sync-b", "sync-c")}
    try:
        install(sims["sync-a"], air, images["1.0.0"], "1.0.0")
        install(sims["sync-b"], air, images["1.0.0"], "1.0.0")
        install(sims["sync-c"], air, images["2.0.0"], "2.0.0")
        # sync-a: its first connection (the reads) stays; the upload's link drops twice
        air.drop_after(sims["sync-a"].address, [10_000, 150, 200])
        log = tmp_path / "sync.sqlite"
        result = sync(repo, air, "--max-parallel", "3", "--log", log)
        assert result.exit_code == 0, result.output + result.stderr
        with sqlite3.connect(log) as db:
            rows = {r[0]: r[1:] for r in db.execute(
                "SELECT device, from_version, to_version, result, reconnects, bytes, error FROM attempts")}
        size = images["2.0.0"].stat().st_size
        assert rows["sync-a"] == ("1.0.0", "2.0.0", "updated", 2, size, None)
        assert rows["sync-b"] == ("1.0.0", "2.0.0", "updated", 0, size, None)
        assert rows["sync-c"] == ("2.0.0", None, "current", 0, 0, None)
        for n in ("sync-a", "sync-b"):
            sims[n].wait_for(r"APP 2\.0\.0")
        assert "pass 1: 3 devices" in result.stdout and "2 reconnects" in result.stdout
    finally:
        for s in sims.values():
            s.stop()


def test_sync_resumes_after_the_device_rebooted(images: dict[str, Path], tmp_path: Path, air: AirThread) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "2.0.0.img").write_bytes(images["2.0.0"].read_bytes())
    sim = start(tmp_path, "sync-r", air)
    try:
        install(sim, air, images["1.0.0"], "1.0.0")
        # first meeting: the upload's link drops after ~100 KiB, no retries: a partial upload
        air.drop_after(sim.address, [10_000, 420])
        log = tmp_path / "sync.jsonl"
        first = sync(repo, air, "--retries", "0", "--log", log)
        assert first.exit_code == 1
        # the device reboots between meetings (power cycle: kill -9 of the whole device)
        sim.kill9()
        sim = BleSim(tmp_path / "sync-r", [KEY], radio=air.spec, name="sync-r")
        sim.wait_for(r"serving SMP over BLE")
        second = sync(repo, air, "--log", log)
        assert second.exit_code == 0, second.output + second.stderr
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["result"] for r in recs] == ["failed", "updated"]
        size = images["2.0.0"].stat().st_size
        assert recs[1]["resumed_from"] >= 64 * 1024 and recs[1]["bytes"] == size - recs[1]["resumed_from"]
    finally:
        sim.stop()


def sync_piped(repo: Path, air: AirThread, *args: object) -> subprocess.Popen[str]:
    """`mpboot sync` in its own process, its output through a pipe (as `| grep` or a log
    file get it; COLUMNS unset)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.Popen([MPBOOT, "sync", str(repo), "--seconds", "1.5", "--ble-backend", f"bumble:{air.spec}",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def bad_image_and_a_device_on_1_0_0(images: dict[str, Path], tmp_path: Path, air: AirThread,
                                    name: str) -> tuple[Path, BleSim]:
    """A repository holding only an image that never confirms itself (2.1.0), and a device
    running 1.0.0 (stop it when done)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "bad.img").write_bytes(images["2.1.0-noconfirm"].read_bytes())
    sim = start(tmp_path, name, air)
    try:
        install(sim, air, images["1.0.0"], "1.0.0")
    except BaseException:
        sim.stop()
        raise
    return repo, sim


def revert_test_boots(sim: BleSim) -> int:
    """How many test boots of 2.1.0 the device has been through."""
    return len(re.findall(r"version 2\.1\.0\+0 test boot", sim.output()))


def test_a_reverted_image_fails_the_pass_and_is_held_until_a_newer_one(images: dict[str, Path], tmp_path: Path,
                                                                        air: AirThread) -> None:
    repo, sim = bad_image_and_a_device_on_1_0_0(images, tmp_path, air, "sync-v")
    log = tmp_path / "log.jsonl"
    try:
        proc = sync_piped(repo, air, "--confirm-timeout", "2", "--log", log)
        out, err = proc.communicate(timeout=120)
        # every device it tried reverted: the pass failed
        assert proc.returncode == 1, out + err
        rec = json.loads(log.read_text())
        assert (rec["from_version"], rec["to_version"], rec["result"]) == ("1.0.0", "2.1.0", "reverted")
        assert "did not confirm" in rec["error"] and rec["image_hash"] == prepare(images["2.1.0-noconfirm"].read_bytes()).hash.hex()
        s = state(sim, air)
        assert s["1.0.0"]["active"] and s["1.0.0"]["confirmed"]
        # through a pipe, lines are whole: the event and the table row, each on one line
        why = "the new image did not confirm itself within 2 s; reset back to the old image"
        assert f"sync: sync-v: reverted: {why}" in out.splitlines(), out
        assert any("sync-v" in line and "reverted" in line and why in line for line in out.splitlines()
                   if line.startswith("│")), out
        assert revert_test_boots(sim) == 1

        # the next run reads the log: the device is held on 1.0.0, the image not sent again
        result = sync(repo, air, "--log", log)
        assert result.exit_code == 0, result.output + result.stderr
        held = json.loads(log.read_text().splitlines()[1])
        assert (held["result"], held["from_version"], held["to_version"], held["bytes"]) == ("held", "1.0.0", "2.1.0", 0)
        assert held["note"] == "2.1.0 reverted on this device before; waiting for a newer image"
        assert "sync: sync-v: held: 2.1.0 reverted on this device before" in result.stdout
        assert revert_test_boots(sim) == 1

        # a newer image in the repository: sent as usual
        (repo / "good.img").write_bytes(images["2.2.0"].read_bytes())
        result = sync(repo, air, "--log", log)
        assert result.exit_code == 0, result.output + result.stderr
        assert json.loads(log.read_text().splitlines()[2])["result"] == "updated"
        sim.wait_for(r"APP 2\.2\.0")
    finally:
        sim.stop()


def test_loop_remembers_a_reverted_image_between_passes(images: dict[str, Path], tmp_path: Path,
                                                        air: AirThread) -> None:
    repo, sim = bad_image_and_a_device_on_1_0_0(images, tmp_path, air, "sync-l")
    try:
        proc = sync_piped(repo, air, "--confirm-timeout", "2", "--loop", "--interval", "0")  # no --log
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "pass 2:" in line:
                break
        for line in proc.stdout:  # the rest of pass 2's table
            lines.append(line.rstrip("\n"))
            if line.startswith("└"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        events = [line for line in lines if line.startswith("sync: sync-l: ")]
        assert events[0] == "sync: sync-l: 1.0.0 -> 2.1.0 (bad.img)"
        assert events[-2].startswith("sync: sync-l: reverted: ")
        assert events[-1] == "sync: sync-l: held: 2.1.0 reverted on this device before; waiting for a newer image"
        assert revert_test_boots(sim) == 1
        # Ctrl-C: 130, as every command, and one line saying how far it got
        assert proc.returncode == 130, "\n".join(lines) + out + err
        assert re.search(r"mpboot: interrupted: after [23] passes \(the last: 1 held\); run it again", err), err
        # (Ctrl-C during an HCI command of pass 3 may make Bumble log an error with a
        # traceback: the console script shows such records as one line, never a traceback)
        assert "Traceback" not in out + err, err
    finally:
        sim.stop()


def test_sync_stopped_before_a_pass_ends_exits_130(images: dict[str, Path], tmp_path: Path, air: AirThread) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.img").write_bytes(images["1.0.0"].read_bytes())
    proc = sync_piped(repo, air, "--seconds", "60")
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("sync: 1 image in ")
    deadline = time.monotonic() + 60
    while air.controllers() == 0:  # until its radio is on the air: scanning, for a minute
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)  # (polling the air for that condition)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "", out + err
    assert err == ("mpboot: interrupted: before the first pass ended; run it again (uploads resume where "
                   "each device is)\n"), err


def test_smpclient_ble_transport_updates_the_device(images: dict[str, Path], tmp_path: Path, air: AirThread) -> None:
    """Unmodified smpclient (PyPI) with its SMPBLETransport, on bleak, on the Bumble backend."""
    from smpclient import SMPClient
    from smpclient.generics import error
    from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
    from smpclient.requests.os_management import ResetWrite
    from smpclient.transport.ble import SMPBLETransport

    from mpboot.ble import bumble_backend

    sim = start(tmp_path, "dev-s", air)
    image = images["2.0.0"].read_bytes()
    digest = prepare(image).hash

    async def main() -> list[Any]:
        bumble_backend.install_default(air.spec)
        try:
            async with SMPClient(SMPBLETransport(), sim.name) as client:
                async for _ in client.upload(image):
                    pass
                assert not error(await client.request(ImageStatesWrite(hash=digest, confirm=False)))
                states = await client.request(ImageStatesRead())
                assert not error(await client.request(ResetWrite()))
                return list(states.images)
        finally:
            bumble_backend.uninstall_default()
            await bumble_backend.close_all()

    try:
        states = asyncio.run(main())
        assert any(s.hash == digest and s.pending for s in states)
        sim.wait_for(r"mpboot: slot \d version 2\.0\.0\+0 test boot")
        sim.wait_for(r"APP 2\.0\.0")
    finally:
        sim.stop()


def test_compressed_upload_over_ble_resumes_across_dropped_links(tmp_path: Path, air: AirThread) -> None:
    """The compressed upload over BLE (docs/PROTOCOL.md, "Compressed upload"), links dropped
    at random points: it resumes, compressed, and fewer bytes cross the air than the image
    holds."""
    from test_zupload import text_app

    image = tmp_path / "z.bin"
    image.write_bytes(text_app(tmp_path / "z", "2.0.0", 120_000))
    size = image.stat().st_size
    sim = start(tmp_path, "dev-z", air)
    try:
        rng = random.Random(7)
        drops = [rng.randrange(5, 120), rng.randrange(5, 100)]
        air.drop_after(sim.address, drops)
        air.clear_trace()
        result = mpboot("flash", image, *ble(sim, air), "--test", "--retries", "5", "--no-progress")
        assert result.exit_code == 0, result.output + result.stderr
        assert "marked for a test boot" in result.stdout
        s = state(sim, air)
        assert s["2.0.0"]["pending"] and not s["2.0.0"]["active"]
        sent = c2p_payload(air)
        assert sent < size / 1.5, (sent, size)  # compressed: the image once, and less
        assert len({r.conn for r in air.trace()}) >= 1 + len(drops)
    finally:
        sim.stop()
