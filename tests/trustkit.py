"""The trust area's record (docs/KEYS.md section 5), built on the host from its fields: what the
device must have written (tests/test_grow.py), or a record to put in a board's flash; and the
device's verdicts on images and records under a given trust state (tests/device/dev_trust.py)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpboot import upy

MAGIC = 0x5442504D  # "MPBT"
SIZE = 2304


def trust_record(seq: int, version: int, revocation: int, threshold: int, image_threshold: int,
                 roots: Sequence[tuple[int, bytes, bytes]], keys: Sequence[bytes] = (),
                 serials: Sequence[int] = ()) -> bytes:
    """The 2304-byte record: roots are (bits, key hash, modulus)."""
    r = bytearray(SIZE)
    struct.pack_into("<IIIIBBBBB", r, 0, MAGIC, seq, version, revocation, threshold, image_threshold,
                     len(roots), len(keys), len(serials))
    for i, (bits, keyhash, modulus) in enumerate(roots):
        o = 24 + 418 * i
        struct.pack_into("<H", r, o, bits)
        r[o + 2:o + 34] = keyhash
        r[o + 34:o + 34 + len(modulus)] = modulus
    for i, h in enumerate(keys):
        r[1696 + 32 * i:1728 + 32 * i] = h
    for i, n in enumerate(serials):
        struct.pack_into("<I", r, 2208 + 4 * i, n)
    struct.pack_into("<I", r, 2300, zlib.crc32(r[:2300]))
    return bytes(r)


def device_trust_verdicts(cases: Sequence[dict[str, Any]], device_lib: Path, workdir: Path) -> list[str]:
    """dev_trust's line for each case ({"name", "trust", "image" + "slot_size" or "record"}; the
    trust state's roots as PKCS#1 DER hex), run on the MicroPython unix port."""
    path = workdir / "trust-cases.json"
    path.write_text(json.dumps(list(cases)))
    proc = upy.run(["-m", "dev_trust", path], path=[device_lib])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def trust_state(roots_der: Sequence[bytes], threshold: int = 1, image_threshold: int = 1) -> dict[str, Any]:
    """A frozen root set as dev_trust takes it (root version 1, nothing revoked)."""
    return {"roots": [d.hex() for d in roots_der], "threshold": threshold, "image_threshold": image_threshold,
            "root_version": 1, "revocation": 0, "revoked_keys": [], "revoked_serials": []}
