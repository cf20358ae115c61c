"""What only grows (docs/KEYS.md section 1): the anti-rollback floor in the boot state log and
the root version and revocation number in the trust area, on MicroPython (firmware as .mpy,
tests/device/dev_grow.py). A single flipped bit anywhere in either area never makes a load
give an older floor or trust state, and never makes the next save fail; a power cut at any
flash operation of a floor raise or a trust save leaves exactly the old or the new state. The
trust record on flash is the layout of KEYS.md section 5, byte for byte; a board without a
trust area keeps the frozen root set (root set version 1).

The default run flips every bit of the newest two state records and a sample of the rest
(of a trust record: its header and CRC and a sample); the slow marker flips every bit."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Device
from powercut import TEARS
from simkit import boot, installed, make_app, sign_app
from trustkit import trust_record

from mpboot import upy
from mpboot.keys import SigningKey
from mpboot.sim import CUT_EXIT, Geometry, SimDevice

FLIPS = re.compile(r"^FLIPS (\d+) lower=(\d+) eio=(\d+) bad=(\d+)$", re.M)


def flips(device: Device, *args: object) -> int:
    """Runs a dev_grow flips command; asserts no flip lowered, failed or misloaded anything.
    Returns how many bits it flipped."""
    out = device.run("dev_grow", *args, heapsize="1m")
    m = FLIPS.search(out)
    assert m, out
    assert m.group(2, 3, 4) == ("0", "0", "0"), out
    return int(m.group(1))


# (sector, write unit, records between the two raises): the raise mid-sector; its first copy
# in a sector's last slot and the second in the other sector; one record per sector (a
# write unit as large as the sector, as on stm32 internal flash); a sector not a multiple of
# the record.
FLOOR_LAYOUTS = [(4096, 16, 5), (4096, 16, 39), (512, 512, 0), (1000, 8, 3)]
TRUST_LAYOUTS = [(4096, 4), (8192, 4), (16384, 16)]  # 1, 3 and 7 trust records per sector


@pytest.mark.parametrize(("sector", "align", "before"), FLOOR_LAYOUTS)
def test_no_bit_flip_lowers_the_floor(device: Device, sector: int, align: int, before: int) -> None:
    assert flips(device, "flips-floor", sector, align, before, 1, 61) > 1536


@pytest.mark.parametrize(("sector", "align"), TRUST_LAYOUTS)
def test_no_bit_flip_gives_an_older_trust_state(device: Device, sector: int, align: int) -> None:
    assert flips(device, "flips-trust", sector, align, 31, 997) > 1000


@pytest.mark.parametrize(("sector", "align"), [(4096, 16), (16384, 4), (1000, 8)])
def test_a_bit_flipped_in_erased_flash_is_skipped_not_eio(device: Device, sector: int, align: int) -> None:
    assert flips(device, "flips-erased", sector, align) > 50


@pytest.mark.slow
@pytest.mark.parametrize(("sector", "align", "before"), FLOOR_LAYOUTS)
def test_no_bit_flip_lowers_the_floor_every_bit(device: Device, sector: int, align: int, before: int) -> None:
    assert flips(device, "flips-floor", sector, align, before, 1, 1) == 2 * sector * 8


@pytest.mark.slow
@pytest.mark.parametrize(("sector", "align"), TRUST_LAYOUTS)
def test_no_bit_flip_gives_an_older_trust_state_every_bit(device: Device, sector: int, align: int) -> None:
    assert flips(device, "flips-trust", sector, align, 1, 1) == 2 * sector * 8


# ---- the trust area's edge cases ---------------------------------------------------------


def test_set_trust_on_a_failing_flash_raises_with_ram_as_flash_is(device: Device) -> None:
    """The flash fails from the K-th operation of a save (erase, program, erase, program):
    OSError, and Slots.trust is what flash holds: the old state while the first copy is not
    whole, the new one once it is."""
    for k in range(6):
        out = device.run("dev_grow", "fail", k)
        f = dict(re.findall(r"(\w+)=(\S+)", out))
        assert f["raised"] == ("OSError:5" if k < 4 else "-"), out
        assert f["ram"] == f["flash"] == (f["old"] if k < 2 else f["new"]), out


def test_counts_read_from_flash_are_bounded(device: Device) -> None:
    """Records with a valid CRC but counts past the limits, thresholds of 0 and key sizes
    past RSA-3072: at most 4 roots, 16 revoked keys and serials, moduli of 384 bytes,
    thresholds of at least 1 (a bad record makes the device trust less, never more)."""
    lines = [line.split()[1:] for line in device.run("dev_grow", "bounds").splitlines() if line.startswith("BOUNDS")]
    assert lines == [["4", "16", "16", "1", "1", "384", "7", "9"],
                     ["0", "16", "16", "1", "255", "0", "7", "9"],
                     ["4", "16", "16", "9", "7", "384", "7", "9"]]


def test_a_state_the_record_cannot_hold_is_refused_before_any_write(device: Device) -> None:
    lines = [line.split()[1:] for line in device.run("dev_grow", "invalid").splitlines()
             if line.startswith("INVALID")]
    assert len(lines) == 10
    assert all(what == "ValueError" and ops == "ops=0" for _, what, ops in lines), lines


# ---- power cuts ---------------------------------------------------------------------------

CUT_SIZE = 64 * 1024


class Chip:
    """A nor_sim flash file with the unix port's layout, driven by `dev_grow cut`."""

    def __init__(self, device: Device, path: Path, sector: int = 4096, align: int = 4) -> None:
        self.device = device
        self.path = path
        self.sector = sector
        self.align = align
        self.size = CUT_SIZE if sector == 4096 else 10 * sector

    def run(self, *ops: str, fault: str | None = None, trace: Path | None = None) -> Any:
        env = {}
        if fault:
            env["MPBOOT_NOR_FAULT"] = fault
        if trace:
            env["MPBOOT_NOR_TRACE"] = str(trace)
        return upy.run(["-m", "dev_grow", "cut", self.path, self.size, self.sector, self.align, *ops],
                       path=[self.device.lib], heapsize="512k", env=env)

    def ok(self, *ops: str) -> str:
        proc = self.run(*ops)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def show(self) -> tuple[int, str, str]:
        """(floor, the whole state record, the whole trust state) as a fresh boot loads them."""
        out = self.ok("show")
        floor = int(re.search(r"^FLOOR (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
        state = re.search(r"^STATE (.*)$", out, re.M).group(1)  # type: ignore[union-attr]
        trust = re.search(r"^TRUST (.*)$", out, re.M).group(1)  # type: ignore[union-attr]
        return floor, state, trust

    def files(self) -> list[Path]:
        return [self.path, self.path.with_name(self.path.name + ".wear")]

    def snapshot(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for f in self.files():
            shutil.copyfile(f, dest / f.name)

    def restore(self, src: Path) -> None:
        for f in self.files():
            shutil.copyfile(src / f.name, f)


State = tuple[int, str, str]  # Chip.show(): floor, state record, trust state


def cut_matrix(chip: Chip, work: Path, op: str) -> tuple[list[tuple[str, State]], State, list[str]]:
    """Traces `op` from the chip as it is, then cuts it at each of its flash operations (every
    tear of powercut.TEARS), each point from the chip as it was. Returns (fault, what a fresh
    load gives after the cut) per point, what the op gives uncut and the kinds of its flash
    operations; checks that a point left with the old state completes (the op again gives
    the same). Leaves the chip as it was."""
    snap = work / "before"
    chip.snapshot(snap)
    trace = work / "trace.txt"
    proc = chip.run(op, trace=trace)
    assert proc.returncode == 0, proc.stderr
    kinds = [line.split()[0] for line in trace.read_text().splitlines()]
    done = chip.show()
    out = []
    for i, kind in enumerate(kinds):
        for tear in TEARS[kind]:
            fault = f"cut={i}" + (f",tear={tear}" if tear else "")
            chip.restore(snap)
            proc = chip.run(op, fault=fault)
            assert proc.returncode == CUT_EXIT, (fault, proc.stdout, proc.stderr)
            got = chip.show()
            out.append((fault, got))
            if got != done:
                chip.ok(op)
                assert chip.show() == done, fault
    chip.restore(snap)
    return out, done, kinds


# (sector, state records before the raise): mid-sector; the first copy in the sector's last
# slot (the second switches sectors: erase, then program); the first copy switches sectors.
FLOOR_CUTS = [(4096, 3), (4096, 41), (4096, 42)]


@pytest.mark.parametrize(("sector", "fill"), FLOOR_CUTS, ids=["mid", "last-slot", "switch"])
def test_a_cut_floor_raise_leaves_the_old_or_the_new_state(device: Device, tmp_path: Path, sector: int,
                                                            fill: int) -> None:
    """A floor raise (two records) cut at every flash operation: a fresh load gives the old
    record or the new one exactly: the old floor while the first copy is not whole, the new
    one from then on."""
    chip = Chip(device, tmp_path / "flash.bin", sector)
    chip.ok("rotate", f"fill:{fill}")
    old = chip.show()
    assert old[0] == 0
    points, new, kinds = cut_matrix(chip, tmp_path, "floor:7")
    assert new[0] == 7 and new[2] == old[2]
    assert kinds == ["W", "W"] if fill == 3 else ["W", "E", "W"] if fill == 41 else ["E", "W", "W"]
    first = kinds.index("W")  # the operation programming the first copy
    for fault, got in points:
        op = int(fault.split(",")[0][4:])
        assert got == (old if op <= first else new), fault  # never a mix, never lower


@pytest.mark.parametrize("sector", [4096, 16384])
@pytest.mark.parametrize("op", ["rotate", "revoke"])
def test_a_cut_trust_save_leaves_the_old_or_the_new_state(device: Device, tmp_path: Path, sector: int,
                                                          op: str) -> None:
    """A rotation (new roots, thresholds, version + 1) or a revocation (number + 1, new
    lists) cut at every flash operation: a fresh load gives the old or the new trust state
    exactly, never an older version or number, never a mix; the floor is not touched."""
    chip = Chip(device, tmp_path / "flash.bin", sector)
    # Version 2 and a revocation first; on 16 KiB sectors (7 records each) two more, so that
    # the save below lands on a sector switch after records left in the sector.
    chip.ok("rotate", "revoke", *(["revoke"] * (2 if sector > 4096 else 0)), "floor:3")
    old = chip.show()
    points, new, _ = cut_matrix(chip, tmp_path, op)
    assert old != new and new[:2] == old[:2]
    version, revocation = (int(w) for w in old[2].split()[0:5:4])
    for fault, got in points:
        assert got in (old, new), fault
        v, r = (int(w) for w in got[2].split()[0:5:4])
        assert v >= version and r >= revocation, fault
    assert points[0][1] == old and points[-1][1] == new


def test_the_trust_record_is_the_documented_layout(device: Device, tmp_path: Path) -> None:
    """The two copies of a save on flash, byte for byte as KEYS.md section 5 lays them out,
    built here from the state the device loads back."""
    chip = Chip(device, tmp_path / "flash.bin")
    out = chip.ok("rotate", "revoke", "rotate", "revoke", "dump", "at")
    head = next(line.split()[1:] for line in out.splitlines() if line.startswith("HEAD"))
    version, threshold, image_threshold, revocation = map(int, head)
    roots = [(int(b), bytes.fromhex(h), bytes.fromhex(m)) for _, b, h, m in
             (line.split() for line in out.splitlines() if line.startswith("ROOT "))]
    keys = [bytes.fromhex(line.split()[1]) for line in out.splitlines() if line.startswith("KEY ")]
    serials = [int(line.split()[1]) for line in out.splitlines() if line.startswith("SERIAL ")]
    at = int(next(line.split()[1] for line in out.splitlines() if line.startswith("AT ")))
    assert version == 3 and revocation == 2 and 1 <= len(roots) <= 4 and keys and serials

    def record(seq: int) -> bytes:
        return trust_record(seq, version, revocation, threshold, image_threshold, roots, keys, serials)

    flash = chip.path.read_bytes()
    # Four saves of two records each, one record per 4 KiB sector: seq 7 in sector 0, 8 in 1.
    assert flash[at:at + 2304] == record(7)
    assert flash[at + 4096:at + 4096 + 2304] == record(8)
    assert flash[at + 2304:at + 4096] == flash[at + 4096 + 2304:at + 8192] == b"\xff" * (4096 - 2304)


# ---- the floor through Slots.confirm, end to end ---------------------------------------------


@pytest.fixture(scope="module")
def counter_images(tmp_path_factory: pytest.TempPathFactory, rsa2048: SigningKey) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("grow-images")
    made = {}
    for version, counter in (("1.0.0", 1), ("2.0.0", 2)):
        path = out / f"v{version}.bin"
        path.write_bytes(sign_app(make_app(out / f"app-{version}", version, confirm=True), rsa2048, version,
                                  security_counter=counter))
        made[version] = path
    return made


def test_a_cut_confirm_never_lowers_the_floor(sim_lib: Path, tmp_path: Path,
                                              counter_images: dict[str, Path]) -> None:
    """v1 (counter 1) runs confirmed; v2 (counter 2) is installed for a test boot. The boot
    that test-boots v2 (the trial record, then the app's confirm: the floor raise, two
    records) cut at each flash operation: the floor is 1 with v1 confirmed, or 2 with v2
    confirmed; the next boot never lowers it, and v1 never runs once it is 2."""
    dev = SimDevice(tmp_path / "device", sim_lib, Geometry(64 * 1024, 4096, 16))
    installed(dev.install(counter_images["1.0.0"], "permanent"))
    assert boot(dev).version == "1.0.0"
    installed(dev.install(counter_images["2.0.0"], "test"))
    snap = tmp_path / "snap"
    dev.snapshot(snap)
    trace = tmp_path / "trace.txt"
    b = boot(dev, trace=trace)
    assert (b.version, b.trial, b.confirmed) == ("2.0.0", True, True)
    assert dev.status().floor == 2
    kinds = [line.split()[0] for line in trace.read_text().splitlines()]
    assert kinds.count("W") >= 3  # the trial record and the confirm's two copies
    points = [(i, tear) for i, kind in enumerate(kinds) for tear in TEARS[kind]]

    def one(args: tuple[int, tuple[int, str]]) -> str:
        n, (i, tear) = args
        d = SimDevice(tmp_path / f"p{n}", dev.lib, dev.geometry, heapsize=dev.heapsize)
        try:
            d.restore(snap)
            fault = f"cut={i}" + (f",tear={tear}" if tear else "")
            if not d.boot(fault=fault).cut:
                return f"{fault}: no cut"
            st = d.status()
            active = st.slots[st.active]
            want = {1: "1.0.0", 2: "2.0.0"}.get(st.floor)
            if want is None or not (active.confirmed and active.version.startswith(want)):
                return f"{fault}: floor {st.floor} with {active}"
            after = boot(d)
            floor = d.status().floor
            if floor < st.floor or (st.floor == 2 and after.version != "2.0.0") or \
                    (after.version == "1.0.0" and floor != 1):
                return f"{fault}: floor {st.floor}, then booted {after} with floor {floor}"
            return "safe"
        finally:
            shutil.rmtree(tmp_path / f"p{n}", ignore_errors=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, enumerate(points)))
    assert results == ["safe"] * len(points), [r for r in results if r != "safe"]


def test_a_flipped_bit_in_the_newest_state_record_keeps_the_floor(sim_lib: Path, tmp_path: Path,
                                                                 counter_images: dict[str, Path]) -> None:
    """End to end on the simulated device: after v2's confirm (floor 2) a bit flipped in the
    newest state record (the copy, or the first one) still boots v2 with floor 2."""
    dev = SimDevice(tmp_path / "device", sim_lib, Geometry(64 * 1024, 4096, 16))
    installed(dev.install(counter_images["1.0.0"], "permanent"))
    installed(dev.install(counter_images["2.0.0"], "permanent"))
    st = dev.status()
    assert st.floor == 2
    g = dev.geometry
    newest = g.state_start + (st.pos - st.record if st.pos > 0 else g.sector - st.record)
    snap = tmp_path / "snap"
    dev.snapshot(snap)
    for off in (newest + 12, newest + 90, newest - st.record + 12):  # floor byte, CRC; the first copy
        dev.restore(snap)
        data = bytearray(dev.flash.read_bytes())
        data[off] ^= 0x01
        dev.flash.write_bytes(data)
        assert dev.status().floor == 2, off
        assert boot(dev).version == "2.0.0", off
