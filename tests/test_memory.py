"""Memory is a feature: the device verifies a 1 MiB image inside a 24 KiB MicroPython heap
(the firmware loaded as .mpy, as `mpboot verify --device` runs it), streaming it from a file
through one small buffer.

RSA-3072 is given 25 KiB here: its modular exponentiation needs several contiguous 770-byte
blocks, and since the trust model (docs/KEYS.md: thresholds, certificates, revocation) the
verifier's own bytecode, loaded into this heap from .mpy, is about 0.5 KiB larger (measured:
16.0 -> 16.8 KiB live at the RSA operation). On a device the firmware is frozen and costs no
heap: tests/test_boot_memory.py holds the boot decision, RSA-3072 included, to 24 KiB."""

from __future__ import annotations

import os

import pytest

from mpboot import upy
from mpboot.image import ImageVersion, SignOptions, build_image
from mpboot.keys import SigningKey

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(MIB)


@pytest.mark.parametrize(("key_name", "heap"), [("rsa2048", "24k"), ("rsa3072", "25k")])
def test_1mib_image_verifies_in_a_small_heap(device, payload: bytes, key_name: str, heap: str,
                                             request) -> None:
    key: SigningKey = request.getfixturevalue(key_name)
    image = build_image(b"\xff" * 0x200 + payload, key, SignOptions(ImageVersion(1, 0, 0), security_counter=1))
    verdict = device.verify_bytes(image, heapsize=heap)
    assert verdict.accepted and verdict.total_size == len(image)


def test_heap_limit_is_real(device, payload: bytes, rsa2048: SigningKey) -> None:
    """Control: the same run in a 8 KiB heap fails, so the 24 KiB pass above means something."""
    image = build_image(b"\xff" * 0x200 + payload[:4096], rsa2048, SignOptions(ImageVersion(1, 0, 0)))
    path = device.workdir / "small-heap.bin"
    path.write_bytes(image)
    listing = device.workdir / "small-heap.txt"
    listing.write_text(f"{path} {len(image)}\n")
    proc = upy.run(["-m", "verify_images", listing], path=[device.lib], heapsize="8k")
    assert proc.returncode != 0 and "MemoryError" in proc.stderr
