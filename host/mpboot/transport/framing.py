"""SMP framings for byte streams (docs/PROTOCOL.md, "Framings on the UART").

- console: Zephyr "SMP over console": `u16 BE length (packet + 2) | packet | CRC16-XMODEM BE`,
  base64, in lines of at most 127 bytes (`06 09` first line, `04 14` continuations, `\\n`).
- raw: MCUboot raw serial recovery: `COBS(packet | CRC16-XMODEM BE) | 00`.

Each framing is an encoder (`encode(packet) -> bytes`) and a stateful decoder (`feed(data)
-> packets`) that drops corrupt frames silently and resynchronises at the next frame start.
Pure functions of bytes: no I/O, so any byte-stream transport (serial, TCP) can reuse them.
"""

from __future__ import annotations

import base64
import binascii
import struct
from enum import StrEnum
from typing import Final, Protocol

# The largest amount of undelimited input kept while looking for a frame end: far above any
# SMP frame; bounds memory on a wrong-baud or wrong-protocol stream.
MAX_BUFFER: Final = 1 << 16

CONSOLE_START: Final = b"\x06\x09"
CONSOLE_CONTINUE: Final = b"\x04\x14"
CONSOLE_LINE_MAX: Final = 127  # bytes per line, marker and newline included
# base64 characters per line: a multiple of 4 (each line decodes on its own) that fits.
CONSOLE_B64_PER_LINE: Final = (CONSOLE_LINE_MAX - len(CONSOLE_START) - 1) // 4 * 4
# Length field + CRC sharing the device's decode buffer: the largest packet is buf_size - 4.
CONSOLE_OVERHEAD: Final = 4


def crc16_xmodem(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0, no reflection, no final xor); check value of
    b"123456789" is 0x31c3. binascii.crc_hqx is exactly this CRC."""
    return binascii.crc_hqx(data, crc)


class Framing(StrEnum):
    """The two SMP framings a serial device accepts."""

    CONSOLE = "console"
    RAW = "raw"


class FrameCodec(Protocol):
    """One framing: a stateless encoder plus a stateful decoder for one connection."""

    def encode(self, packet: bytes) -> bytes:
        """The wire bytes carrying one SMP packet."""
        ...

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the SMP packets completed by them (possibly none)."""
        ...

    def reset(self) -> None:
        """Forget partial input (a new connection)."""
        ...

    def max_packet(self, buf_size: int) -> int:
        """The largest SMP packet a device with this receive buffer size accepts."""
        ...


# --- COBS (as MCUboot boot/boot_serial/src/cobs.c and smpclient's Cobs) ---------------------


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode `data` (no delimiter appended). A full 254-byte run closes its block
    with code 0xff and starts a new one, so the output never contains 0x00."""
    out = bytearray(b"\x00")
    code_at = 0
    code = 1
    for byte in data:
        if byte:
            out.append(byte)
            code += 1
            if code != 0xFF:
                continue
        out[code_at] = code
        code_at = len(out)
        out.append(0)
        code = 1
    out[code_at] = code
    return bytes(out)


def cobs_decode(encoded: bytes | bytearray | memoryview) -> bytes:
    """Inverse of cobs_encode for one frame without its delimiter; ValueError if malformed."""
    out = bytearray()
    src = 0
    n = len(encoded)
    while src < n:
        code = encoded[src]
        if code == 0:
            raise ValueError("0x00 code byte in COBS frame")
        end = src + code
        if end > n:
            raise ValueError("truncated COBS frame")
        block = encoded[src + 1 : end]
        if 0 in block:
            raise ValueError("0x00 inside a COBS block")
        out += block
        src = end
        if code != 0xFF and src < n:
            out.append(0)
    return bytes(out)


class RawCodec:
    """`COBS(packet | CRC16 BE) | 00`."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def encode(self, packet: bytes) -> bytes:
        return cobs_encode(packet + struct.pack(">H", crc16_xmodem(packet))) + b"\x00"

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        packets: list[bytes] = []
        while (end := self._buf.find(0)) >= 0:
            frame = bytes(self._buf[:end])
            del self._buf[: end + 1]
            packet = self._decode(frame)
            if packet is not None:
                packets.append(packet)
        if len(self._buf) > MAX_BUFFER:
            self._buf.clear()
        return packets

    @staticmethod
    def _decode(frame: bytes) -> bytes | None:
        try:
            decoded = cobs_decode(frame)
        except ValueError:
            return None
        if len(decoded) <= 2:
            return None
        packet = decoded[:-2]
        if crc16_xmodem(packet) != struct.unpack_from(">H", decoded, len(packet))[0]:
            return None
        return packet

    def reset(self) -> None:
        self._buf.clear()

    def max_packet(self, buf_size: int) -> int:
        return buf_size


class ConsoleCodec:
    """Zephyr SMP-over-console lines; text lines that are not SMP are ignored."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._frame: bytearray | None = None  # decoded bytes of the frame being assembled
        self._need = 0  # its length field: packet + CRC

    def encode(self, packet: bytes) -> bytes:
        body = struct.pack(">H", len(packet) + 2) + packet + struct.pack(">H", crc16_xmodem(packet))
        b64 = base64.b64encode(body)
        step = CONSOLE_B64_PER_LINE
        lines = [
            (CONSOLE_START if i == 0 else CONSOLE_CONTINUE) + b64[i : i + step] + b"\n"
            for i in range(0, len(b64), step)
        ]
        return b"".join(lines)

    def feed(self, data: bytes) -> list[bytes]:
        packets: list[bytes] = []
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            self._line += data[start:nl]
            start = nl + 1
            packet = self._take_line(bytes(self._line))
            self._line.clear()
            if packet is not None:
                packets.append(packet)
        self._line += data[start:]
        if len(self._line) > MAX_BUFFER:
            self._line.clear()
        return packets

    def _take_line(self, line: bytes) -> bytes | None:
        # A marker may follow console text that had no newline: base64 never holds 04 or 06.
        start = line.rfind(CONSOLE_START)
        if start < 0:
            start = line.rfind(CONSOLE_CONTINUE)
        line = line[max(start, 0) :].rstrip(b"\r")
        marker, text = line[:2], line[2:]
        if marker == CONSOLE_START:
            self._frame = None
            chunk = self._b64(text)
            if chunk is None or len(chunk) < 2:
                return None
            self._need = struct.unpack_from(">H", chunk)[0]
            if self._need < 2 or self._need > MAX_BUFFER:
                return None
            self._frame = bytearray(chunk[2:])
        elif marker == CONSOLE_CONTINUE and self._frame is not None:
            chunk = self._b64(text)
            if chunk is None:
                self._frame = None
                return None
            self._frame += chunk
        else:
            # Console text, or a continuation without a start: not ours. A text line in the
            # middle of a frame is console output interleaved by the device; keep the frame.
            return None
        if len(self._frame) < self._need:
            return None
        frame, self._frame = self._frame, None
        if len(frame) != self._need:
            return None
        packet = bytes(frame[:-2])
        if crc16_xmodem(packet) != struct.unpack_from(">H", frame, len(frame) - 2)[0]:
            return None
        return packet

    @staticmethod
    def _b64(text: bytes) -> bytes | None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None

    def reset(self) -> None:
        self._line.clear()
        self._frame = None

    def max_packet(self, buf_size: int) -> int:
        return buf_size - CONSOLE_OVERHEAD


def codec(framing: Framing | str) -> FrameCodec:
    """A fresh codec (decoder state included) for `framing`."""
    kind = Framing(framing)
    return ConsoleCodec() if kind is Framing.CONSOLE else RawCodec()
