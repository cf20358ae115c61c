"""Interop: unmodified smpclient (PyPI) updates `mpboot sim` over its pty, with the console
transport and with the raw transport in COBS framing: upload, read state, mark for test,
reset, the device boots the new image as a test image (and the app confirms it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import KEYS_DIR, signing_key
from simkit import make_app, sign_app
from simserve import SimProcess
from smpclient import SMPClient
from smpclient.generics import error, success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import ResetWrite
from smpclient.transport.serial import SMPSerialTransport
from smpclient.transport.serial.framing.cobs import Cobs
from smpclient.transport.serial.unencoded import SMPSerialRawTransport

from mpboot.image import parse_image

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"mpboot: serving SMP"  # the device listens on its UART from here


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("apps")
    return {v: sign_app(make_app(out / v, v, confirm=True, filler=3000), signing_key(KEY.name), v)
            for v in ("1.0.0", "2.0.0")}


def transport(kind: str):  # type: ignore[no-untyped-def]
    if kind == "console":
        return SMPSerialTransport()
    return SMPSerialRawTransport(framing=Cobs(), mtu=2048)


async def update(path: str, kind: str, image: bytes, confirm: bool) -> list:  # type: ignore[type-arg]
    """smpclient's own workflow: upload, state write (test or confirm), state read, reset."""
    async with SMPClient(transport(kind), path) as client:
        async for _ in client.upload(image):
            pass
        digest = parse_image(image).digest
        rsp = await client.request(ImageStatesWrite(hash=digest, confirm=confirm))
        assert success(rsp), rsp
        states = await client.request(ImageStatesRead())
        assert success(states), states
        assert not error(await client.request(ResetWrite()))
        return list(states.images)


@pytest.mark.parametrize("kind", ["console", "raw"])
def test_smpclient_updates_the_simulator(kind: str, images: dict[str, bytes], tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    try:
        sim.wait_for(r"recovery")  # factory-fresh: nothing to boot, serving updates
        sim.wait_for(SERVING)
        states = asyncio.run(update(sim.path, kind, images["1.0.0"], confirm=True))
        (s1,) = [s for s in states if s.version == "1.0.0"]
        assert s1.hash == parse_image(images["1.0.0"]).digest
        # It boots at the next reset and stays: pending and permanent (Zephyr's flags)
        assert s1.pending and s1.permanent and not s1.confirmed and not s1.active
        sim.wait_for(r"mpboot: slot \d version 1\.0\.0\+0$")
        sim.wait_for(r"APP 1\.0\.0")
        sim.wait_for(SERVING)

        states = asyncio.run(update(sim.path, kind, images["2.0.0"], confirm=False))
        by_version = {s.version: s for s in states}
        assert by_version["1.0.0"].active and by_version["1.0.0"].confirmed
        v2 = by_version["2.0.0"]
        assert v2.pending and not v2.confirmed and not v2.permanent and v2.bootable
        sim.wait_for(r"mpboot: slot \d version 2\.0\.0\+0 test boot")
        sim.wait_for(r"APP 2\.0\.0")
        sim.wait_for(r"CONFIRM True")
        sim.wait_for(SERVING)

        async def read() -> list:  # type: ignore[type-arg]
            async with SMPClient(transport(kind), sim.path) as client:
                rsp = await client.request(ImageStatesRead())
                assert success(rsp), rsp
                return list(rsp.images)

        states = {s.version: s for s in asyncio.run(read())}
        assert states["2.0.0"].active and states["2.0.0"].confirmed and not states["2.0.0"].pending
        assert not states["1.0.0"].active
    finally:
        assert sim.stop() == 0


def test_smpclient_sha_is_checked_and_resumes(images: dict[str, bytes], tmp_path: Path) -> None:
    """smpclient sends the file's sha at off 0: a second upload of the same image after an
    interrupted one continues where the device is (Zephyr semantics)."""
    sim = SimProcess(tmp_path / "dev", [KEY])
    img = images["2.0.0"]

    async def partial_then_full() -> list[int]:
        async with SMPClient(SMPSerialTransport(), sim.path) as client:
            offs = []
            async for off in client.upload(img):
                offs.append(off)
                if off > len(img) // 2:
                    break  # the client gives up half-way
            first = []
            async for off in client.upload(img):
                first.append(off)
            assert first[-1] == len(img)
            return [offs[-1], first[0]]

    try:
        sim.wait_for(SERVING)
        stopped_at, resumed_at = asyncio.run(partial_then_full())
        assert resumed_at >= stopped_at  # not from the start
    finally:
        assert sim.stop() == 0
