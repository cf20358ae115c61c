"""ESP-IDF app images (tests/vectors/esp/, written by tools/gen_esp_vectors.py with esptool)
through esptool's image_info, the oracle, and through firmware/mpboot/espimg.py on the
MicroPython unix port: same verdicts, same facts. And the device check streams: a 1 MiB
image in a 12 KiB heap (measured floor 11 KiB, the modules loaded as .mpy), not in 6 KiB."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import FIRMWARE, ROOT, VECTORS
from mpboot import upy

sys.path.insert(0, str(ROOT / "tools"))
import gen_esp_vectors  # noqa: E402

ESP = VECTORS / "esp"
MANIFEST = json.loads((ESP / "vectors.json").read_text())
VECTOR_LIST = MANIFEST["vectors"]
# The device's error names, from the module itself (E_BAD_MAGIC = const(1) -> 1: "BAD_MAGIC").
CODES = {int(m[2]): m[1] for m in re.finditer(r"^E_(\w+) = const\((\d+)\)",
                                              (FIRMWARE / "mpboot" / "espimg.py").read_text(), re.M)}


def test_manifest_lists_every_file_and_known_names() -> None:
    assert {v["file"] for v in VECTOR_LIST} == {p.name for p in ESP.glob("*.bin")}
    assert {v["expect"] for v in VECTOR_LIST} <= {"OK", *CODES.values()}
    assert MANIFEST["esptool"] == __import__("esptool").__version__


def test_generator_rebuilds_the_vectors() -> None:
    """Deterministic: the committed files are what the generator makes today."""
    built = {v.name: v for v in gen_esp_vectors.vectors()}
    assert sorted(built) == sorted(v["name"] for v in VECTOR_LIST)
    for vec in VECTOR_LIST:
        assert built[vec["name"]].image == (ESP / vec["file"]).read_bytes(), vec["name"]
        assert built[vec["name"]].part_size == vec["part_size"]


@pytest.mark.parametrize("vec", VECTOR_LIST, ids=[v["name"] for v in VECTOR_LIST])
def test_esptool_agrees(vec: dict) -> None:
    data = (ESP / vec["file"]).read_bytes()
    view = gen_esp_vectors.esptool_view(data)
    assert gen_esp_vectors.esptool_verdict(view, len(data), vec["part_size"]) == vec["expect"], vec["note"]
    if vec["expect"] == "OK":
        assert gen_esp_vectors.fields(view) == vec["fields"]


def _device_lines(device, items: list[tuple[str, int]], heapsize: str = "512k") -> list[str]:
    listing = device.workdir / f"esp-{len(items)}.txt"
    listing.write_text("".join(f"{name} {size}\n" for name, size in items))
    lines = device.run("dev_espimg", listing.name, heapsize=heapsize).splitlines()
    assert len(lines) == len(items), lines
    return lines


def _facts(line: str) -> dict[str, object]:
    words = line.split("\t")
    assert words[0] == "OK", line
    keys = ("chip_id", "entry", "segments", "length", "sha256", "version", "project", "idf_ver")
    return {k: int(w) if k in ("chip_id", "entry", "segments", "length") else w for k, w in zip(keys, words[1:])}


def test_device_matches_esptool(device) -> None:
    """Every vector in one MicroPython run: the manifest's verdict, and esptool's facts."""
    lines = _device_lines(device, [(str(ESP / v["file"]), v["part_size"]) for v in VECTOR_LIST])
    for vec, line in zip(VECTOR_LIST, lines):
        if vec["expect"] == "OK":
            assert _facts(line) == vec["fields"], vec["name"]
        else:
            word, code = line.split()
            assert word == "REJECT" and CODES[int(code)] == vec["expect"], (vec["name"], line)


def test_device_bounds_the_partition(device) -> None:
    """The partition, not the file, bounds the image: the same valid image is refused by a
    partition one byte short, and a huge segment length by any partition."""
    data = (ESP / "ok-esp32.bin").read_bytes()
    name = str(ESP / "ok-esp32.bin")
    lines = _device_lines(device, [(name, len(data)), (name, len(data) - 1), (name, 23),
                                   (str(ESP / "segment-length-huge.bin"), 16 << 20)])
    assert lines[0].startswith("OK\t")
    assert [CODES[int(line.split()[1])] for line in lines[1:]] == ["TOO_LARGE"] * 3


@pytest.fixture(scope="module")
def big_image(device) -> tuple[str, dict]:
    """A 1 MiB-code app (1.06 MiB image) in the device's work folder, and esptool's facts."""
    data = gen_esp_vectors.App(irom=1 << 20).image()
    path = device.workdir / "esp-big.bin"
    path.write_bytes(data)
    return path.name, gen_esp_vectors.fields(gen_esp_vectors.esptool_view(data))


def test_1mib_image_checks_in_a_small_heap(device, big_image) -> None:
    name, fields = big_image
    (line,) = _device_lines(device, [(name, gen_esp_vectors.PARTITION_SIZE)], heapsize="12k")
    assert _facts(line) == fields and fields["length"] > 1 << 20


def test_heap_limit_is_real(device, big_image) -> None:
    """Control: the same run in a 6 KiB heap fails, so the 12 KiB pass above means something."""
    listing = device.workdir / "esp-small-heap.txt"
    listing.write_text(f"{big_image[0]} {gen_esp_vectors.PARTITION_SIZE}\n")
    proc = upy.run(["-m", "dev_espimg", listing.name], path=[device.lib], heapsize="6k", cwd=device.workdir)
    assert proc.returncode != 0 and "MemoryError" in proc.stderr
