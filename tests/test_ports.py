"""The port adapters (firmware/mpboot/ports/{esp32,rp2,stm32}.py) run on the MicroPython unix
port against fakes of esp32.Partition, rp2.Flash, pyb.Flash and machine
(tests/device/fakes), in an 80 KiB heap (64 KiB before the trust area's check, whose record
is 2304 bytes), compiled to .mpy as a device holds them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpboot import upy
from mpboot.upy import compile_tree, mpy_cross_compile

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "mpboot"
DEVICE = ROOT / "tests" / "device"
ADAPTERS = ("esp32", "rp2", "stm32")
# The firmware modules the adapters and the driver need (not the whole package, which other
# work may be changing).
NEEDED = ("__init__.py", "flash.py", "state.py", "factory.py", "trust.py", "ports/__init__.py", "ports/nor_sim.py",
          *(f"ports/{name}.py" for name in ADAPTERS))


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
