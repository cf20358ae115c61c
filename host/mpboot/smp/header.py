"""The SMP packet: an 8-byte big-endian header and a CBOR map (docs/PROTOCOL.md)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import cbor2

from mpboot.errors import ProtocolError

HEADER_SIZE: Final = 8
_HEADER: Final = struct.Struct(">BBHHBB")


class Op(IntEnum):
    READ = 0
    READ_RSP = 1
    WRITE = 2
    WRITE_RSP = 3


class Version(IntEnum):
    V1 = 0  # legacy errors: {"rc": N, "rsn": "..."}
    V2 = 1  # {"err": {"group": G, "rc": R}}


class Group(IntEnum):
    OS = 0
    IMAGE = 1
    MPBOOT = 64  # the first user group: mpboot's own commands


class MpbootCmd(IntEnum):
    DEVICE = 0  # read: unique id, vendor/class id, counter floor, downgrade policy, serial
    FACTORY = 1  # read: factory info (docs/FACTORY.md section 2)
    IDENTITY = 2  # write: serial, vendor/class id, labels
    FLOOR = 3  # write: raise the security-counter floor
    POLICY = 4  # write: production policy
    SEAL = 5  # write: identity and policy become read-only
    TRUST = 6  # read: the trust state; write: a trust record, in chunks (docs/KEYS.md)
    ZUPLOAD = 7  # write: a compressed upload chunk (docs/PROTOCOL.md, "Compressed upload")
    PROBE = 8  # write: a probe chunk, stage 1's proof (docs/PROTOCOL.md, "Stage 1")


class OsCmd(IntEnum):
    ECHO = 0
    RESET = 5
    MCUMGR_PARAMS = 6
    OS_INFO = 7
    BOOTLOADER_INFO = 8


class ImageCmd(IntEnum):
    STATE = 0
    UPLOAD = 1
    ERASE = 5
    SLOT_INFO = 6


@dataclass(frozen=True)
class Header:
    op: Op
    version: Version
    flags: int
    length: int
    group: int
    seq: int
    command: int

    def pack(self) -> bytes:
        return _HEADER.pack((self.op & 7) | ((self.version & 3) << 3), self.flags, self.length,
                            self.group, self.seq, self.command)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise ProtocolError(f"SMP packet of {len(data)} bytes is shorter than its header")
        b0, flags, length, group, seq, command = _HEADER.unpack_from(data)
        op, version = b0 & 7, (b0 >> 3) & 3
        if op > Op.WRITE_RSP or version > Version.V2:
            raise ProtocolError(f"SMP header byte 0 {b0:#04x}: unknown op {op} or version {version}")
        return cls(Op(op), Version(version), flags, length, group, seq, command)


def encode_packet(op: Op, group: int, command: int, seq: int, payload: dict[str, Any],
                  version: Version = Version.V1) -> bytes:
    """Header + CBOR map (definite lengths, shortest integers: cbor2's defaults)."""
    body = cbor2.dumps(payload)
    if len(body) > 0xFFFF:
        raise ValueError(f"SMP payload of {len(body)} bytes is over 65535")
    return Header(op, version, 0, len(body), group, seq & 0xFF, command).pack() + body


def decode_packet(packet: bytes) -> tuple[Header, dict[str, Any]]:
    """Split and check one packet; ProtocolError if the length or the CBOR map is wrong."""
    header = Header.unpack(packet)
    body = packet[HEADER_SIZE:]
    if header.length != len(body):
        raise ProtocolError(f"SMP header says {header.length} payload bytes, packet has {len(body)}")
    try:
        payload = cbor2.loads(body) if body else {}
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as err:
        raise ProtocolError(f"undecodable CBOR in SMP response: {err}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"SMP payload is a {type(payload).__name__}, not a map")
    return header, payload
