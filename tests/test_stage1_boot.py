"""Stage 1 runs from its own signed image (issue 19, docs/BOOT.md "Two stages"): the serving
simulated device with stage-1 slots boots, loads the update service from the stage-1 slot
the boot decision chose (mounted at /s1, never from sys.path), and serves it to stock
smpclient over its pty. A stage 1 that fails to import falls back in the same boot to the
other slot's confirmed one, then to the rescue (the service frozen in the firmware). An
app's ROMFS holding modules named like the service's builtins or packages changes nothing.

Stage-1 images are the real service: `mpboot firmware export --stage1`, packed and signed
with kind updater; variants patch one file so that the test can tell which one served."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import KEYS_DIR, signing_key
from simkit import installed, make_app, make_service, sign_app
from simserve import SimProcess, mpboot, ok
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.os_management import EchoWrite
from smpclient.transport.serial import SMPSerialTransport

from mpboot.cli import cli as cli_main
from mpboot.image import ImageKind
from mpboot.pack import pack_app
from mpboot.sim import Geometry, SimDevice, read_config, write_config

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"mpboot: serving SMP"
TIMEOUT = 20.0
# 64 KiB app slots, 40 KiB stage-1 slots (the service packs to about 25 KiB), 4 KiB sectors.
GEOMETRY = Geometry.for_slots(64 * 1024, 4096, 16, s1_size=40 * 1024)

@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("stage1-images")
    key = signing_key(KEY.name)
    made = {}
    for name, variant, version in (("good", "", "1.0.0"), ("shout", "shout", "2.0.0"),
                                   ("crash", "crash", "3.0.0"), ("breaks", "breaks", "4.0.0"),
                                   ("mute", "mute", "5.0.0")):
        romfs = make_service(out / name, variant)
        made[name] = out / f"s1-{name}.bin"
        made[name].write_bytes(sign_app(romfs, key, version, kind=ImageKind.UPDATER))
    app = make_app(out / "app", "v1", confirm=True)
    made["app"] = out / "app.bin"
    made["app"].write_bytes(sign_app(app, key, "1.0.0"))
    return made


def _device(state: Path, images: dict[str, Path], *stage1: tuple[str, str]) -> SimDevice:
    """A device in `state` with the app confirmed and the stage-1 images (name, mode)
    installed in order (each into stage 1's free slot)."""
    dev = SimDevice.create(state, [signing_key(KEY.name).public()], GEOMETRY)
    installed(dev.install(images["app"], "permanent"))
    for name, mode in stage1:
        installed(dev.run("install", images[name], mode, 2048, "image=1"))
    return dev


async def _echo(path: str, text: str) -> str:
    async with SMPClient(SMPSerialTransport(), path, timeout_s=TIMEOUT) as client:
        rsp = await client.request(EchoWrite(d=text), timeout_s=TIMEOUT)
        assert success(rsp), rsp
        return rsp.r


def _serve(state: Path) -> SimProcess:
    return SimProcess(state, [KEY])


def test_the_service_runs_from_the_stage1_image(tmp_path: Path, images: dict[str, Path]) -> None:
    """The service answering is the chosen stage-1 image's code: "shout" capitalises echoes,
    the firmware's own copy (the rescue) does not."""
    _device(tmp_path / "dev", images, ("shout", "permanent"))
    sim = _serve(tmp_path / "dev")
    try:
        sim.wait_for(r"mpboot: stage 1 slot 0 version 2\.0\.0\+0$")
        sim.wait_for(r"APP v1$")
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "from stage one")) == "FROM STAGE ONE"
        state = json.loads(ok("state", "--port", sim.path, "--json"))  # device info: s1, ctr1
        assert (state["stage1"], state["stage1_floor"]) == ("2.0.0+0", 1), state
        assert "stage 1 2.0.0+0" in ok("state", "--port", sim.path)
    finally:
        assert sim.stop() == 0


def test_a_stage1_that_fails_to_import_falls_back_to_the_other_slot(tmp_path: Path, images: dict[str, Path]) -> None:
    # "shout" confirmed in slot 0, then "crash" installed permanently into slot 1: the boot
    # chooses "crash", which raises at import; in the same boot slot 0's confirmed "shout"
    # serves.
    _device(tmp_path / "dev", images, ("shout", "permanent"), ("crash", "permanent"))
    sim = _serve(tmp_path / "dev")
    try:
        sim.wait_for(r"stage 1 crashes at import")
        sim.wait_for(r"mpboot: stage 1 slot 1 cannot run \(error -5 \(STAGE1_IMPORT")
        sim.wait_for(r"mpboot: stage 1 slot 0 version 2\.0\.0\+0$")
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "fallback")) == "FALLBACK"
    finally:
        assert sim.stop() == 0


def test_no_runnable_stage1_leaves_the_rescue_serving(tmp_path: Path, images: dict[str, Path]) -> None:
    _device(tmp_path / "dev", images, ("crash", "permanent"))
    sim = _serve(tmp_path / "dev")
    try:
        sim.wait_for(r"mpboot: stage 1 slot 0 cannot run \(error -5 \(STAGE1_IMPORT")
        sim.wait_for(r"mpboot: stage 1 none: the rescue service$")
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "rescued")) == "rescued"  # the firmware's own service
        state = json.loads(ok("state", "--port", sim.path, "--json"))
        assert "stage1" in state and state["stage1"] is None, state
        assert "the firmware's rescue serves" in ok("state", "--port", sim.path)
    finally:
        assert sim.stop() == 0


def test_a_stage1_test_image_that_crashes_serves_the_confirmed_one(tmp_path: Path, images: dict[str, Path]) -> None:
    _device(tmp_path / "dev", images, ("shout", "permanent"), ("crash", "test"))
    sim = _serve(tmp_path / "dev")
    try:
        sim.wait_for(r"mpboot: stage 1 slot 1 cannot run \(error -5 \(STAGE1_IMPORT")
        sim.wait_for(r"mpboot: stage 1 slot 0 version 2\.0\.0\+0$")
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "kept")) == "KEPT"
    finally:
        assert sim.stop() == 0
    # The trial was started and never proven: the next boot reverts it.
    st = SimDevice.open(tmp_path / "dev").status()
    assert st.s1 is not None and st.s1.trial == 1 and st.s1.active == 0


def test_an_app_cannot_stand_in_for_the_service_or_its_builtins(tmp_path: Path, images: dict[str, Path]) -> None:
    """An app ROMFS with struct.py, time.py, select.py, binascii.py and mpboot/smp/ files:
    the app itself runs, but nothing of it is imported for the service (each would print
    HOSTILE), and the stage-1 image still serves."""
    folder = tmp_path / "hostile"
    make_app(folder, "hostile", confirm=True)
    for name in ("struct", "time", "select", "binascii", "asyncio"):
        (folder / f"{name}.py").write_text(f"print('HOSTILE {name}')\n")
    (folder / "mpboot/smp").mkdir(parents=True)
    (folder / "mpboot/__init__.py").write_text("print('HOSTILE mpboot')\n")
    (folder / "mpboot/smp/__init__.py").write_text("print('HOSTILE smp')\n")
    (folder / "mpboot/smp/service.py").write_text("print('HOSTILE service')\n")
    (tmp_path / "hostile.bin").write_bytes(sign_app(pack_app(folder), signing_key(KEY.name), "1.0.0"))
    dev = _device(tmp_path / "dev", images, ("shout", "permanent"))
    installed(dev.install(tmp_path / "hostile.bin", "permanent"))
    sim = _serve(tmp_path / "dev")
    try:
        sim.wait_for(r"APP hostile$")
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "still me")) == "STILL ME"
    finally:
        assert sim.stop() == 0
    assert not [line for line in sim.lines if "HOSTILE" in line], sim.lines


def test_firmware_export_stage1_signs_as_an_updater(tmp_path: Path) -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    out = runner.invoke(cli_main, ["firmware", "export", "--stage1", str(tmp_path / "s1")])
    assert out.exit_code == 0, out.output
    names = sorted(p.relative_to(tmp_path / "s1").as_posix() for p in (tmp_path / "s1").rglob("*.py"))
    assert "mpboot/smp/service.py" in names and "mpboot/smp/server.py" in names and "mpboot/transport/uart.py" in names
    # Stage 0 stays in the firmware: none of it is in stage 1's image.
    assert not {"mpboot/boot.py", "mpboot/cbor.py", "mpboot/image.py", "mpboot/update.py",
                "mpboot/__init__.py"} & set(names)
    signed = runner.invoke(cli_main, ["sign", str(tmp_path / "s1"), "-k", str(KEY), "--kind", "updater",
                                      "--version", "1.0.0", "-o", str(tmp_path / "s1.bin")])
    assert signed.exit_code == 0, signed.output
    # An app folder is not a stage 1, and a stage-1 folder is not an app.
    app = make_app(tmp_path / "app", "v1", confirm=True)
    del app
    wrong = runner.invoke(cli_main, ["sign", str(tmp_path / "app"), "-k", str(KEY), "--kind", "updater",
                                     "--version", "1.0.0", "-o", str(tmp_path / "x.bin")])
    assert wrong.exit_code == 2 and "no mpboot/smp/service.py" in wrong.output and "Traceback" not in wrong.output
    wrong = runner.invoke(cli_main, ["sign", str(tmp_path / "s1"), "-k", str(KEY),
                                     "--version", "1.0.0", "-o", str(tmp_path / "x.bin")])
    assert wrong.exit_code == 2 and "no main.py" in wrong.output


FEED = """
import time
import mpboot
from mpboot import boot
from mpboot.ports import unix as port

class Slots:  # what set_booted reads of the app's pair
    state = [0] * 13

w = port.watchdog(60000)
boot.set_booted(Slots(), 0, None, w, boot.HOW_CONFIRMED)
b = mpboot._booted
b[boot.BOOTED_S1_SLOT] = 1
b[boot.BOOTED_S1_HOW] = boot.HOW_TEST
b[boot.BOOTED_DEADLINE] = time.ticks_add(time.ticks_ms(), 60000)
boot.feed()
print("BEFORE", w.feeds)
b[boot.BOOTED_DEADLINE] = time.ticks_add(time.ticks_ms(), -1)
boot.feed()
print("LATE", w.feeds)
b[boot.BOOTED_S1_HOW] = boot.HOW_CONFIRMED  # proven and confirmed (mpboot.smp.stage1)
b[boot.BOOTED_DEADLINE] = None
boot.feed()
print("PROVEN", w.feeds)
"""


def test_the_watchdog_is_not_fed_past_an_unproven_stage1_deadline(device) -> None:  # type: ignore[no-untyped-def]
    """Stage 0's feed() (every feeder: the app, the service's tick) stops feeding once a
    stage-1 test boot's proof deadline passes unproven, so a stage 1 that hangs, or serves
    without proving itself, is reset by the watchdog and reverted by the next boot."""
    from mpboot import upy

    proc = upy.run(["-c", FEED], path=[device.lib])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["BEFORE", "1", "LATE", "1", "PROVEN", "2"], proc.stdout


def test_a_stage1_that_breaks_uploads_fails_its_proof_and_is_reverted(tmp_path: Path, images: dict[str, Path]) -> None:
    """It boots and answers, but its uploads write wrong bytes: the probe goes through the
    same upload code (into a hash), so it fails; the confirm is refused; a reset reverts it."""
    _device(tmp_path / "dev", images, ("good", "permanent"))
    sim = _serve(tmp_path / "dev")
    port = ["--port", sim.path]
    try:
        sim.wait_for(SERVING)
        r = mpboot("flash", images["breaks"], *port, "--image", "stage1", "--test", "--reset", "--no-progress")
        sim.wait_for(r"mpboot: stage 1 slot 1 version 4\.0\.0\+0 test boot$")
        assert r.exit_code != 0 and "probe" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert asyncio.run(_echo(sim.path, "answers")) == "answers"
        refused = mpboot("confirm", *port, "--image", "stage1")
        assert refused.exit_code != 0, refused.stdout
        ok("reset", *port)
        sim.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")  # reverted
        sim.wait_for(SERVING)
    finally:
        assert sim.stop() == 0


def test_a_stage1_that_never_answers_is_reverted_at_its_deadline(tmp_path: Path, images: dict[str, Path]) -> None:
    dev = _device(tmp_path / "dev", images, ("good", "permanent"), ("mute", "test"))
    write_config(dev.config, {**read_config(dev.config), "prove": 1500})
    sim = _serve(tmp_path / "dev")
    try:
        sim.wait_for(r"mpboot: stage 1 slot 1 version 5\.0\.0\+0 test boot$")
        sim.wait_for(SERVING)
        # Nobody can prove it (it answers nothing): at the deadline the service resets and
        # the next boot reverts it.
        sim.wait_for(r"mpboot: stage 1 slot 0 version 1\.0\.0\+0$")
        sim.wait_for(SERVING)
        assert asyncio.run(_echo(sim.path, "back")) == "back"
    finally:
        assert sim.stop() == 0


def test_combined_update_of_app_and_stage1_with_mpboot_flash(tmp_path: Path, images: dict[str, Path]) -> None:
    """`mpboot flash APP --with-stage1 S1 --test --reset`: an app that needs stage 1 >= 2.0.0
    cannot be test-marked alone against stage 1 1.0.0 (DEPENDENCY), but as a pair with that
    stage 1 both boot on trial together, the app confirms its half, stage 1 is proven: both
    kept. The pair mark is one state write (`with`)."""
    key = signing_key(KEY.name)
    app2 = tmp_path / "app2.bin"
    app2.write_bytes(sign_app(make_app(tmp_path / "app2", "v2", confirm=True), key, "2.0.0", depends=((1, "2.0.0"),)))
    _device(tmp_path / "dev", images, ("good", "permanent"))
    sim = _serve(tmp_path / "dev")
    port = ["--port", sim.path]
    try:
        sim.wait_for(SERVING)
        alone = mpboot("flash", app2, *port, "--test", "--no-progress")
        assert alone.exit_code != 0 and "dependency" in alone.stderr.lower(), alone.stderr
        out = ok("flash", app2, *port, "--with-stage1", images["shout"], "--test", "--reset", "--no-progress")
        assert "marked together" in out, out
        sim.wait_for(r"mpboot: stage 1 slot 1 version 2\.0\.0\+0 test boot$")
        sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0 test boot")
        sim.wait_for(r"APP v2$")
        sim.wait_for(SERVING)
        state = json.loads(ok("state", *port, "--json"))
        rows = {(r.get("image", 0), r["version"]): r for r in state["images"]}
        assert rows[(0, "2.0.0")]["active"] and rows[(0, "2.0.0")]["confirmed"], rows
        assert rows[(1, "2.0.0")]["active"] and rows[(1, "2.0.0")]["confirmed"], rows
        assert asyncio.run(_echo(sim.path, "pair")) == "PAIR"
        ok("reset", *port)
        sim.wait_for(r"mpboot: stage 1 slot 1 version 2\.0\.0\+0$")
        sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0$")
        sim.wait_for(SERVING)
    finally:
        assert sim.stop() == 0
