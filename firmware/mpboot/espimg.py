# ESP-IDF app image checker for MicroPython (the firmware image esp32's 2nd-stage bootloader
# boots from an OTA app partition). Used by the esp32 firmware update, next: nothing calls it
# yet, so firmware/manifest.py does not freeze it.
#
# check(read, part_size) streams the image through one fixed buffer, as mpboot.image does:
# header (magic 0xE9, segment count, hash_appended), each segment's length bounded against the
# partition before anything is read, the XOR checksum (seed 0xEF) in the last byte of the
# 16-byte-aligned block after the segments, and the appended SHA-256 over everything before
# it, which we require (an image without one is refused). The app descriptor
# (esp_app_desc_t, magic 0xABCD5432) must open segment 0, at file offset 0x20. Layout: ESP-IDF
# esp_app_format.h, esp_app_desc.h; checks as esp_image_format.c makes them. Failures raise
# EspImageError with a numeric code (one per cause). Not checked here (set_boot() runs
# ESP-IDF's esp_image_verify, which does): the MMU alignment of flash-mapped segments and the
# chip revision window; the chip id is returned for the caller to compare.
import hashlib
import struct
from micropython import const

_MAGIC = const(0xE9)
_HEADER_SIZE = const(24)  # esp_image_header_t
_SEG_HEADER_SIZE = const(8)  # esp_image_segment_header_t: u32 load_addr, u32 data_len
_MAX_SEGMENTS = const(16)  # ESP_IMAGE_MAX_SEGMENTS
_MAX_SEGMENT_LEN = const(0x1000000)  # esp_image_format.c: a segment is under 16 MiB
_CHECKSUM_SEED = const(0xEF)
_DIGEST_SIZE = const(32)
_HASH_APPENDED = const(23)  # header offset of u8 hash_appended
_CHIP_ID = const(12)  # header offset of u16 chip_id
_ENTRY = const(4)  # header offset of u32 entry_addr
# esp_app_desc_t: 256 bytes, the start of segment 0's data. Offsets inside it:
_APP_DESC_MAGIC = const(0xABCD5432)
_APP_DESC_SIZE = const(256)
_DESC_VERSION = const(0x10)  # char version[32]
_DESC_PROJECT = const(0x30)  # char project_name[32]
_DESC_IDF_VER = const(0x70)  # char idf_ver[32]

# Default read buffer; any size of at least _MIN_BUF works (the descriptor must fit in it).
BUF_SIZE = const(1024)
_MIN_BUF = const(256)

# Error codes (EspImageError.code); the vectors' manifest (tests/vectors/esp/) uses the names
# without the E_.
E_BAD_MAGIC = const(1)  # first byte is not 0xE9
E_BAD_HEADER = const(2)  # segment count 0 or over 16, or hash_appended neither 0 nor 1
E_TOO_LARGE = const(3)  # a segment or the whole image runs past the partition (or 16 MiB)
E_TRUNCATED = const(4)  # the medium ended before the image did
E_BAD_SEGMENT = const(5)  # a segment length that is not a multiple of 4
E_BAD_CHECKSUM = const(6)  # XOR checksum byte differs from the segments' data
E_NO_HASH = const(7)  # hash_appended is 0: we require the appended SHA-256
E_HASH_MISMATCH = const(8)  # appended SHA-256 differs from the computed digest
E_NO_APP_DESC = const(9)  # segment 0 does not start with an esp_app_desc_t


class EspImageError(Exception):
    # raise EspImageError(code): e.args[0] is the code (no methods: see mpboot.image).
    pass


# check() returns a dict (as mpboot.image.verify does):
#   "chip_id": header chip id (ESP32 0, S2 2, C3 5, S3 9, ...)   "entry": entry point address
#   "segments": segment count   "length": image bytes, the appended SHA-256 included
#   "sha256": the appended SHA-256, which matched (a mismatch raises)
#   "version", "project", "idf_ver": the app descriptor's strings, as bytes


def _read(read, offset, buf):
    # (mpboot.image has the same three lines; importing it would load mpboot.rsa too)
    if read(offset, buf) != len(buf):
        raise EspImageError(E_TRUNCATED)


def _text(mv, start):
    # A NUL-padded char[32] of the descriptor, as bytes: decoding could fail on an image
    # ESP-IDF boots (it never decodes them).
    b = bytes(mv[start : start + 32])
    n = b.find(b"\0")
    return b if n < 0 else b[:n]


def check(read, part_size, buf=None):
    # read: a reader (see mpboot.reader). part_size: bytes of the app partition the image
    # sits at offset 0 of. buf: optional preallocated bytearray of at least 256 bytes
    # (default: BUF_SIZE). Returns the dict described above; raises EspImageError.
    if buf is None:
        buf = bytearray(BUF_SIZE)
    size = len(buf)
    if size < _MIN_BUF:
        raise ValueError("buffer")
    mv = memoryview(buf)
    if part_size < _HEADER_SIZE:
        raise EspImageError(E_TOO_LARGE)
    hdr = mv[:_HEADER_SIZE]
    _read(read, 0, hdr)
    if hdr[0] != _MAGIC:
        raise EspImageError(E_BAD_MAGIC)
    count = hdr[1]
    appended = hdr[_HASH_APPENDED]
    if not count or count > _MAX_SEGMENTS or appended > 1:
        raise EspImageError(E_BAD_HEADER)
    if not appended:
        raise EspImageError(E_NO_HASH)
    info = {
        "chip_id": struct.unpack_from("<H", hdr, _CHIP_ID)[0],
        "entry": struct.unpack_from("<I", hdr, _ENTRY)[0],
        "segments": count,
    }
    h = hashlib.sha256(hdr)
    xor = _CHECKSUM_SEED
    off = _HEADER_SIZE
    for seg in range(count):
        # Room for this segment header and the smallest tail (checksum byte, digest).
        if off + _SEG_HEADER_SIZE + 1 + _DIGEST_SIZE > part_size:
            raise EspImageError(E_TOO_LARGE)
        sh = mv[:_SEG_HEADER_SIZE]
        _read(read, off, sh)
        h.update(sh)
        length = struct.unpack_from("<I", sh, 4)[0]
        off += _SEG_HEADER_SIZE
        if length >= _MAX_SEGMENT_LEN or length > part_size - off - 1 - _DIGEST_SIZE:
            raise EspImageError(E_TOO_LARGE)
        if length & 3:
            raise EspImageError(E_BAD_SEGMENT)
        end = off + length
        first = seg == 0
        if first and length < _APP_DESC_SIZE:
            raise EspImageError(E_NO_APP_DESC)
        while off < end:
            n = end - off
            chunk = mv if n >= size else mv[:n]
            _read(read, off, chunk)
            if first:
                first = False
                if struct.unpack_from("<I", chunk, 0)[0] != _APP_DESC_MAGIC:
                    raise EspImageError(E_NO_APP_DESC)
                info["version"] = _text(chunk, _DESC_VERSION)
                info["project"] = _text(chunk, _DESC_PROJECT)
                info["idf_ver"] = _text(chunk, _DESC_IDF_VER)
            h.update(chunk)
            for b in chunk:
                xor ^= b
            off += len(chunk)
    # Zero padding, then the checksum as the last byte of a 16-byte block, then the digest.
    tail = mv[: (off | 15) + 1 - off]
    if off + len(tail) + _DIGEST_SIZE > part_size:
        raise EspImageError(E_TOO_LARGE)
    _read(read, off, tail)
    h.update(tail)
    off += len(tail)
    if tail[-1] != xor:
        raise EspImageError(E_BAD_CHECKSUM)
    digest = mv[:_DIGEST_SIZE]
    _read(read, off, digest)
    digest = bytes(digest)
    if digest != h.digest():
        raise EspImageError(E_HASH_MISMATCH)
    info["length"] = off + _DIGEST_SIZE
    info["sha256"] = digest
    return info
