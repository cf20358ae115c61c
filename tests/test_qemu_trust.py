"""The trust area on the emulated Cortex-M3 board (mpboot.qemu, ports/qemu.py): five
non-overlapping areas (the fifth, the trust area, after the factory area), the trust state
saved and loaded by the frozen firmware through Slots.set_trust, a board without a trust area
on its frozen root set, and a trust save cut at every flash operation (the board counts them;
tests/test_grow.py does the same on the unix port at every tear)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import qemukit
from conftest import signing_key, trusted_public_keys
from qemumeasure import BOOT_GOAL, boot_image, smallest_boot_heap
from trustkit import trust_record

from mpboot.qemu import Firmware, QemuBoard, create_flash
from mpboot.qemu.runner import arm_cut, trace_ops, traced_ops

pytestmark = pytest.mark.qemu

CUT_EXIT = 75  # ports/qemu.CUT_EXIT


@pytest.fixture(scope="module")
def qemu_firmware() -> Firmware:
    qemukit.require()
    return qemukit.build_firmware(trusted_public_keys())


LAYOUT_CODE = """
from mpboot.ports import qemu as port
def spans(a):
    return " ".join("-" if x is None else "%d:%d" % (x.start, x.size) for x in a)
print("DEFAULT", spans(port.areas()))
print("NOFACTORY", spans(port.areas(factory=False)))
print("NOTRUST", spans(port.areas(trust=False)))
print("NEITHER", spans(port.areas(factory=False, trust=False)))
for args in ((0, 0x100000, 0x200000 - 0x5000), (0x205000, 0x1000, 0x200000)):
    try:
        port.areas(*args)
        print("OVERLAP ok")
    except ValueError as e:
        print("OVERLAP", e.args[0])
"""

MIB = 0x100000
K8 = 0x2000


def test_areas_are_five_without_overlap(qemu_firmware: Firmware, tmp_path: Path) -> None:
    flash = tmp_path / "flash.img"
    create_flash(flash)
    with QemuBoard(qemu_firmware.elf, flash) as board:
        board.raw_repl()
        out = board.exec(LAYOUT_CODE)
    lines = [line.split(" ", 1) for line in out.splitlines()]
    got = {k: v for k, v in lines if k != "OVERLAP"}
    slots = f"0:{MIB} {MIB}:{MIB}"
    state, factory, trust = (f"{2 * MIB + i * K8}:{K8}" for i in range(3))
    assert got == {"DEFAULT": f"{slots} {state} {factory} {trust}",
                   "NOFACTORY": f"{slots} {state} - {trust}",  # the trust area stays where it is
                   "NOTRUST": f"{slots} {state} {factory}",
                   "NEITHER": f"{slots} {state}"}
    spans = sorted(tuple(map(int, s.split(":"))) for s in got["DEFAULT"].split())
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    # The trust area's sectors count in the overlap check (the state 20 KiB before slot 1's
    # end, and a slot inside the trust area).
    assert [v for k, v in lines if k == "OVERLAP"] == ["overlap", "overlap"]


# The frozen keys are root set version 1; the states below name them by index.
TRUST_CODE = """
import hashlib
from binascii import hexlify
from mpboot.ports import qemu as port
from mpboot.slots import Slots
from mpboot import trust
from mpboot_keys import KEYS
a = port.areas()
def slots(area=a[4]):
    return Slots(a[0], a[1], a[2], KEYS, mapped=port.mapped, factory=a[3], trust=area)
def show(t):
    return "%d %d %d %s %d %d %d %s" % (t[0], t[1], t[2], "".join(str(KEYS.index(r)) for r in t[3]), t[4],
                                      len(t[5]), len(t[6]), hexlify(hashlib.sha256(repr(t)).digest()[:6]).decode())
STATES = {
    2: [2, 1, 1, [KEYS[1]], 0, [], []],
    3: [3, 2, 2, [KEYS[0], KEYS[1]], 4, [bytes(range(32)), b"\\x07" * 32], [5, 6, 0xFFFFFFFF]],
}
"""


def run(firmware: Firmware, flash: Path, code: str) -> str:
    with QemuBoard(firmware.elf, flash) as board:
        board.raw_repl()
        return board.exec(TRUST_CODE + code)


def test_trust_state_saved_and_loaded_on_the_board(qemu_firmware: Firmware, tmp_path: Path) -> None:
    flash = tmp_path / "flash.img"
    create_flash(flash)
    out = run(qemu_firmware, flash, """
s = slots()
print("BLANK", show(s.trust), int(s.trust_store.found), int(s.trust == trust.initial(KEYS)))
s.set_trust(STATES[2])
print("SET", show(s.trust))
s.set_trust(STATES[3])
print("AGAIN", show(slots().trust), int(slots().trust == STATES[3]))
n = slots(None)
print("NONE", show(n.trust), n.trust_store)
""")
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["BLANK"].startswith("1 1 1 01 0 0 0 ") and lines["BLANK"].endswith(" 0 1")
    assert lines["SET"].startswith("2 1 1 1 0 0 0 ")
    assert lines["AGAIN"].startswith("3 2 2 01 4 2 3 ") and lines["AGAIN"].endswith(" 1")
    assert lines["NONE"].startswith("1 1 1 01 0 0 0 ") and lines["NONE"].endswith(" None")


def test_a_cut_trust_save_leaves_the_old_or_the_new_state(qemu_firmware: Firmware, tmp_path: Path) -> None:
    """Version 2 saved, then version 3 (new roots and thresholds, a revocation) cut at each
    flash operation the board counts (programs, erases, syncs), not done or half done: the
    next power-on loads version 2 or version 3 exactly, and the save then completes."""
    base = tmp_path / "base.img"
    create_flash(base)
    run(qemu_firmware, base, "slots().set_trust(STATES[2])\n")
    old = run(qemu_firmware, base, "print(show(slots().trust))\n").strip()
    ref = tmp_path / "ref.img"
    shutil.copyfile(base, ref)
    trace_ops(ref)
    run(qemu_firmware, ref, "slots().set_trust(STATES[3])\n")
    ops = traced_ops(ref)
    new = run(qemu_firmware, ref, "print(show(slots().trust))\n").strip()
    assert old.startswith("2 ") and new.startswith("3 ")
    assert [k for k, _ in ops] == ["E", "W", "S", "E", "W", "S"]  # one record per 4 KiB sector, twice
    seen = []
    for i, (kind, _) in enumerate(ops):
        for tear in (False, True) if kind != "S" else (False,):
            flash = tmp_path / f"cut{i}{'t' if tear else ''}.img"
            shutil.copyfile(base, flash)
            arm_cut(flash, i, tear)
            with QemuBoard(qemu_firmware.elf, flash) as board:
                board.raw_repl()
                board.write((TRUST_CODE + "slots().set_trust(STATES[3])\n").encode() + b"\x04")
                assert board.wait_exit() == CUT_EXIT, (i, tear)
            got = run(qemu_firmware, flash, "print(show(slots().trust))\n").strip()
            assert got in (old, new), (i, tear, got)
            if got == old:
                run(qemu_firmware, flash, "slots().set_trust(STATES[3])\n")
                assert run(qemu_firmware, flash, "print(show(slots().trust))\n").strip() == new
            seen.append(got == new)
            flash.unlink()
    # The old state until the first copy is whole (a cut in the first erase or program: each
    # not done or half done), then the new one (from the sync after it: QEMU's flash has the
    # program already).
    assert seen == [False] * 4 + [True] * 6


def test_the_boot_with_a_trust_record_fits_the_heap_goal(qemu_firmware: Firmware, tmp_path: Path,
                                                          record_property) -> None:  # type: ignore[no-untyped-def]
    """A board whose trust area holds a record (root set version 2: both test keys, an
    RSA-2048 and an RSA-3072, in RAM now rather than in the frozen module) boots the 256 KiB
    image in place within the boot's heap goal, mpboot's modules loaded (as
    tests/test_qemu.py measures the blank area): the record is read in 64-byte pieces."""
    keys = trusted_public_keys()
    roots = [(k.bits, k.keyhash(), k.modulus) for k in keys]
    trust_at = 2 * MIB + 2 * K8  # ports/qemu.areas()'s defaults
    extra = [(trust_at, trust_record(1, 2, 0, 1, 1, roots)), (trust_at + 0x1000, trust_record(2, 2, 0, 1, 1, roots))]
    image = boot_image(tmp_path / "app", signing_key("TEST-ONLY-rsa2048.pem"))
    heap = smallest_boot_heap(qemu_firmware.elf, tmp_path / "flash.img", image, False, 4 * 1024, BOOT_GOAL,
                              extra=extra)
    record_property("summary", f"heap on Cortex-M3 (QEMU, frozen, gc on): the boot with a trust record (2 roots) "
                               f"completes in {heap.free_b} B of free heap (not in {heap.failed_b}; goal {BOOT_GOAL})")
    assert heap.free_b <= BOOT_GOAL
