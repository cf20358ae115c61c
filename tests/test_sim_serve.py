"""`mpboot sim --state DIR` (host/mpboot/sim/serve.py, upy_scripts/sim_serve.py): the real CLI
in a subprocess, talked to over its pty with unmodified smpclient (console and raw COBS
transports). Every wait is on a line the simulator prints or on a request's answer, with a
timeout; nothing sleeps to synchronise. Also the NOR flash timing model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import KEYS_DIR, signing_key
from simkit import make_app, sign_app
from simserve import MPBOOT, SimProcess
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.image_management import ImageStatesRead
from smpclient.requests.os_management import EchoWrite, MCUMgrParametersRead, ResetWrite
from smpclient.transport.serial import SMPSerialTransport
from smpclient.transport.serial.framing.cobs import Cobs
from smpclient.transport.serial.unencoded import SMPSerialRawTransport

from mpboot import upy
from mpboot.sim import SimDevice

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"mpboot: serving SMP"
TIMEOUT = 20.0


def transport(kind: str):  # type: ignore[no-untyped-def]
    return SMPSerialTransport() if kind == "console" else SMPSerialRawTransport(framing=Cobs(), mtu=2048)


async def talk(path: str, kind: str, *requests):  # type: ignore[no-untyped-def]
    async with SMPClient(transport(kind), path, timeout_s=TIMEOUT) as client:
        return [await client.request(r, timeout_s=TIMEOUT) for r in requests]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet by a parent that is itself gone) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["console", "raw"])
def test_echo_and_params(tmp_path: Path, kind: str) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    try:
        sim.wait_for(r"recovery: no bootable image")  # a new device: blank flash
        sim.wait_for(SERVING)
        text = "mpboot " * 200  # several console lines; zeros-free but long for COBS
        echo, params = asyncio.run(talk(sim.path, kind, EchoWrite(d=text), MCUMgrParametersRead()))
        assert success(echo) and echo.r == text
        assert success(params) and (params.buf_size, params.buf_count) == (2048, 4)
    finally:
        assert sim.stop() == 0


def test_reset_restarts_the_process_and_flash_persists(tmp_path: Path) -> None:
    """A reset request ends the device process (RAM state gone) and powers on a new one,
    which boots the image in flash again; the flash also survives restarting the simulator."""
    state = tmp_path / "dev"
    sim = SimProcess(state, [KEY], "--slot-size", "64k")
    sim.wait_for(SERVING)
    assert sim.stop() == 0
    # Put a confirmed image into the flash while the simulator is off (one power-on of the
    # single-command simulator on the same directory).
    app = sign_app(make_app(tmp_path / "app", "v1", confirm=True), signing_key(KEY.name), "1.2.3")
    (tmp_path / "app.bin").write_bytes(app)
    assert "INSTALLED" in SimDevice.open(state).install(tmp_path / "app.bin", "permanent").stdout

    sim = SimProcess(state, [KEY])
    try:
        first = int(sim.wait_for(r"power on 1 \(pid (\d+)\)").group(1))
        sim.wait_for(r"mpboot: slot 0 version 1\.2\.3\+0$")
        sim.wait_for(r"APP v1$")
        sim.wait_for(SERVING)
        (states,) = asyncio.run(talk(sim.path, "console", ImageStatesRead()))
        assert success(states), states
        assert [(s.slot, s.version, s.active, s.confirmed) for s in states.images] == [(0, "1.2.3", True, True)]
        (rsp,) = asyncio.run(talk(sim.path, "raw", ResetWrite()))
        assert success(rsp), rsp
        sim.wait_for(r"device reset")
        second = int(sim.wait_for(r"power on 2 \(pid (\d+)\)").group(1))
        assert second != first and not alive(first)
        sim.wait_for(r"mpboot: slot 0 version 1\.2\.3\+0$")
        sim.wait_for(r"APP v1$")
        sim.wait_for(SERVING)
        (echo,) = asyncio.run(talk(sim.path, "console", EchoWrite(d="after reset")))
        assert echo.r == "after reset"
    finally:
        assert sim.stop() == 0
    sim = SimProcess(state, [KEY])  # the simulator restarted: same flash
    try:
        sim.wait_for(r"mpboot: slot 0 version 1\.2\.3\+0$")
    finally:
        assert sim.stop() == 0


def test_link_symlink_and_clean_sigint(tmp_path: Path) -> None:
    link = tmp_path / "ttyMPBOOT"
    sim = SimProcess(tmp_path / "dev", [KEY], "--link", str(link))
    device = int(sim.wait_for(r"power on 1 \(pid (\d+)\)").group(1))
    sim.wait_for(SERVING)
    assert link.is_symlink() and os.readlink(link) == sim.path
    (echo,) = asyncio.run(talk(str(link), "raw", EchoWrite(d="via the link")))
    assert echo.r == "via the link"
    t0 = time.monotonic()
    assert sim.stop(signal.SIGINT) == 130  # Ctrl-C: as every command, 130 and where it stopped
    assert time.monotonic() - t0 < 5
    assert not link.exists() and not link.is_symlink()
    assert not alive(device)
    out = sim.output()
    assert "Traceback" not in out
    assert out.rstrip().splitlines()[-2:] == [
        "mpboot sim: stopped",
        f"mpboot: interrupted: the device in {tmp_path / 'dev'} is off and keeps its flash; "
        "the same command powers it on again"]
    # The state directory is free again.
    sim = SimProcess(tmp_path / "dev", [KEY])
    assert sim.stop() == 0


def test_sigterm_stops_too(tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    sim.wait_for(SERVING)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=10) == 0


def test_refusals(tmp_path: Path) -> None:
    """Another geometry or vendor for an existing DIR, a DIR in use, a missing key: one line,
    exit 2, no traceback."""
    state = tmp_path / "dev"
    sim = SimProcess(state, [KEY], "--slot-size", "64k")
    try:
        sim.wait_for(SERVING)

        def refused(*args: str) -> str:
            proc = subprocess.run([MPBOOT, "sim", "--state", str(state), *args], capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr
            return proc.stderr

        assert "in use by another mpboot sim" in refused("--keys", str(KEY))
    finally:
        assert sim.stop() == 0
    assert "65536-byte slots, not 131072" in refused("--keys", str(KEY), "--slot-size", "128k")
    assert "vendor id" in refused("--keys", str(KEY), "--vendor-id", "example.com")
    assert "--keys" in refused()
    link = tmp_path / "file"
    link.write_text("not a symlink")
    assert "not a symlink" in refused("--keys", str(KEY), "--link", str(link))


def test_crash_loop_is_stopped(tmp_path: Path) -> None:
    """A device that cannot even boot (its heap too small) is powered on a few times, then
    the simulator gives up with one line and a non-zero exit."""
    sim = SimProcess(tmp_path / "dev", [KEY], "--heapsize", "2k")
    sim.wait_for(r"crashed 3 times in a row")
    assert sim.proc.wait(timeout=20) == 2
    assert "mpboot: error: the simulated device crashed" in sim.output()


def test_baud_pacing(tmp_path: Path) -> None:
    """At 38400 baud an echo of 1000 characters (about 2.8 KB on the wire both ways, console
    framing) takes at least the line time."""
    sim = SimProcess(tmp_path / "dev", [KEY], "--baud", "38400")
    try:
        sim.wait_for(SERVING)
        text = "x" * 1000

        async def timed() -> tuple[float, int]:
            async with SMPClient(SMPSerialTransport(), sim.path, timeout_s=TIMEOUT) as client:
                t0 = time.perf_counter()
                rsp = await client.request(EchoWrite(d=text), timeout_s=TIMEOUT)
                assert rsp.r == text
                return time.perf_counter() - t0, len(EchoWrite(d=text).BYTES)

        elapsed, size = asyncio.run(timed())
        wire = 2 * (size + 4) * 4 / 3 * 124 / 120  # both ways, base64 and line framing
        assert elapsed >= 0.95 * wire / 3840, (elapsed, wire)
    finally:
        assert sim.stop() == 0


# ---- the NOR flash timing model -------------------------------------------------------------

_TIMING = """
import sys, time
from mpboot.ports.nor_sim import NorFlash
f = NorFlash(sys.argv[1], 8 * int(sys.argv[2]), int(sys.argv[2]), 1, sys.argv[3] if sys.argv[3] != "-" else None)
def us(fn, *a):
    t = time.ticks_us()
    fn(*a)
    return time.ticks_diff(time.ticks_us(), t)
e = us(f.ioctl, 6, 1)
p1 = us(f.writeblocks, 1, b"\\x00" * 16, 100)           # inside one page
p2 = us(f.writeblocks, 1, b"\\x00" * 16, 250)           # over a page boundary: two pages
p8 = us(f.writeblocks, 1, b"\\x00" * 2048, 1024)        # 8 pages
print(e, p1, p2, p8)
"""


@pytest.mark.parametrize("sector", [4096, 65536])
def test_nor_timing(sim_lib: Path, tmp_path: Path, sector: int) -> None:
    script = tmp_path / "timing.py"
    script.write_text(_TIMING)

    def measure(timing: str) -> list[int]:
        proc = upy.run([script, tmp_path / f"chip-{timing}.bin", sector, timing], path=[sim_lib], heapsize="256k")
        assert proc.returncode == 0, proc.stderr
        return [int(x) for x in proc.stdout.split()]

    took = measure("nor")
    # 45 ms per 4 KiB erased; 30 us per page touched + 670 us per 256 bytes: 16 bytes in one
    # page, 16 over two, 8 pages. An operation may take less than its model by what the ones
    # before it overshot (nor_sim takes that back), so the model bounds each running total.
    model = [45000 * sector // 4096, 30 + 670 * 16 // 256, 2 * 30 + 670 * 16 // 256, 8 * 700]
    for k in range(1, 5):
        assert sum(took[:k]) >= sum(model[:k]), (took, model)
    erase, one, two, eight = measure("-")  # default: no model
    assert erase < 45000 * sector // 4096 and eight < 8 * 700


def test_app_that_raises_still_serves(tmp_path: Path) -> None:
    """An app whose main raises: the traceback is on the console and the update service
    still answers (as a board's boot.py that catches the app's exception)."""
    from mpboot.pack import pack_app

    state = tmp_path / "dev"
    sim = SimProcess(state, [KEY], "--slot-size", "64k")
    assert sim.stop() == 0
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("print('APP broken')\nraise ValueError('broken app')\n")
    (tmp_path / "app.bin").write_bytes(sign_app(pack_app(app), signing_key(KEY.name), "2.0.0"))
    assert "INSTALLED" in SimDevice.open(state).install(tmp_path / "app.bin", "permanent").stdout
    sim = SimProcess(state, [KEY])
    try:
        sim.wait_for(r"APP broken")
        sim.wait_for(r"ValueError: broken app")
        sim.wait_for(SERVING)
        (echo,) = asyncio.run(talk(sim.path, "console", EchoWrite(d="still here")))
        assert echo.r == "still here"
    finally:
        assert sim.stop() == 0
