"""ESP-IDF app images for tests of the esp32 fake's OTA model (tests/device/fakes/esp32.py).

The layout is ESP-IDF's (components/bootloader_support/include/esp_app_format.h,
esp_app_desc.h, esp_image_format.c; notes/issue19-esp32-ota.md section 3), as esptool's
elf2image writes it: a 24-byte header, segments of {u32 load_addr, u32 data_len} + data, zero
padding to a 16-byte boundary whose last byte is the XOR checksum (seed 0xEF), then the
SHA-256 of all that. test_esp32_fake_ota.py checks the output with `esptool image-info`.
"""

from __future__ import annotations

import hashlib
import struct

MAGIC = 0xE9
CHIP_ESP32 = 0
CHIP_ESP32S3 = 9
APP_DESC_MAGIC = 0xABCD5432
DROM = 0x3F400000  # ESP32 flash-mapped data: segment 0 (the app descriptor) sits here
DRAM = 0x3FFB0000  # ESP32 internal data RAM (loaded, not mapped)
IRAM_ENTRY = 0x40080400
HEADER = struct.Struct("<BBBBIB3sHBHH4sB")  # esp_image_header_t, 24 bytes
SEGMENT = struct.Struct("<II")
CHECKSUM_SEED = 0xEF


def app_desc(version: str, project: str = "micropython") -> bytes:
    """esp_app_desc_t (256 bytes): magic, secure_version, reserved, version, project_name,
    time, date, idf_ver, app_elf_sha256, reserved."""
    desc = struct.pack("<II8s32s32s16s16s32s32s", APP_DESC_MAGIC, 0, b"", version.encode(),
                       project.encode(), b"00:00:00", b"Jan  1 2026", b"v5.4", bytes(32))
    return desc + bytes(256 - len(desc))


def app_image(version: str = "1.0", *, payload: bytes = b"", chip_id: int = CHIP_ESP32,
              hash_appended: bool = True, drom_addr: int | None = None) -> bytes:
    """An ESP32 app image: segment 0 in DROM (the app descriptor then `payload`, padded to 4
    bytes), segment 1 in DRAM. `drom_addr` overrides segment 0's load address (the default
    keeps it congruent with its flash offset modulo 64 KiB, as esp_image_verify wants)."""
    drom = app_desc(version) + payload
    drom += bytes(-len(drom) % 4)
    dram = b"\x5a" * 16
    segments = [(DROM + HEADER.size + SEGMENT.size if drom_addr is None else drom_addr, drom),
                (DRAM, dram)]
    header = HEADER.pack(MAGIC, len(segments), 2, 0x20, IRAM_ENTRY,  # DIO, 4MB, 40m
                         0xEE, bytes(3), chip_id, 0, 0, 399, bytes(4), 1 if hash_appended else 0)
    body = bytearray(header)
    checksum = CHECKSUM_SEED
    for addr, data in segments:
        body += SEGMENT.pack(addr, len(data)) + data
        for b in data:
            checksum ^= b
    body += bytes(15 - len(body) % 16)  # (len + 1) % 16 == 0
    body.append(checksum)
    if hash_appended:
        body += hashlib.sha256(body).digest()
    return bytes(body)
