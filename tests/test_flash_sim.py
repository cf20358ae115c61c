"""The flash layer on MicroPython: the NOR flash simulator (mpboot.ports.nor_sim) and its
fault injection, flash areas (mpboot.flash.Area) and the power-safe state log
(mpboot.state.Store). Every check runs the device code on the MicroPython unix port
(tests/device/dev_flash.py); this side prepares chip files, checks what the driver printed
and the raw chip and wear files, and encodes state records independently of the firmware."""

from __future__ import annotations

import struct
import subprocess
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from mpboot import upy

CUT_EXIT = 75  # nor_sim.CUT_EXIT
ALIGNS = (1, 4, 8, 16)
NONE = 0xFF
MAGIC = 0x5342504D
REC_FMT = "<IIBBBBI8s16s16sII16sB"  # then 0xff to byte 92, CRC-32 of [0, 92)
REC = 96
CRC_AT = 92
S = 8 * REC  # the default test sector: 8 records


def pat(n: int, seed: int) -> bytes:
    """Test data; tests/device/dev_flash.py has the same function."""
    return bytes((i * 37 + seed * 11 + 5) & 0xFF for i in range(n))


def run(device, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # upy.run adds env to os.environ: a fault or trace set outside must not leak in ("" is off).
    env = {"MPBOOT_NOR_FAULT": "", "MPBOOT_NOR_TRACE": "", **(env or {})}
    return upy.run(["-m", "dev_flash", *map(str, args)], path=[device.lib], heapsize="512k", env=env)


def run_ok(device, *args: object, env: dict[str, str] | None = None) -> list[str]:
    proc = run(device, *args, env=env)
    assert proc.returncode == 0, f"dev_flash {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout.splitlines()


def checks(lines: list[str]) -> dict[str, str]:
    """'name value...' lines as {name: 'value...'}; names are unique."""
    out: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(" ")
        assert name not in out, f"duplicate check {name}"
        out[name] = value
    return out


def make_chip(path: Path, size: int, sector: int, image: bytes | None = None) -> None:
    """A chip file as nor_sim keeps it (contents + u32 LE erase counter per sector)."""
    image = b"\xff" * size if image is None else image
    assert len(image) == size
    path.write_bytes(image)
    Path(f"{path}.wear").write_bytes(bytes(4 * (size // sector)))


def wear(path: Path) -> list[int]:
    data = Path(f"{path}.wear").read_bytes()
    return list(struct.unpack(f"<{len(data) // 4}I", data))


# ---- NOR simulator: basic behaviour, across two processes -------------------------------


@dataclass
class NorRuns:
    first: dict[str, str]
    second: dict[str, str]
    raw1: dict[int, bytes]
    raw2: dict[int, bytes]
    wear1: dict[int, list[int]]
    wear2: dict[int, list[int]]


@pytest.fixture(scope="module")
def nor(device, tmp_path_factory: pytest.TempPathFactory) -> NorRuns:
    d = tmp_path_factory.mktemp("nor")
    chips = {al: d / f"nor{al}.bin" for al in ALIGNS}
    first = checks(run_ok(device, "nor", d))  # creates the chip files
    raw1 = {al: p.read_bytes() for al, p in chips.items()}
    wear1 = {al: wear(p) for al, p in chips.items()}
    second = checks(run_ok(device, "nor2", d))  # a new process: a power cycle
    raw2 = {al: p.read_bytes() for al, p in chips.items()}
    wear2 = {al: wear(p) for al, p in chips.items()}
    return NorRuns(first, second, raw1, raw2, wear1, wear2)


def _misaligned_bytes(al: int) -> list[tuple[int, int]]:
    """(offset in sector 6, length) of the alignment probes that program (see dev_flash)."""
    if al == 1:
        return [(1, 1), (64, 2), (128, 1), (193, 1)]
    return [(192 + al, al)]


def expected_nor_image(al: int) -> bytearray:
    img = bytearray(b"\xff" * 2048)
    img[0:16] = b"\x30" * 16
    img[16:32] = bytes(16)
    img[256:768] = pat(512, 2)
    img[768:1024] = pat(256, 1)
    img[1280:1536] = bytes(256)
    for off, n in _misaligned_bytes(al):
        img[1536 + off : 1536 + off + n] = bytes(n)
    return img


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_fresh_chip_and_ioctl(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    assert c[p + "fresh"] == "ff"  # every byte of a new chip reads erased
    assert c[p + "ioctl"] == "8 256 0 0 0"  # block count, block size; init/deinit/sync 0
    assert c[p + "ioctl_unknown"] == "None"


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_program_only_clears_bits(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    assert c[p + "prog_f0"] == "ok"
    assert c[p + "prog_0f_over_f0"] == "OSError 5"
    assert c[p + "after_0f"] == "f0" * 16  # refused: nothing programmed
    assert c[p + "errors1"] == "1"
    assert c[p + "prog_same"] == "ok"  # the same bytes again: no 1 over a 0
    assert c[p + "prog_subset"] == "ok"  # clearing more bits of a programmed byte
    assert c[p + "after_subset"] == "30" * 16
    assert c[p + "prog_00"] == "ok"
    assert c[p + "after_00"] == "00" * 16
    assert c[p + "errors2"] == "1"
    assert c[p + "ops_progs"] == "4"  # the refused program was not an operation
    # One bit 1 over 0 at byte 300 of a 512-byte program: the whole program is refused.
    assert c[p + "prog_long_one_bad"] == "OSError 5"
    assert c[p + "long_after"] == "aa"
    assert c[p + "errors3"] == "2"
    assert c[p + "prog_long_ok"] == "ok"
    assert c[p + "long_ok_after"] == "88"


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_alignment_enforced(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    bad = "ok" if al == 1 else "OSError 22"
    assert c[p + "mis_addr"] == bad
    assert c[p + "mis_len"] == bad
    assert c[p + "mis_len_short"] == bad
    assert c[p + "aligned"] == "ok"
    ops = 4 if al == 1 else 1
    assert c[p + "mis_counts"] == f"{ops} 0"  # EINVAL: not an operation, not an .errors
    sector6 = bytearray(b"\xff" * 256)
    for off, n in _misaligned_bytes(al):
        sector6[off : off + n] = bytes(n)
    assert c[p + "sector6"] == sector6.hex()


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_bounds(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    assert c[p + "prog_past_end"] == "OSError 22"
    assert c[p + "prog_neg"] == "OSError 22"
    assert c[p + "read_past_end"] == "OSError 22"
    assert c[p + "read_block8"] == "OSError 22"
    assert c[p + "read_last"] == "ok"
    assert c[p + "erase8"] == "OSError 22"
    assert c[p + "erase_neg"] == "OSError 22"


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_erase_is_exactly_one_sector(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    assert c[p + "erase4"] == "ok 0"
    assert c[p + "sectors345"] == "00 ff 00"
    assert c[p + "edges"] == "0000ffff ffff0000"


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_basic_protocol_erases_then_programs(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    assert c[p + "basic1"] == "ok"  # over a zeroed sector: needs its erase
    assert c[p + "basic1_read"] == "1 ff"  # the next sector untouched
    assert c[p + "basic2"] == "ok"  # two sectors of 0x88/0xaa
    assert c[p + "basic2_read"] == "1"


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_counters_and_reads_are_not_operations(nor: NorRuns, al: int) -> None:
    c = nor.first
    p = f"a{al}."
    assert c[p + "reads_ops"] == "0"
    ops = (17 if al == 1 else 14)
    programmed = 2624 + sum(n for _, n in _misaligned_bytes(al))
    assert c[p + "counters"] == f"{ops} 4 2 {programmed}"  # ops, erases, errors, programmed


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_file_and_wear_after_first_process(nor: NorRuns, al: int) -> None:
    assert nor.raw1[al] == expected_nor_image(al)
    assert nor.wear1[al] == [0, 1, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("al", ALIGNS)
def test_nor_survives_new_process_and_wear_accumulates(nor: NorRuns, al: int) -> None:
    c = nor.second
    p = f"a{al}."
    assert c[p + "counters"] == "0 0 0 0"  # per-process counters start over
    assert c[p + "first"] == "30" * 16 + "00" * 16
    assert c[p + "basic"] == "1 1"
    assert c[p + "sector4"] == "ff"
    assert c[p + "erase3"] == "ok 0"
    assert c[p + "prog7"] == "ok"
    img = expected_nor_image(al)
    img[768:1024] = b"\xff" * 256
    img[1856:1920] = pat(64, 7)
    assert nor.raw2[al] == img  # written without close(): in the file all the same
    assert nor.wear2[al] == [0, 1, 1, 2, 1, 0, 0, 0]


# ---- NOR simulator: fault injection ----------------------------------------------------

# What `dev_flash ops PATH ALIGN` does, in order (reads between them do not count).
OPS = [("W", 0, pat(32, 0)), ("E", 256, 256), ("W", 512, pat(64, 2)), ("E", 768, 256), ("W", 1040, pat(48, 4))]


def ops_initial() -> bytearray:
    img = bytearray(b"\xff" * 2048)
    img[256:512] = bytes(256)  # so that erases (and torn ones) show
    img[768:1024] = bytes(256)
    return img


def apply_op(img: bytearray, op: tuple[str, int, object], align: int = 1, tear: str = "") -> None:
    """Op done, or torn by `tear` as nor_sim documents it (an independent model)."""
    kind, addr, data = op
    if kind == "W":
        assert isinstance(data, bytes)
        n = len(data)
        if tear == "half":
            data = data[: n // 2]
        elif tear.startswith("prefix:"):
            data = data[: min(int(tear[7:]), n - 1)]
        elif tear == "word":
            w = max(4, align)
            last = bytes(o & (d | 0x55) for o, d in zip(img[addr + n - w : addr + n], data[n - w :], strict=True))
            img[addr + n - w : addr + n] = last
            data = data[: n - w]
        elif tear:
            data = b""
        img[addr : addr + len(data)] = bytes(o & d for o, d in zip(img[addr : addr + len(data)], data, strict=True))
    else:
        assert isinstance(data, int)
        n = data
        if tear == "erase-half":
            n //= 2
        elif tear.startswith("erase:"):
            n = min(int(tear[6:]), n - 1)
        elif tear:
            n = 0
        img[addr : addr + n] = b"\xff" * n


def expected_ops_image(done: int, torn: str | None = None, align: int = 1) -> bytearray:
    img = ops_initial()
    for op in OPS[:done]:
        apply_op(img, op, align)
    if torn is not None and done < len(OPS):
        apply_op(img, OPS[done], align, torn or "none")
    return img


def ops_chip(tmp_path: Path, name: str = "chip.bin") -> Path:
    path = tmp_path / name
    make_chip(path, 2048, 256, bytes(ops_initial()))
    return path


def done_lines(stdout: str) -> list[int]:
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("done ")]


def test_ops_without_fault(device, tmp_path: Path) -> None:
    path = ops_chip(tmp_path)
    proc = run(device, "ops", path, 1)
    assert proc.returncode == 0, proc.stderr
    assert done_lines(proc.stdout) == [0, 1, 2, 3, 4]
    assert "end 5 2 144" in proc.stdout  # ops, erases, bytes programmed: reads not counted
    assert path.read_bytes() == expected_ops_image(5)
    assert wear(path) == [0, 1, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4])
def test_ops_cut_stops_before_operation_n(device, tmp_path: Path, cut: int) -> None:
    path = ops_chip(tmp_path)
    proc = run(device, "ops", path, 1, env={"MPBOOT_NOR_FAULT": f"cut={cut}"})
    assert proc.returncode == CUT_EXIT, (proc.stdout, proc.stderr)
    assert done_lines(proc.stdout) == list(range(cut))  # ops 0..N-1 returned; reads between
    assert "end" not in proc.stdout
    assert f"power cut at operation {cut}" in proc.stderr
    assert path.read_bytes() == expected_ops_image(cut)  # op N not done at all
    erased = [i // 256 for kind, i, _ in OPS[:cut] if kind == "E"]
    w = wear(path)
    for sector in (1, 3):
        if sector in erased:
            assert w[sector] == 1
    assert [w[s] for s in (0, 2, 4, 5, 6, 7)] == [0] * 6


def test_ops_cut_past_the_last_operation_is_harmless(device, tmp_path: Path) -> None:
    path = ops_chip(tmp_path)
    proc = run(device, "ops", path, 1, env={"MPBOOT_NOR_FAULT": "cut=5"})
    assert proc.returncode == 0
    assert done_lines(proc.stdout) == [0, 1, 2, 3, 4]
    assert path.read_bytes() == expected_ops_image(5)


TEARS = [
    (0, "half", 1),
    (0, "prefix:5", 1),
    (2, "prefix:63", 4),
    (2, "prefix:1000", 1),  # at most all but one byte
    (2, "prefix:0", 8),
    (0, "word", 1),
    (0, "word", 4),
    (0, "word", 8),
    (0, "word", 16),
    (4, "word", 16),
    (1, "erase-half", 1),
    (3, "erase:100", 1),
    (3, "erase:5000", 1),  # at most all but one byte
]


@pytest.mark.parametrize(("cut", "tear", "align"), TEARS)
def test_ops_torn_operation(device, tmp_path: Path, cut: int, tear: str, align: int) -> None:
    path = ops_chip(tmp_path)
    proc = run(device, "ops", path, align, env={"MPBOOT_NOR_FAULT": f"cut={cut},tear={tear}"})
    assert proc.returncode == CUT_EXIT, (proc.stdout, proc.stderr)
    assert done_lines(proc.stdout) == list(range(cut))
    raw = path.read_bytes()
    assert raw == expected_ops_image(cut, tear, align)
    kind, addr, what = OPS[cut]
    if kind == "E":
        assert wear(path)[addr // 256] == 1  # a torn erase still wore the sector
    # Spelled out, independently of the model above:
    if tear == "half":
        assert raw[0:16] == pat(32, 0)[:16] and raw[16:32] == b"\xff" * 16
    elif tear == "prefix:5":
        assert raw[0:5] == pat(32, 0)[:5] and raw[5:32] == b"\xff" * 27
    elif tear == "prefix:1000":
        assert raw[512:575] == pat(64, 2)[:63] and raw[575] == 0xFF
    elif tear == "prefix:0":
        assert raw[512:576] == b"\xff" * 64
    elif tear == "word":
        assert isinstance(what, bytes)
        w = max(4, align)
        n = len(what)
        assert raw[addr : addr + n - w] == what[: n - w]
        last = raw[addr + n - w : addr + n]
        assert last == bytes(d | 0x55 for d in what[n - w :])  # only the 0xaa bits went down
        assert last != what[n - w :]
    elif tear == "erase-half":
        assert raw[256:384] == b"\xff" * 128 and raw[384:512] == bytes(128)
    elif tear == "erase:100":
        assert raw[768:868] == b"\xff" * 100 and raw[868:1024] == bytes(156)
    elif tear == "erase:5000":
        assert raw[768:1023] == b"\xff" * 255 and raw[1023] == 0


def test_word_tear_exact_bytes(device, tmp_path: Path) -> None:
    """tear=word on op 0 (32 bytes at 0, write unit 4): bytes 0..27 programmed; the last
    word has only the bits of 0xaa programmed (the bits of 0x55 still 1)."""
    path = ops_chip(tmp_path)
    proc = run(device, "ops", path, 4, env={"MPBOOT_NOR_FAULT": "cut=0,tear=word"})
    assert proc.returncode == CUT_EXIT
    raw = path.read_bytes()
    assert pat(32, 0)[28:].hex() == "11365b80"
    assert raw[28:32].hex() == "55775fd5"  # 11|55, 36|55, 5b|55, 80|55
    assert raw[0:28] == pat(32, 0)[:28]
    assert raw[32:256] == b"\xff" * 224


def test_fault_control_file_is_one_shot(device, tmp_path: Path) -> None:
    path = ops_chip(tmp_path)
    control = Path(f"{path}.fault")
    control.write_text("cut=2\n")
    proc = run(device, "ops", path, 1)
    assert proc.returncode == CUT_EXIT
    assert done_lines(proc.stdout) == [0, 1]
    assert not control.exists()  # deleted when read
    assert path.read_bytes() == expected_ops_image(2)
    # The next power-on is fault-free (and redoing ops 0 and 1 is allowed on NOR).
    proc = run(device, "ops", path, 1)
    assert proc.returncode == 0, proc.stderr
    assert done_lines(proc.stdout) == [0, 1, 2, 3, 4]
    assert path.read_bytes() == expected_ops_image(5)
    assert wear(path) == [0, 2, 0, 1, 0, 0, 0, 0]


def test_fault_control_file_with_tear(device, tmp_path: Path) -> None:
    path = ops_chip(tmp_path)
    Path(f"{path}.fault").write_text("cut=3,tear=erase-half")
    proc = run(device, "ops", path, 1)
    assert proc.returncode == CUT_EXIT
    assert path.read_bytes() == expected_ops_image(3, "erase-half")
    assert not Path(f"{path}.fault").exists()


def test_fault_env_takes_precedence_over_control_file(device, tmp_path: Path) -> None:
    path = ops_chip(tmp_path)
    control = Path(f"{path}.fault")
    control.write_text("cut=3")
    proc = run(device, "ops", path, 1, env={"MPBOOT_NOR_FAULT": "cut=1"})
    assert proc.returncode == CUT_EXIT
    assert done_lines(proc.stdout) == [0]
    assert control.read_text() == "cut=3"  # "or else": not read, so not consumed
    proc = run(device, "ops", path, 1)  # now the file applies, once
    assert proc.returncode == CUT_EXIT
    assert done_lines(proc.stdout) == [0, 1, 2]
    assert not control.exists()


def test_trace_one_line_per_operation(device, tmp_path: Path) -> None:
    path = ops_chip(tmp_path)
    trace = tmp_path / "trace.txt"
    proc = run(device, "ops", path, 1, env={"MPBOOT_NOR_TRACE": str(trace)})
    assert proc.returncode == 0
    full = ["W 0 32", "E 256 256", "W 512 64", "E 768 256", "W 1040 48"]
    assert trace.read_text().splitlines() == full  # reads are not traced
    # Appends; the operation the power is cut in is traced (with its full length).
    proc = run(device, "ops", path, 1, env={"MPBOOT_NOR_TRACE": str(trace), "MPBOOT_NOR_FAULT": "cut=2,tear=half"})
    assert proc.returncode == CUT_EXIT
    assert trace.read_text().splitlines() == full + full[:3]


# ---- Area --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def area(device, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], bytes, list[int]]:
    path = tmp_path_factory.mktemp("area") / "chip.bin"
    img = b"\xa5" * 1024 + b"\xff" * 1024 + b"\xa5" * 2048  # the area under test: erased
    make_chip(path, 4096, 256, img)
    c = checks(run_ok(device, "area", path))
    return c, path.read_bytes(), wear(path)


CTOR = {
    "whole": "ok 0 4096 256 1",
    "rest": "ok 1024 3072 256 4",
    "exact": "ok 3840 256 256 256",
    "ws16": "ok 0 256 256 16",
    "start_mis": "ValueError",
    "start_mis_rest": "ValueError",
    "size_mis": "ValueError",
    "size_half_block": "ValueError",
    "past_end": "ValueError",
    "too_big": "ValueError",
    "at_end": "ValueError",
    "start_past": "ValueError",
    "neg_size": "ValueError",
    "ws3": "ValueError",
    "ws0": "ValueError",
    "ws_neg": "ValueError",
    "ws512": "ValueError",
    "ws96": "ValueError",
}


@pytest.mark.parametrize("name", sorted(CTOR))
def test_area_constructor(area, name: str) -> None:
    assert area[0]["ctor." + name] == CTOR[name]


def test_area_constructor_refuses_negative_start(area) -> None:
    assert area[0]["ctor.neg_start"] == "ValueError"


def test_area_read_bounds(area) -> None:
    c = area[0]
    # Short read at the end of a [0, 1024) area: 4 bytes of chip 0xa5, the rest of buf kept.
    assert c["read.short"] == "ok 4 " + "a5" * 4 + "11" * 12
    assert c["read.full"] == "ok 16 " + "ff" * 16
    assert c["read.end"] == "ok 0 " + "11" * 16
    assert c["read.beyond"] == "ValueError"
    assert c["read.neg"] == "ValueError"


def test_area_write_alignment_bounds_and_erased_target(area) -> None:
    c = area[0]
    for name in ("mis_off", "mis_len", "mis_both", "past_end", "neg"):
        assert c["write." + name] == "ValueError", name
    assert c["write.first"] == "ok"
    assert c["write.again_same"] == "OSError 5"  # Area refuses even what NOR would allow
    assert c["write.again_ff"] == "OSError 5"
    assert c["write.next"] == "ok"  # right after programmed bytes: no false alarm
    assert c["write.last"] == "ok"
    assert c["write.chip_errors"] == "0"  # refused before the chip saw it


MID = [
    (256, 0, 0), (256, 0, 1), (256, 0, 62), (256, 0, 63), (256, 0, 64), (256, 0, 65),
    (256, 0, 127), (256, 0, 128), (256, 0, 191), (256, 0, 200), (256, 0, 254), (256, 0, 255),
    (4, 0, 0), (4, 0, 1), (4, 0, 2), (4, 0, 3), (12, 4, 5), (12, 4, 11), (60, 0, 59),
    (68, 0, 66), (68, 0, 64), (132, 8, 130), (132, 8, 3), (192, 0, 190),
    (64, 0, 64), (12, 4, 12), (8, 4, -1), (60, 128, -4), (252, 4, -3),
]


@pytest.mark.parametrize(("n", "s", "q"), MID)
def test_area_write_refuses_one_unerased_byte(area, n: int, s: int, q: int) -> None:
    """A write of n bytes whose target has one byte 0x7f at offset q (outside when q < 0 or
    q >= n): refused with EIO, nothing programmed; allowed when the byte is outside."""
    result, seen, zeros, errors = area[0][f"mid.{n}.{s}.{q}"].rsplit(" ", 3)
    if 0 <= q < n:
        assert (result, seen, zeros) == ("OSError 5", "7fff", "0")
    else:
        assert (result, seen, zeros) == ("ok", "007fff", str(n))
    assert errors == "0"


def test_area_erase_whole_blocks_only(area) -> None:
    c = area[0]
    for name in ("mis_off", "mis_len", "past_end", "neg"):
        assert c["erase." + name] == "ValueError", name
    assert c["erase.block2"] == "ok"
    assert c["erase.none"] == "ok"
    assert c["erase.after"] == "ff 0005060708"
    assert c["erase.hi"] == "ok"
    assert c["erase.hi_size"] == "1024"


def test_area_maps_to_chip_bytes(area) -> None:
    c, raw, w = area
    assert raw[0:1024] == b"\xa5" * 1024  # before the area: untouched
    assert raw[1024:1028] == b"\x01\x02\x03\x04"  # area offset 0
    assert raw[1028:1036] == pat(8, 3)
    assert raw[1036:1280] == b"\xff" * 244
    # Area block 1 (chip sector 5) after the last probe: 0x7f at 257, zeros from 260.
    assert raw[1280:1536] == b"\xff\x7f\xff\xff" + bytes(252)
    assert raw[1536:1792] == b"\xff" * 256  # area block 2, erased
    assert raw[1792:2048] == bytes(252) + b"\x05\x06\x07\x08"  # area offset 1020: write.last
    assert raw[2048:3072] == b"\xa5" * 1024  # after the area: untouched
    assert raw[3072:4096] == b"\xff" * 1024  # Area(3072, rest).erase(0, 1024)
    expect = [0] * 16
    expect[5] = int(c["mid.erases"])
    expect[6] = 1
    expect[12:16] = [1] * 4
    assert expect[5] == len(MID)
    assert w == expect


# ---- State store -----------------------------------------------------------------------


@dataclass
class Rec:
    seq: int = 0
    active: int = NONE
    test: int = NONE
    trial: int = NONE
    flags: int = 0
    floor: int = 0
    version: bytes = bytes(8)
    ok0: bytes = bytes(16)
    ok1: bytes = bytes(16)
    slen: int = 0
    soff: int = 0
    ssha: bytes = bytes(16)
    sslot: int = NONE
    crc_xor: int = field(default=0, compare=False)

    def body(self, magic: int = MAGIC) -> bytes:
        return struct.pack(REC_FMT, magic, self.seq, self.active, self.test, self.trial, self.flags,
                           self.floor, self.version, self.ok0, self.ok1, self.slen, self.soff, self.ssha,
                           self.sslot).ljust(CRC_AT, b"\xff")

    def encode(self, size: int = REC) -> bytes:
        """The record as on flash: 92 bytes, CRC-32 of them (LE), 0xff up to the write unit."""
        body = self.body()
        return (body + struct.pack("<I", zlib.crc32(body) ^ self.crc_xor)).ljust(size, b"\xff")

    def fmt(self) -> str:
        return " ".join([str(self.seq), str(self.active), str(self.test), str(self.trial), str(self.flags),
                         str(self.floor), self.version.hex(), self.ok0.hex(), self.ok1.hex(), str(self.slen),
                         str(self.soff), self.ssha.hex(), str(self.sslot)])

    def sets(self) -> list[str]:
        """dev_flash ops setting every field but seq."""
        return [f"set:1={self.active}", f"set:2={self.test}", f"set:3={self.trial}", f"set:4={self.flags}",
                f"set:5={self.floor}", f"set:6=h:{self.version.hex()}", f"set:7=h:{self.ok0.hex()}",
                f"set:8=h:{self.ok1.hex()}", f"set:9={self.slen}", f"set:10={self.soff}",
                f"set:11=h:{self.ssha.hex()}", f"set:12={self.sslot}"]


def saved(seq: int) -> Rec:
    """The record `saven` writes with sequence number seq (from blank). The floor stays 0:
    a save that raises it is two records (test_state_floor_raise_is_written_twice)."""
    return Rec(seq, soff=seq, version=pat(8, seq))


def decode(slot: bytes) -> int | str:
    """A record slot: its seq if valid, 'blank', or 'bad'."""
    if slot == b"\xff" * len(slot):
        return "blank"
    magic, seq = struct.unpack_from("<II", slot)
    if magic != MAGIC or zlib.crc32(slot[:CRC_AT]) != struct.unpack_from("<I", slot, CRC_AT)[0]:
        return "bad"
    return seq


@dataclass
class Geo:
    size: int = 4 * S
    sector: int = S
    align: int = 1
    start: int = S  # state area: chip sectors 1 and 2; sectors 0 and 3 are neighbours
    asize: int = 2 * S
    ws: int = 1

    @property
    def rec(self) -> int:
        return (REC + self.ws - 1) // self.ws * self.ws


class StChip:
    """One chip file for `dev_flash st`, neighbours of the state area filled with 0xa5."""

    def __init__(self, d: Path, name: str, geo: Geo | None = None) -> None:
        self.name = name
        self.geo = geo or Geo()
        self.path = d / f"{name}.bin"
        g = self.geo
        img = bytearray(b"\xa5" * g.size)
        img[g.start : g.start + g.asize] = b"\xff" * g.asize
        make_chip(self.path, g.size, g.sector, bytes(img))

    def op(self) -> str:
        g = self.geo
        return f"chip:{self.name}:{g.size}:{g.sector}:{g.align}:{g.start}:{g.asize}:{g.ws}"

    def raw(self) -> bytes:
        return self.path.read_bytes()

    def area(self) -> bytes:
        g = self.geo
        return self.raw()[g.start : g.start + g.asize]

    def slots(self) -> list[list[int | str]]:
        """Per sector of the state area, each record slot decoded."""
        g = self.geo
        a = self.area()
        return [[decode(a[s + i : s + i + g.rec]) for i in range(0, g.sector - g.rec + 1, g.rec)]
                for s in range(0, g.asize, g.sector)]

    def slot(self, sector: int, i: int) -> bytes:
        g = self.geo
        off = sector * g.sector + i * g.rec
        return self.area()[off : off + g.rec]

    def neighbours_untouched(self) -> bool:
        g = self.geo
        raw = self.raw()
        return raw[: g.start] == b"\xa5" * g.start and raw[g.start + g.asize :] == b"\xa5" * (g.size - g.start - g.asize)

    def state_wear(self) -> list[int]:
        g = self.geo
        w = wear(self.path)
        first = g.start // g.sector
        assert all(x == 0 for i, x in enumerate(w) if not first <= i < first + g.asize // g.sector)
        return w[first : first + g.asize // g.sector]


def st_run(device, d: Path, *ops: str, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Run `dev_flash st`; output lines grouped per chip (in order)."""
    return group(run_ok(device, "st", d, *ops, env=env))


def group(lines: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur: list[str] = []
    for line in lines:
        if line.startswith("chip "):
            cur = out.setdefault(line[5:], [])
        else:
            cur.append(line)
    return out


BLANK = Rec()
NEW = f"new ok {REC} 8"


def test_state_blank_area(device, tmp_path: Path) -> None:
    chip = StChip(tmp_path, "s")
    out = st_run(device, tmp_path, chip.op(), "blank", "new", "load", "errors")["s"]
    assert out == ["blank " + BLANK.fmt(), NEW, "load 0 " + BLANK.fmt(), "errors 0"]
    assert chip.area() == b"\xff" * (2 * S)  # loading writes nothing
    assert chip.state_wear() == [0, 0]
    assert chip.neighbours_untouched()


def test_state_round_trip_every_field_across_processes(device, tmp_path: Path) -> None:
    chip = StChip(tmp_path, "s")
    # Both saves raise the floor: each is two records, the second copy one seq later.
    r1 = Rec(1, active=1, test=0, trial=NONE, flags=0xA5, floor=0x80000001,
             version=bytes.fromhex("00ff0102fe7f8001"), ok0=bytes(range(16)), ok1=bytes(range(255, 239, -1)))
    r2 = Rec(3, active=0, test=1, trial=1, flags=0, floor=0xFFFFFFFF,
             version=b"\x07" * 8, ok0=b"\xff" * 16, ok1=bytes(16), slen=0x12345678, soff=0x9ABCDEF0,
             ssha=bytes(range(16, 32)), sslot=1)
    out = st_run(device, tmp_path, chip.op(), "new", "load", *r1.sets(), "save", "check")["s"]
    assert out == [NEW, "load 0 " + BLANK.fmt(), "save 2", "check 1 " + replace(r1, seq=2).fmt()]
    assert chip.slot(0, 0) == r1.encode()  # the documented layout, bit for bit
    assert chip.slot(0, 1) == replace(r1, seq=2).encode()
    out = st_run(device, tmp_path, chip.op(), "new", "load", *r2.sets(), "save")["s"]
    assert out == [NEW, "load 1 " + replace(r1, seq=2).fmt(), "save 4"]
    out = st_run(device, tmp_path, chip.op(), "new", "load")["s"]
    assert out == [NEW, "load 1 " + replace(r2, seq=4).fmt()]
    assert chip.slot(0, 2) == r2.encode()
    assert chip.slots() == [[1, 2, 3, 4] + ["blank"] * 4, ["blank"] * 8]
    assert chip.state_wear() == [1, 0]
    assert chip.neighbours_untouched()


def test_state_sector_switch_after_records_per_sector(device, tmp_path: Path) -> None:
    chip = StChip(tmp_path, "s")  # 768-byte sectors: 8 records of 96 bytes each
    op = chip.op()
    out = st_run(device, tmp_path, op, "new", "load", "saven:8", "check")["s"]
    assert out == [NEW, "load 0 " + BLANK.fmt(), "saven 1 2 3 4 5 6 7 8", "check 1 " + saved(8).fmt()]
    assert chip.slots() == [[1, 2, 3, 4, 5, 6, 7, 8], ["blank"] * 8]
    assert chip.state_wear() == [1, 0]
    # The 9th save: the other sector is erased and takes it; the full one is kept.
    out = st_run(device, tmp_path, op, "new", "load", "saven:1", "check")["s"]
    assert out == [NEW, "load 1 " + saved(8).fmt(), "saven 9", "check 1 " + saved(9).fmt()]
    assert chip.slots() == [[1, 2, 3, 4, 5, 6, 7, 8], [9] + ["blank"] * 7]
    assert chip.state_wear() == [1, 1]
    out = st_run(device, tmp_path, op, "new", "load", "saven:7")["s"]
    assert out == [NEW, "load 1 " + saved(9).fmt(), "saven 10 11 12 13 14 15 16"]
    assert chip.slots() == [[1, 2, 3, 4, 5, 6, 7, 8], list(range(9, 17))]
    assert chip.state_wear() == [1, 1]
    out = st_run(device, tmp_path, op, "new", "load", "saven:1", "errors")["s"]
    assert out == [NEW, "load 1 " + saved(16).fmt(), "saven 17", "errors 0"]
    assert chip.slots() == [[17] + ["blank"] * 7, list(range(9, 17))]
    assert chip.state_wear() == [2, 1]
    assert chip.slot(0, 0) == saved(17).encode()
    out = st_run(device, tmp_path, op, "new", "load")["s"]
    assert out == [NEW, "load 1 " + saved(17).fmt()]
    assert chip.neighbours_untouched()


GEOMETRIES = {
    # name: (geometry, saves, rec, per, expected slots per sector (seqs), wear)
    "a16": (Geo(align=16, ws=16), 9, 96, 8, [list(range(1, 9)), [9] + ["blank"] * 7], [1, 1]),
    "ws64": (Geo(align=8, ws=64), 3, 128, 6, [[1, 2, 3] + ["blank"] * 3, ["blank"] * 6], [1, 0]),
    "ws128": (Geo(size=4 * 4096, sector=4096, align=16, start=4096, asize=8192, ws=128), 33, 128, 32,
              [list(range(1, 33)), [33] + ["blank"] * 31], [1, 1]),
    "ws256": (Geo(align=8, ws=256), 5, 256, 3, [[1, 2, 3], [4, 5, "blank"]], [1, 1]),
    "per1": (Geo(size=512, sector=128, align=4, start=128, asize=256, ws=64), 5, 128, 1, [[5], [4]], [3, 2]),
    # Sectors that are not a multiple of the record: the tail of each sector stays unused.
    "odd100": (Geo(size=400, sector=100, align=4, start=100, asize=200, ws=4), 5, 96, 1, [[5], [4]], [3, 2]),
    "odd200": (Geo(size=800, sector=200, align=1, start=200, asize=400, ws=1), 5, 96, 2,
               [[5, "blank"], [3, 4]], [2, 1]),
    "ws48": (Geo(size=576, sector=144, align=16, start=144, asize=288, ws=48), 3, 96, 1, [[3], [2]], [2, 1]),
}


def test_state_record_size_follows_write_unit(device, tmp_path: Path) -> None:
    chips = {name: StChip(tmp_path, name, g[0]) for name, g in GEOMETRIES.items()}
    ops = []
    for name, (_geo, saves, *_rest) in GEOMETRIES.items():
        ops += [chips[name].op(), "new", "load", f"saven:{saves}", "check", "errors"]
    out = st_run(device, tmp_path, *ops)
    for name, (geo, saves, rec, per, slots, wear_) in GEOMETRIES.items():
        assert geo.rec == rec
        assert out[name] == [f"new ok {rec} {per}", "load 0 " + BLANK.fmt(),
                             "saven " + " ".join(map(str, range(1, saves + 1))),
                             "check 1 " + saved(saves).fmt(), "errors 0"], name
        chip = chips[name]
        assert chip.slots() == slots, name
        assert chip.state_wear() == wear_, name
        newest = [(s, i) for s, sec in enumerate(slots) for i, x in enumerate(sec) if x == saves]
        assert chip.slot(*newest[0]) == saved(saves).encode(rec), name  # tail 0xff to rec
        area = chip.area()
        for base in range(0, geo.asize, geo.sector):  # nothing past the last whole slot
            assert area[base + per * rec : base + geo.sector] == b"\xff" * (geo.sector - per * rec), name
        assert chip.neighbours_untouched(), name


def test_state_area_of_wrong_size(device, tmp_path: Path) -> None:
    bad = {
        "one": Geo(start=S, asize=S),
        "three": Geo(start=S, asize=3 * S),
        "whole": Geo(start=0, asize=4 * S),
        "tiny_sectors": Geo(size=256, sector=32, start=64, asize=64),  # a record needs 96 bytes
        "ws_over_half": Geo(size=1024, sector=128, align=16, start=0, asize=256, ws=128),
    }
    ops = []
    for name, geo in bad.items():
        StChip(tmp_path, name, geo)
        ops += [f"chip:{name}:{geo.size}:{geo.sector}:{geo.align}:{geo.start}:{geo.asize}:{geo.ws}", "new"]
    out = st_run(device, tmp_path, *ops)
    assert out["one"] == ["new ValueError"]
    assert out["three"] == ["new ValueError"]
    assert out["whole"] == ["new ValueError"]
    assert out["tiny_sectors"] == ["new ValueError"]
    assert out["ws_over_half"] == ["new ok 128 1"]  # one record per sector is allowed


def _garbage() -> dict[str, bytes]:
    r4 = saved(3)
    r4.seq = 4  # what the next save would write
    full = r4.encode()
    bad_magic = r4.body(magic=MAGIC ^ 0x00010000)
    return {
        "zeros4": bytes(4),
        "byte95": b"\xff" * (REC - 1) + b"\x00",  # only the last byte of the slot
        "prefix32": full[:32],  # half-programmed
        "prefix95": full[: REC - 1],
        "word": full[:CRC_AT] + bytes(b | 0x55 for b in full[CRC_AT:]),  # last word half-programmed
        "badcrc": replace(r4, crc_xor=0x00000100).encode(),
        "badmagic": bad_magic + struct.pack("<I", zlib.crc32(bad_magic)),
        "body": full[:60] + bytes([full[60] & 0xFE]) + full[61:],  # soff 3 -> 2, CRC not
    }


GARBAGE = _garbage()


def test_state_torn_or_corrupt_newest_record_is_ignored(device, tmp_path: Path) -> None:
    """3 saves, then garbage by hand through the chip in the next free slot: the 3rd record
    loads, and the next save goes after the garbage (never over unerased bytes)."""
    ops = []
    chips = {}
    for name, junk in GARBAGE.items():
        assert decode(junk.ljust(REC, b"\xff")) == "bad", name
        chips[name] = chip = StChip(tmp_path, name)
        ops += [chip.op(), "new", "load", "saven:3", f"raw:{3 * REC}:{junk.hex()}", "new", "load", "save",
                "errors", "check"]
    out = st_run(device, tmp_path, *ops)
    r4 = saved(3)
    r4.seq = 4
    for name, junk in GARBAGE.items():
        chip = chips[name]
        assert out[name] == [NEW, "load 0 " + BLANK.fmt(), "saven 1 2 3", "raw ok", NEW,
                             "load 1 " + saved(3).fmt(), "save 4", "errors 0", "check 1 " + r4.fmt()], name
        assert chip.slot(0, 3) == junk.ljust(REC, b"\xff"), name  # left alone
        assert chip.slot(0, 4) == r4.encode(), name
        assert chip.slots() == [[1, 2, 3, "bad", 4, "blank", "blank", "blank"], ["blank"] * 8], name
        assert chip.state_wear() == [1, 0], name


def test_state_torn_record_at_sector_edges(device, tmp_path: Path) -> None:
    """Garbage in the last slot of a sector (the sector counts as full: the next save erases
    the other one), or in the first slot of the fresh sector (erased again before use)."""
    junk = GARBAGE["prefix32"].hex()
    last = StChip(tmp_path, "last")
    first = StChip(tmp_path, "first")
    out = st_run(device, tmp_path,
                 last.op(), "new", "load", "saven:7", f"raw:{7 * REC}:{junk}", "new", "load", "save", "errors", "check",
                 first.op(), "new", "load", "saven:8", f"raw:{S}:{junk}", "new", "load", "save", "errors", "check")
    r = saved(7)
    r.seq = 8
    assert out["last"][4:] == [NEW, "load 1 " + saved(7).fmt(), "save 8", "errors 0", "check 1 " + r.fmt()]
    assert last.slots() == [[1, 2, 3, 4, 5, 6, 7, "bad"], [8] + ["blank"] * 7]
    assert last.state_wear() == [1, 1]
    r = saved(8)
    r.seq = 9
    assert out["first"][4:] == [NEW, "load 1 " + saved(8).fmt(), "save 9", "errors 0", "check 1 " + r.fmt()]
    assert first.slots() == [list(range(1, 9)), [9] + ["blank"] * 7]
    assert first.slot(1, 0) == r.encode()
    assert first.state_wear() == [1, 1]


def _rec(seq: int) -> Rec:
    return Rec(seq, active=seq & 1, test=(seq >> 1) & 1, trial=seq & 0xFF, flags=0, floor=seq * 3 & 0xFFFFFFFF,
               version=pat(8, seq & 0xFF), ok0=pat(16, seq & 0xFF), ok1=pat(16, (seq + 1) & 0xFF))


ORDERS = {
    # name: (seqs in sector 0, seqs in sector 1, winner, (sector, slot) of the next save)
    "b_newer": ([5, 6], [9], 9, (1, 1)),
    "a_newer": ([9], [5, 6, 7], 9, (0, 1)),
    "a_newer_b_fuller": ([20], list(range(11, 19)), 20, (0, 1)),
    "b_newer_a_full": (list(range(1, 9)), [12, 13], 13, (1, 2)),
    "high_bit": ([0x7FFFFFFF], [0x80000000], 0x80000000, (1, 1)),
    "high_bit_a": ([0xFFFFFFF0, 0xFFFFFFF1], [0x7FFFFFFF], 0xFFFFFFF1, (0, 2)),
}


def test_state_highest_sequence_wins_regardless_of_sector(device, tmp_path: Path) -> None:
    ops = []
    chips = {}
    for name, (a, b, _, _) in ORDERS.items():
        chips[name] = chip = StChip(tmp_path, name)
        ops.append(chip.op())
        ops += [f"raw:{i * REC}:{_rec(s).encode().hex()}" for i, s in enumerate(a)]
        ops += [f"raw:{S + i * REC}:{_rec(s).encode().hex()}" for i, s in enumerate(b)]
        ops += ["new", "load", "save", "errors", "check"]
    out = st_run(device, tmp_path, *ops)
    for name, (a, b, win, (sec, slot)) in ORDERS.items():
        chip = chips[name]
        nxt = replace(_rec(win), seq=win + 1)
        n = len(a) + len(b)
        assert out[name] == ["raw ok"] * n + [NEW, "load 1 " + _rec(win).fmt(), f"save {win + 1}",
                                              "errors 0", "check 1 " + nxt.fmt()], name
        assert chip.slot(sec, slot) == nxt.encode(), name
        assert chip.state_wear() == [0, 0], name


def test_state_only_invalid_records_is_blank(device, tmp_path: Path) -> None:
    """No valid record anywhere: blank(), found False, and the first save erases sector 0."""
    chip = StChip(tmp_path, "s")
    out = st_run(device, tmp_path, chip.op(), f"raw:0:{GARBAGE['badcrc'].hex()}", f"raw:{S}:{GARBAGE['body'].hex()}",
                 "new", "load", "save", "check")["s"]
    assert out == ["raw ok", "raw ok", NEW, "load 0 " + BLANK.fmt(), "save 1",
                   "check 1 " + replace(BLANK, seq=1).fmt()]
    assert chip.slots()[0] == [1] + ["blank"] * 7
    assert chip.state_wear() == [1, 0]


TORN_SAVES = {
    # name: (geometry, tear; the save is op 4 after 3 saves (erase + 3 programs); slot of the redo)
    "none": (Geo(), "", 3),
    "half": (Geo(), "half", 4),
    "prefix1": (Geo(), "prefix:1", 4),
    "prefix95": (Geo(), "prefix:95", 4),
    "word": (Geo(), "word", 4),
    "a16_word": (Geo(align=16, ws=16), "word", 4),
    "a16_half": (Geo(align=16, ws=16), "half", 4),
}


@pytest.mark.parametrize("name", sorted(TORN_SAVES))
def test_state_power_cut_during_save(device, tmp_path: Path, name: str) -> None:
    geo, tear, slot = TORN_SAVES[name]
    chip = StChip(tmp_path, "s", geo)
    fault = "cut=4" + (f",tear={tear}" if tear else "")
    proc = run(device, "st", tmp_path, chip.op(), "new", "load", "saven:3", "save",
               env={"MPBOOT_NOR_FAULT": fault})
    assert proc.returncode == CUT_EXIT, (proc.stdout, proc.stderr)
    assert "saven 1 2 3" in proc.stdout and "save 4" not in proc.stdout
    torn = chip.slot(0, 3)
    assert (torn == b"\xff" * REC) == (tear == "")
    out = st_run(device, tmp_path, chip.op(), "new", "load", "save", "errors", "check")["s"]
    r4 = replace(saved(3), seq=4)
    assert out == [NEW, "load 1 " + saved(3).fmt(), "save 4", "errors 0", "check 1 " + r4.fmt()]
    assert chip.slot(0, slot) == r4.encode()
    if slot == 4:
        assert chip.slot(0, 3) == torn  # the torn record is left where it is
    assert chip.slots()[1] == ["blank"] * 8
    assert chip.state_wear() == [1, 0]


SWITCH_CUTS = {
    # 16 saves fill both sectors (ops 0..17); save 17 = erase sector 0 (op 18) + program (19).
    "erase_not_done": "cut=18",
    "erase_half": "cut=18,tear=erase-half",
    "erase_100": "cut=18,tear=erase:100",
    "program_not_done": "cut=19",
    "program_half": "cut=19,tear=half",
    "program_word": "cut=19,tear=word",
}


@pytest.mark.parametrize("name", sorted(SWITCH_CUTS))
def test_state_power_cut_during_sector_switch(device, tmp_path: Path, name: str) -> None:
    chip = StChip(tmp_path, "s")
    proc = run(device, "st", tmp_path, chip.op(), "new", "load", "saven:16", "saven:1",
               env={"MPBOOT_NOR_FAULT": SWITCH_CUTS[name]})
    assert proc.returncode == CUT_EXIT, (proc.stdout, proc.stderr)
    assert chip.slots()[1] == list(range(9, 17))  # the newest records survive any cut
    out = st_run(device, tmp_path, chip.op(), "new", "load", "save", "errors", "check")["s"]
    r17 = replace(saved(16), seq=17)
    assert out == [NEW, "load 1 " + saved(16).fmt(), "save 17", "errors 0", "check 1 " + r17.fmt()]
    assert chip.slots() == [[17] + ["blank"] * 7, list(range(9, 17))]
    assert chip.slot(0, 0) == r17.encode()
    w = chip.state_wear()
    assert w[1] == 1
    if name != "erase_not_done":  # (an erase cut before it started still counts: see report)
        assert w[0] == 3  # first use, the cut switch, the redo


def test_nor_timing_takes_back_what_sleeps_overshoot(device, tmp_path: Path) -> None:
    """timing="nor": each operation sleeps its modelled time less what the sleeps before it
    overshot, so the chip's busy time adds up to the model's (on a clock that overshoots every
    sleep by 150 us; 45 ms erase, 0.7 ms per page, 71 us per 16 bytes)."""
    chip = tmp_path / "t.bin"
    make_chip(chip, 16384, 4096)
    got = checks(run_ok(device, "timing", chip))
    assert got["slept"].split() == ["45000"] + ["550"] * 8  # each page 700 less the 150 owed
    # Each 16-byte write (71 us) is less than what was owed: neither sleeps, and what is owed
    # goes down (150 - 71 - 71 = 8 us): the busy time is the model's, to the last overshoot.
    modelled = 45000 + 8 * 700 + 2 * 71
    assert int(got["busy"]) == modelled + 8
