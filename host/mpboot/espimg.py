"""ESP-IDF app images (what an esp32 firmware image carries as its payload, docs/FORMAT.md
"Firmware images (esp32)"): the host's check, the same rules as the device's
(firmware/mpboot/espimg.py) with the same error names, so that `mpboot sign --kind firmware`
refuses what a device would. Layout: ESP-IDF esp_app_format.h / esp_app_desc.h; esptool
(a test dependency only) is the oracle in tests/test_espota_host.py.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from mpboot.errors import ImageErrorCode, ImageRejected

MAGIC: Final = 0xE9
HEADER_SIZE: Final = 24
MAX_SEGMENTS: Final = 16
MAX_SEGMENT_LEN: Final = 0x1000000
CHECKSUM_SEED: Final = 0xEF
DIGEST_SIZE: Final = 32
APP_DESC_MAGIC: Final = 0xABCD5432
APP_DESC_SIZE: Final = 256
# esp_image_header_t chip_id values (esp_app_format.h)
CHIP_NAMES: Final = {0: "ESP32", 2: "ESP32-S2", 5: "ESP32-C3", 9: "ESP32-S3", 0x0C: "ESP32-C2",
                     0x0D: "ESP32-C6", 0x10: "ESP32-H2", 0x12: "ESP32-P4"}


class EspImageCode(IntEnum):
    """Why a payload is not an ESP-IDF app image: the device's espimg codes, same numbers."""

    BAD_MAGIC = 1
    BAD_HEADER = 2
    TOO_LARGE = 3
    TRUNCATED = 4
    BAD_SEGMENT = 5
    BAD_CHECKSUM = 6
    NO_HASH = 7
    HASH_MISMATCH = 8
    NO_APP_DESC = 9


_WORDS: Final = {
    EspImageCode.BAD_MAGIC: "first byte is not 0xe9",
    EspImageCode.BAD_HEADER: "segment count 0 or over 16, or a bad hash_appended byte",
    EspImageCode.TOO_LARGE: "a segment runs past the payload",
    EspImageCode.TRUNCATED: "the data ends inside the image",
    EspImageCode.BAD_SEGMENT: "a segment length is not a multiple of 4",
    EspImageCode.BAD_CHECKSUM: "the XOR checksum does not match",
    EspImageCode.NO_HASH: "no appended SHA-256 (build it with esptool's default --append-digest)",
    EspImageCode.HASH_MISMATCH: "the appended SHA-256 does not match",
    EspImageCode.NO_APP_DESC: "segment 0 does not start with an app descriptor (esp_app_desc_t)",
}


@dataclass(frozen=True)
class EspApp:
    chip_id: int
    entry: int
    segments: int
    length: int  # bytes, the appended SHA-256 included
    sha256: bytes
    version: str
    project: str
    idf_ver: str

    @property
    def chip(self) -> str:
        return CHIP_NAMES.get(self.chip_id, f"chip id {self.chip_id}")


class NotEspApp(ImageRejected):
    """The payload of a firmware image is not an ESP-IDF app image."""

    def __init__(self, why: EspImageCode) -> None:
        super().__init__(ImageErrorCode.NOT_ESP_APP, f"{_WORDS[why]} ({why.name})")
        self.why = why


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def check(data: bytes, part_size: int | None = None) -> EspApp:
    """The ESP-IDF app image at the start of `data` (which may hold more after it), in a
    partition of part_size bytes (default: len(data)); raises NotEspApp. The device's
    espimg.check, in the same order: sizes against the partition are TOO_LARGE, data that
    ends early is TRUNCATED."""
    limit = len(data) if part_size is None else part_size

    def read(start: int, n: int) -> bytes:
        if start + n > len(data):
            raise NotEspApp(EspImageCode.TRUNCATED)
        return data[start : start + n]

    if limit < HEADER_SIZE:
        raise NotEspApp(EspImageCode.TOO_LARGE)
    header = read(0, HEADER_SIZE)
    if header[0] != MAGIC:
        raise NotEspApp(EspImageCode.BAD_MAGIC)
    count, appended = header[1], header[23]
    if not count or count > MAX_SEGMENTS or appended > 1:
        raise NotEspApp(EspImageCode.BAD_HEADER)
    if not appended:
        raise NotEspApp(EspImageCode.NO_HASH)
    chip_id, = struct.unpack_from("<H", header, 12)
    entry, = struct.unpack_from("<I", header, 4)
    off = HEADER_SIZE
    xor = CHECKSUM_SEED
    desc = b""
    for seg in range(count):
        if off + 8 + 1 + DIGEST_SIZE > limit:
            raise NotEspApp(EspImageCode.TOO_LARGE)
        length, = struct.unpack_from("<I", read(off, 8), 4)
        off += 8
        if length >= MAX_SEGMENT_LEN or length > limit - off - 1 - DIGEST_SIZE:
            raise NotEspApp(EspImageCode.TOO_LARGE)
        if length % 4:
            raise NotEspApp(EspImageCode.BAD_SEGMENT)
        if seg == 0:
            if length < APP_DESC_SIZE:
                raise NotEspApp(EspImageCode.NO_APP_DESC)
            desc = read(off, APP_DESC_SIZE)
            if struct.unpack_from("<I", desc, 0)[0] != APP_DESC_MAGIC:
                raise NotEspApp(EspImageCode.NO_APP_DESC)
        body = read(off, length)
        xor ^= _xor(body)
        off += length
    end = (off | 15) + 1
    if end + DIGEST_SIZE > limit:
        raise NotEspApp(EspImageCode.TOO_LARGE)
    if read(off, end - off)[-1] != xor:
        raise NotEspApp(EspImageCode.BAD_CHECKSUM)
    digest = read(end, DIGEST_SIZE)
    if hashlib.sha256(data[:end]).digest() != digest:
        raise NotEspApp(EspImageCode.HASH_MISMATCH)
    return EspApp(chip_id, entry, count, end + DIGEST_SIZE, bytes(digest), _text(desc[0x10:0x30]),
                  _text(desc[0x30:0x50]), _text(desc[0x70:0x90]))


def _xor(body: bytes) -> int:
    """XOR of all bytes (folded from one big integer: a Python loop over 1.6 MB is slow)."""
    if not body:
        return 0
    n = int.from_bytes(body, "little")
    width = len(body) * 8
    while width > 8:
        width = (width + 1) // 2
        half = (width + 7) // 8 * 8
        n = (n >> half) ^ (n & ((1 << half) - 1))
        width = half
    return n & 0xFF


SECTOR: Final = 4096
MAX_ENVELOPE: Final = 4 * SECTOR


def envelope_offset(img_size: int, total: int, partition_size: int) -> int | None:
    """Where a device puts a firmware image's envelope (its header room and TLV areas,
    total - img_size bytes) in an OTA partition: the start of the partition's last sectors
    that hold it; None when payload and envelope do not fit in separate sectors, or the
    envelope is over 16 KiB (firmware/mpboot/espota.py env_start, the same rule)."""
    sectors = -(-(total - img_size) // SECTOR)
    env = partition_size - sectors * SECTOR
    if sectors * SECTOR > MAX_ENVELOPE or -(-img_size // SECTOR) * SECTOR > env:
        return None
    return env


def check_fits(img_size: int, total: int, partition_size: int) -> None:
    """Raises ImageRejected(TOO_LARGE) unless a firmware image fits an OTA partition of
    partition_size bytes as a device lays it out (envelope_offset)."""
    if envelope_offset(img_size, total, partition_size) is None:
        raise ImageRejected(ImageErrorCode.TOO_LARGE,
                            f"firmware payload {img_size} bytes + envelope {total - img_size} bytes, each in whole "
                            f"4 KiB sectors (the envelope at most 16 KiB), do not fit an OTA partition of "
                            f"{partition_size} bytes")


__all__ = ["CHIP_NAMES", "EspApp", "EspImageCode", "NotEspApp", "check", "check_fits", "envelope_offset"]
