"""`mpboot sim --machine qemu` (the emulated Cortex-M3, mpboot frozen into its firmware) under
the vendor/class policy and the factory station, as tests/test_flash_e2e.py and
tests/test_provision_e2e.py do it against the unix port's `mpboot sim`.

Policy: a board started with --vendor-id/--class-id refuses another vendor's or another
class's image as offered (exit 1, the CLI's one line) and marks nothing; an image with its ids
test-boots. Factory: `mpboot provision` (records in SQLite) provisions a board: its first
image test-booted and confirmed, identity written, sealed; what the board then says over SMP
(`mpboot state --json`, the factory info) is what the station recorded.

Every wait is on a line the simulator prints or on a command's answer, with a deadline.
Skips (or fails with MPBOOT_QEMU_REQUIRED) where the toolchain or MicroPython source is missing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import qemukit
from conftest import KEYS_DIR, signing_key
from qemumeasure import SERVING
from simkit import image_files, make_app, sign_app
from simserve import SimProcess, mpboot, ok, slots

from mpboot.factory.db import FactoryDB
from mpboot.errors import ImageErrorCode, ImageRefused
from mpboot.flashing import Mark, flash, prepare
from mpboot.image import class_uuid, vendor_uuid
from mpboot.qemu.runner import ID_LEN, ID_OFFSET
from mpboot.qemu.serve import FLASH
from mpboot.smp import SMPClient
from mpboot.smp.messages import Policy
from mpboot.transport.serial import SerialTransport

pytestmark = pytest.mark.qemu

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
PUBLIC_KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem"  # what a station holds
QEMU = ("--machine", "qemu")
VENDOR = vendor_uuid("example.com")
CLASS = class_uuid("sensor", VENDOR)


@pytest.fixture(scope="module", autouse=True)
def qemu_board() -> None:
    qemukit.require()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small apps (a few KiB: the emulated UART moves about 12 KiB/s of upload), all signed by
    the trusted key; they differ in their vendor and class ids."""
    out = tmp_path_factory.mktemp("apps")
    key = signing_key(KEY.name)
    specs = {  # name: (version, vendor id, class id)
        "ours": ("1.0.0", VENDOR, CLASS),
        "other-vendor": ("2.0.0", vendor_uuid("example.org"), CLASS),
        "other-class": ("2.0.0", VENDOR, class_uuid("actuator", VENDOR)),
        "no-ids": ("2.0.0", None, None),
    }
    return image_files(out, {name: sign_app(make_app(out / name, name, confirm=True, filler=2000), key, version,
                                            security_counter=3, vendor_id=vid, class_id=cid)
                             for name, (version, vid, cid) in specs.items()})


async def _refused_after(port: str, path: Path) -> int:
    """The requests mpboot's own client sent before the board refused the image."""
    async with SMPClient(SerialTransport(port)) as client:
        with pytest.raises(ImageRefused) as exc:
            await flash(client, prepare(path.read_bytes()), mark=Mark.TEST)
        assert exc.value.code is ImageErrorCode.VENDOR_MISMATCH
        return client.stats.requests


def _factory_info(port: str) -> Any:
    async def read() -> Any:
        async with SMPClient(SerialTransport(port)) as c:
            return await c.factory_info()

    return asyncio.run(read())


def test_vendor_and_class_policy(images: dict[str, Path], tmp_path: Path) -> None:
    """Built for example.com's sensors: another vendor's image, another class's and one with no
    ids are refused from their protected TLVs when offered (exit 1, one line), nothing is
    marked; an image carrying both ids test-boots from the mapped slot and confirms itself."""
    sim = SimProcess(tmp_path / "dev", [KEY], *QEMU, "--vendor-id", "example.com", "--class-id", "sensor")
    port = ["--port", sim.path]
    try:
        sim.wait_for(r"recovery: no bootable image")
        sim.wait_for(SERVING)
        refusals = {"other-vendor": "image is for another vendor (vendor id) (image error 16, SMP rc 3 EINVAL)",
                    "other-class": "image is for another device class (class id) (image error 17, SMP rc 3 EINVAL)",
                    "no-ids": "image is for another vendor (vendor id) (image error 16, SMP rc 3 EINVAL)"}
        # refused from its protected TLVs, at the first upload request (after the state read and
        # the params), before any of the payload is written: the window behind that request
        # (the board named its pipeline, 4) is answered without a session and nothing more goes
        assert 3 <= asyncio.run(_refused_after(sim.path, images["other-vendor"])) <= 3 + 3
        assert slots(port) == {}
        for name, why in refusals.items():
            r = mpboot("flash", images[name], *port, "--test", "--reset", "--no-progress")
            assert r.exit_code == 1, (name, r.stdout, r.stderr)
            assert r.stderr == f"mpboot: error: device refused the image: {why}\n", (name, r.stderr)
            assert slots(port) == {}, name  # nothing written that lists as an image, nothing marked

        out = ok("flash", images["ours"], *port, "--test", "--reset", "--no-progress")
        assert "device reset" in out
        sim.wait_for(r"mpboot: slot 0 version 1\.0\.0\+0 test boot$")
        sim.wait_for(r"APP ours$")
        sim.wait_for(r"CONFIRM True$")
        sim.wait_for(SERVING)
        state = slots(port)
        assert list(state) == ["1.0.0"] and state["1.0.0"]["active"] and state["1.0.0"]["confirmed"], state
        assert "Traceback" not in sim.output()
    finally:
        assert sim.stop() == 0


def test_the_station_provisions_a_qemu_board(images: dict[str, Path], tmp_path: Path) -> None:
    """`mpboot provision` against the emulated board: key check, serial, upload, test boot and
    the app's own confirm (QEMU exits and comes back), identity, floor, policy, seal. The board
    then answers with what the records say; the same command again skips it."""
    state = tmp_path / "dev"
    sim = SimProcess(state, [KEY], *QEMU)
    db = tmp_path / "factory.sqlite"
    args = ["provision", "--port", sim.path, "--image", images["ours"], "--expect-key", PUBLIC_KEY,
            "--serial-prefix", "QM-", "--db", db, "--station-id", "qemu1", "--operator", "bob",
            "--label", "hw=mps2-an385"]
    try:
        sim.wait_for(SERVING)
        r = mpboot(*args)
        assert r.exit_code == 0, r.output + r.stderr
        assert "provision: 1 provisioned of 1 board\n" in r.stdout
        sim.wait_for(r"mpboot: slot 0 version 1\.0\.0\+0 test boot$")
        sim.wait_for(r"CONFIRM True$")

        (row,) = json.loads(ok("provision", "report", "--db", db, "--json"))
        uid = (state / FLASH).read_bytes()[ID_OFFSET:ID_OFFSET + ID_LEN]  # what the runner gave the board
        image = prepare(images["ours"].read_bytes())
        assert row["uid"] == uid.hex() and row["serial"] == "QM-000001"
        assert row["result"] == "provisioned" and row["error"] is None, row
        assert (row["station"], row["operator"], row["labels"]) == ("qemu1", "bob", {"hw": "mps2-an385"})
        assert row["image_hash"] == image.hash.hex() and row["image_version"] == "1.0.0+0"
        assert row["key_hash"] == signing_key(KEY.name).public().keyhash().hex()
        with FactoryDB.open(str(db)) as records:
            steps = [e.step for e in records.audit_log(uid)]
        assert steps == ["connect", "keys", "serial", "upload", "test-boot", "confirmed", "identity", "floor",
                         "policy", "verify", "seal", "verify", "done"], steps

        # what the board says, over SMP: the CLI's view, then the whole factory record
        shown = json.loads(ok("state", "--port", sim.path, "--json"))
        assert (shown["uid"], shown["serial"]) == (row["uid"], row["serial"])
        assert [(s["version"], s["hash"], s["active"], s["confirmed"]) for s in shown["images"]] == [
            ("1.0.0", image.hash.hex(), True, True)]
        info = _factory_info(sim.path)
        assert info.uid == uid and info.serial == row["serial"] and info.sealed
        assert info.labels == row["labels"] and info.vendor_id == VENDOR and info.class_id == CLASS
        assert info.floor == 3 and info.policy == Policy(True, True, True)
        assert [k.hex() for k in info.key_hashes] == [row["key_hash"]]

        r = mpboot(*args, "--station-id", "qemu2")  # a re-run: nothing to do
        assert r.exit_code == 0 and "provision: 1 skipped of 1 board\n" in r.stdout, r.output + r.stderr
        assert "Traceback" not in sim.output()
    finally:
        assert sim.stop() == 0
