"""ESP-IDF app images for tests of the esp32 fake's OTA model (tests/device/fakes/esp32.py),
laid out by esptool itself (tools/gen_esp_vectors.py's `App`, the one host-side builder; the
format: notes/issue19-esp32-ota.md section 3). test_esp32_fake_ota.py checks them with
`esptool image-info`.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gen_esp_vectors import App, reseal  # noqa: E402

CHIP_ESP32 = 0
CHIP_ESP32S3 = 9
DROM = 0x3F400000  # ESP32 flash-mapped data; esptool puts segment 0 at 0x20 past it
SEGMENT0_ADDR = 24  # file offset of segment 0's load address (after the 24-byte header)


def app_image(version: str = "1.0", *, chip_id: int = CHIP_ESP32, hash_appended: bool = True,
              drom_addr: int | None = None) -> bytes:
    """An ESP32 app image (chip_id CHIP_ESP32S3: an ESP32-S3 one) whose app descriptor names
    `version`. `drom_addr` moves segment 0's load address afterwards (esptool itself always
    keeps it congruent with its flash offset modulo 64 KiB, as esp_image_verify wants), with
    the appended SHA-256 made again, so only the mapping is wrong."""
    image = App(chip="esp32s3" if chip_id == CHIP_ESP32S3 else "esp32", version=version,
                append_digest=hash_appended).image()
    if drom_addr is None:
        return image
    moved = bytearray(image)
    struct.pack_into("<I", moved, SEGMENT0_ADDR, drom_addr)
    return reseal(moved)
