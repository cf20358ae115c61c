"""The device verifier frozen into MicroPython's Cortex-M3 firmware (qemu port, mps2-an385),
run under QEMU (mpboot.qemu): the same verdicts as on the unix port for the golden vectors and
every Wycheproof case, single-bit flips rejected, and a signed image verified in place in the
board's mapped flash, with the heap that took on this 32-bit frozen build.

Runs wherever gcc-arm-none-eabi, qemu-system-arm and a MicroPython v1.28.0 source are present
(the firmware is built once per key set and cached, mpboot.qemu.build); skips elsewhere with
what is missing, or fails with MPBOOT_QEMU_REQUIRED=1 (set by .ci/run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import qemukit
from conftest import VECTORS, Verdict, trusted_public_keys
from qemukit import pack_fields, run_with_data
from qemumeasure import BOOT_GOAL, BOOT_IMAGE_KIB, boot_image, smallest_boot_heap
from simkit import make_app, sign_app
from test_wycheproof import WYCHEPROOF_FILES, _wycheproof_dir

from mpboot.keys import SigningKey
from mpboot.qemu import Firmware, write_flash

pytestmark = pytest.mark.qemu

VECTOR_LIST = json.loads((VECTORS / "vectors.json").read_text())["vectors"]


@pytest.fixture(scope="session")
def qemu_firmware() -> Firmware:
    """The firmware with mpboot (port qemu) and the test-only trusted keys frozen in."""
    qemukit.require()
    return qemukit.build_firmware(trusted_public_keys())


def test_firmware_is_built_once_per_key_set(qemu_firmware: Firmware, record_property) -> None:  # type: ignore[no-untyped-def]
    again = qemukit.build_firmware(trusted_public_keys())
    assert again.cached and again.elf == qemu_firmware.elf
    how = "from the cache" if qemu_firmware.cached else "built"
    record_property("summary", f"qemu firmware ({qemu_firmware.key_hash}): {how} in {qemu_firmware.build_s:.1f} s")


# Prints verify_images' verdict lines (mpboot/upy_scripts/verify_images.py) for each image in
# the data region: fields (image, slot size), verified in place from the mapped flash.
VERIFY_CODE = """
from mpboot import image, reader
from mpboot_keys import KEYS
buf = bytearray(image.BUF_SIZE)
while True:
    im = field()
    if im is None:
        break
    slot = int(bytes(field()))
    try:
        info = image.verify(reader.bytes_reader(im), KEYS, slot, buf)
    except image.ImageError as e:
        print("REJECT", e.args[0])
        continue
    c = info["security_counter"]
    deps = " ".join("%d:%d.%d.%d+%d" % ((d[0],) + d[1]) for d in info.get("deps", ()))
    print("OK", "%d.%d.%d+%d" % info["version"], -1 if c is None else c, info["key_index"], info["total_size"], deps)
"""


def verify_on_qemu(firmware: Firmware, flash: Path, items: list[tuple[bytes, int]]) -> list[Verdict]:
    data = pack_fields((image, str(slot).encode()) for image, slot in items)
    out = run_with_data(firmware.elf, flash, data, VERIFY_CODE).splitlines()
    assert len(out) == len(items), out
    return [Verdict.parse(line) for line in out]


def test_golden_vectors_same_verdicts_as_unix_port(qemu_firmware: Firmware, device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = [((VECTORS / v["file"]).read_bytes(), v["slot_size"]) for v in VECTOR_LIST]
    on_qemu = verify_on_qemu(qemu_firmware, tmp_path / "flash.img", items)
    on_unix = device.verify_files([(VECTORS / v["file"], v["slot_size"]) for v in VECTOR_LIST])
    assert on_qemu == on_unix
    # And both are the manifest's verdicts (tests/test_vectors.py checks the unix side in detail).
    assert [v.accepted for v in on_qemu] == [v["expect"] == "OK" for v in VECTOR_LIST]


WYCHEPROOF_CODE = """
import hashlib
from mpboot import rsa
while True:
    tc = field()
    if tc is None:
        break
    scheme, bits, e, n, sig, msg = field(), field(), field(), field(), field(), field()
    verify = rsa.verify_pss if scheme == b"pss" else rsa.verify_pkcs1v15
    ok = verify(int.from_bytes(n, "big"), int(bytes(bits)), bytes(sig),
                hashlib.sha256(msg).digest(), int.from_bytes(e, "big"))
    print(str(tc, "ascii"), 1 if ok else 0)
"""


@pytest.mark.parametrize("name", sorted(WYCHEPROOF_FILES))
def test_wycheproof_on_cortex_m(qemu_firmware: Firmware, tmp_path: Path, name: str, record_property) -> None:  # type: ignore[no-untyped-def]
    """Every case of the file, one QEMU run; the verdicts tests/test_wycheproof.py holds the
    unix port to (valid: accept; invalid and the MissingNull "acceptable": reject)."""
    scheme, count = WYCHEPROOF_FILES[name]
    suite = json.loads((_wycheproof_dir() / name).read_text())
    records = []
    expected: dict[str, bool] = {}
    for group in suite["testGroups"]:
        key = group["publicKey"]
        for case in group["tests"]:
            tc = str(case["tcId"])
            expected[tc] = case["result"] == "valid"
            records.append((tc.encode(), scheme.encode(), str(group["keySize"]).encode(),
                            bytes.fromhex(key["publicExponent"]), bytes.fromhex(key["modulus"]),
                            bytes.fromhex(case["sig"]), bytes.fromhex(case["msg"])))
    assert len(records) == count
    out = run_with_data(qemu_firmware.elf, tmp_path / "flash.img", pack_fields(records), WYCHEPROOF_CODE)
    got = {tc: v == "1" for tc, v in (line.split() for line in out.splitlines())}
    assert set(got) == set(expected)
    wrong = sorted((tc for tc in expected if got[tc] != expected[tc]), key=int)
    record_property("summary", f"wycheproof {name} on Cortex-M3 (QEMU): {count} cases, {count - len(wrong)} ok")
    assert not wrong, f"the Cortex-M3 build disagrees with Wycheproof on cases {wrong}"


# Flips each listed bit of the image in the data region (in place, in the mapped memory),
# verifies, flips it back. Fields: image, then the bit offsets (u32 LE each).
BITFLIP_CODE = """
from mpboot import image, reader
from mpboot_keys import KEYS
im = field()
bits = field()
buf = bytearray(image.BUF_SIZE)
src = reader.bytes_reader(im)
image.verify(src, KEYS, len(im), buf)
accepted = []
codes = {}
for i in range(0, len(bits), 4):
    b = int.from_bytes(bits[i:i + 4], "little")
    im[b >> 3] ^= 1 << (b & 7)
    try:
        image.verify(src, KEYS, len(im), buf)
        accepted.append(b)
    except image.ImageError as e:
        codes[e.args[0]] = codes.get(e.args[0], 0) + 1
    im[b >> 3] ^= 1 << (b & 7)
print("accepted", " ".join(str(a) for a in accepted))
print("flips", sum(codes.values()))
"""


def test_single_bit_flips_rejected(qemu_firmware: Firmware, rsa2048: SigningKey, tmp_path: Path,
                                   record_property) -> None:  # type: ignore[no-untyped-def]
    """Every bit of the header and of the TLV areas up to the signature, and one bit of each
    signature byte (each of those costs an RSA operation; tests/test_device_rejects.py flips
    every signature bit on the unix port)."""
    from mpboot.image import ImageHeader, ImageVersion, SignOptions, build_image, parse_image, vendor_uuid

    image = build_image(b"\0" * 0x20 + bytes(range(64)), rsa2048,
                        SignOptions(ImageVersion(1, 0, 0), header_size=0x20, security_counter=3,
                                    vendor_id=vendor_uuid("example.com")))
    h = ImageHeader.unpack(image)
    sig = parse_image(image).unprotected[-1].offset  # the signature TLV's value
    bits = [*range(h.hdr_size * 8), *range((h.hdr_size + h.img_size) * 8, sig * 8),
            *(byte * 8 + byte % 8 for byte in range(sig, len(image)))]
    data = pack_fields([(image, b"".join(b.to_bytes(4, "little") for b in bits))])
    out = run_with_data(qemu_firmware.elf, tmp_path / "flash.img", data, BITFLIP_CODE).splitlines()
    assert out[0].split()[1:] == [], f"bit flips accepted at bit offsets {out[0]}"
    assert int(out[1].split()[1]) == len(bits)
    record_property("summary", f"bit flips on Cortex-M3 (QEMU): {len(bits)} single-bit mutants, 0 accepted")


# A factory-fresh board: the signed app in slot 0, state and factory areas erased. Measures
# the heap the check of slot 0 and then the whole boot (decide, verify in place, VfsRom mount
# of the mapped slot, the app's import) allocate: collected first, then no collection runs,
# so mem_free's drop is everything they allocated (an upper bound on what they hold at once).
BOOT_CODE = """
import gc
gc.collect()
gc.disable()
from mpboot import boot
from mpboot.ports import qemu as port
from mpboot.slots import Slots
from mpboot_keys import KEYS
a = port.areas()
gc.collect()
f0 = gc.mem_free()
s = Slots(a[0], a[1], a[2], KEYS, mapped=port.mapped, factory=a[3])
f1 = gc.mem_free()
info = s.check(0)
f2 = gc.mem_free()
print("CHECK", f0 - f1, f1 - f2, info["total_size"])
s = info = None
gc.collect()
f0 = gc.mem_free()
ok = boot.start(port, a, KEYS)
f1 = gc.mem_free()
print("BOOT", ok, f0 - f1)
"""


def test_boot_runs_in_place_from_mapped_flash(qemu_firmware: Firmware, rsa2048: SigningKey, tmp_path: Path,
                                              record_property) -> None:  # type: ignore[no-untyped-def]
    """A 256 KiB image verified where it lies and its ROMFS mounted there (no RAM copy: the
    heap it takes is a small fraction of the image)."""
    image = sign_app(make_app(tmp_path / "app", "qemu-1", confirm=False, filler=256 * 1024), rsa2048, "1.0.0")
    flash = tmp_path / "flash.img"
    qemukit.create_flash(flash)
    write_flash(flash, 0, image)
    with qemukit.QemuBoard(qemu_firmware.elf, flash) as board:
        board.raw_repl()
        out = board.exec(BOOT_CODE)
    check, boot_line = [line for line in out.splitlines() if line.startswith(("CHECK", "BOOT"))]
    slots_bytes, check_bytes, total = map(int, check.split()[1:])
    assert total == len(image) > 256 * 1024
    assert "mpboot: slot 0 version 1.0.0" in out and "APP qemu-1" in out, out
    _, ok, boot_bytes = boot_line.split()
    assert ok == "True"
    boot_bytes_i = int(boot_bytes)
    assert slots_bytes + check_bytes < 32 * 1024 and boot_bytes_i < 32 * 1024, out  # nothing copied
    record_property("summary", f"heap on Cortex-M3 (QEMU, frozen): Slots() {slots_bytes} B, then verify of a "
                               f"{total // 1024} KiB image in mapped flash {check_bytes} B; whole boot (Slots, "
                               f"decide, verify, confirm, VfsRom mount in place, app) {boot_bytes_i} B")


def test_boot_fits_the_heap_goal(qemu_firmware: Firmware, rsa2048: SigningKey, tmp_path: Path,
                                 record_property) -> None:  # type: ignore[no-untyped-def]
    """The heap the boot needs at its peak, garbage collector on: a ballast leaves only N bytes
    free and the boot (decide, verify the 256 KiB image in place, confirm, VfsRom mount, the
    app's import) must complete; N bisected to 256 B. With mpboot's modules loaded first (as
    boot.py has them) it must fit the goal, 12 KiB; from cold (their imports counted too) the
    figure is reported."""
    image = boot_image(tmp_path / "app", rsa2048)
    flash = tmp_path / "flash.img"
    warm = smallest_boot_heap(qemu_firmware.elf, flash, image, False, 4 * 1024, BOOT_GOAL)
    cold = smallest_boot_heap(qemu_firmware.elf, flash, image, True, warm.failed_b, 24 * 1024)
    record_property("summary", f"heap on Cortex-M3 (QEMU, frozen, gc on): the boot of a {BOOT_IMAGE_KIB} KiB image "
                               f"completes in {warm.free_b} B of free heap (not in {warm.failed_b}; goal "
                               f"{BOOT_GOAL}) with mpboot's modules loaded; from cold, their imports "
                               f"included, in {cold.free_b} B (not in {cold.failed_b})")
    assert warm.free_b <= BOOT_GOAL


ADAPTER_CODE = """
from mpboot.ports import qemu as port
a = port.areas()
st = a[2]
dev = st.bdev
blk = st.start // 4096
def attempt(f):
    try:
        f()
        return "ok"
    except (OSError, ValueError) as e:
        return "%s:%s" % (type(e).__name__, e.args[0] if e.args else "")
st.erase(0, 8192)
print("ERASED", st.is_erased(0, 8192))
st.write(0, b"\\x0f\\xf0\\x00\\xff")
print("ZERO_TO_ONE", attempt(lambda: dev.writeblocks(blk, b"\\xff\\xff\\xff\\xff", 0)))
print("CLEAR_BITS", attempt(lambda: dev.writeblocks(blk, b"\\x0e\\xe0\\x00\\xff", 0)))
print("MISALIGNED", attempt(lambda: dev.writeblocks(blk, b"\\x00\\x00\\x00\\x00", 6)))
print("PAST_END", attempt(lambda: dev.readblocks(dev.ioctl(4, 0), bytearray(4), 0)))
print("OVERLAP", attempt(lambda: port.areas(0, 0x100000, 0x100000)))
print("MAPPED", bytes(port.mapped(st)[:4]).hex())
print("ID", port.unique_id().hex())
print("GEOMETRY", dev.ioctl(4, 0), dev.ioctl(5, 0), st.write_size)
"""


def test_adapter_gives_nor_flash_that_survives_a_reset(qemu_firmware: Firmware, tmp_path: Path) -> None:
    """ports/qemu.py on the board: erase to 0xff, programs only clear bits (0->1 refused),
    4-byte write unit, the last sector kept out of the chip for the unique id; reset() exits
    QEMU and what was written is in the flash file, as flash keeps it across power cycles."""
    flash = tmp_path / "flash.img"
    uid = bytes(range(16))
    qemukit.create_flash(flash, uid)
    with qemukit.QemuBoard(qemu_firmware.elf, flash) as board:
        board.raw_repl()
        out = dict(line.split(" ", 1) for line in board.exec(ADAPTER_CODE).splitlines())
        board.write(b"from mpboot.ports import qemu\nqemu.reset()\x04")
        board.wait_exit()
    assert out == {"ERASED": "True", "ZERO_TO_ONE": "OSError:5", "CLEAR_BITS": "ok", "MISALIGNED": "OSError:22",
                   "PAST_END": "OSError:22", "OVERLAP": "ValueError:overlap", "MAPPED": "0ee000ff",
                   "ID": uid.hex(), "GEOMETRY": "4095 4096 4"}
    data = flash.read_bytes()
    assert data[0x200000:0x200004] == bytes.fromhex("0ee000ff")  # the state area, default layout
    assert data[0x200004:0x204000] == b"\xff" * (0x4000 - 4)
