"""The esp32 fake's OTA model (tests/device/fakes/esp32.py) against ESP-IDF's documented
behaviour (notes/issue19-esp32-ota.md sections 1, 2 and 4), driven on the MicroPython unix
port by tests/device/dev_esp32_ota.py with app images from tests/espkit.py (which esptool
itself must take for valid ESP32 images)."""

from __future__ import annotations

import binascii
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mpboot import upy
from mpboot.upy import compile_tree, mpy_cross_compile

import espkit

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "mpboot"
DEVICE = ROOT / "tests" / "device"
NEEDED = ("__init__.py", "ports/__init__.py", "ports/nor_sim.py")

# esp_ota_img_states_t
NEW, PENDING_VERIFY, VALID, INVALID, ABORTED, UNDEFINED = 0, 1, 2, 3, 4, 0xFFFFFFFF
# crc of ota_seq 1, 2, 3 (esp_rom_crc32_le(UINT32_MAX, &seq, 4)), checked with otatool's formula
CRC = {1: 0x4743989A, 2: 0x55F63774, 3: 0xED4A5011}
BLANK = "ff" * 32
Run = tuple[dict[str, str], dict[str, tuple[str, str]]]


def entry(seq: int, state: int, label: bytes = b"\xff" * 20) -> str:
    """esp_ota_select_entry_t as ESP-IDF writes it: u32 ota_seq, u8 seq_label[20],
    u32 ota_state, u32 crc, little-endian."""
    crc = binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF)
    assert seq not in CRC or crc == CRC[seq]
    return struct.pack("<I20sII", seq, label, state, crc).hex()


def test_entry_crc_matches_esp_idf_check_values() -> None:
    assert [int.from_bytes(bytes.fromhex(entry(s, NEW))[28:], "little") for s in (1, 2, 3)] == \
        [CRC[1], CRC[2], CRC[3]]


def _images() -> dict[str, bytes]:
    good = espkit.app_image("1.0")
    bad_sum = bytearray(good[:-32])
    bad_sum[-1] ^= 0x01  # the checksum byte, under a SHA-256 that matches it
    bad_sum += hashlib.sha256(bad_sum).digest()
    bad_hash = bytearray(good)
    bad_hash[-1] ^= 0x01
    return {
        "a.bin": good,
        "b.bin": espkit.app_image("2.0"),
        "magic.bin": b"\xe8" + good[1:],
        "chip.bin": espkit.app_image("1.0", chip_id=espkit.CHIP_ESP32S3),
        "map.bin": espkit.app_image("1.0", drom_addr=espkit.DROM),  # offset 0x20 mapped at 0
        "sum.bin": bytes(bad_sum),
        "hash.bin": bytes(bad_hash),
    }


@pytest.mark.parametrize("name", ["a.bin", "b.bin", "magic.bin", "chip.bin", "sum.bin", "hash.bin"])
def test_espkit_images_as_esptool_reads_them(tmp_path: Path, name: str) -> None:
    """esptool image-info (esptool is the reference image builder): the good images have a
    valid checksum and hash; each bad one is bad in the one way it is meant to be."""
    path = tmp_path / name
    path.write_bytes(_images()[name])
    chip = "esp32s3" if name == "chip.bin" else "esp32"  # (read as its own chip, to show its descriptor)
    proc = subprocess.run([sys.executable, "-m", "esptool", "--chip", chip, "image-info", str(path)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    if name == "magic.bin":
        assert proc.returncode != 0 and "magic" in out.lower(), out
        return
    assert proc.returncode == 0, out
    assert ("Checksum: 0x" in out and "(valid)" in out.split("Checksum:")[1].splitlines()[0]) == \
        (name != "sum.bin"), out
    assert ("(valid)" in out.split("Validation hash:")[1].splitlines()[0]) == (name != "hash.bin"), out
    assert ("Chip ID: 9" in out) == (name == "chip.bin"), out
    assert "App version: " + ("2.0" if name == "b.bin" else "1.0") in out, out


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("esp32ota") / "lib"
    for rel in NEEDED:
        target = out / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    compile_tree(DEVICE / "fakes", out)
    mpy_cross_compile(DEVICE / "dev_esp32_ota.py", out / "dev_esp32_ota.mpy")
    return out


@pytest.fixture(scope="module")
def run(lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Runs the device script once; returns the detail of each passed check and the raw
    otadata entries (hex) dumped under each tag."""
    work = tmp_path_factory.mktemp("esp32ota-run")
    for name, data in _images().items():
        (work / name).write_bytes(data)
    proc = upy.run(["-m", "dev_esp32_ota", work], path=[lib], heapsize="80k", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    passed: dict[str, str] = {}
    otadata: dict[str, tuple[str, str]] = {}
    failed = []
    for line in proc.stdout.splitlines():
        words = line.split(" ", 2)
        if words[0] == "OTADATA":
            tag, e0, e1 = line.split()[1:]
            otadata[tag] = (e0, e1)
        elif words[0] == "PASS":
            passed[words[1]] = words[2] if len(words) > 2 else ""
        else:
            failed.append(line)
    assert not failed, "\n".join(failed) + "\n" + proc.stderr[-2000:]
    return passed, otadata



# What each check of dev_esp32_ota reports: where the board runs and boots from after each
# step, and the states esp_ota_get_state_partition would give for ota_0/ota_1 (0 NEW,
# 1 PENDING_VERIFY, 2 VALID, 4 ABORTED, 4294967295 UNDEFINED, None: no entry selects it).
EXPECTED = {
    "blank": "",  # nothing flashed: no bootable app (NoBoot, a reset loop on a board)
    "esptool": "running=ota_0 boot=ota_0 states=2/None",
    "next_update": "ota_0->ota_1->ota_0 vfs->ota_0",
    "refused": "blank,magic.bin,chip.bin,map.bin,sum.bin,hash.bin",
    "set_boot": "running=ota_0 boot=ota_1 states=2/0",  # RUNNING changes only on a reset
    "trial": "running=ota_1 boot=ota_1 states=2/1",
    "rollback": "running=ota_0 boot=ota_0 states=2/4",
    "confirm": "running=ota_1 boot=ota_1 states=2/1 then running=ota_1 boot=ota_1 states=2/2",
    "back": "running=ota_1 boot=ota_0 states=0/2",
    # ota_0 (NEW, selected) no longer verifies: marked PENDING_VERIFY, skipped for ota_1; the
    # next reset aborts it.
    "bad_image_skipped": "running=ota_1 boot=ota_0 states=1/2 then running=ota_1 boot=ota_1 states=4/2",
    "misuse": "set_boot_data,blocks,find",
    "no_rollback": "running=ota_1 boot=ota_1 then running=ota_1 boot=ota_1 states=None/4294967295",
    "factory": "running=factory boot=factory; running=ota_0 boot=ota_0 states=1/None; "
               "running=factory boot=factory states=4/None; running=factory boot=factory",
    "no_otadata": "running=factory next=ota_0",
}

# The raw otadata entries (sector 0, sector 1) after each step, as ESP-IDF lays them out.
OTADATA = {
    "blank": (BLANK, BLANK),
    "esptool": (entry(1, VALID), BLANK),  # the bootloader's set_actual_ota_seq
    "set_boot": (entry(1, VALID), entry(2, NEW)),  # written by set_boot(), before any reset
    "trial": (entry(1, VALID), entry(2, PENDING_VERIFY)),
    "rollback": (entry(1, VALID), entry(2, ABORTED)),
    "again": (entry(1, VALID), entry(2, NEW)),
    "confirmed": (entry(1, VALID), entry(2, VALID)),
    "back": (entry(3, NEW), entry(2, VALID)),  # the next seq that selects slot 0
    "skipped": (entry(3, PENDING_VERIFY), entry(2, VALID)),
    "norb": (entry(2, UNDEFINED), BLANK),  # rollback off: UNDEFINED, never PENDING_VERIFY
    "factory": (BLANK, BLANK),  # a factory boot writes nothing
    "factory_set": (entry(1, NEW), BLANK),
    "factory_back": (BLANK, BLANK),  # set_boot() on the factory app erases otadata
}


@pytest.mark.parametrize("check", sorted(EXPECTED))
def test_device_check(run: Run, check: str) -> None:
    passed, _ = run
    assert set(passed) == set(EXPECTED)
    assert passed[check] == EXPECTED[check]


@pytest.mark.parametrize("tag", sorted(OTADATA))
def test_otadata_bytes(run: Run, tag: str) -> None:
    _, otadata = run
    assert set(otadata) == set(OTADATA)
    assert otadata[tag] == OTADATA[tag]


def test_set_boot_entry_literal(run: Run) -> None:
    """The entry set_boot() writes for seq 2, spelt out byte by byte."""
    _, otadata = run
    assert otadata["set_boot"][1] == "02000000" + "ff" * 20 + "00000000" + "7437f655"


# Power cuts in the bootloader's otadata rewrite (an erase of the entry's sector, then a
# 32-byte program): nor_sim's cut=N fault ends the power-on at operation N (0: the erase,
# 1: the program), torn as `tear` says. Whatever the cut leaves, the board never runs the
# new app without the trial that can roll it back: it starts the new app only when nothing
# was written (the entry still NEW), else the old one.
CUTS = {
    "cut=0": "ota_1",  # the erase never started: NEW still there, the trial goes on
    "cut=0,tear=erase-half": "ota_0",  # the entry erased, the sector half: no valid entry 2
    "cut=1": "ota_0",  # erased, nothing programmed
    "cut=1,tear=half": "ota_0",  # seq and part of the label: crc blank
    "cut=1,tear=prefix:28": "ota_0",  # all but the crc
    "cut=1,tear=word": "ota_0",  # the crc's last word half-programmed
}


@pytest.mark.parametrize("phase", ["trial", "rollback"])
def test_power_cut_in_bootloader_otadata_write(lib: Path, tmp_path: Path, phase: str) -> None:
    """trial: the cut hits the NEW -> PENDING_VERIFY rewrite of the boot after set_boot();
    rollback: the PENDING_VERIFY -> ABORTED rewrite of the boot after the trial (the old
    app must come back whatever is torn)."""
    for name, data in _images().items():
        (tmp_path / name).write_bytes(data)

    def device(mode: str, work: Path) -> subprocess.CompletedProcess[str]:
        return upy.run(["-m", "dev_esp32_ota", work, mode], path=[lib], heapsize="80k", timeout=60)

    proc = device("prepare-" + phase, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = "running=ota_0" if phase == "trial" else "running=ota_1"
    assert proc.stdout.split()[:2] == ["READY", want], proc.stdout
    for spec, runs in CUTS.items():
        work = tmp_path / spec.replace(",", "_").replace("=", "").replace(":", "")
        work.mkdir()
        for f in tmp_path.glob("*.bin*"):
            (work / f.name).write_bytes(f.read_bytes())
        (work / "cut.bin.fault").write_text(spec)
        proc = device("boot", work)
        assert proc.returncode == 75 and "power cut" in proc.stderr, (spec, proc.stdout, proc.stderr)
        proc = device("boot", work)
        assert proc.returncode == 0, (spec, proc.stdout, proc.stderr)
        running = proc.stdout.split()[1]
        expected = runs if phase == "trial" else "ota_0"
        assert running == "running=" + expected, (spec, proc.stdout)
