"""The `mpboot` CLI, as a user runs it, against real Zephyr and MCUboot SMP servers nobody here
wrote: the Zephyr 4.4.0 smp_server fixtures of the smpclient 7.3.0 sdist (tests/zephyrkit.py),
native_sim builds for the OS group at several buffer sizes, MCUboot builds for mps2-an385 (a
Zephyr app with the image group, and MCUboot's own serial recovery) and a Zephyr app with
MCUboot on qemu_cortex_m0 for the whole update cycle. Each test gets its own fresh device.

Where the 32-bit C library or qemu-system-arm is missing the tests skip, saying what to install;
with MPBOOT_ZEPHYR_REQUIRED=1 (set by .ci/run) they fail instead, so CI cannot skip them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cbor2
import pytest
import zephyrkit
from smpkit import with_version
from zephyrkit import ZephyrDevice

MPBOOT = str(Path(sys.executable).parent / "mpboot")
REQUIRED_ENV = "MPBOOT_ZEPHYR_REQUIRED"
COMMAND_TIMEOUT_S = 120.0  # a hung command fails its test instead of the whole run

# A 4 KiB payload keeps the MCUboot uploads to a few requests (the whole 132 KiB app takes
# 4-14 s under QEMU); those images are uploaded and listed, never booted.
SMALL_PAYLOAD = 4096


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRED_ENV):
        pytest.fail(f"{reason} ({REQUIRED_ENV} is set)")
    pytest.skip(reason)


@pytest.fixture
def zephyr() -> Iterator[Callable[..., ZephyrDevice]]:
    """start(fixture_id, recovery=False): a fresh device, stopped when the test ends."""
    devices: list[ZephyrDevice] = []

    def start(fixture_id: str, *, recovery: bool = False) -> ZephyrDevice:
        reason = zephyrkit.unavailable(fixture_id)
        if reason is not None:
            _unavailable(reason)
        try:
            zephyrkit.fetch_fixtures()
        except zephyrkit.KitError as err:
            _unavailable(f"cannot fetch the Zephyr fixtures: {err}")
        device = zephyrkit.start(zephyrkit.find(fixture_id), recovery=recovery)
        devices.append(device)
        return device

    try:
        yield start
    finally:
        for device in devices:
            device.stop()


def mpboot(device: ZephyrDevice, *args: str) -> subprocess.CompletedProcess[str]:
    """`mpboot ARGS --port PTY --framing F`, as a user types it."""
    return subprocess.run([MPBOOT, *args, "--port", device.port, "--framing", device.framing],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def ok(device: ZephyrDevice, *args: str) -> str:
    done = mpboot(device, *args)
    assert done.returncode == 0, f"mpboot {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    return done.stdout


def state(device: ZephyrDevice) -> list[dict[str, object]]:
    images = json.loads(ok(device, "state", "--json"))["images"]
    return sorted(images, key=lambda i: i["slot"])


def image_hash(image: bytes) -> str:
    """The SHA256 TLV, as `mpboot state` lists it: the image's last 32 bytes here."""
    return image[-32:].hex()


def echo_request_bytes(text: str) -> int:
    """The echo request's size: SMP header + {"d": text}."""
    return 8 + len(cbor2.dumps({"d": text}))


# --- native_sim: the OS group at several buffer sizes -------------------------------------------

# (fixture, an echo that must come back, the buf_size the device reports or None when it reports
# none). The echo is the largest that fits that buffer, but for line512. native_sim's UART is a pty with no baud pacing: a request
# arrives at once, and a build whose receive pool is small drops lines ("uart_mcumgr:
# Insufficient buffers, fragment dropped"), so the echoes are sized to what each build takes.
ECHOES = [
    ("native_sim.serial_buf96", "x" * 79, 96),
    ("native_sim.serial_buf256", "x" * 239, 256),
    ("native_sim.serial_buf2048", "x" * 2030, 2048),
    ("native_sim.serial_line512", "x" * 1000, 2048),
    ("native_sim.serial_noparams", "x" * 300, None),
]


@pytest.mark.parametrize(("fixture_id", "text", "buf_size"), ECHOES, ids=[e[0].split(".")[1] for e in ECHOES])
def test_echo(zephyr: Callable[..., ZephyrDevice], fixture_id: str, text: str, buf_size: int | None) -> None:
    dev = zephyr(fixture_id)
    assert ok(dev, "echo", text) == text + "\n"
    if buf_size is None:
        return  # no MCUmgr parameters: mpboot cannot know the buffer, and sends what it is given
    # The echo above is the largest that fits the buffer the device reports (less the console
    # framing's 4 bytes); one character more is refused on the host, naming both sizes.
    limit = buf_size - 4
    largest = "x" * next(n for n in range(limit, 0, -1) if echo_request_bytes("x" * n) <= limit)
    if fixture_id != "native_sim.serial_line512":  # (its receive pool takes 1377 characters at once)
        assert text == largest
    refused = mpboot(dev, "echo", largest + "x")
    assert refused.returncode == 2
    assert refused.stderr == (f"mpboot: error: the echo request takes {echo_request_bytes(largest + 'x')} bytes, "
                              f"more than the device's buffer holds ({limit} of buf_size {buf_size} "
                              f"over {dev.port})\n")


def test_two_line_echo_on_a_stock_zephyr_console(zephyr: Callable[..., ZephyrDevice]) -> None:
    """The smp_server sample's stock console receiver queues each line it receives, an empty one
    too, in one of two buffers (CONFIG_UART_MCUMGR_RX_BUF_COUNT); on a link with no baud pacing
    a whole request arrives at once. A request of two 127-byte lines fits; with a newline sent
    before every frame it did not (the largest echo was 76 characters, smpclient's 169)."""
    dev = zephyr("native_sim.serial")
    text = "x" * 169  # the largest echo whose console frame takes two lines
    assert ok(dev, "echo", "hello") == "hello\n"
    assert ok(dev, "echo", text) == text + "\n"


def test_a_device_mpboot_cannot_frame_is_reported_silent(zephyr: Callable[..., ZephyrDevice]) -> None:
    """Zephyr's raw UART transport sends bare SMP packets, a framing mpboot does not speak: the
    user learns within the timeout that nothing answered, and that the framing may be wrong."""
    dev = zephyr("native_sim.serial_raw")
    assert dev.framing == zephyrkit.UNFRAMED
    done = subprocess.run([MPBOOT, "echo", "hi", "--port", dev.port, "--framing", "raw", "--timeout", "0.5"],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert done.returncode == 3
    assert done.stderr == f"mpboot: error: no SMP reply from {dev.port} in 0.5 s (wrong port, baud or framing?)\n"


# --- mps2-an385: a Zephyr app with the image group, under MCUboot -------------------------------

# The smallest and the largest buffer (a 1024 build exists too: it adds nothing these two miss).
MPS2_APPS = ["mps2_an385.serial_recovery", "mps2_an385.serial_recovery_buf2048"]


@pytest.mark.parametrize("fixture_id", MPS2_APPS, ids=["buf384", "buf2048"])
def test_state_flash_erase_on_a_zephyr_app(zephyr: Callable[..., ZephyrDevice], fixture_id: str,
                                            tmp_path: Path) -> None:
    dev = zephyr(fixture_id)
    assert dev.image is not None
    running = dev.image.read_bytes()
    assert ok(dev, "state").splitlines() == [
        "slot  version        hash              flags",
        f"0     0.0.0          {image_hash(running)[:16]}  active confirmed bootable",
    ]

    new = tmp_path / "app-1.2.3.bin"
    new.write_bytes(with_version(running, "1.2.3", payload_size=SMALL_PAYLOAD))
    out = ok(dev, "flash", str(new), "--no-progress").splitlines()
    assert out[0].startswith(f"uploaded {new.stat().st_size} bytes in ")
    assert out[1] == f"flashed {new} (version 1.2.3+0) in slot 1: not marked (it does not boot until marked)"
    images = state(dev)
    assert [(i["slot"], i["version"], i["hash"], i["active"], i["pending"]) for i in images] == [
        (0, "0.0.0", image_hash(running), True, False),
        (1, "1.2.3", image_hash(new.read_bytes()), False, False),
    ]

    # Again: the device holds it, nothing is sent.
    assert ok(dev, "flash", str(new), "--no-progress") == (
        f"flashed {new} (version 1.2.3+0) in slot 1 (the device held it already: nothing uploaded): "
        "not marked (it does not boot until marked)\n")

    assert ok(dev, "erase") == "erased the slot not running\n"
    assert [i["slot"] for i in state(dev)] == [0]


# --- mps2-an385: MCUboot's serial recovery, console and raw COBS --------------------------------

RECOVERY = ["mps2_an385.serial_recovery", "mps2_an385.serial_recovery_raw_cobs"]


@pytest.mark.parametrize("fixture_id", RECOVERY, ids=["console", "raw-cobs"])
def test_mcuboot_serial_recovery(zephyr: Callable[..., ZephyrDevice], fixture_id: str, tmp_path: Path) -> None:
    dev = zephyr(fixture_id, recovery=True)
    assert dev.framing == ("raw" if "cobs" in fixture_id else "console")
    assert dev.image is not None
    running = dev.image.read_bytes()
    # MCUboot lists slot 0 with no flags at all: nothing runs while it serves recovery.
    assert ok(dev, "state").splitlines()[1:] == [f"0     0.0.0          {image_hash(running)[:16]}  "]

    new = tmp_path / "app-1.2.3.bin"
    new.write_bytes(with_version(running, "1.2.3", payload_size=SMALL_PAYLOAD))
    out = ok(dev, "flash", str(new), "--no-progress").splitlines()
    assert out[0].startswith(f"uploaded {new.stat().st_size} bytes in ")
    # It took the image into slot 0 and boots it at its next reset, unmarked. (It does not list
    # this shortened image, a whole one it does: so the line names no slot.)
    assert out[1] == (f"flashed {new} (version 1.2.3+0): not marked; the device runs no image (recovery), "
                      "so its bootloader decides whether it boots at the next reset: MCUboot's serial "
                      "recovery boots slot 0 as it is, mpboot only a marked image")
    # It cannot mark: the user learns the image is there, and what the device does with it.
    refused = mpboot(dev, "flash", str(new), "--no-progress", "--test", "--reset")
    assert refused.returncode == 1
    assert refused.stderr == (
        "mpboot: error: the image is on the device, but the device cannot mark it (image state write "
        "failed: SMP rc 8 ENOTSUP (command not supported)): a serial recovery bootloader such as "
        "MCUboot's boots the image in slot 0 at its next reset, without a mark\n")

    refused = mpboot(dev, "erase")
    assert refused.returncode == 1
    assert refused.stderr == "mpboot: error: image erase failed: SMP rc 8 ENOTSUP (command not supported)\n"


def test_a_first_upload_to_mcuboot_recovery_is_not_called_resumed(zephyr: Callable[..., ZephyrDevice],
                                                                 tmp_path: Path) -> None:
    dev = zephyr("mps2_an385.serial_recovery_raw_cobs", recovery=True)
    assert dev.image is not None
    new = tmp_path / "app-1.2.3.bin"
    new.write_bytes(with_version(dev.image.read_bytes(), "1.2.3", payload_size=SMALL_PAYLOAD))
    # MCUboot writes whole flash-write units of a chunk but the last and answers that offset:
    # the opening request's data is a multiple of 64 bytes, so it takes it whole (else the
    # summary said "resumed at 956"), and after its first partial take of a chunk the client
    # ends every chunk on such a boundary (else every chunk of 998 bytes was cut: 132 resyncs
    # in a 132 KiB upload).
    summary = ok(dev, "flash", str(new), "--no-progress").splitlines()[0]
    assert "resumed" not in summary, summary


# --- qemu_cortex_m0: a Zephyr app with MCUboot (swap), the whole cycle --------------------------

# As a user runs it: the client uploads one request at a time to this device (it is not mpboot,
# so it gets no window) and resends a request the emulated nRF51 UART loses (about one
# multi-line request in 500; smpclient's upload fails there) after its resend timeout.
M0_FLASH = ("--no-progress",)


def test_update_cycle_on_a_zephyr_app_with_mcuboot(zephyr: Callable[..., ZephyrDevice], tmp_path: Path) -> None:
    dev = zephyr("qemu_cortex_m0.serial")
    assert dev.image is not None
    old = dev.image.read_bytes()
    new = tmp_path / "app-1.2.3.bin"
    new.write_bytes(with_version(old, "1.2.3"))
    old_hash, new_hash = image_hash(old), image_hash(new.read_bytes())

    out = ok(dev, "flash", str(new), "--test", "--reset", *M0_FLASH).splitlines()
    assert out[0].startswith(f"uploaded {len(new.read_bytes())} bytes in ")
    assert out[1] == (f"flashed {new} (version 1.2.3+0) in slot 1: marked for a test boot at the next "
                      "reset; device reset")
    dev.wait_ready()
    # MCUboot swapped: the new image runs from slot 0 on its test boot; the old one waits in
    # slot 1 (Zephyr flags it confirmed, the image a reset reverts to).
    assert ok(dev, "state").splitlines()[1:] == [
        f"0     1.2.3          {new_hash[:16]}  active bootable",
        f"1     0.0.0          {old_hash[:16]}  confirmed bootable",
    ]
    assert ok(dev, "flash", str(new), *M0_FLASH) == (
        f"{new} (version 1.2.3+0) already runs on the device (slot 0, on its test boot): nothing uploaded\n")

    assert ok(dev, "confirm") == "confirmed the running image (slot 0, version 1.2.3)\n"
    assert [(i["slot"], i["hash"], i["active"], i["confirmed"]) for i in state(dev)][0] == (0, new_hash, True, True)

    assert ok(dev, "reset") == f"reset {dev.port}\n"
    dev.wait_ready()
    # Confirmed: it runs again after the reset.
    images = state(dev)
    assert [(i["slot"], i["version"], i["hash"], i["active"], i["confirmed"]) for i in images][0] == (
        0, "1.2.3", new_hash, True, True)


def test_revert_then_permanent_on_a_zephyr_app_with_mcuboot(zephyr: Callable[..., ZephyrDevice],
                                                            tmp_path: Path) -> None:
    dev = zephyr("qemu_cortex_m0.serial")
    assert dev.image is not None
    old = dev.image.read_bytes()
    new = tmp_path / "app-2.0.0.bin"
    new.write_bytes(with_version(old, "2.0.0"))
    old_hash, new_hash = image_hash(old), image_hash(new.read_bytes())

    ok(dev, "flash", str(new), "--test", "--reset", *M0_FLASH)
    dev.wait_ready()
    assert [i["version"] for i in state(dev) if i["active"]] == ["2.0.0"]
    # A reset without a confirm: MCUboot swaps back.
    assert ok(dev, "reset") == f"reset {dev.port}\n"
    dev.wait_ready()
    assert [(i["slot"], i["hash"], i["active"], i["confirmed"], i["pending"]) for i in state(dev)] == [
        (0, old_hash, True, True, False), (1, new_hash, False, False, False)]

    # Made permanent by its hash, as `mpboot state` lists it: it boots from the next reset on.
    assert ok(dev, "confirm", new_hash[:8]) == (
        f"image {new_hash[:16]} in slot 1 (version 2.0.0) made permanent: it boots from the next reset\n")
    ok(dev, "reset")
    dev.wait_ready()
    assert [(i["slot"], i["hash"], i["active"], i["confirmed"]) for i in state(dev)][0] == (0, new_hash, True, True)

    assert ok(dev, "erase") == "erased the slot not running\n"
    assert [i["slot"] for i in state(dev)] == [0]
