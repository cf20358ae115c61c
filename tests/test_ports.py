"""The port adapters (firmware/mpboot/ports/{esp32,rp2,stm32}.py) run on the MicroPython unix
port against fakes of esp32.Partition, rp2.Flash, pyb.Flash and machine
(tests/device/fakes), in an 80 KiB heap (64 KiB before the trust area's check, whose record
is 2304 bytes), compiled to .mpy as a device holds them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpboot import upy
from mpboot.device import write_keys_module
from mpboot.image import ImageKind
from mpboot.keys import SigningKey
from mpboot.upy import compile_tree, mpy_cross_compile
from simkit import make_service, sign_app

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "mpboot"
DEVICE = ROOT / "tests" / "device"
ADAPTERS = ("esp32", "rp2", "stm32")
# The firmware modules the adapters and the driver need (not the whole package, which other
# work may be changing).
NEEDED = ("__init__.py", "flash.py", "state.py", "factory.py", "trust.py", "ports/__init__.py", "ports/nor_sim.py",
          *(f"ports/{name}.py" for name in ADAPTERS))
# What the boot decision for two pairs adds (the stage-1 slots' end-to-end check).
NEEDED_STAGES = ("image.py", "rsa.py", "reader.py", "slots.py", "pairs.py")


@pytest.fixture(scope="session")
def ports_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mpboot (needed modules) as .mpy, the fakes as top-level modules, the driver."""
    lib = tmp_path_factory.mktemp("ports") / "lib"
    for rel in NEEDED:
        target = lib / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    compile_tree(DEVICE / "fakes", lib)
    mpy_cross_compile(DEVICE / "dev_ports.py", lib / "dev_ports.mpy")
    return lib


Geometry = dict[str, tuple[int, int, int]]


def run_port(lib: Path, workdir: Path, name: str) -> tuple[Geometry, dict[str, str]]:
    """Runs dev_ports for one port; returns (size, erase unit, write unit) per area and the
    detail of each passed check."""
    proc = upy.run(["-m", "dev_ports", name, workdir], path=[lib], heapsize="80k", timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    geometry: Geometry = {}
    passed: dict[str, str] = {}
    failed = []
    for line in proc.stdout.splitlines():
        words = line.split(" ", 2)
        if words[0] == "INFO" and words[1] == "geometry":
            area, size, erase, write = words[2].split()
            geometry[area] = (int(size), int(erase), int(write))
        elif words[0] == "PASS":
            passed[words[1]] = words[2] if len(words) > 2 else ""
        else:
            failed.append(line)
    assert not failed, "\n".join(failed) + "\n" + proc.stderr[-2000:]
    return geometry, passed


CHECKS = {"write_read", "refuse_misaligned", "refuse_unerased", "raw", "erase_slot", "state_cycle",
          "state_store", "factory_store", "unsynced_then_cut", "persists", "mapped", "reset_persists", "watchdog",
          "unique_id", "refuse_layouts", "trust_store"}

# Per port: geometry (size, erase unit, write unit) of slot0, slot1, state (the factory area
# is the same as the state); then what the
# native device does on its own (raw), whether an unsynced slot write survives a power cut,
# whether slots map, the watchdog timeout armed for the one asked, the unique id length, and
# the layouts refused.
EXPECTED = {
    "esp32": dict(
        slot=(0x8000, 4096, 1), state=(0x2000, 4096, 1),
        raw="overwrite=5 misaligned=ok past_end=-260", lost="lost=0", mapped="none",
        watchdog="asked=1500 armed=2000", uid="len=6",
        refused="running,encrypted,missing,state_app,twice,small", trust="per_sector=1 erase=4096 write=1"),
    "rp2": dict(
        slot=(0x2000, 4096, 256), state=(0x2000, 4096, 256),
        raw="overwrite=5 misaligned=22 past_end=22", lost="lost=0", mapped=f"size={0x2000}",
        watchdog="asked=20000 armed=8388", uid="len=8",
        refused="unaligned,overlap,factory_overlap,outside", trust="per_sector=1 erase=4096 write=256"),
    # Internal flash: the port's RAM sector copy rewrites whatever is written, and keeps it
    # off flash until a flush.
    "stm32": dict(
        slot=(0x2000, 0x1000, 1), state=(1024, 512, 512),
        raw="overwrite=rewritten misaligned=ok past_end=5", lost="lost=1", mapped=f"size={0x2000}",
        watchdog="asked=60000 armed=32767", uid="len=12",
        refused="no_sectors,misaligned,partial,overlap", trust="per_sector=1 erase=2560 write=512"),
    "stm32-spi": dict(
        slot=(0x2000, 4096, 1), state=(0x2000, 4096, 1),
        raw="overwrite=5 misaligned=ok past_end=ok", lost="lost=0", mapped="none",
        watchdog="asked=60000 armed=32767", uid="len=12",
        refused="unaligned,overlap", trust="per_sector=1 erase=4096 write=1"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_adapter_on_fake_port(ports_lib: Path, tmp_path: Path, name: str) -> None:
    geometry, passed = run_port(ports_lib, tmp_path, name)
    want = EXPECTED[name]
    assert geometry == {"slot0": want["slot"], "slot1": want["slot"], "state": want["state"],
                        "factory": want["state"]}
    assert set(passed) == CHECKS
    assert passed["raw"] == want["raw"]
    assert passed["unsynced_then_cut"] == want["lost"]
    assert passed["mapped"] == want["mapped"]
    assert passed["watchdog"] == want["watchdog"]
    assert passed["unique_id"] == want["uid"]
    assert passed["refuse_layouts"] == want["refused"]
    assert passed["trust_store"] == want["trust"]  # opt-in fifth area (trust=True): one record per unit
    # The state holds one record per erase unit where a write rewrites the whole unit.
    per = int(re.search(r"per_sector=(\d+)", passed["state_store"]).group(1))
    size, erase, write = want["state"]
    assert per == erase // (-(-96 // write) * write)  # 96-byte records, rounded to the write unit
    per = int(re.search(r"per_sector=(\d+)", passed["factory_store"]).group(1))
    assert per == erase // (-(-272 // write) * write)  # 272-byte factory records


@pytest.mark.parametrize("which", ["state", "factory", "trust"])
def test_stm32_state_survives_power_cuts(ports_lib: Path, tmp_path: Path, which: str) -> None:
    """nor_sim's cut= fault tears the port's sector rewrites during a state (or factory
    record, or trust state) save: loading then still gives the newest complete record,
    because the stm32 state, factory and trust areas hold one record per sector and a save
    rewrites only the sector without the newest one. A trust save is two records: a cut
    after the first is whole loads that one (the new state)."""
    script = tmp_path / "cut.py"
    script.write_text(_CUT_SCRIPT)

    def state(what: str, rc: int = 0) -> int:
        proc = upy.run([script, tmp_path, what, which], path=[ports_lib], heapsize="64k")
        assert proc.returncode == rc, (what, proc.stdout, proc.stderr)
        return int(proc.stdout.split()[-1]) if rc == 0 else -1

    per_save = 2 if which == "trust" else 1  # records
    saved = state("save")
    n = state("count")  # flash operations in one save (it saves too)
    assert n >= 2 * per_save  # at least the other sector's erase and the rewrite with the record
    saved += per_save
    # prefix:0: a torn program leaves nothing programmed after its sector erase;
    # erase-half: a torn erase is half done.
    seen = set()
    seq = saved
    for cut in range(n):
        for tear in ("prefix:0", "erase-half"):
            (tmp_path / "flash.bin.fault").write_text(f"cut={cut},tear={tear}")
            state("save", rc=75)
            before, seq = seq, state("load")
            # (trust: the old record, or the new one's first copy; the next cut starts there)
            assert seq - before in ((0, 1) if which == "trust" else (0,)), (cut, tear, seq, before)
            seen.add(seq - before)
    assert state("save") == seq + per_save
    if which == "trust":
        assert seen == {0, 1}


# Saves or loads an mpboot.state record (or the factory record: its policy toggled) through
# the stm32 adapter over the internal-flash fake; "count" prints how many flash operations
# one save takes.
_CUT_SCRIPT = """
import sys
import machine
import pyb
from mpboot.ports import stm32
from mpboot.state import Store
from mpboot.factory import Factory

d, what, which = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "trust":
    # 4 KiB slots, then state, factory and trust in 4 KiB sectors (one 2560-byte unit each).
    pyb.setup(d + "/flash.bin", (0x800,) * 4 + (0x1000,) * 8, 0x08004000, 0x1000)
    a = stm32.areas(0x2000, 0x1000, 0x4000, 0x1000, 0x1000, 0x08004000, trust=True)
else:
    pyb.setup(d + "/flash.bin", (0x800,) * 4 + (0x1000,) * 4, 0x08004000, 0x1000)
    a = stm32.areas(0x2000, 0x2000, 0, 0x1000, 0x800, 0x08004000)
if which == "trust":
    from mpboot.trust import TrustStore
    keys = ((bytes(32), 2048, bytes(256)),)
    s = TrustStore(a[4])
    t = s.load(keys)
    def save():
        t[4] += 1  # the next revocation number
        s.save(t)
    seq = lambda: s.seq
elif which == "state":
    s = Store(a[2])
    rec = s.load()
    save = lambda: s.save(rec)
    seq = lambda: rec[0]
else:
    s = Factory(a[3])
    save = lambda: s.write(s.flags ^ 2, s.serial, None, None, s.labels)  # toggle no-downgrade
    seq = lambda: s.seq
if what == "count":
    before = pyb.chip().ops
    save()
    print(pyb.chip().ops - before)
else:
    if what == "save":
        save()
    print(seq())
"""


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_compiles_with_mpy_cross(tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.mpy"
    mpy_cross_compile(FIRMWARE / "ports" / f"{name}.py", out)
    data = out.read_bytes()
    assert data[:1] == b"M" and data[1] == 6  # .mpy header, format version 6


def test_only_the_adapters_import_native_port_modules() -> None:
    native = re.compile(r"^\s*(?:import|from)\s+(esp32|rp2|pyb)\b", re.M)
    allowed = {"ports/esp32.py": {"esp32"}, "ports/rp2.py": {"rp2"}, "ports/stm32.py": {"pyb"}}
    offenders = []
    for py in sorted(FIRMWARE.rglob("*.py")):
        rel = py.relative_to(FIRMWARE).as_posix()
        extra = set(native.findall(py.read_text())) - allowed.get(rel, set())
        if extra:
            offenders.append(f"{rel}: {sorted(extra)}")
    assert not offenders
    assert all(native.search((FIRMWARE / rel).read_text()) for rel in allowed)


# -- stage 1's slots: areas(..., stage1=...) (docs/BOOT.md "Two stages") --------------------

@pytest.fixture(scope="module")
def stage1_lib(tmp_path_factory: pytest.TempPathFactory, rsa2048: SigningKey) -> Path:
    """The adapters and the boot decision (mpboot.pairs) as .mpy, the fakes, the driver, and
    a keys module trusting the test-only RSA-2048 key."""
    lib = tmp_path_factory.mktemp("ports-s1") / "lib"
    for rel in NEEDED + NEEDED_STAGES:
        target = lib / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    compile_tree(DEVICE / "fakes", lib)
    mpy_cross_compile(DEVICE / "dev_ports_stage1.py", lib / "dev_ports_stage1.mpy")
    src = lib.parent / "src"
    src.mkdir()
    mpy_cross_compile(write_keys_module(src, [rsa2048.public()]), lib / "mpboot_keys.mpy")
    return lib


@pytest.fixture(scope="module")
def stage1_image(tmp_path_factory: pytest.TempPathFactory, rsa2048: SigningKey) -> Path:
    """Stage 1 as it ships (the real service, ~26 KB), signed as an updater, version 1.2.3."""
    out = tmp_path_factory.mktemp("ports-s1-image")
    path = out / "s1.bin"
    path.write_bytes(sign_app(make_service(out / "s1"), rsa2048, "1.2.3", kind=ImageKind.UPDATER))
    return path


def run_stage1(lib: Path, workdir: Path, name: str, image: Path | None = None,
               heapsize: str = "80k") -> list[str]:
    """Runs dev_ports_stage1 for one port: its lines before DONE."""
    args: list[object] = ["-m", "dev_ports_stage1", name, workdir]
    if image is not None:
        args.append(image)
    proc = upy.run(args, path=[lib], heapsize=heapsize, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DONE", proc.stdout
    return lines[:-1]


# Per port, with stage1: the seven areas (start in the port's storage, or the chip for
# esp32; size; erase unit; write unit; None for an area not asked for), how many areas the
# same call gives without stage1, the layouts accepted beside it, and the refusals
# (exception, message; "-": none, from the port's own flash object). esp32: the running
# partition is an app partition, refused as one.
S1_EXPECTED = {
    "esp32": dict(
        areas=[(0x28000, 0x9000, 4096, 1), (0x31000, 0x9000, 4096, 1), (0x3A000, 0x2000, 4096, 1),
               (0x3C000, 0x2000, 4096, 1), (0x3E000, 0x2000, 4096, 1), (0x40000, 0x10000, 4096, 1),
               (0x50000, 0x10000, 4096, 1)],
        plain=5, accepted={},
        refused={"running": ("ValueError", "stage1 not a data partition"), "twice": ("ValueError", "same partition"),
                 "app_slot": ("ValueError", "same partition"), "state": ("ValueError", "same partition"),
                 "app_partition": ("ValueError", "stage1 not a data partition"),
                 "encrypted": ("ValueError", "encrypted"), "missing": ("OSError", "2")}),
    "rp2": dict(
        areas=[(0, 0x9000, 4096, 256), (0x9000, 0x9000, 4096, 256), (0x12000, 0x2000, 4096, 256),
               (0x14000, 0x2000, 4096, 256), None, (0x16000, 0x9000, 4096, 256), (0x1F000, 0x9000, 4096, 256)],
        plain=4, accepted={"no_factory": 7, "trust": 7},
        refused={"app_slots": ("ValueError", "overlap"), "state": ("ValueError", "overlap"),
                 "factory": ("ValueError", "overlap"), "trust": ("ValueError", "overlap"),
                 "unaligned": ("ValueError", "stage1"), "partial": ("ValueError", "stage1"),
                 "empty": ("ValueError", "stage1"), "negative": ("ValueError", "stage1"),
                 "outside": ("ValueError", "-")}),
    # Internal flash: stage 1's slots in physical sectors of slot_sector (4 KiB), mapped
    # like the app's; the state and factory units at the starts of 2 KiB sectors.
    "stm32": dict(
        areas=[(0x2000, 0x9000, 4096, 1), (0xB000, 0x9000, 4096, 1), (0, 1024, 512, 512),
               (0x1000, 1024, 512, 512), None, (0x14000, 0x9000, 4096, 1), (0x1D000, 0x9000, 4096, 1)],
        plain=4, accepted={},
        refused={"app_slots": ("ValueError", "overlap"), "state": ("ValueError", "overlap"),
                 "misaligned": ("ValueError", "sector alignment"), "partial": ("ValueError", "stage1 size"),
                 "empty": ("ValueError", "stage1 size"), "outside": ("ValueError", "-")}),
    "stm32-spi": dict(
        areas=[(0, 0x9000, 4096, 1), (0x9000, 0x9000, 4096, 1), (0x12000, 0x2000, 4096, 1),
               (0x14000, 0x2000, 4096, 1), None, (0x16000, 0x9000, 4096, 1), (0x1F000, 0x9000, 4096, 1)],
        plain=4, accepted={"no_factory": 7, "trust": 7},
        refused={"app_slots": ("ValueError", "overlap"), "state": ("ValueError", "overlap"),
                 "factory": ("ValueError", "overlap"), "trust": ("ValueError", "overlap"),
                 "unaligned": ("ValueError", "-"), "partial": ("ValueError", "stage1 size"),
                 "empty": ("ValueError", "stage1 size"), "negative": ("ValueError", "stage1 size"),
                 "outside": ("ValueError", "-")}),
}


@pytest.mark.parametrize("name", sorted(S1_EXPECTED))
def test_stage1_slots_on_fake_port(stage1_lib: Path, tmp_path: Path, name: str) -> None:
    """areas(..., stage1=...) gives seven areas: today's (the same starts and sizes as
    without stage1, None for a factory or trust area not asked for), then stage 1's two
    slots, under the app's slots' rules; layouts where they would overlap the app's slots,
    the state, factory or trust area, or each other, or have a bad size, are refused."""
    want = S1_EXPECTED[name]
    areas: list[tuple[int, ...] | None] = [None] * 7
    plain, accepted, refused = None, {}, {}
    for line in run_stage1(stage1_lib, tmp_path, name):
        words = line.split(" ", 3 if line.startswith("REFUSED ") else -1)
        if words[0] == "AREA":
            areas[int(words[1])] = None if words[2] == "none" else tuple(int(w) for w in words[2:])
        elif words[0] == "PLAIN":
            plain = int(words[1])
        elif words[0] == "ACCEPTED":
            accepted[words[1]] = int(words[2])
        elif words[0] == "REFUSED":
            refused[words[1]] = (words[2], words[3])
        else:
            raise AssertionError(words)
    assert areas == want["areas"]
    assert plain == want["plain"]
    assert accepted == want["accepted"]
    assert refused == want["refused"]


# The firmware modules load into the heap here (frozen on a device); rp2's and stm32's fakes
# copy a mapped slot (28 KiB; a device maps it in place). Measured floors: esp32 96k, rp2
# 112k, stm32 136k.
S1_DECIDE_HEAP = {"esp32": "112k", "rp2": "128k", "stm32": "152k"}


@pytest.mark.parametrize("name", ["esp32", "rp2", "stm32"])
def test_stage1_image_decided_from_its_slot(stage1_lib: Path, stage1_image: Path, tmp_path: Path,
                                            name: str) -> None:
    """End to end on the fake: the real service signed as an updater, written into stage 1's
    slot 1 (and into the app's slot 0, where its kind is refused: error 26); the decision for
    both pairs (mpboot.pairs.decide_all over the adapter's seven areas, as stages.start makes
    it, mapped where the port maps) picks it, confirmed (a blank state: stage 1 is fresh), and
    again after a power cycle, from the state record written the first time."""
    lines = run_stage1(stage1_lib, tmp_path, name, stage1_image, heapsize=S1_DECIDE_HEAP[name])
    # app slot (-1: none, recovery), app slot 0's error, stage-1 slot, its version, test
    # boot, stage-1 slot 0's error (erased: 1, bad magic), a state record there before the
    # decision, the newest record's sequence number after it (2: stage 1's floor raised,
    # written twice; no write the second time)
    mapped = {"esp32": -1, "rp2": 0x9000, "stm32": 0x9000}[name]
    assert lines == ["DECIDE -1 26 1 1.2.3 0 1 0 2", "DECIDE -1 26 1 1.2.3 0 0 1 2", f"MAPPED {mapped}"]
