"""Updates over a bad line, and a device killed mid-upload.

- A pty relay (tests/faultrelay.py) between `mpboot flash`'s client and `mpboot sim` drops,
  corrupts, duplicates and delays bytes and cuts the link. After every update attempt the
  device is reset over a clean link: it must run the old or the new verified image, with
  exactly that image active and confirmed; never anything else. A handful of randomized
  updates run by default, 1000 under `-m slow` (make test-slow).
- `mpboot sim` killed with SIGKILL (supervisor and device at once: a power cut) half-way
  through an upload, plain or compressed: restarted on the same state, the same `mpboot flash`
  resumes from the device's persisted checkpoint instead of from 0, and the image boots."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from conftest import KEYS_DIR, signing_key
from faultrelay import FaultRelay, Faults
from simkit import make_app, sign_app
from simserve import SimProcess
from test_zupload import text_app

from mpboot.errors import MpbootError
from mpboot.flashing import Mark, flash
from mpboot.smp.client import SMPClient
from mpboot.transport.serial import SerialTransport

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
BOOT = r"mpboot: slot (\d) version (\S+?)\+0( test boot)?"
SERVING = r"mpboot: serving SMP"  # the device listens on its UART from here


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("apps")
    made = {v: sign_app(make_app(out / v, v, confirm=True, filler=3000), signing_key(KEY.name), v)
            for v in ("1.0.0", "2.0.0", "3.0.0")}
    made["big"] = sign_app(make_app(out / "big", "4.0.0", confirm=True, filler=150_000),
                           signing_key(KEY.name), "4.0.0")
    made["compressible"] = text_app(out / "zbig", "4.0.0", 200_000)  # its chunks go compressed
    return made


async def _flash(path: str, image: bytes, mark: Mark, reset: bool, timeout: float = 3.0, progress=None):  # type: ignore[no-untyped-def]
    async with SMPClient(SerialTransport(path), timeout=timeout) as client:
        return await flash(client, image, mark=mark, reset=reset, progress=progress, timeout=timeout)


async def _state(path: str) -> list:  # type: ignore[type-arg]
    async with SMPClient(SerialTransport(path)) as client:
        return await client.state()


def _reset_and_check(sim: SimProcess, allowed: set[str]) -> str:
    """Reset over the clean link; the device boots one of `allowed` and ends up running it
    confirmed (a test boot's app confirms itself). Returns the version running."""

    async def reset() -> None:
        async with SMPClient(SerialTransport(sim.path)) as client:
            await client.reset()

    asyncio.run(reset())
    m = sim.wait_for(BOOT)
    version = m.group(2)
    assert version in allowed, (version, allowed)
    if m.group(3):
        sim.wait_for(r"CONFIRM True")
    sim.wait_for(SERVING)
    states = asyncio.run(_state(sim.path))
    active = [s for s in states if s.active]
    assert len(active) == 1 and active[0].version == version and active[0].confirmed, states
    assert not any(s.pending for s in states), states
    return version


def _running_v1(tmp_path: Path, images: dict[str, bytes]) -> SimProcess:
    sim = SimProcess(tmp_path / "dev", [KEY], "--slot-size", "256k")
    sim.wait_for(SERVING)
    asyncio.run(_flash(sim.path, images["1.0.0"], Mark.CONFIRM, reset=True))
    sim.wait_for(r"APP 1\.0\.0")
    sim.wait_for(SERVING)
    return sim


def soak(sim: SimProcess, images: dict[str, bytes], runs: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    running = "1.0.0"
    tally = {"updated": 0, "kept": 0}
    for i in range(runs):
        new = "2.0.0" if running != "2.0.0" else "3.0.0"
        faults = Faults(drop=rng.choice([0, 0.03, 0.1]), corrupt=rng.choice([0, 0.03, 0.1]),
                        duplicate=rng.choice([0, 0.05]), delay=rng.choice([0, 0.1]), delay_s=0.05,
                        cut=rng.choice([0, 0, 0.02]), cut_s=0.4, seed=seed * 100_000 + i)
        with FaultRelay(sim.path, faults) as relay:
            try:
                asyncio.run(_flash(relay.path, images[new], Mark.TEST, reset=False, timeout=1.0))
            except MpbootError:
                pass  # a failed update is allowed; what it leaves behind is checked below
        now = _reset_and_check(sim, {running, new})
        tally["updated" if now == new else "kept"] += 1
        running = now
    return tally


def test_updates_over_a_faulty_line_end_old_or_new(images: dict[str, bytes], tmp_path: Path) -> None:
    sim = _running_v1(tmp_path, images)
    try:
        tally = soak(sim, images, runs=4, seed=1)
        assert tally["updated"] >= 1  # the client does get through a bad line
    finally:
        assert sim.stop() == 0


@pytest.mark.slow
def test_soak_1000_updates_over_a_faulty_line(images: dict[str, bytes], tmp_path: Path) -> None:
    sim = _running_v1(tmp_path, images)
    try:
        tally = soak(sim, images, runs=1000, seed=2)
        print(f"soak: {tally['updated']} updated, {tally['kept']} kept the old image, 0 other states")
    finally:
        assert sim.stop() == 0


@pytest.mark.parametrize("kind", ["big", "compressible"])
def test_upload_resumes_after_the_simulator_is_killed(images: dict[str, bytes], tmp_path: Path, kind: str) -> None:
    sim = _running_v1(tmp_path, images)
    big = images[kind]
    killed_at = []

    def progress(done: int, total: int) -> None:
        if not killed_at and done > 80_000:  # past two 32 KiB checkpoints
            killed_at.append(done)
            sim.kill9()

    with pytest.raises(MpbootError):
        asyncio.run(_flash(sim.path, big, Mark.TEST, reset=False, timeout=1.0, progress=progress))
    assert killed_at
    sim = SimProcess(tmp_path / "dev", [KEY], "--slot-size", "256k")  # same state dir
    try:
        sim.wait_for(r"APP 1\.0\.0")  # the old image still runs
        sim.wait_for(SERVING)
        result = asyncio.run(_flash(sim.path, big, Mark.TEST, reset=True))
        assert result.upload.resumed_from >= 65536 and result.upload.resumed_from % 32768 == 0
        assert result.upload.resumed_from <= killed_at[0]
        assert result.upload.match is True
        assert (result.upload.compressed > 0) == (kind == "compressible")  # compressed again after the cut
        sim.wait_for(r"mpboot: slot 1 version 4\.0\.0\+0 test boot")
        sim.wait_for(r"CONFIRM True")
    finally:
        assert sim.stop() == 0
