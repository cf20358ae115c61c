"""`mpboot sim --machine qemu` (mpboot.qemu.serve): the emulated Cortex-M3 board, mpboot frozen
into its MicroPython firmware, updated over its UART end to end with the real CLI and stock
tools: v1 permanent -> v2 test-boots from the mapped slot and confirms itself -> v3 never
confirms and is reverted by the next reset; an imgtool-signed image uploaded by smpclient
(unmodified) boots; an image signed by an untrusted key is refused before it can be marked; a
board stuck at its REPL is a crash. Also the heap the SMP service takes during a full upload on this 32-bit frozen build, and the
firmware size mpboot adds.

Every wait is on a line the simulator prints or on a command's answer, with a deadline.
Skips (or fails with MPBOOT_QEMU_REQUIRED) where the toolchain or MicroPython source is missing.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import qemukit
from conftest import KEYS_DIR, signing_key
from qemukit import Console
from qemumeasure import SERVICE_GOAL, SERVING, firmware_sizes, service_heap
from simkit import image_files, make_app, sign_app
from simserve import SimProcess, mpboot, ok, slots
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import ResetWrite
from smpclient.transport.serial import SMPSerialTransport
from test_imgtool_interop import imgtool
from test_zupload import code_text

from mpboot.image import parse_image
from mpboot.pack import pack_app
from mpboot.qemu.serve import QemuSimServer

pytestmark = pytest.mark.qemu

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
UNTRUSTED = "TEST-ONLY-rsa2048-untrusted.pem"
TIMEOUT_S = 30.0
QEMU = ("--machine", "qemu")


@pytest.fixture(scope="module", autouse=True)
def qemu_board() -> None:
    qemukit.require()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small apps (each a few KiB: the emulated UART moves about 12 KiB/s of upload)."""
    out = tmp_path_factory.mktemp("apps")
    specs = {  # name: (version, the app confirms itself, signing key)
        "1.0.0": ("1.0.0", True, KEY.name),
        "2.0.0": ("2.0.0", True, KEY.name),
        "3.0.0": ("3.0.0", False, KEY.name),
        "untrusted": ("4.0.0", False, UNTRUSTED),
    }
    return image_files(out, {name: sign_app(make_app(out / name, version, confirm=confirm, filler=2000),
                                            signing_key(key), version)
                             for name, (version, confirm, key) in specs.items()})


def test_flash_test_boot_self_confirm_and_revert(images: dict[str, Path], tmp_path: Path) -> None:
    """One pty for the simulator's life while QEMU exits and restarts at each reset; the
    flash file keeps the board's state through resets and a kill -9 of the simulator."""
    sim = SimProcess(tmp_path / "dev", [KEY], *QEMU)
    port = ["--port", sim.path]
    try:
        sim.wait_for(r"recovery: no bootable image")  # a new board: erased flash
        sim.wait_for(SERVING)
        out = ok("flash", images["1.0.0"], *port, "--confirm", "--reset", "--no-progress")
        assert "made permanent" in out and "device reset" in out
        sim.wait_for(r"mpboot sim: device reset")  # QEMU exited (machine.reset()) and comes back
        sim.wait_for(r"mpboot sim: power on 2 ")
        sim.wait_for(r"mpboot: slot 0 version 1\.0\.0\+0$")
        sim.wait_for(r"APP 1\.0\.0$")
        sim.wait_for(SERVING)

        ok("flash", images["2.0.0"], *port, "--test", "--reset", "--no-progress")
        # No watchdog on this board: the line says "test boot" and nothing more.
        sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0 test boot$")
        sim.wait_for(r"APP 2\.0\.0$")
        sim.wait_for(r"CONFIRM True$")  # the app kept itself
        sim.wait_for(SERVING)
        state = slots(port)
        assert state["2.0.0"]["active"] and state["2.0.0"]["confirmed"], state

        ok("flash", images["3.0.0"], *port, "--test", "--reset", "--no-progress")
        sim.wait_for(r"mpboot: slot 0 version 3\.0\.0\+0 test boot$")
        sim.wait_for(r"APP 3\.0\.0$")
        sim.wait_for(SERVING)
        state = slots(port)
        assert state["3.0.0"]["active"] and not state["3.0.0"]["confirmed"], state
        assert state["2.0.0"]["confirmed"] and not state["2.0.0"]["active"], state

        ok("reset", *port)  # 3.0.0 never confirmed: the next boot reverts it
        sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0$")
        sim.wait_for(SERVING)
        state = slots(port)
        assert state["2.0.0"]["active"] and state["2.0.0"]["confirmed"], state
        assert "Traceback" not in sim.output()
    finally:
        sim.kill9()  # a power cut: simulator and QEMU die at once (QEMU with its parent)
    sim = SimProcess(tmp_path / "dev", [KEY], *QEMU)  # the flash file kept everything
    try:
        sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0$")
        sim.wait_for(SERVING)
    finally:
        assert sim.stop() == 0


async def _smpclient_flow(path: str, data: bytes, digest: bytes) -> list:  # type: ignore[type-arg]
    """smpclient's own upload, a test mark and a reset; the image states before the reset."""
    async with SMPClient(SMPSerialTransport(), path, timeout_s=TIMEOUT_S) as client:
        async for _ in client.upload(data):
            pass
        rsp = await client.request(ImageStatesRead())
        assert success(rsp), rsp
        assert success(await client.request(ImageStatesWrite(hash=digest)))
        assert success(await client.request(ResetWrite()))
        return list(rsp.images)


async def _smpclient_states(path: str) -> list:  # type: ignore[type-arg]
    async with SMPClient(SMPSerialTransport(), path, timeout_s=TIMEOUT_S) as client:
        rsp = await client.request(ImageStatesRead())
        assert success(rsp), rsp
        return list(rsp.images)


def test_imgtool_image_by_smpclient_boots_and_wrong_key_is_refused(images: dict[str, Path], tmp_path: Path) -> None:
    """MCUboot's tools, unmodified: imgtool signs the app (padded header, SEC_CNT), smpclient
    uploads it, reads the states, marks it for a test boot and resets; it boots in place and
    confirms itself. Then an image signed by an untrusted key fails verification on the
    board when it has arrived, and is never marked: the state is as before."""
    romfs = tmp_path / "app.romfs"
    romfs.write_bytes(make_app(tmp_path / "app", "imgtool", confirm=True))
    signed = tmp_path / "imgtool.bin"
    proc = imgtool("sign", "-k", str(KEY), "-H", "0x200", "--pad-header", "-S", "0x100000", "-v", "1.2.3+9",
                   "-s", "1", str(romfs), str(signed))
    assert proc.returncode == 0, proc.stderr
    data = signed.read_bytes()
    digest = parse_image(data).digest

    sim = SimProcess(tmp_path / "dev", [KEY], *QEMU)
    try:
        sim.wait_for(SERVING)
        before_mark = asyncio.run(_smpclient_flow(sim.path, data, digest))
        assert [(s.slot, s.version, s.hash) for s in before_mark] == [(0, "1.2.3.9", digest)]
        sim.wait_for(r"mpboot: slot 0 version 1\.2\.3\+9 test boot$")
        sim.wait_for(r"APP imgtool$")
        sim.wait_for(r"CONFIRM True$")
        sim.wait_for(SERVING)
        (running,) = asyncio.run(_smpclient_states(sim.path))
        assert (running.slot, running.hash, running.active, running.confirmed) == (0, digest, True, True)

        r = mpboot("flash", images["untrusted"], "--port", sim.path, "--test", "--no-progress")
        assert r.exit_code == 1
        assert r.stderr.startswith("mpboot: error: image verification on the device failed: "), r.stderr
        after = asyncio.run(_smpclient_states(sim.path))
        assert all(not s.pending for s in after), after
        assert [s.hash for s in after if s.active] == [digest]
    finally:
        assert sim.stop() == 0


def qemu_server(state: Path, console: Console, entry: str | None = None) -> QemuSimServer:
    return QemuSimServer(state, [signing_key(KEY.name).public()], entry=entry, output=console.queue.put)


def test_heap_of_the_service_during_a_full_upload(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    """The board's boot, then a ballast leaving the service SERVICE_GOAL of heap: a full upload
    and its test mark complete in it (qemumeasure.HEAP_ENTRY)."""
    app = tmp_path / "app.bin"
    app.write_bytes(sign_app(make_app(tmp_path / "app", "heap", confirm=False, filler=36 * 1024),
                             signing_key(KEY.name), "1.0.0"))
    heap = service_heap(tmp_path / "dev", [signing_key(KEY.name).public()], app)
    assert heap.free_b <= SERVICE_GOAL + 256 and heap.ballast_b > 64 * 1024  # the ballast took the rest
    assert heap.held_b < SERVICE_GOAL
    record_property("summary", f"heap on Cortex-M3 (QEMU, frozen): after the boot {heap.boot_held_b} B held; SMP "
                               f"service and a full upload ({heap.flashed.image_b // 1024} KiB, test mark, "
                               f"{heap.flashed.seconds:.1f} s) complete in {heap.free_b // 1024} KiB of free heap, "
                               f"holding at most {heap.held_b} B between requests")


def test_heap_of_the_service_during_a_compressed_upload(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    """The same bound with the upload compressed (docs/PROTOCOL.md, "Compressed upload"): the
    board inflates each request in its 1 KiB window within SERVICE_GOAL of heap."""
    folder = tmp_path / "app"
    make_app(folder, "heap", confirm=False)
    (folder / "source.txt").write_bytes(code_text(36 * 1024))  # an asset: compressible text
    app = tmp_path / "app.bin"
    app.write_bytes(sign_app(pack_app(folder), signing_key(KEY.name), "1.0.0"))
    heap = service_heap(tmp_path / "dev", [signing_key(KEY.name).public()], app)
    m = re.search(r"(\d+) compressed, ([\d.]+)x", heap.flashed.output)
    assert m and int(m.group(1)) > 0 and float(m.group(2)) > 1.5, heap.flashed.output
    assert heap.free_b <= SERVICE_GOAL + 256 and heap.held_b < SERVICE_GOAL
    record_property("summary", f"heap on Cortex-M3 (QEMU, frozen), compressed upload "
                               f"({heap.flashed.image_b // 1024} KiB, {m.group(2)}x, {heap.flashed.seconds:.1f} s): "
                               f"complete in {heap.free_b // 1024} KiB of free heap, holding at most "
                               f"{heap.held_b} B between requests")


def test_a_board_stuck_at_its_repl_is_a_crash(tmp_path: Path) -> None:
    """A boot entry that raises leaves the board at its raw REPL: the simulator shows the
    error, powers it off as a crash, and stops after a few in a row (as for the unix port)."""
    console = Console()
    server = qemu_server(tmp_path / "dev", console, "print('booting')\nraise ValueError('no luck')\n")
    try:
        server.start()
        assert server.wait(60)
    finally:
        server.stop()
    lines = console.drain()
    assert lines.count("device: booting") == 3, lines
    assert lines.count("device: ValueError: no luck") == 3, lines
    assert lines.count("mpboot sim: the device stopped before serving SMP") == 3
    assert not any("\x04" in line or line == "device: >" for line in lines), lines
    assert server.error and "crashed 3 times in a row" in server.error


def test_firmware_size_mpboot_adds(record_property) -> None:  # type: ignore[no-untyped-def]
    """text + rodata of the firmware with mpboot (port qemu) and one key frozen in, against the
    same build with nothing frozen (both cached after the first run)."""
    bare, with_mpboot = firmware_sizes([signing_key(KEY.name).public()])
    assert 0 < with_mpboot - bare < 128 * 1024
    record_property("summary", f"firmware text on Cortex-M3 (QEMU port): {bare} B bare, {with_mpboot} B with "
                               f"mpboot and one RSA-2048 key frozen in (+{with_mpboot - bare} B)")


def test_single_power_on_commands_refuse_a_qemu_board(images: dict[str, Path], tmp_path: Path) -> None:
    """`mpboot sim init/boot/install/status DIR` run the unix port's device only: on a state
    directory the emulated board made they say so in one line (exit 2) and leave it as it was
    (both keep their flash in flash.img)."""
    state = tmp_path / "dev"
    console = Console()
    server = qemu_server(state, console)
    try:
        server.start()
        console.wait_for(SERVING)
    finally:
        server.stop()
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    for args in (("boot",), ("status",), ("install", "--test"), ("init", "-k", KEY)):
        extra = (images["2.0.0"],) if args[0] == "install" else ()
        r = mpboot("sim", args[0], state, *extra, *args[1:])
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"mpboot: error: {state} holds an emulated "
                                                                  f"Cortex-M3 board"), r.stderr
        assert f"mpboot sim --state {state} --machine qemu" in r.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before
