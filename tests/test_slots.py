"""Slots and state on the simulated device, one power-on per process: test boot, confirm,
revert, anti-rollback floor, downgrade refusal, vendor/class ids, corrupted slots, factory
images, recovery and the watchdog of test boots."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpboot.errors import ImageErrorCode
from mpboot.image import ImageKind, class_uuid, parse_image, vendor_uuid
from mpboot.keys import SigningKey
from mpboot.sim import Geometry, SimDevice
from simkit import boot, installed, make_app, refused, sign_app

VENDOR = vendor_uuid("example.com")
CLASS = class_uuid("hello-board", VENDOR)
OTHER_VENDOR = vendor_uuid("example.org")


@pytest.fixture(scope="module")
def romfs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("apps")
    return {
        "confirming": make_app(out / "c", "confirming", confirm=True),
        "silent": make_app(out / "s", "silent", confirm=False),
    }


@pytest.fixture
def image(tmp_path: Path, romfs: dict[str, bytes], rsa2048: SigningKey):  # type: ignore[no-untyped-def]
    def make(version: str, *, confirm: bool = True, counter: int | None = 1, **kw: object) -> Path:
        data = sign_app(romfs["confirming" if confirm else "silent"], rsa2048, version, security_counter=counter, **kw)  # type: ignore[arg-type]
        path = tmp_path / f"img-{version}-{confirm}-{counter}-{len(list(tmp_path.iterdir()))}.bin"
        path.write_bytes(data)
        return path
    return make


@pytest.fixture
def dev(tmp_path: Path, sim_lib: Path) -> SimDevice:
    return SimDevice(tmp_path / "device", sim_lib)


def test_blank_device_is_in_recovery(dev: SimDevice) -> None:
    b = boot(dev)
    assert b.slot == -1
    assert dev.status().found is False


def test_permanent_install_boots_and_stays(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    assert installed(dev.install(image("1.0.0"), "permanent")) == 0
    for _ in range(2):
        b = boot(dev)
        assert (b.slot, b.version, b.trial, b.watchdog) == (0, "1.0.0", False, False)
        assert b.confirmed is False  # already confirmed: confirm() changes nothing


def test_test_boot_confirm_then_stays(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    assert installed(dev.install(image("2.0.0", counter=5), "test")) == 1
    assert dev.status().floor == 1  # a test mark does not raise the floor
    b = boot(dev)
    assert (b.slot, b.version, b.trial, b.watchdog, b.confirmed) == (1, "2.0.0", True, True, True)
    st = dev.status()
    assert (st.active, st.trial, st.test, st.floor) == (1, 255, 255, 5)  # confirm raised it
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "2.0.0", False)


def test_unconfirmed_test_image_is_reverted(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    installed(dev.install(image("2.0.0", confirm=False, counter=7), "test"))
    b = boot(dev)
    assert (b.slot, b.version, b.trial, b.confirmed) == (1, "2.0.0", True, None)
    assert dev.status().trial == 1
    b = boot(dev)  # reset without a confirm
    assert (b.slot, b.version, b.trial) == (0, "1.0.0", False)
    st = dev.status()
    assert (st.active, st.trial, st.test, st.floor) == (0, 255, 255, 1)  # the floor never moved
    assert st.slots[1].ok and not st.slots[1].confirmed
    assert boot(dev).version == "1.0.0"  # and it is not tried again


def test_unmarked_install_does_not_boot(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    installed(dev.install(image("2.0.0"), "none"))
    assert boot(dev).version == "1.0.0"


def test_counter_below_floor_is_refused(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("2.0.0", counter=5), "permanent"))
    assert refused(dev.install(image("2.1.0", counter=4), "test", manifest=True)) == ("image", ImageErrorCode.COUNTER_BELOW_FLOOR)
    # Without the manifest the image is written but refused at finish, never marked.
    assert refused(dev.install(image("2.1.0", counter=4), "test")) == ("image", ImageErrorCode.COUNTER_BELOW_FLOOR)
    st = dev.status()
    assert st.test == 255 and st.floor == 5
    assert boot(dev).version == "2.0.0"
    assert installed(dev.install(image("2.2.0", counter=5), "test")) == 1  # equal is fine


def test_an_updater_image_is_refused_in_the_apps_slots(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    """An image of another kind (MPBOOT_KIND updater) is not an app: refused before anything is
    written when its protected TLVs come first, refused at the end otherwise, never marked;
    one found in a slot does not boot."""
    installed(dev.install(image("1.0.0"), "permanent"))
    updater = image("2.0.0", kind=ImageKind.UPDATER)
    assert refused(dev.install(updater, "test", manifest=True)) == ("image", ImageErrorCode.WRONG_KIND)
    assert refused(dev.install(updater, "test")) == ("image", ImageErrorCode.WRONG_KIND)
    st = dev.status()
    assert st.test == 255 and st.slots[1].error == ImageErrorCode.WRONG_KIND
    assert boot(dev).version == "1.0.0"
    # A slot holding one (written there by other means) is not bootable: the board that has
    # nothing else is in recovery.
    fresh = SimDevice(dev.workdir.parent / "fresh", dev.lib)
    area0 = int(fresh.run("layout").line("AREAS").split()[1].split(":")[0])
    chip = bytearray(fresh.flash.read_bytes())
    data = updater.read_bytes()
    chip[area0:area0 + len(data)] = data
    fresh.flash.write_bytes(bytes(chip))
    assert boot(fresh).slot == -1 and fresh.status().slots[0].error == ImageErrorCode.WRONG_KIND


def test_early_refusal_writes_nothing(dev: SimDevice, image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("2.0.0", counter=5), "permanent"))
    before = dev.flash.read_bytes()
    trace = tmp_path / "trace.txt"
    assert refused(dev.install(image("3.0.0", counter=2), "test", manifest=True, trace=trace))[1] == 18
    bad = tmp_path / "bad-magic.bin"
    bad.write_bytes(b"\0" * 4 + image("3.0.0").read_bytes()[4:])
    assert refused(dev.install(bad, "test", trace=trace)) == ("image", ImageErrorCode.BAD_MAGIC)
    assert not trace.exists() or trace.read_text() == ""
    assert dev.flash.read_bytes() == before


def test_downgrade_refused_when_configured(tmp_path: Path, sim_lib: Path, image) -> None:  # type: ignore[no-untyped-def]
    dev = SimDevice(tmp_path / "strict", sim_lib, downgrade=False)
    installed(dev.install(image("2.1.0"), "permanent"))
    assert refused(dev.install(image("2.0.9"), "test")) == ("image", ImageErrorCode.DOWNGRADE)
    installed(dev.install(image("2.1.0"), "test"))  # same version: not a downgrade
    lenient = SimDevice(tmp_path / "lenient", sim_lib)
    installed(lenient.install(image("2.1.0"), "permanent"))
    installed(lenient.install(image("2.0.9"), "test"))


def test_vendor_and_class_ids(tmp_path: Path, sim_lib: Path, image) -> None:  # type: ignore[no-untyped-def]
    dev = SimDevice(tmp_path / "d", sim_lib, vendor_id=VENDOR, class_id=CLASS)
    ok = image("1.0.0", vendor_id=VENDOR, class_id=CLASS)
    assert parse_image(ok.read_bytes()).vendor_id == VENDOR
    installed(dev.install(ok, "permanent"))
    for kw, code in (({"vendor_id": OTHER_VENDOR, "class_id": CLASS}, ImageErrorCode.VENDOR_MISMATCH),
                     ({"class_id": CLASS}, ImageErrorCode.VENDOR_MISMATCH),
                     ({"vendor_id": VENDOR, "class_id": class_uuid("other-board", VENDOR)}, ImageErrorCode.CLASS_MISMATCH),
                     ({"vendor_id": VENDOR}, ImageErrorCode.CLASS_MISMATCH)):
        for manifest in (True, False):
            assert refused(dev.install(image("1.1.0", **kw), "test", manifest=manifest)) == ("image", code), kw
    assert boot(dev).version == "1.0.0"


def test_update_while_on_test_boot_is_refused(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    installed(dev.install(image("2.0.0"), "test"))
    # This power-on takes the test boot (update service running inside the unconfirmed image).
    assert refused(dev.install(image("3.0.0"), "test")) == ("update", 1)
    assert boot(dev).version == "1.0.0"  # the test boot was used up without a confirm


def flip_payload_bit(dev: SimDevice, slot: int) -> None:
    data = bytearray(dev.flash.read_bytes())
    data[slot * dev.geometry.slot_size + 0x200 + 40] ^= 0x10
    dev.flash.write_bytes(data)


def test_corrupted_slot_falls_back_to_the_other_confirmed_image(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    installed(dev.install(image("2.0.0"), "test"))
    assert boot(dev).confirmed is True
    flip_payload_bit(dev, 1)
    b = boot(dev)
    assert (b.slot, b.version) == (0, "1.0.0")
    st = dev.status()
    assert st.slots[1].error == ImageErrorCode.HASH_MISMATCH
    flip_payload_bit(dev, 0)
    assert boot(dev).slot == -1  # nothing valid left: recovery, with both reasons
    assert "error 10" in dev.boot().stdout


def test_fallback_respects_the_rollback_floor(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0", counter=1), "permanent"))
    installed(dev.install(image("2.0.0", counter=2), "test"))
    assert boot(dev).confirmed is True
    flip_payload_bit(dev, 1)
    assert boot(dev).slot == -1  # v1 is confirmed in slot 0 but below the floor now
    assert dev.status().slots[0].error == ImageErrorCode.COUNTER_BELOW_FLOOR


def test_factory_image_without_state_is_confirmed_at_first_boot(dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    # As esptool/picotool would flash it: raw image bytes into slot 1, state area erased.
    data = bytearray(b"\xff" * dev.geometry.size)
    img = image("1.2.0", counter=3).read_bytes()
    base = dev.geometry.slot_size
    data[base:base + len(img)] = img
    dev.flash.write_bytes(data)
    dev.flash.with_name("flash.bin.wear").write_bytes(bytes(4 * (dev.geometry.size // dev.geometry.sector)))
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "1.2.0", False)
    st = dev.status()
    assert (st.found, st.active, st.floor) == (True, 1, 3)


def test_geometry_slot_size_matches_the_device(dev: SimDevice) -> None:
    g: Geometry = dev.geometry
    assert 2 * g.slot_size + 6 * g.sector <= g.size
    assert g.state_start == 2 * g.slot_size and g.factory_start == g.size - 2 * g.sector
    assert g.trust_start == g.state_start + 2 * g.sector


@pytest.mark.parametrize("trust", [True, False], ids=["trust-area", "made-before-it"])
@pytest.mark.parametrize(("size", "sector"), [(64 * 1024, 4096), (68 * 1024, 4096), (64 * 1024, 1024)])
def test_device_areas_are_the_host_geometry(tmp_path: Path, sim_lib: Path, trust: bool, size: int,
                                            sector: int) -> None:
    """The device's port.areas() (ports/unix.py) is the host's Geometry: five areas, none
    overlapping (an odd sector count leaves one unused sector before the factory area); a
    device whose config predates the trust area, or whose sectors cannot hold a trust record
    (1 KiB), keeps the four-area layout and its frozen root set (trust version 1)."""
    g = Geometry(size, sector, 4, trust)
    assert Geometry.for_slots(g.slot_size, sector, 4).slot_size == g.slot_size
    dev = SimDevice(tmp_path / "device", sim_lib, g)
    if not trust:  # a config written before the trust area: no "trust" line at all
        dev.config.write_text("".join(line + "\n" for line in dev.config.read_text().splitlines()
                                      if not line.startswith("trust=")))
        assert SimDevice.open(dev.workdir).geometry == g
    run = dev.run("layout")
    areas = [tuple(map(int, a.split(":"))) for a in (run.line("AREAS") or "").split()[1:]]
    want = [(0, g.slot_size), (g.slot_size, g.slot_size), (g.state_start, 2 * g.sector),
            (g.factory_start, 2 * g.sector)]
    assert g.trust_area == (trust and sector == 4096)
    if g.trust_area:
        assert g.trust_start is not None
        want.append((g.trust_start, 2 * g.sector))
    assert areas == want
    spans = sorted(areas)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])) and spans[-1][0] + spans[-1][1] == size
    assert run.line("TRUST") == "TRUST version=1 threshold=1 image=1 roots=2 revocation=0 found=0"


def _device_codes(module: str, prefix: str) -> dict[str, int]:
    import re

    from conftest import FIRMWARE

    text = (FIRMWARE / "mpboot" / module).read_text()
    return {name: int(value) for name, value in re.findall(rf"^{prefix}(\w+) = const\((\d+)\)", text, re.M)}


def test_host_knows_every_device_image_policy_and_update_code() -> None:
    """One name per code: the device's E_X (image.py 1-15, 23-25 and 27, records.py 20-22,
    slots.py 16-19 and 26) is the host's
    ImageErrorCode.X, U_X (update.py) is UpdateErrorCode.X, with the same numbers."""
    from mpboot.errors import UpdateErrorCode

    certificates = {k: v for k, v in _device_codes("records.py", "E_").items() if k.startswith("CERT_")}
    verifier = _device_codes("image.py", "E_") | certificates
    policy = _device_codes("slots.py", "E_")
    firmware = _device_codes("espota.py", "E_")  # the esp32 firmware update's own
    assert sorted(verifier.values()) == [*range(1, 16), *range(20, 26), 27]
    assert sorted(policy.values()) == [16, 17, 18, 19, 26]
    assert firmware == {"NOT_ESP_APP": 30}
    assert verifier | policy | firmware == {code.name: code.value for code in ImageErrorCode}
    update = _device_codes("update.py", "U_")
    assert update == {code.name: code.value for code in UpdateErrorCode}


def test_old_image_confirm_does_not_undo_a_permanent_update(device, dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    from mpboot import upy

    installed(dev.install(image("1.0.0"), "permanent"))
    g = dev.geometry
    proc = upy.run(["-m", "dev_confirm", "confirm-after-permanent", dev.flash, g.size, g.sector, g.align,
                    image("2.0.0")], path=[device.lib])
    assert proc.returncode == 0, proc.stderr
    assert "BOOTED 0 0" in proc.stdout
    assert "PERMANENT 1 1" in proc.stdout
    assert "CONFIRM False 1 1" in proc.stdout  # the old app's confirm() left slot 1 active
    assert boot(dev).version == "2.0.0"


def test_fallback_image_confirm_makes_it_active(device, dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    from mpboot import upy

    installed(dev.install(image("1.0.0"), "permanent"))
    installed(dev.install(image("2.0.0"), "test"))
    assert boot(dev).confirmed is True
    flip_payload_bit(dev, 1)
    g = dev.geometry
    proc = upy.run(["-m", "dev_confirm", "confirm-fallback", dev.flash, g.size, g.sector, g.align],
                   path=[device.lib])
    assert proc.returncode == 0, proc.stderr
    assert "BOOTED 0 0" in proc.stdout
    assert "CONFIRM True 0 False" in proc.stdout
    assert dev.status().active == 0


def test_state_log_with_a_sector_not_a_multiple_of_the_record(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mpboot import upy

    # 1000-byte sectors hold 10 records of 96 bytes (40 bytes left over): the 11th switches.
    proc = upy.run(["-m", "dev_confirm", "odd-sector", tmp_path / "flash.bin", 4000, 1000, 8], path=[device.lib])
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("SAVE")]
    assert len(lines) == 12  # per + 2 saves
    for i, (_, _, seq, soff, erases) in enumerate(lines):
        assert (int(seq), int(soff)) == (i + 1, i + 1)  # every save loads back, newest wins
        assert int(erases) == (1 if i < 10 else 2)  # first use, then one switch after 10


def test_signed_image_without_a_romfs_goes_to_recovery(dev: SimDevice, rsa2048: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "not-romfs.bin"
    path.write_bytes(sign_app(b"this is not a ROMFS image" * 40, rsa2048, "1.0.0"))
    installed(dev.install(path, "permanent"))  # valid and signed: the updater takes it
    run = dev.boot()
    assert "RECOVERY" in run.stdout and "slot 0: error -19" in run.stdout


def test_a_firmware_without_vfsrom_stays_in_recovery(device, dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    """The stock esp32/rp2/stm32 builds have no vfs.VfsRom (docs/PORTING.md): the boot says
    so and goes to recovery, where the service can still take an image, instead of stopping
    on an AttributeError before anything is recorded."""
    from mpboot import upy

    installed(dev.install(image("1.0.0"), "permanent"))
    g = dev.geometry
    proc = upy.run(["-m", "dev_no_vfsrom", dev.flash, g.size, g.sector, g.align], path=[device.lib])
    assert proc.returncode == 0, proc.stderr
    assert "this firmware has no vfs.VfsRom" in proc.stdout
    assert "slot 0 cannot run (error -19)" in proc.stdout
    assert "RAN False -19 " in proc.stdout  # recovery


def test_active_image_that_cannot_run_falls_back_to_the_confirmed_one(dev: SimDevice, image, rsa2048: SigningKey,
                                                                       tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    bad = tmp_path / "not-romfs-2.bin"
    bad.write_bytes(sign_app(b"signed but not a ROMFS" * 40, rsa2048, "2.0.0"))
    assert installed(dev.install(bad, "permanent")) == 1
    run = dev.boot()
    assert "slot 1 cannot run (error -19)" in run.stdout
    assert "mpboot: slot 0 version 1.0.0" in run.stdout and "APP confirming" in run.stdout
    # The app's confirm() on that fallback makes slot 0 the confirmed image again.
    assert dev.status().active == 0
    # And a repair goes to the broken slot, never over the image that runs.
    assert installed(dev.install(image("2.0.1"), "test")) == 1


def test_test_boot_that_cannot_run_resets_and_reverts(dev: SimDevice, image, rsa2048: SigningKey, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    installed(dev.install(image("1.0.0"), "permanent"))
    bad = tmp_path / "not-romfs-2.bin"
    bad.write_bytes(sign_app(b"signed but not a ROMFS" * 40, rsa2048, "2.0.0"))
    installed(dev.install(bad, "test"))
    run = dev.boot()
    assert "slot 1 cannot run (error -19)" in run.stdout and "APP" not in run.stdout  # reset at once
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (0, "1.0.0", False)
    # A new test install of that slot is not swallowed by the stale test boot.
    installed(dev.install(image("2.0.1"), "test"))
    assert boot(dev).version == "2.0.1"


def test_romfs_without_entry_module_never_imports_one_from_elsewhere(tmp_path: Path, sim_lib: Path, rsa2048: SigningKey,
                                                                     image) -> None:  # type: ignore[no-untyped-def]
    import shutil

    lib = tmp_path / "lib"
    shutil.copytree(sim_lib, lib)
    (lib / "main.py").write_text("print('UNVERIFIED main ran')\n")  # e.g. the board's writable filesystem
    dev = SimDevice(tmp_path / "d", lib)
    app = tmp_path / "app-nomain"
    app.mkdir()
    (app / "other.py").write_text("x = 1\n")
    from mpboot.pack import pack_app

    nomain = tmp_path / "nomain.bin"
    nomain.write_bytes(sign_app(pack_app(app, entry=None), rsa2048, "1.0.0"))
    installed(dev.install(nomain, "permanent"))
    run = dev.boot()
    assert "UNVERIFIED" not in run.stdout
    assert "slot 0 cannot run (error -2)" in run.stdout and "RECOVERY" in run.stdout


def test_fallback_confirm_does_not_undo_a_permanent_update(device, dev: SimDevice, image) -> None:  # type: ignore[no-untyped-def]
    from mpboot import upy

    installed(dev.install(image("1.0.0"), "permanent"))
    installed(dev.install(image("2.0.0"), "test"))
    assert boot(dev).confirmed is True
    flip_payload_bit(dev, 1)  # slot 1 (active) broken: slot 0 runs as a fallback
    g = dev.geometry
    proc = upy.run(["-m", "dev_confirm", "fallback-then-permanent", dev.flash, g.size, g.sector, g.align,
                    image("3.0.0")], path=[device.lib])
    assert proc.returncode == 0, proc.stderr
    assert "BOOTED 0 0" in proc.stdout and "CONFIRM False 1" in proc.stdout
    assert boot(dev).version == "3.0.0"


def test_an_image_too_big_for_the_ram_copy_goes_to_recovery(tmp_path: Path, sim_lib: Path,
                                                            rsa2048: SigningKey) -> None:
    """Ports that cannot map flash (esp32, the simulator) copy the image into RAM to run it:
    one that does not fit is an image that cannot run (slot error -12), not a crash, so the
    update service still comes up (in recovery here: there is no other image)."""
    dev = SimDevice(tmp_path / "device", sim_lib, Geometry(512 * 1024, 4096, 4))
    big = tmp_path / "big.bin"
    big.write_bytes(sign_app(make_app(tmp_path / "big", "1.0.0", confirm=True, filler=200_000), rsa2048, "1.0.0"))
    installed(dev.install(big, "permanent"))
    run = dev.boot(heapsize="160k")
    assert "mpboot: slot 0 cannot run (error -12)" in run.stdout
    assert "RECOVERY" in run.stdout and "slot 0: error -12" in run.stdout
    assert boot(dev).version == "1.0.0"  # with room for the copy, the same image runs
