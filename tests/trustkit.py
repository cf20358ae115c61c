"""The trust area's record (docs/KEYS.md section 5), built on the host from its fields: what the
device must have written (tests/test_grow.py), or a record to put in a board's flash."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

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
