"""End to end: `mpboot flash` and friends against `mpboot sim` (the firmware on the MicroPython
unix port serving SMP on a pty).

flash (permanent, reset) -> the device boots it; flash --test --reset -> it boots as a test
image; state shows it; confirm -> state shows it confirmed; an interrupted upload resumes
after a device reset; a refused image is refused before its payload (ptlv) or at the end
(signature); a paced line stays busy.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import KEYS_DIR, signing_key
from mpboot.errors import ImageErrorCode
from mpboot.flashing import Mark, flash, prepare
from mpboot.image import vendor_uuid
from mpboot.sim import SimDevice, install_result
from mpboot.smp import ImageRefused, SMPClient, VerificationFailed
from mpboot.transport.serial import SerialTransport
from simkit import image_files, make_app, sign_app
from simserve import SimProcess, mpboot, ok, slots

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("apps")
    key = signing_key(KEY.name)
    made = {
        "1.0.0": sign_app(make_app(out / "a1", "1.0.0", confirm=True, filler=3000), key, "1.0.0"),
        "2.0.0": sign_app(make_app(out / "a2", "2.0.0", confirm=False, filler=90_000), key, "2.0.0"),
        "untrusted": sign_app(make_app(out / "a3", "3.0.0", confirm=False, filler=3000),
                              signing_key("TEST-ONLY-rsa2048-untrusted.pem"), "3.0.0"),
        "vendor": sign_app(make_app(out / "a4", "4.0.0", confirm=False), key, "4.0.0", vendor_id=b"\x42" * 16),
    }
    return image_files(out, made)


@pytest.mark.parametrize("framing", ["raw", "console"])
def test_flash_test_boot_confirm(images: dict[str, Path], tmp_path: Path, framing: str) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    port = ["--port", sim.path, "--framing", framing]
    try:
        sim.wait_for(r"serving SMP")
        out = ok("flash", images["1.0.0"], *port, "--confirm", "--reset", "--no-progress")
        assert "made permanent" in out and "device reset" in out
        sim.wait_for(r"mpboot: slot \d version 1\.0\.0\+0$")
        sim.wait_for(r"APP 1\.0\.0")
        sim.wait_for(r"serving SMP")

        out = ok("flash", images["2.0.0"], *port, "--test", "--reset")  # with the progress bar
        assert "marked for a test boot" in out
        sim.wait_for(r"mpboot: slot \d version 2\.0\.0\+0 test boot")
        sim.wait_for(r"APP 2\.0\.0")
        sim.wait_for(r"serving SMP")
        state = slots(port)
        v2 = state["2.0.0"]
        assert v2["active"] and not v2["confirmed"]  # running its test boot
        assert state["1.0.0"]["confirmed"] and not state["1.0.0"]["active"]
        table = ok("state", *port)
        assert any(line.split()[1:2] == ["2.0.0"] and "active" in line and "confirmed" not in line
                   for line in table.splitlines())

        assert ok("confirm", *port).strip() == f"confirmed the running image (slot {v2['slot']}, version 2.0.0)"
        state = slots(port)
        assert state["2.0.0"]["active"] and state["2.0.0"]["confirmed"]
        assert not state["1.0.0"]["confirmed"]
        assert ok("echo", "still there", *port).strip() == "still there"
    finally:
        assert sim.stop() == 0


def test_interrupted_upload_resumes_after_a_reset(images: dict[str, Path], tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    data = images["2.0.0"].read_bytes()
    assert len(data) > 64 * 1024  # past the device's first 32 KiB checkpoints

    class Interrupted(Exception):
        pass

    def stop_half_way(done: int, total: int) -> None:
        if done > 0.8 * total:
            raise Interrupted

    async def partial() -> None:
        async with SMPClient(SerialTransport(sim.path)) as client:
            with pytest.raises(Interrupted):
                await flash(client, data, progress=stop_half_way)
            await client.reset()

    async def full() -> Any:
        async with SMPClient(SerialTransport(sim.path)) as client:
            return await flash(client, data, mark=Mark.TEST)

    try:
        sim.wait_for(r"serving SMP")
        asyncio.run(partial())
        sim.wait_for(r"device reset")
        sim.wait_for(r"serving SMP")
        result = asyncio.run(full())
        assert result.upload.resumed_from >= 32 * 1024  # the persisted checkpoint
        assert result.upload.sent < len(data) - 32 * 1024 + 4096
        assert result.slot is not None and result.slot.pending and result.slot.version == "2.0.0"
    finally:
        assert sim.stop() == 0


def test_refusals(images: dict[str, Path], tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY], "--vendor-id", "example.com")
    port = ["--port", sim.path]
    try:
        sim.wait_for(r"serving SMP")
        # another vendor's image: refused from its protected TLVs, before any payload
        vendor = images["vendor"].read_bytes()

        async def refused() -> int:
            async with SMPClient(SerialTransport(sim.path)) as client:
                with pytest.raises(ImageRefused) as exc:
                    await flash(client, prepare(vendor))
                assert exc.value.code is ImageErrorCode.VENDOR_MISMATCH
                return client.stats.requests

        # the state read (does the device hold it already?), params, and the first upload request
        assert asyncio.run(refused()) == 3
        r = mpboot("flash", images["vendor"], *port, "--no-progress")
        assert r.exit_code == 1
        assert r.stderr.strip() == ("mpboot: error: device refused the image: image is for another vendor "
                                    "(vendor id) (image error 16, SMP rc 3 EINVAL)")
        # the device wants a vendor id: an image without one is refused as well
        r = mpboot("flash", images["untrusted"], *port, "--no-progress")
        assert r.exit_code == 1 and "image error 16" in r.stderr
    finally:
        assert sim.stop() == 0


def test_untrusted_signature_fails_verification(images: dict[str, Path], tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    try:
        sim.wait_for(r"serving SMP")

        async def run() -> None:
            async with SMPClient(SerialTransport(sim.path)) as client:
                with pytest.raises(VerificationFailed) as exc:
                    await flash(client, images["untrusted"].read_bytes(), mark=Mark.TEST)
                assert exc.value.code in (ImageErrorCode.UNKNOWN_KEY, ImageErrorCode.NO_SIGNATURE)

        asyncio.run(run())
        r = mpboot("flash", images["untrusted"], "--port", sim.path, "--test", "--no-progress")
        assert r.exit_code == 1
        assert r.stderr.startswith("mpboot: error: image verification on the device failed: ")
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        assert sim.stop() == 0


def test_the_simulator_and_smp_refuse_alike(images: dict[str, Path], tmp_path: Path) -> None:
    """One refusal, one type and one code, however the board is reached: SimDevice.install
    (the device's updater in one power-on) or an upload over SMP to `mpboot sim`. Another
    vendor's image is refused as offered (ImageRefused); an image for this vendor signed by an
    untrusted key is refused once it arrived whole (VerificationFailed)."""
    vid = vendor_uuid("example.com")
    untrusted = tmp_path / "untrusted-ours.bin"
    # (filler: more than one upload request, so the refusal meets the last one, as in the sim)
    untrusted.write_bytes(sign_app(make_app(tmp_path / "u", "5.0.0", confirm=False, filler=3000),
                                   signing_key("TEST-ONLY-rsa2048-untrusted.pem"), "5.0.0", vendor_id=vid))
    cases = {"other vendor": images["vendor"], "untrusted key": untrusted}

    direct = SimDevice.create(tmp_path / "direct", [signing_key(KEY.name).public()], vendor_id=vid)
    from_sim: dict[str, ImageRefused] = {}
    for name, path in cases.items():
        with pytest.raises(ImageRefused) as exc:
            install_result(direct.install(path, "test", manifest=True))  # manifest: ptlv first, as flash sends it
        from_sim[name] = exc.value

    over_smp: dict[str, ImageRefused] = {}
    sim = SimProcess(tmp_path / "served", [KEY], "--vendor-id", "example.com")
    try:
        sim.wait_for(r"serving SMP")

        async def upload_each() -> None:
            async with SMPClient(SerialTransport(sim.path)) as client:
                for name, path in cases.items():
                    with pytest.raises(ImageRefused) as exc:
                        await flash(client, path.read_bytes())
                    over_smp[name] = exc.value

        asyncio.run(upload_each())
    finally:
        assert sim.stop() == 0

    assert from_sim["other vendor"].code is ImageErrorCode.VENDOR_MISMATCH
    assert type(from_sim["other vendor"]) is ImageRefused
    assert from_sim["untrusted key"].code in (ImageErrorCode.UNKNOWN_KEY, ImageErrorCode.NO_SIGNATURE)
    assert type(from_sim["untrusted key"]) is VerificationFailed
    for name in cases:
        assert (type(over_smp[name]), over_smp[name].code) == (type(from_sim[name]), from_sim[name].code), name
        assert from_sim[name].rc is None and over_smp[name].rc is not None  # wire details: SMP only


def test_pipelining_keeps_a_paced_line_busy(images: dict[str, Path], tmp_path: Path) -> None:
    baud = 230400
    sim = SimProcess(tmp_path / "dev", [KEY], "--baud", str(baud), "--flash-timing", "nor")
    data = images["2.0.0"].read_bytes()
    try:
        sim.wait_for(r"serving SMP")

        async def run() -> Any:
            async with SMPClient(SerialTransport(sim.path)) as client:
                t0 = time.monotonic()
                result = await client.upload(data, ptlv=prepare(data).ptlv)
                return result, time.monotonic() - t0

        result, elapsed = asyncio.run(run())
        line = baud / 10  # bytes per second, 8N1
        share = len(data) / elapsed / line
        print(f"raw framing, window {result.window}: {len(data) / elapsed:.0f} B/s = {share:.0%} of the line")
        assert share > 0.75, share
    finally:
        assert sim.stop() == 0


def run_v1(sim: SimProcess, images: dict[str, Path]) -> None:
    """The fresh device takes v1, made permanent, and runs it."""
    sim.wait_for(r"serving SMP")
    ok("flash", images["1.0.0"], "--port", sim.path, "--confirm", "--reset", "--no-progress")
    sim.wait_for(r"APP 1\.0\.0")
    sim.wait_for(r"serving SMP")


class _Cut(Exception):
    """The host died here (kill -9 of `mpboot flash`): the device keeps what it got."""


class _CutClient(SMPClient):
    """An SMP client that stops at one step of a flash, as a killed host would."""

    def __init__(self, path: str, cut: str) -> None:
        super().__init__(SerialTransport(path))
        self.cut = cut

    async def state_write(self, hash: bytes | None, confirm: bool) -> Any:
        if self.cut == "before-mark":
            raise _Cut
        done = await super().state_write(hash, confirm)
        if self.cut == "after-mark":
            raise _Cut
        return done

    async def reset(self) -> None:
        if self.cut == "before-reset":
            raise _Cut
        await super().reset()
        if self.cut == "after-reset":
            raise _Cut


@pytest.mark.parametrize("cut", ["mid-upload", "before-mark", "after-mark", "after-reset"])
@pytest.mark.parametrize("how", ["--test", "--confirm"])
def test_rerunning_a_cut_flash_completes_it(images: dict[str, Path], tmp_path: Path, cut: str, how: str) -> None:
    """README: re-running an interrupted flash completes it, wherever it stopped. The v3 app
    confirms itself: after the re-run it runs, confirmed, whatever the first run managed."""
    key = signing_key(KEY.name)
    v3 = tmp_path / "v3.bin"
    v3.write_bytes(sign_app(make_app(tmp_path / "a", "3.0.0", confirm=True, filler=90_000), key, "3.0.0"))
    sim = SimProcess(tmp_path / "dev", [KEY])
    port = ["--port", sim.path]
    try:
        run_v1(sim, images)

        def half_way(done: int, total: int) -> None:
            if cut == "mid-upload" and done > total // 2:
                raise _Cut

        async def first() -> None:
            async with _CutClient(sim.path, cut) as client:
                with pytest.raises(_Cut):
                    await flash(client, v3.read_bytes(), mark=Mark.TEST if how == "--test" else Mark.CONFIRM,
                                reset=True, progress=half_way)

        asyncio.run(first())
        if cut == "after-reset":  # the device went on without the host: v3 ran and confirmed itself
            sim.wait_for(r"APP 3\.0\.0")
            sim.wait_for(r"serving SMP")
        again = mpboot("flash", v3, *port, how, "--reset", "--no-progress")
        assert again.exit_code == 0, again.stdout + again.stderr
        if cut == "after-reset":
            assert again.stdout.strip() == (f"{v3} (version 3.0.0+0) already runs on the device (slot 1, "
                                            "confirmed): nothing uploaded, no reset needed")
        else:
            assert "flashed" in again.stdout and "device reset" in again.stdout
            if cut in ("before-mark", "after-mark"):
                assert "the device held it already: nothing uploaded" in again.stdout
            sim.wait_for(r"APP 3\.0\.0")
            sim.wait_for(r"serving SMP")
        v = slots(port)["3.0.0"]
        assert v["active"] and v["confirmed"], v
        assert ok("flash", v3, *port, how, "--no-progress").startswith(f"{v3} (version 3.0.0+0) already runs")
    finally:
        sim.stop()


def test_confirm_by_hash_when_both_slots_hold_the_image(images: dict[str, Path], tmp_path: Path) -> None:
    """The running image, copied into the other slot too: `confirm HASH` acts on the running
    copy (as Zephyr does) and says so, instead of claiming the other slot was made permanent."""
    sim = SimProcess(tmp_path / "dev", [KEY])
    port = ["--port", sim.path]
    try:
        run_v1(sim, images)
        data = images["1.0.0"].read_bytes()

        async def copy() -> None:  # what a re-run of an old tool did: the same image, other slot
            async with SMPClient(SerialTransport(sim.path)) as client:
                await client.upload(data)

        asyncio.run(copy())
        h = prepare(data).hash
        assert h is not None
        both = json.loads(ok("state", *port, "--json"))["images"]
        assert [(s["slot"], s["hash"] == h.hex(), s["active"]) for s in both] == [(0, True, True), (1, True, False)]
        out = ok("confirm", h.hex()[:8], *port)
        assert out.strip() == "confirmed the running image (slot 0, version 1.0.0)"
        after = json.loads(ok("state", *port, "--json"))["images"]
        assert not any(s["permanent"] or s["pending"] for s in after), after
    finally:
        sim.stop()


def test_flash_confirm_of_the_image_on_its_test_boot_confirms_it(images: dict[str, Path], tmp_path: Path) -> None:
    """v2 does not confirm itself: flashing it again with --confirm while it runs its test
    boot confirms it (no upload, no reset) and says so."""
    sim = SimProcess(tmp_path / "dev", [KEY])
    port = ["--port", sim.path]
    try:
        run_v1(sim, images)
        ok("flash", images["2.0.0"], *port, "--test", "--reset", "--no-progress")
        sim.wait_for(r"APP 2\.0\.0")
        sim.wait_for(r"serving SMP")
        assert not slots(port)["2.0.0"]["confirmed"]
        out = ok("flash", images["2.0.0"], *port, "--confirm", "--reset", "--no-progress")
        assert out.strip() == (f"{images['2.0.0']} (version 2.0.0+0) already runs on the device (slot 1, on its "
                               "test boot: confirmed it now): nothing uploaded, no reset needed")
        v2 = slots(port)["2.0.0"]
        assert v2["active"] and v2["confirmed"], v2
    finally:
        sim.stop()


def test_flash_confirm_of_the_running_image_while_another_is_made_permanent(images: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """v2 made permanent (no reset yet): the device lists v1 running and confirmed (Zephyr:
    not on a test boot) and v2 pending and permanent. Flashing v1 again with --confirm cannot
    keep v1 (the device keeps a permanent install): refused with why, nothing written; so is
    `mpboot confirm` of the running image."""
    sim = SimProcess(tmp_path / "dev", [KEY])
    port = ["--port", sim.path]
    try:
        run_v1(sim, images)
        assert "made permanent" in ok("flash", images["2.0.0"], *port, "--confirm", "--no-progress")
        state = slots(port)
        assert (state["1.0.0"]["active"], state["1.0.0"]["confirmed"], state["1.0.0"]["pending"]) == (True, True, False)
        assert (state["2.0.0"]["pending"], state["2.0.0"]["permanent"], state["2.0.0"]["confirmed"]) == (True, True, False)
        again = mpboot("flash", images["1.0.0"], *port, "--confirm", "--no-progress")
        assert again.exit_code == 1, again.stdout + again.stderr
        assert "slot 1 (version 2.0.0) was made permanent and boots at the next reset" in again.stderr
        conf = mpboot("confirm", *port)  # the running image's confirm: the same
        assert conf.exit_code == 1 and "the running image cannot be kept, but the image in slot 1" in conf.stderr
        assert slots(port) == state
    finally:
        sim.stop()
