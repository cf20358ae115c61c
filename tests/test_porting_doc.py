"""docs/PORTING.md's board recipes against the code they describe.

No physical board is in CI, so this is what holds recipes 2-4 to the adapters: each recipe's
`port.areas(...)` call, as printed, runs through the real adapter (firmware/mpboot/ports/) on
the fake of the port's native module (tests/device/fakes) with the recipe's flash geometry;
the ESP32 partition table follows ESP-IDF's rules and the adapter's; no Pyboard sector holds
parts of two areas; the programmer commands write where slot 0 is; and every `mpboot` command
line shown parses with the real CLI."""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import click
import pytest

from mpboot import upy
from mpboot.cli import cli
from mpboot.upy import compile_tree, mpy_cross_compile

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PORTING.md"
FIRMWARE = ROOT / "firmware" / "mpboot"
FAKES = ROOT / "tests" / "device" / "fakes"
NEEDED = ("__init__.py", "flash.py", "ports/__init__.py", "ports/nor_sim.py", "ports/esp32.py",
          "ports/rp2.py", "ports/stm32.py")

# Board facts the recipes rely on (MicroPython v1.28.0 sources, cited in PORTING.md).
ESP32_FLASH = 0x400000  # the recipe's 4 MiB module
ESP32_TABLE_END = 0x9000  # the partition table at 0x8000 fills one 4 KiB sector
ESP_APP_ALIGN = 0x10000  # ESP-IDF: app partitions on 64 KiB, data on 4 KiB boundaries
ESP_DATA_ALIGN = 0x1000
ESP_TYPES = {"app": 0, "data": 1}
ESP_SUBTYPES = {  # ESP-IDF gen_esp32part.py
    "app": {"factory": 0x00, "test": 0x20, **{f"ota_{n}": 0x10 + n for n in range(16)}},
    "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "nvs_keys": 0x04,
             "efuse": 0x05, "undefined": 0x06, "esphttpd": 0x80, "fat": 0x81, "spiffs": 0x82,
             "littlefs": 0x83},
}
PICO_FLASH = 0x200000  # RPI_PICO: 2 MiB; the storage area is its last MICROPY_HW_FLASH_STORAGE_BYTES
XIP_BASE = 0x10000000
# PYBV11 (STM32F405): storage = sectors 1-4 from 0x08004000 (stm32f405.ld), written through a
# RAM copy of one sector, the 64 KiB CCM (flashbdev.c)
PYB_BASE = 0x08004000
PYB_SECTORS = (0x4000, 0x4000, 0x4000, 0x10000)
PYB_CACHE = 0x10000


# -- reading the doc ---------------------------------------------------------------------

def recipe(n: int) -> str:
    """The text of `## Recipe n: ...`, up to the next `## ` heading."""
    m = re.search(rf"^## Recipe {n}:.*?(?=^## |\Z)", DOC.read_text(), re.M | re.S)
    assert m, f"no Recipe {n} in {DOC}"
    return m.group(0)


def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of that language, dedented (blocks inside list items are
    indented)."""
    return [textwrap.dedent(m.group(3)) for m in
            re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S) if m.group(2) == lang]


def one_block(text: str, lang: str, needle: str) -> str:
    found = [b for b in blocks(text, lang) if needle in b]
    assert len(found) == 1, f"{len(found)} {lang} blocks with {needle!r}"
    return found[0]


def areas_call(boot_py: str) -> str:
    """The `port.areas(...)` expression of a recipe's boot.py, balanced parentheses and all."""
    start = boot_py.index("port.areas(")
    depth = 0
    for i in range(start, len(boot_py)):
        depth += {"(": 1, ")": -1}.get(boot_py[i], 0)
        if boot_py[i] == ")" and depth == 0:
            return boot_py[start : i + 1]
    raise AssertionError("unbalanced port.areas(")


def boot_py(n: int, port: str, stages: bool = False) -> str:
    """The recipe's boot.py: the one-stage board's, or (stages) the two-stage board's."""
    found = [b for b in blocks(recipe(n), "python")
             if f"from mpboot.ports import {port} as port" in b and ("stages.start(" in b) == stages]
    assert len(found) == 1, f"{len(found)} boot.py blocks for {port} (stages={stages})"
    return found[0]


def adapter_const(port: str, name: str) -> int:
    m = re.search(rf"^{name} = const\((\w+)\)", (FIRMWARE / "ports" / f"{port}.py").read_text(), re.M)
    assert m, f"{name} not in ports/{port}.py"
    return int(m.group(1), 0)


def esp32_table(stages: bool = False) -> list[dict[str, Any]]:
    """The recipe's partition table; stages: with the lines of "Two stages" in place of
    those they replace (by name)."""
    rows = _csv_rows(one_block(recipe(2), "csv", "mpboot"))
    if stages:
        extra = _csv_rows(one_block(recipe(2), "csv", "mpb1_0"))
        names = {p["name"] for p in extra}
        rows = [p for p in rows if p["name"] not in names] + extra
    return rows


def _csv_rows(block: str) -> list[dict[str, Any]]:
    rows = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, kind, sub, offset, size, flags = (f.strip() for f in line.split(","))
        subtype = int(sub, 0) if sub[0].isdigit() else ESP_SUBTYPES[kind].get(sub)
        rows.append(dict(name=name, type=ESP_TYPES[kind], subtype=subtype, offset=int(offset, 0),
                         size=int(size, 0), encrypted="encrypted" in flags))
    return rows


# -- running the adapters on the fakes ----------------------------------------------------

@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapters and what they import as .mpy, the fakes of esp32, rp2, pyb and machine."""
    out = tmp_path_factory.mktemp("porting") / "lib"
    for rel in NEEDED:
        target = out / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    compile_tree(FAKES, out)
    return out


# Sets up the fake for PORT with the geometry in SPEC_FILE, evaluates the doc's areas call and prints one
# JSON line per area: where its units are (storage/chip offsets), its sizes, and whether the
# port maps it.
_DRIVER = """
import json
import sys
import machine

name, path = sys.argv[1], sys.argv[2]
with open(sys.argv[3]) as f:
    spec = json.load(f)
machine.setup(name)
if name == "esp32":
    import esp32 as fake
    fake.setup(path, spec["size"], tuple(tuple(p) for p in spec["table"]), spec["running"])
    from mpboot.ports import esp32 as port
elif name == "rp2":
    import rp2 as fake
    fake.setup(path, spec["size"])
    from mpboot.ports import rp2 as port
    port._map = fake.xip
else:
    import pyb as fake
    if "sectors" in spec:
        fake.setup(path, tuple(spec["sectors"]), spec["base"], spec["cache"])
    else:
        fake.setup(path, mode="spi", size=spec["size"])
    from mpboot.ports import stm32 as port
    port._map = fake.mem
for a in eval(spec["call"], {"port": port}):
    if a is None:  # (seven areas: no factory or trust area asked for)
        print("null")
        continue
    d = a.bdev
    if name == "esp32":
        units = [[d.info()[2] + a.start, a.size]]
    elif name == "rp2":
        units = [[d._start + a.start, a.size]]
    else:
        units = [[d.start + i * d.stride, d.es] for i in range(d.n)]
    m = port.mapped(a)
    print(json.dumps({"units": units, "size": a.size, "erase": a.erase_size,
                      "write": a.write_size, "mapped": -1 if m is None else len(m)}))
if name == "stm32":
    print(json.dumps({"base": port._base}))
"""


def run_areas(lib: Path, tmp_path: Path, port: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    script = tmp_path / "areas_driver.py"
    script.write_text(_DRIVER)
    # The spec goes in a file: this port's wrapper died ("FATAL: uncaught NLR") on the esp32
    # spec passed as an argument, and ran it read from a file.
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = upy.run([script, port, tmp_path / "flash.bin", spec_file], path=[lib], heapsize="2m",
                   timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def span(area: dict[str, Any]) -> tuple[int, int]:
    first = area["units"][0][0]
    last = area["units"][-1]
    return first, last[0] + last[1]


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# -- Recipe 2: ESP32 ----------------------------------------------------------------------

@pytest.mark.parametrize("stages", [False, True])
def test_esp32_partition_table_follows_esp_idf(stages: bool) -> None:
    table = esp32_table(stages)
    names = [p["name"] for p in table]
    assert len(set(names)) == len(names)
    for p in table:
        align = ESP_APP_ALIGN if p["type"] == ESP_TYPES["app"] else ESP_DATA_ALIGN
        assert p["offset"] % align == 0 and p["size"] % ESP_DATA_ALIGN == 0, p
        assert p["offset"] >= ESP32_TABLE_END and p["offset"] + p["size"] <= ESP32_FLASH, p
        assert p["subtype"] is not None, p
    spans = sorted((p["offset"], p["offset"] + p["size"], p["name"]) for p in table)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        assert end <= start, f"{a} overlaps {b}"
    by_name = {p["name"]: p for p in table}
    # MicroPython runs from the factory app and mounts the data partition labelled vfs; with no
    # otadata the ESP-IDF bootloader always starts factory.
    assert by_name["factory"]["type"] == ESP_TYPES["app"]
    assert by_name["vfs"]["type"] == ESP_TYPES["data"]
    assert not any(p["type"] == ESP_TYPES["data"] and p["subtype"] == 0 for p in table)


def test_esp32_mpboot_partitions_follow_the_adapter() -> None:
    labels = re.findall(r'"(\w+)"', areas_call(boot_py(2, "esp32")))
    assert len(labels) == 3
    by_name = {p["name"]: p for p in esp32_table()}
    sector = adapter_const("esp32", "_SECTOR")
    for label in labels:
        p = by_name[label]
        # Data, not app: flash encryption encrypts every app partition, and the adapter
        # refuses encrypted ones. Not what MicroPython runs from or mounts.
        assert p["type"] == adapter_const("esp32", "_TYPE_DATA") and not p["encrypted"], p
        assert label not in ("factory", "vfs", "nvs", "phy_init"), p
        assert p["size"] % sector == 0, p
    assert by_name[labels[2]]["size"] >= 6 * sector  # state: sectors 0-1, factory area: 2-3, trust: 4-5


def test_esp32_areas_call_on_the_fake(lib: Path, tmp_path: Path) -> None:
    table = esp32_table()
    call = areas_call(boot_py(2, "esp32"))
    running = [p["name"] for p in table].index("factory")
    rows = [(p["type"], p["subtype"], p["offset"], p["size"], p["name"], p["encrypted"]) for p in table]
    areas = run_areas(lib, tmp_path, "esp32", dict(size=ESP32_FLASH, table=rows, running=running, call=call))
    by_name = {p["name"]: p for p in table}
    slot0, slot1, state = (by_name[label] for label in re.findall(r'"(\w+)"', call))
    sector = adapter_const("esp32", "_SECTOR")
    assert [span(a) for a in areas] == [
        (slot0["offset"], slot0["offset"] + slot0["size"]),
        (slot1["offset"], slot1["offset"] + slot1["size"]),
        (state["offset"], state["offset"] + 2 * sector),
        (state["offset"] + 2 * sector, state["offset"] + 4 * sector),
        (state["offset"] + 4 * sector, state["offset"] + 6 * sector)]  # the trust area
    assert {(a["erase"], a["write"], a["mapped"]) for a in areas} == {(sector, 1, -1)}
    esptool = re.search(r"write_flash (0x[0-9a-fA-F]+) app", recipe(2))
    assert esptool and int(esptool.group(1), 16) == slot0["offset"]


# -- Recipe 3: Raspberry Pi Pico ----------------------------------------------------------

def test_rp2_areas_call_on_the_fake(lib: Path, tmp_path: Path) -> None:
    text = recipe(3)
    m = re.search(r"MICROPY_HW_FLASH_STORAGE_BYTES\s+\(([\d\s*]+)\)", one_block(text, "c", "STORAGE_BYTES"))
    assert m
    storage = eval(m.group(1), {"__builtins__": {}})  # digits and * only
    fs = re.search(r"rp2\.Flash\(start=(\w+), len=(\w+)\)", one_block(text, "python", "VfsLfs2"))
    assert fs
    fs_range = (int(fs.group(1), 0), int(fs.group(1), 0) + int(fs.group(2), 0))
    areas = run_areas(lib, tmp_path, "rp2", dict(size=storage, call=areas_call(boot_py(3, "rp2"))))
    assert len(areas) == 5  # with the trust area
    sector, page = adapter_const("rp2", "_SECTOR"), adapter_const("rp2", "_PAGE")
    assert {(a["erase"], a["write"]) for a in areas} == {(sector, page)}
    for a in areas:
        assert not overlaps(span(a), fs_range), ("littlefs", a)
    assert areas[0]["size"] == areas[1]["size"] == areas[0]["mapped"] == areas[1]["mapped"]
    assert areas[2]["size"] == areas[3]["size"] == areas[4]["size"] == 2 * sector
    slot0_xip = XIP_BASE + PICO_FLASH - storage + areas[0]["units"][0][0]
    picotool = re.search(r"picotool load app\S* -t bin -o (0x[0-9a-fA-F]+)", text)
    assert picotool and int(picotool.group(1), 16) == slot0_xip


# -- Recipe 4: Pyboard v1.1 ---------------------------------------------------------------

def test_stm32_areas_call_on_the_fake(lib: Path, tmp_path: Path) -> None:
    text = recipe(4)
    out = run_areas(lib, tmp_path, "stm32", dict(sectors=PYB_SECTORS, base=PYB_BASE, cache=PYB_CACHE,
                                                 call=areas_call(boot_py(4, "stm32"))))
    areas, base = out[:-1], out[-1]["base"]
    assert base == PYB_BASE  # slots are mapped and their alignment checked
    assert len(areas) == 3  # factory=False: four 16 KiB sectors would be needed (no trust area)
    assert areas[0]["mapped"] == areas[0]["size"] and areas[1]["mapped"] == areas[1]["size"]
    # The adapter cannot see physical sectors: no sector may hold parts of two areas, and the
    # state's two units must be in two sectors (one record each, rewritten apart).
    starts = [sum(PYB_SECTORS[:i]) for i in range(len(PYB_SECTORS))]

    def sectors(unit: list[int]) -> set[int]:
        at, n = unit
        return {i for i, s in enumerate(starts) if overlaps((s, s + PYB_SECTORS[i]), (at, at + n))}

    owner: dict[int, int] = {}
    for n, a in enumerate(areas):
        for unit in a["units"]:
            for s in sectors(unit):
                assert owner.setdefault(s, n) == n, f"sector {s + 1} holds parts of areas {owner[s]} and {n}"
    state = areas[2]["units"]
    assert len(state) == 2 and sectors(state[0]).isdisjoint(sectors(state[1]))
    dfu = re.search(r"dfu-util -a 0 -s (0x[0-9a-fA-F]+) -D app", text)
    assert dfu and int(dfu.group(1), 16) == PYB_BASE + areas[0]["units"][0][0]


# -- the mpboot command lines -------------------------------------------------------------

def command_lines() -> list[str]:
    """Every `mpboot ...` line of the doc's sh blocks, continuation lines joined."""
    lines = []
    for block in blocks(DOC.read_text(), "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("mpboot "):
                lines.append(line.strip())
    return lines


def parse(args: list[str]) -> None:
    """Parses args as `mpboot` would, down to the command's own options, without running it:
    raises click's usage errors (no such command or option, bad or missing value)."""
    cmd: click.Command = cli
    ctx = click.Context(cli, info_name="mpboot")
    while isinstance(cmd, click.Group):
        name, sub, args = cmd.resolve_command(ctx, args)
        assert sub is not None and name is not None
        cmd, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    with cmd.make_context(ctx.info_name, list(args), parent=ctx.parent):
        pass


def test_parse_refuses_what_the_cli_refuses() -> None:
    parse(["flash", "app.bin", "--port", "/dev/ttyUSB1", "--test", "--reset"])
    with pytest.raises(click.NoSuchOption):
        parse(["flash", "app.bin", "--porrt", "/dev/ttyUSB1"])
    with pytest.raises(click.UsageError, match="No such command"):
        parse(["flsh", "app.bin"])
    with pytest.raises(click.BadParameter):
        parse(["pubkey", "k.pem", "--format", "micropy"])


@pytest.mark.parametrize("line", command_lines())
def test_mpboot_command_line_parses(line: str) -> None:
    parse(shlex.split(line, comments=True)[1:])


def test_the_doc_shows_the_commands_a_board_needs() -> None:
    commands = {line.split()[1] for line in command_lines()}
    assert {"keygen", "pubkey", "firmware", "sign", "flash", "state"} <= commands


# -- the recipes' "Two stages" (stage 1's slots, docs/BOOT.md) ----------------------------

def test_esp32_two_stages_on_the_fake(lib: Path, tmp_path: Path) -> None:
    table = esp32_table(stages=True)
    call = areas_call(boot_py(2, "esp32", stages=True))
    assert areas_call(boot_py(2, "esp32")) == call.replace(', stage1=("mpb1_0", "mpb1_1")', "")
    running = [p["name"] for p in table].index("factory")
    rows = [(p["type"], p["subtype"], p["offset"], p["size"], p["name"], p["encrypted"]) for p in table]
    areas = run_areas(lib, tmp_path, "esp32", dict(size=ESP32_FLASH, table=rows, running=running, call=call))
    by_name = {p["name"]: p for p in table}
    assert len(areas) == 7 and None not in areas
    labels = re.findall(r'"(\w+)"', call)
    for area, label in zip(areas[5:], labels[3:]):
        p = by_name[label]
        assert p["type"] == ESP_TYPES["data"] and p["size"] == 0x10000  # 64 KiB, as the text says
        assert span(area) == (p["offset"], p["offset"] + p["size"])


def test_rp2_two_stages_on_the_fake(lib: Path, tmp_path: Path) -> None:
    text = recipe(3)
    m = re.search(r"MICROPY_HW_FLASH_STORAGE_BYTES\s+\(([\d\s*]+)\)", one_block(text, "c", "STORAGE_BYTES"))
    assert m
    storage = eval(m.group(1), {"__builtins__": {}})  # digits and * only
    call = areas_call(boot_py(3, "rp2", stages=True))
    assert call.replace(", stage1=(0x3A000, 0x10000)", "") == areas_call(boot_py(3, "rp2"))
    two = text[text.index("### Two stages"):]
    fs = re.search(r"rp2\.Flash\(start=(\w+), len=(\w+)\)", two)
    assert fs
    fs_range = (int(fs.group(1), 0), int(fs.group(1), 0) + int(fs.group(2), 0))
    areas = run_areas(lib, tmp_path, "rp2", dict(size=storage, call=call))
    assert len(areas) == 7 and None not in areas
    for a in areas:
        assert not overlaps(span(a), fs_range), ("littlefs", a)
    assert span(areas[5]) == (0x3A000, 0x4A000) and span(areas[6]) == (0x4A000, 0x5A000)
    assert areas[5]["mapped"] == areas[6]["mapped"] == 0x10000  # runs in place


def test_stm32_two_stages_on_the_fake(lib: Path, tmp_path: Path) -> None:
    text = recipe(4)
    two = text[text.index("### Two stages"):]
    call = areas_call(one_block(two, "python", "stage1="))
    end = 0x86000 + 2 * 0x10000
    areas = run_areas(lib, tmp_path, "stm32", dict(size=end, call=call))  # SPI flash, just big enough
    areas = areas[:-1]  # (the base line)
    assert len(areas) == 7 and None not in areas
    spans = [span(a) for a in areas]
    assert spans[5:] == [(0x86000, 0x96000), (0x96000, end)]
    for i, a in enumerate(spans):
        for b in spans[i + 1 :]:
            assert not overlaps(a, b)
    assert areas[5]["mapped"] == -1  # SPI flash: stage 1 is copied to RAM
