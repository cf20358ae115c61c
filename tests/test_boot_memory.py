"""The boot decision (verify the slot's exact bytes through flash reads + state changes) in a
bounded heap, on MicroPython, with 1 MiB images signed by RSA-2048 and RSA-3072.

On a device the firmware modules are frozen (firmware/manifest.py) and execute from flash;
on the unix port they load from .mpy into the heap (about 24 KiB on this 64-bit build). So
dev_decide loads them first and a ballast leaves exactly WORK bytes of heap for the decision.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mpboot import upy
from mpboot.keys import SigningKey
from mpboot.sim import Geometry, SimDevice
from simkit import installed, make_app, sign_app

WORK = 24 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def flash(tmp_path_factory: pytest.TempPathFactory, sim_lib: Path, rsa2048: SigningKey,
          rsa3072: SigningKey) -> tuple[SimDevice, Path, Path]:
    """A device with a confirmed 1 MiB RSA-2048 image in slot 0 (snapshot `normal`) and
    then a 1 MiB RSA-3072 image marked for a test boot in slot 1 (snapshot `test`)."""
    work = tmp_path_factory.mktemp("memory")
    dev = SimDevice(work / "device", sim_lib, Geometry.for_slots(MIB, 4096, 4))
    for version, key, mode in (("1.0.0", rsa2048, "permanent"), ("2.0.0", rsa3072, "test")):
        image = sign_app(make_app(work / f"app-{version}", version, confirm=True, filler=MIB - 4096),
                         key, version)
        assert len(image) > MIB - 4096
        path = work / f"{version}.bin"
        path.write_bytes(image)
        installed(dev.install(path, mode, chunk=4096))
        dev.snapshot(work / ("normal" if mode == "permanent" else "test"))
    return dev, work / "normal", work / "test"


def decide(device, dev: SimDevice, snapshot: Path, work: int | None):  # type: ignore[no-untyped-def]
    dev.restore(snapshot)
    g = dev.geometry
    args = ["-m", "dev_decide", dev.flash, g.size, g.sector, g.align]
    if work is not None:
        args.append(work)
    return upy.run(args, path=[device.lib], heapsize="256k")


@pytest.mark.parametrize(("which", "expected"), [("normal", "DECIDE 0 0 1.0.0"), ("test", "DECIDE 1 1 2.0.0")])
def test_boot_decision_fits_in_24k(device, flash, which: str, expected: str, record_property) -> None:  # type: ignore[no-untyped-def]
    dev, normal, test = flash
    proc = decide(device, dev, normal if which == "normal" else test, WORK)
    assert proc.returncode == 0, proc.stderr
    free = int(proc.stdout.split("WORK ")[1].split()[0])
    assert WORK - 64 <= free <= WORK, free  # the ballast left what it says
    assert expected in proc.stdout
    if which == "test":
        # The decision wrote the state change (test -> trial) inside that heap too.
        assert dev.status().trial == 1
        record_property("summary", f"boot decision: 1 MiB RSA-2048 / RSA-3072 image verified and state "
                        f"written in {WORK // 1024} KiB of heap (firmware modules excluded, frozen on devices)")


def test_boot_decision_heap_bound_is_real(device, flash) -> None:  # type: ignore[no-untyped-def]
    dev, normal, _ = flash
    proc = decide(device, dev, normal, 8 * 1024)
    assert proc.returncode != 0
    assert "MemoryError" in proc.stderr


def _roots_lib(dest: Path, threshold: int, image_threshold: int) -> Path:
    """The simulated device's modules with a 2-of-3 root set frozen in (TEST-ONLY root-a/b/c,
    THRESHOLD and IMAGE_THRESHOLD as `mpboot pubkey --format micropython` writes them)."""
    from conftest import signing_key

    from mpboot.pubkey import micropython_module
    from mpboot.sim import build_lib

    roots = [signing_key(f"TEST-ONLY-root-{x}.pem").public() for x in "abc"]
    lib = build_lib(dest / "lib", roots)
    src = dest / "mpboot_keys.py"
    src.write_text(micropython_module(roots, threshold, image_threshold))
    upy.mpy_cross_compile(src, lib / "mpboot_keys.mpy")
    return lib


@pytest.mark.parametrize(("team_bits", "work"), [(2048, WORK), (3072, WORK + 1024)])
def test_delegated_two_of_three_boot_fits_in_24k(device, tmp_path: Path, team_bits: int, work: int,
                                                 record_property) -> None:  # type: ignore[no-untyped-def]
    """Issue 16's bound: a 1 MiB image signed by root a and by a CI key whose certificate
    chain is root a + b -> team (depth 1) -> ci, under a frozen root set of three with
    thresholds 2 (certificates) and 2 (images): the boot decision verifies both certificates
    and both signatures (5 RSA operations) and writes its state in 24 KiB.

    With an RSA-3072 team key the ci certificate's check is a 3072-bit operation, whose
    products need 770-byte blocks in one piece: measured, it passes at 24 KiB but fails at
    23.5 KiB, and where the remaining heap lies depends on what was loaded before (a path's
    length can tip it), so that case is held to 25 KiB."""
    from conftest import signing_key

    from mpboot.image import ImageSigner, ImageVersion, SignOptions, build_image
    from mpboot.keys import SignatureScheme, generate
    from mpboot.trust import Certificate, sign_envelope
    from simkit import HEADER_ROOM

    lib = _roots_lib(tmp_path, threshold=2, image_threshold=2)
    key = {n: signing_key(f"TEST-ONLY-{n}.pem") for n in ("root-a", "root-b", "ci")}
    key["team"] = signing_key("TEST-ONLY-team.pem") if team_bits == 3072 else generate("rsa-2048")
    pss = SignatureScheme.PSS
    team = sign_envelope(Certificate(20, key["team"].public(), counters=(0, 100), depth=1),
                         [key["root-a"], key["root-b"]], pss)
    ci = sign_envelope(Certificate(21, key["ci"].public(), counters=(1, 10)), [key["team"]], pss)
    romfs = make_app(tmp_path / "app", "1.0.0", confirm=True, filler=MIB - 4096)
    opts = SignOptions(ImageVersion.parse("1.0.0"), security_counter=1)
    signers = [ImageSigner(key["root-a"]), ImageSigner(key["ci"], (team, ci))]
    path = tmp_path / "delegated.bin"
    path.write_bytes(build_image(bytes(HEADER_ROOM) + romfs, signers, opts))
    dev = SimDevice(tmp_path / "device", lib, Geometry.for_slots(MIB, 4096, 4))
    installed(dev.install(path, "permanent", chunk=4096))
    snapshot = tmp_path / "snapshot"
    dev.snapshot(snapshot)

    g = dev.geometry
    args = ["-m", "dev_decide", dev.flash, g.size, g.sector, g.align, work]
    proc = upy.run(args, path=[lib, device.lib], heapsize="256k")  # lib first: its mpboot_keys
    assert proc.returncode == 0, proc.stderr
    assert "DECIDE 0 0 1.0.0" in proc.stdout
    free = int(proc.stdout.split("WORK ")[1].split()[0])
    assert work - 64 <= free <= work, free

    # Control: with the image threshold at 3 the same image (two signers) does not boot.
    strict = _roots_lib(tmp_path / "strict", threshold=2, image_threshold=3)
    dev.restore(snapshot)
    proc = upy.run(args, path=[strict, device.lib], heapsize="256k")
    assert proc.returncode == 0, proc.stderr
    assert "DECIDE -1 0 -" in proc.stdout
    record_property("summary", f"boot decision: 1 MiB image, 2-of-3 roots, signed by a root and a delegated key "
                    f"(chain of 2 certificates, RSA-{team_bits} team key) verified in {work // 1024} KiB of heap")
