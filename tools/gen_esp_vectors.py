#!/usr/bin/env python3
"""Generate the golden ESP-IDF app image vectors in tests/vectors/esp/ (read by tests/test_espimg.py).

    .venv/bin/python tools/gen_esp_vectors.py    # rewrites tests/vectors/esp/*.bin + vectors.json

Valid images are made by esptool's own image classes (`ESP32FirmwareImage.save`, what
`esptool elf2image` runs), from a few sections laid out like an ESP-IDF app: the app
descriptor (esp_app_desc_t) first in flash-mapped data (DROM), then DRAM and IRAM, and
optionally flash-mapped code (IROM), which makes esptool insert its 64 KiB alignment padding.
The bad ones are those images with one defect each. Everything is deterministic: a re-run
writes the same bytes.

esptool is also the oracle: `esptool_view` runs its `image_info` on an image and
`esptool_verdict` turns what it says (plus the partition size, which is ours) into the
verdict firmware/mpboot/espimg.py must reach. The generator refuses to write a vector whose
esptool verdict differs from the expected one, and tests/test_espimg.py checks it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from esptool.bin_image import ELFSection, ESP32FirmwareImage, ESP32S3FirmwareImage
from esptool.cmds import image_info
from esptool.util import FatalError

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors" / "esp"

APP_DESC_MAGIC = 0xABCD5432
# An OTA app partition of MicroPython's ESP32_GENERIC OTA table (partitions-4MiB-ota.csv).
PARTITION_SIZE = 0x180000
DIGEST_SIZE = 32

# Where each chip maps what (esptool's targets/*.py memory maps); an app's DROM and IROM
# sections start 0x20 into a 64 KiB page, after the image and segment headers.
CHIPS = {
    "esp32": {"cls": ESP32FirmwareImage, "drom": 0x3F400020, "dram": 0x3FFB0000, "iram": 0x40080000,
              "irom": 0x400D0020},
    "esp32s3": {"cls": ESP32S3FirmwareImage, "drom": 0x3C000020, "dram": 0x3FC88000, "iram": 0x40378000,
                "irom": 0x42000020},
}


def fill(n: int, seed: str) -> bytes:
    """n deterministic, varied bytes (a SHA-256 counter stream)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def app_desc(version: str, project: str, idf_ver: str, *, magic: int = APP_DESC_MAGIC,
             secure_version: int = 0) -> bytes:
    """esp_app_desc_t (256 bytes; esp_app_desc.h), with a made-up time, date and ELF SHA-256."""
    return struct.pack("<II8s32s32s16s16s32s32sHHB3s72s", magic, secure_version, b"", version.encode(),
                       project.encode(), b"12:00:00", b"Dec  1 2026", idf_ver.encode(),
                       hashlib.sha256(project.encode()).digest(), 0, 0, 0, b"", b"")


@dataclass(frozen=True)
class App:
    """What an app image holds; `image()` lays it out with esptool."""
    chip: str = "esp32"
    version: str = "v1.28.0"
    project: str = "micropython"
    idf_ver: str = "v5.4.1"
    entry: int | None = None  # default: 0x404 into the chip's IRAM
    rodata: int = 512  # bytes of DROM after the descriptor
    dram: int = 256
    iram: int = 1024
    irom: int = 0  # bytes of flash-mapped code (0: none)
    extra_ram_segments: int = 0  # more small DRAM segments (for a segment count over 16)
    append_digest: bool = True
    desc_magic: int = APP_DESC_MAGIC
    flash_size_freq: int = 0x20  # 4MB, 40m

    def image(self) -> bytes:
        c = CHIPS[self.chip]
        img = c["cls"](append_digest=self.append_digest)
        img.entrypoint = c["iram"] + 0x404 if self.entry is None else self.entry
        img.flash_size_freq = self.flash_size_freq
        desc = app_desc(self.version, self.project, self.idf_ver, magic=self.desc_magic)
        img.segments = [ELFSection(b".flash.appdesc", c["drom"], desc + fill(self.rodata, "rodata"), 0),
                        ELFSection(b".dram0.data", c["dram"], fill(self.dram, "dram"), 0),
                        ELFSection(b".iram0.text", c["iram"], fill(self.iram, "iram"), 0)]
        if self.irom:
            img.segments.append(ELFSection(b".flash.text", c["irom"], fill(self.irom, "irom"), 0))
        for i in range(self.extra_ram_segments):
            img.segments.append(ELFSection(b".dram0.extra", c["dram"] + 0x1000 * (i + 1), fill(16, f"x{i}"), 0))
        return img.save(None)


# --- esptool as the oracle ---------------------------------------------------------------

@dataclass
class EsptoolView:
    """What `esptool image-info` says about an image."""
    error: str = ""  # esptool refused to parse it (FatalError/RuntimeError text)
    chip_id: int | None = None
    entry: int | None = None
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (length, load addr, file offset)
    checksum_valid: bool | None = None
    digest: str | None = None  # hex of the SHA-256 esptool computed; None: not appended
    digest_valid: bool | None = None
    app: dict[str, str] | None = None  # project, version, idf_ver; None: no descriptor
    length: int | None = None  # image length incl. the digest, from LoadFirmwareImage


def esptool_view(data: bytes) -> EsptoolView:
    out = io.StringIO()
    view = EsptoolView()
    try:
        with contextlib.redirect_stdout(out):
            image_info(data)
    except (FatalError, RuntimeError) as e:
        view.error = str(e)
        return view
    text = out.getvalue()

    def line(label: str) -> str | None:
        m = re.search(rf"^{re.escape(label)}:(.*)$", text, re.M)
        return m.group(1).strip() if m else None

    view.chip_id = int(line("Chip ID").split()[0])
    entry = line("Entry point")
    view.entry = int(entry, 16) if entry else 0
    # (esptool shows each length padded to 4 bytes: the data_len as written is at the offset)
    view.segments = [(struct.unpack_from("<I", data, int(m[3], 16) + 4)[0], int(m[2], 16), int(m[3], 16))
                     for m in re.finditer(r"^\s+\d+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", text, re.M)]
    view.checksum_valid = line("Checksum").endswith("(valid)")
    digest = line("Validation hash")
    if digest is not None:
        view.digest, state = digest.split()
        view.digest_valid = state == "(valid)"
    if "Application Information" in text:
        view.app = {"project": line("Project name"), "version": line("App version"), "idf_ver": line("ESP-IDF")}
    if view.digest is not None:
        from esptool.bin_image import LoadFirmwareImage

        view.length = LoadFirmwareImage("esp32" if view.chip_id == 0 else "esp32s3", data).data_length + DIGEST_SIZE
    return view


def esptool_verdict(view: EsptoolView, data_len: int, part_size: int) -> str:
    """The verdict espimg.check must reach, from esptool's view plus our own rules (an
    appended SHA-256 is required; everything fits the partition), in espimg's order."""
    if "magic" in view.error:
        return "BAD_MAGIC"
    if "segment count" in view.error:
        return "BAD_HEADER"
    if view.error:
        m = re.search(r"End of file reading segment .*, length (\d+)", view.error)
        assert m, view.error
        return "TOO_LARGE" if int(m[1]) > part_size else "TRUNCATED"
    if view.digest is None:
        return "NO_HASH"
    for length, _addr, offset in view.segments:
        if offset + 8 + length + 1 + DIGEST_SIZE > part_size:
            return "TOO_LARGE"
        if length % 4:
            return "BAD_SEGMENT"
    if view.app is None or view.segments[0][0] < 256:
        return "NO_APP_DESC"
    if view.length > part_size:
        return "TOO_LARGE"
    if view.length > data_len:
        return "TRUNCATED"
    if not view.checksum_valid:
        return "BAD_CHECKSUM"
    if not view.digest_valid:
        return "HASH_MISMATCH"
    return "OK"


# --- the vectors -------------------------------------------------------------------------

@dataclass(frozen=True)
class Vector:
    name: str
    image: bytes
    expect: str  # "OK" or an espimg error name (E_ dropped)
    note: str
    part_size: int = PARTITION_SIZE


def segments_of(image: bytes) -> list[tuple[int, bytes]]:
    """(load address, data) of each segment of a well-formed image."""
    out, off = [], 24
    for _ in range(image[1]):
        addr, length = struct.unpack_from("<II", image, off)
        out.append((addr, image[off + 8 : off + 8 + length]))
        off += 8 + length
    return out


def assemble(header: bytes, segments: list[tuple[int, bytes]]) -> bytes:
    """An image laid out by hand (header, segments, zero padding, XOR checksum, SHA-256):
    for defects esptool's own writer refuses to make. main() checks it rebuilds esptool's."""
    out = bytearray(header[:24])
    out[1] = len(segments)
    xor = 0xEF
    for addr, data in segments:
        out += struct.pack("<II", addr, len(data)) + data
        for b in data:
            xor ^= b
    out += bytes((len(out) | 15) - len(out)) + bytes([xor])
    return reseal(out + bytes(DIGEST_SIZE))


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the appended SHA-256 after an edit (so only the edit is wrong)."""
    body = bytes(data[:-DIGEST_SIZE])
    return body + hashlib.sha256(body).digest()


def vectors() -> list[Vector]:
    small = App().image()
    v = [
        Vector("ok-esp32", small, "OK", "ESP32 app: descriptor + rodata (DROM), DRAM, IRAM"),
        Vector("ok-esp32-irom", App(version="v1.28.0-ota", irom=4096).image(), "OK",
               "with flash-mapped code (IROM): esptool pads to the 64 KiB page (image > 64 KiB)"),
        Vector("ok-esp32s3", App(chip="esp32s3", project="mp-s3", idf_ver="v5.2.2").image(), "OK",
               "ESP32-S3 (chip id 9)"),
    ]
    bad = bytearray(small)
    bad[0] = 0xE8
    v.append(Vector("bad-magic", bytes(bad), "BAD_MAGIC", "first byte 0xe8"))
    v.append(Vector("too-many-segments", App(extra_ram_segments=14).image(), "BAD_HEADER",
                    "17 segments (ESP-IDF allows 16)"))
    v.append(Vector("no-appended-hash", App(append_digest=False).image(), "NO_HASH",
                    "hash_appended 0: esptool and ESP-IDF accept it, we require the SHA-256"))
    bad = bytearray(small)
    struct.pack_into("<I", bad, 24 + 4, 0xFFFFFFF0)
    v.append(Vector("segment-length-huge", bytes(bad), "TOO_LARGE", "segment 0 data_len 0xfffffff0"))
    v.append(Vector("partition-too-small", small, "TOO_LARGE", "a partition one byte smaller than the image",
                    part_size=len(small) - 1))
    v.append(Vector("no-app-desc", App(desc_magic=0xABCD5433).image(), "NO_APP_DESC",
                    "descriptor magic 0xabcd5433 (esptool shows no Application Information)"))
    segs = segments_of(small)
    segs[1] = (segs[1][0], segs[1][1] + b"\x00\x00")
    v.append(Vector("segment-length-unaligned", assemble(small, segs), "BAD_SEGMENT",
                    "segment 1 data_len 258, not a multiple of 4 (esptool shows it; ESP-IDF refuses)"))
    seg1 = 24 + 8 + len(segs[0][1])
    v.append(Vector("truncated-segment", small[: seg1 + 8 + 20], "TRUNCATED", "file ends inside segment 1's data"))
    v.append(Vector("truncated-digest", small[:-16], "TRUNCATED", "file ends inside the appended SHA-256"))
    bad = bytearray(small)
    bad[-DIGEST_SIZE - 1] ^= 0x01
    v.append(Vector("bad-checksum", reseal(bad), "BAD_CHECKSUM",
                    "checksum byte off by one bit, SHA-256 recomputed over it"))
    bad = bytearray(small)
    bad[-1] ^= 0x80
    v.append(Vector("bad-sha256", bytes(bad), "HASH_MISMATCH", "last byte of the appended SHA-256 flipped"))
    bad = bytearray(small)
    bad[24 + 8 + 256 + 7] ^= 0x10
    v.append(Vector("data-bit-flip", bytes(bad), "BAD_CHECKSUM",
                    "one rodata bit flipped: checksum (checked first) and SHA-256 both wrong"))
    return v


def fields(view: EsptoolView) -> dict[str, object]:
    """The facts espimg.check must report for a valid image, as esptool sees them."""
    assert view.app is not None and view.length is not None
    return {"chip_id": view.chip_id, "entry": view.entry, "segments": len(view.segments), "length": view.length,
            "sha256": view.digest, **view.app}


def main() -> None:
    small = App().image()
    assert assemble(small, segments_of(small)) == small, "assemble() no longer lays out as esptool does"
    VECTORS.mkdir(parents=True, exist_ok=True)
    for old in VECTORS.glob("*.bin"):
        old.unlink()
    manifest: dict[str, object] = {
        "about": "Golden ESP-IDF app images for firmware/mpboot/espimg.py; regenerate with "
                 "tools/gen_esp_vectors.py. expect: OK or an espimg error name (E_ dropped); "
                 "esptool: what esptool's image_info says about the file.",
        "esptool": __import__("esptool").__version__,
        "vectors": [],
    }
    for vec in vectors():
        view = esptool_view(vec.image)
        verdict = esptool_verdict(view, len(vec.image), vec.part_size)
        if verdict != vec.expect:
            raise SystemExit(f"{vec.name}: esptool says {verdict}, expected {vec.expect}: {view}")
        (VECTORS / f"{vec.name}.bin").write_bytes(vec.image)
        entry: dict[str, object] = {"name": vec.name, "file": f"{vec.name}.bin", "part_size": vec.part_size,
                                    "expect": vec.expect, "note": vec.note,
                                    "esptool": view.error or f"checksum {'valid' if view.checksum_valid else 'invalid'}, "
                                    + (f"hash {'valid' if view.digest_valid else 'invalid'}" if view.digest
                                       else "hash not appended")}
        if vec.expect == "OK":
            entry["fields"] = fields(view)
        manifest["vectors"].append(entry)  # type: ignore[attr-defined]
    (VECTORS / "vectors.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest['vectors'])} vectors to {VECTORS}")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
