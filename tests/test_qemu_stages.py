"""Two stages on the emulated Cortex-M3 board (issue 19): MicroPython's qemu firmware with
stage 0 and the rescue frozen in, stage-1 slots in its flash (`mpboot sim --machine qemu
--s1-size`), updated end to end over its UART with the real CLI and stock smpclient.

A new board serves with the rescue (the frozen service); `mpboot flash --image stage1 --test
--reset` puts the real service (a variant that answers echoes in capitals, so the test can
tell which code serves) in a stage-1 slot, its test boot is proven and confirmed, and from
then on the service runs from that slot, mapped in place from flash (the frozen firmware's
`mpboot` package path switched to the stage-1 ROMFS while its packages import). A stage 1 that
crashes at import is replaced in the same boot by the confirmed one and reverted at the next
reset; stock smpclient uploads stage 1 as image 2.

Every wait is on a line the simulator prints or on a command's answer, with a deadline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import qemukit
from conftest import KEYS_DIR, signing_key
from simkit import make_app, make_service, sign_app
from simserve import SimProcess, mpboot, ok
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.os_management import EchoWrite
from smpclient.transport.serial import SMPSerialTransport

from mpboot.image import ImageKind

pytestmark = pytest.mark.qemu

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"mpboot: serving SMP"
TIMEOUT_S = 30.0
BOARD = ("--machine", "qemu", "--slot-size", "64k", "--s1-size", "64k")


@pytest.fixture(scope="module", autouse=True)
def qemu_board() -> None:
    qemukit.require()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("stages")
    key = signing_key(KEY.name)
    made = {}
    for name, variant, version in (("shout", "shout", "1.0.0"), ("good", "", "2.0.0"), ("crash", "crash", "3.0.0")):
        made[name] = out / f"s1-{name}.bin"
        made[name].write_bytes(sign_app(make_service(out / name, variant), key, version, kind=ImageKind.UPDATER))
    made["app"] = out / "app.bin"
    made["app"].write_bytes(sign_app(make_app(out / "app", "1.0.0", confirm=True), key, "1.0.0"))
    return made


async def _echo(path: str, text: str) -> str:
    async with SMPClient(SMPSerialTransport(), path, timeout_s=TIMEOUT_S) as client:
        rsp = await client.request(EchoWrite(d=text), timeout_s=TIMEOUT_S)
        assert success(rsp), rsp
        return str(rsp.r)


def _stage1(port: list[str]) -> list[tuple[int, str, bool, bool]]:
    """Stage 1's entries of `mpboot state --json`: (slot, version, active, confirmed)."""
    import json

    rows = json.loads(ok("state", *port, "--json"))["images"]
    return sorted((r["slot"], r["version"], r["active"], r["confirmed"]) for r in rows if r.get("image") == 1)


def test_stage1_updated_proven_and_served_from_its_slot(images: dict[str, Path], tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY], *BOARD)
    port = ["--port", sim.path]
    try:
        sim.wait_for(r"mpboot: stage 1 none: the rescue service$")  # a new board: erased flash
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "rescue")) == "rescue"
        ok("flash", images["app"], *port, "--confirm", "--no-progress")

        # Stage 1 through the rescue: uploaded as image 2, test boot, probe, confirm.
        out = ok("flash", images["shout"], *port, "--image", "stage1", "--test", "--reset", "--no-progress")
        assert "confirm" in out, out
        sim.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0 test boot$")
        sim.wait_for(r"APP 1\.0\.0$")
        sim.wait_for(SERVING)
        assert _stage1(port) == [(0, "1.0.0", True, True)]
        assert asyncio.run(_echo(sim.path, "from the slot")) == "FROM THE SLOT"
        ok("reset", *port)
        sim.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")  # confirmed: no test boot
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "kept")) == "KEPT"

        # A stage 1 that crashes at import: the same boot serves the confirmed one; the
        # proof cannot happen (the trial is not what runs), and the next reset reverts it.
        r = mpboot("flash", images["crash"], *port, "--image", "stage1", "--test", "--reset", "--no-progress")
        sim.wait_for(r"stage 1 crashes at import")
        sim.wait_for(r"mpboot: stage 1 slot 1 cannot run \(error -5")
        sim.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")
        sim.wait_for(SERVING)
        assert r.exit_code != 0 and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
        assert asyncio.run(_echo(sim.path, "fallback")) == "FALLBACK"
        ok("reset", *port)
        sim.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")
        sim.wait_for(SERVING)
        assert _stage1(port)[0] == (0, "1.0.0", True, True)

        # Stock smpclient: stage 1 as image 2 (then our tool proves and confirms it).
        data = images["good"].read_bytes()

        async def upload() -> None:
            async with SMPClient(SMPSerialTransport(), sim.path, timeout_s=TIMEOUT_S) as client:
                async for _ in client.upload(data, 2):
                    pass

        asyncio.run(upload())
        assert (1, "2.0.0", False, False) in _stage1(port)
        # The same image again: already there, it is not sent again (smpclient's upload ended
        # verified); marked, reset, proven, confirmed.
        out = ok("flash", images["good"], *port, "--image", "stage1", "--test", "--reset", "--no-progress")
        sim.wait_for(r"mpboot: stage 1 slot 1 version 2\.0\.0\+0 test boot$")
        sim.wait_for(SERVING)
        assert _stage1(port) == [(0, "1.0.0", False, False), (1, "2.0.0", True, True)], out
        assert asyncio.run(_echo(sim.path, "plain again")) == "plain again"
        assert sim.output().count("Traceback") == 1  # the crashing stage 1's, printed by the boot
    finally:
        assert sim.stop() == 0
