"""Stock SMP clients' own update flows against `mpboot sim` (issue 14): each client drives its
high-level flow, unmodified, over the simulator's pty, and the device then runs the new image
on its test boot. smpmgr's `upgrade --slot 1` and `image upload` (its CLI, in a subprocess),
mcumgr-toolkit's `firmware_update()` (it detects the bootloader from OS bootloader info),
smpclient's `upload(data, 1)` with a state write and a reset, mcumgr-client's (the
mcumgr-client-wrapper module) `upload(slot=1)`; and smpclient's enumeration requests. On a
device with two stages, smpmgr and mcumgr-client update stage 1 as slot 2 (issue 19).

Every wait is on a line the simulator prints or on a client's answer; nothing sleeps."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mcumgr_client
import mcumgr_toolkit
import pytest
from conftest import KEYS_DIR, signing_key
from simkit import installed, make_app, make_service, sign_app
from simserve import SimProcess
from smp import header as smphdr
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.enumeration_management import (
    CountSupportedGroups,
    GroupDetails,
    ListSupportedGroups,
    GroupId,
)
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import ResetWrite
from smpclient.transport.serial import SMPSerialTransport

from mpboot.image import ImageKind, parse_image
from mpboot.keys import load_public_key
from mpboot.sim.serve import open_state

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"mpboot: serving SMP"
SMPMGR = str(Path(sys.executable).parent / "smpmgr")
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1.0.0 (runs first) and 2.0.0 (the update; it does not confirm itself, so it stays on
    its test boot), signed with the test key, as files."""
    out = tmp_path_factory.mktemp("apps")
    files = {}
    for v in ("1.0.0", "2.0.0"):
        data = sign_app(make_app(out / v, v, confirm=False, filler=3000), signing_key(KEY.name), v)
        files[v] = out / f"app-{v}.bin"
        files[v].write_bytes(data)
    return files


@pytest.fixture
def sim(images: dict[str, Path], tmp_path: Path) -> Iterator[SimProcess]:
    """`mpboot sim` running 1.0.0 confirmed from slot 0, serving SMP on its pty."""
    state = tmp_path / "dev"
    dev = open_state(state, [load_public_key(KEY)])
    assert installed(dev.install(images["1.0.0"], "permanent")) == 0
    proc = SimProcess(state, [KEY])
    try:
        proc.wait_for(r"mpboot: slot 0 version 1\.0\.0\+0$")
        proc.wait_for(r"APP 1\.0\.0")
        proc.wait_for(SERVING)
        yield proc
    finally:
        assert proc.stop() == 0


def digest(path: Path) -> bytes:
    return parse_image(path.read_bytes()).digest


async def read_states(path: str) -> list:  # type: ignore[type-arg]
    async with SMPClient(SMPSerialTransport(), path, timeout_s=TIMEOUT_S) as client:
        rsp = await client.request(ImageStatesRead())
        assert success(rsp), rsp
        return list(rsp.images)


def assert_test_boot_of_2(sim: SimProcess, images: dict[str, Path]) -> None:
    """The device reset into 2.0.0 from slot 1, on its test boot, and says so: 2.0.0 active and
    not confirmed, 1.0.0 the confirmed image a reset reverts to (Zephyr's flags)."""
    sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0 test boot")
    sim.wait_for(r"APP 2\.0\.0")
    sim.wait_for(SERVING)
    states = {s.slot: s for s in asyncio.run(read_states(sim.path))}
    new, old = states[1], states[0]
    assert new.hash == digest(images["2.0.0"]) and new.active and not new.confirmed and not new.pending
    assert old.hash == digest(images["1.0.0"]) and old.confirmed and not old.active and not old.pending


def smpmgr(sim: SimProcess, *args: object) -> str:
    proc = subprocess.run([SMPMGR, "--port", sim.path, "--timeout", str(TIMEOUT_S), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def test_smpmgr_upgrade_test_boot(sim: SimProcess, images: dict[str, Path]) -> None:
    """smpmgr's upgrade: upload into slot 1, mark for a test boot, reset."""
    out = smpmgr(sim, "upgrade", "--slot", 1, images["2.0.0"])
    assert "Upgrade complete." in out
    assert_test_boot_of_2(sim, images)


def test_smpmgr_image_upload_then_mark_and_reset(sim: SimProcess, images: dict[str, Path]) -> None:
    smpmgr(sim, "image", "upload", "--slot", 1, images["2.0.0"])
    smpmgr(sim, "image", "state-write", digest(images["2.0.0"]).hex())
    smpmgr(sim, "os", "reset")
    assert_test_boot_of_2(sim, images)


def test_mcumgr_toolkit_firmware_update(sim: SimProcess, images: dict[str, Path]) -> None:
    """mcumgr-toolkit detects the bootloader (MCUboot), finds the device stable, uploads,
    marks for a test boot and resets; run again during the test boot it stops: an image is
    being tested."""
    steps: list[str] = []
    with mcumgr_toolkit.MCUmgrClient.serial(sim.path, timeout_ms=int(TIMEOUT_S * 1000)) as client:
        client.use_auto_frame_size()
        client.firmware_update(images["2.0.0"].read_bytes(), progress=lambda step, _: steps.append(step))
    assert any("Found bootloader: MCUboot" in s for s in steps), steps
    assert_test_boot_of_2(sim, images)
    with mcumgr_toolkit.MCUmgrClient.serial(sim.path, timeout_ms=int(TIMEOUT_S * 1000)) as client:
        with pytest.raises(Exception, match="being tested"):
            client.firmware_update(images["2.0.0"].read_bytes())


def test_smpclient_upload_to_slot_1(sim: SimProcess, images: dict[str, Path]) -> None:
    data = images["2.0.0"].read_bytes()

    async def flow() -> None:
        async with SMPClient(SMPSerialTransport(), sim.path, timeout_s=TIMEOUT_S) as client:
            async for _ in client.upload(data, 1):
                pass
            rsp = await client.request(ImageStatesWrite(hash=digest(images["2.0.0"])))
            assert success(rsp), rsp
            assert success(await client.request(ResetWrite()))

    asyncio.run(flow())
    assert_test_boot_of_2(sim, images)


def test_mcumgr_client_upload_to_slot_1(sim: SimProcess, images: dict[str, Path]) -> None:
    session = mcumgr_client.SerialSession(sim.path, initial_timeout_s=int(TIMEOUT_S))
    session.upload(str(images["2.0.0"]), slot=1)
    session.test(digest(images["2.0.0"]))
    session.reset()
    assert_test_boot_of_2(sim, images)


def test_smpclient_enumeration(sim: SimProcess) -> None:
    async def ask() -> list:  # type: ignore[type-arg]
        async with SMPClient(SMPSerialTransport(), sim.path, timeout_s=TIMEOUT_S) as client:
            return [await client.request(r) for r in (CountSupportedGroups(), ListSupportedGroups(),
                                                       GroupId(index=3), GroupDetails())]

    count, listing, last, details = asyncio.run(ask())
    assert success(count) and count.count == 4
    assert success(listing) and smphdr.GroupId.OS_MANAGEMENT in listing.groups and list(listing.groups) == [0, 1, 10, 64]
    assert success(last) and last.group == 64 and last.end is True
    assert success(details) and [(d.group, d.name) for d in details.groups] == [
        (0, "os mgmt"), (1, "img mgmt"), (10, "enum mgmt"), (64, "mpboot")]


# ---------------------------------------------------------------- stage 1 (issue 19)
@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The update service as stage-1 images 1.0.0 and 2.0.0 (mpboot firmware export --stage1)."""
    out = tmp_path_factory.mktemp("stage1")
    files = {}
    for v in ("1.0.0", "2.0.0"):
        files[v] = out / f"s1-{v}.bin"
        files[v].write_bytes(sign_app(make_service(out / v), signing_key(KEY.name), v, kind=ImageKind.UPDATER))
    return files


@pytest.fixture
def sim2(images: dict[str, Path], stage1: dict[str, Path], tmp_path: Path) -> Iterator[SimProcess]:
    """A device with two stages: app 1.0.0 and stage 1 1.0.0, both confirmed."""
    state = tmp_path / "dev"
    dev = open_state(state, [load_public_key(KEY)], s1_size=40 * 1024)
    installed(dev.install(images["1.0.0"], "permanent"))
    installed(dev.run("install", stage1["1.0.0"], "permanent", 2048, "image=1"))
    proc = SimProcess(state, [KEY])
    try:
        proc.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")
        proc.wait_for(SERVING)
        yield proc
    finally:
        assert proc.stop() == 0


def test_smpmgr_updates_stage1_as_image_2(sim2: SimProcess, images: dict[str, Path], stage1: dict[str, Path]) -> None:
    """smpmgr alone: upload to slot 2, mark by hash, reset; on stage 1's test boot the next app
    upload (slot 1) is its proof, then the confirm by its hash keeps it."""
    smpmgr(sim2, "image", "upload", "--slot", 2, stage1["2.0.0"])
    smpmgr(sim2, "image", "state-write", digest(stage1["2.0.0"]).hex())
    smpmgr(sim2, "os", "reset")
    sim2.wait_for(r"mpboot: stage 1 slot 1 version 2\.0\.0\+0 test boot$")
    sim2.wait_for(SERVING)
    smpmgr(sim2, "image", "upload", "--slot", 1, images["2.0.0"])
    smpmgr(sim2, "image", "state-write", digest(stage1["2.0.0"]).hex(), "--confirm")
    smpmgr(sim2, "os", "reset")
    sim2.wait_for(r"mpboot: stage 1 slot 1 version 2\.0\.0\+0$")  # confirmed: no test boot
    sim2.wait_for(SERVING)


def test_mcumgr_client_updates_stage1_as_slot_2(sim2: SimProcess, images: dict[str, Path],
                                                stage1: dict[str, Path]) -> None:
    """mcumgr-client (no confirm by hash in its API): upload to slot 2, test, reset: stage 1's
    test boot; unproven, a reset reverts it."""
    session = mcumgr_client.SerialSession(sim2.path, initial_timeout_s=int(TIMEOUT_S))
    session.upload(str(stage1["2.0.0"]), slot=2)
    session.test(digest(stage1["2.0.0"]))
    session.reset()
    sim2.wait_for(r"mpboot: stage 1 slot 1 version 2\.0\.0\+0 test boot$")
    sim2.wait_for(SERVING)
    mcumgr_client.SerialSession(sim2.path, initial_timeout_s=int(TIMEOUT_S)).reset()
    sim2.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")
