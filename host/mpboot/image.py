"""The MCUboot v1 image format (docs/FORMAT.md): build, parse, verify.

The host's one implementation of the format. Verification follows the same rules, in the same
order, as the device verifier (firmware/mpboot/image.py), so both reject a bad image with the
same ImageErrorCode; the golden vectors in tests/vectors/ hold both sides to that.
"""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from mpboot.errors import ImageErrorCode, ImageRejected, UsageError
from mpboot.keys import PublicKey, SignatureScheme, SigningKey

IMAGE_MAGIC = 0x96F3B83D
HEADER_SIZE = 32
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_INFO_SIZE = 4
TLV_ENTRY_HEADER_SIZE = 4
DEFAULT_HEADER_SIZE = 0x200
# The device reads these TLVs whole into its read buffer (at least 1 KiB).
MAX_PROTECTED_TLV_SIZE = 1024
MAX_PUBKEY_TLV_SIZE = 1024
MAX_SIGNATURE_SIZE = 384
# Signature TLVs (any algorithm) an image may carry: bounds the RSA work one image costs.
MAX_SIGNATURES = 4


class TlvType(IntEnum):
    KEYHASH = 0x01
    PUBKEY = 0x02
    SHA256 = 0x10
    RSA2048_PSS = 0x20
    ECDSA_SIG = 0x22
    RSA3072_PSS = 0x23
    ED25519 = 0x24
    DEPENDENCY = 0x40
    SEC_CNT = 0x50
    BOOT_RECORD = 0x60
    DECOMP_SIZE = 0x70
    DECOMP_SHA = 0x71
    DECOMP_SIGNATURE = 0x72
    UUID_VID = 0x74
    UUID_CID = 0x75
    # Vendor range (0xa0-0xfe): RSASSA-PKCS1-v1_5 / SHA-256 over the image digest.
    MPBOOT_RSA_PKCS1V15 = 0xA0


# Types MCUboot trusts only when covered by the hash (CVE-2024-32883).
PROTECTED_ONLY_TYPES = frozenset(
    {
        TlvType.SEC_CNT,
        TlvType.UUID_VID,
        TlvType.UUID_CID,
        TlvType.DEPENDENCY,
        TlvType.BOOT_RECORD,
        TlvType.DECOMP_SIZE,
        TlvType.DECOMP_SHA,
        TlvType.DECOMP_SIGNATURE,
    }
)
RSA_SIGNATURE_TYPES = frozenset(
    {TlvType.RSA2048_PSS, TlvType.RSA3072_PSS, TlvType.MPBOOT_RSA_PKCS1V15}
)
OTHER_SIGNATURE_TYPES = frozenset({TlvType.ECDSA_SIG, TlvType.ED25519})


class ImageFlag(IntFlag):
    PIC = 0x01
    ENCRYPTED_AES128 = 0x04
    ENCRYPTED_AES256 = 0x08
    NON_BOOTABLE = 0x10
    RAM_LOAD = 0x20
    ROM_FIXED = 0x100
    COMPRESSED_LZMA1 = 0x200
    COMPRESSED_LZMA2 = 0x400
    COMPRESSED_ARM_THUMB = 0x800


# Flags a verified image may carry; encrypted or compressed images are refused (as on the device).
FLAGS_ALLOWED = int(ImageFlag.PIC | ImageFlag.NON_BOOTABLE | ImageFlag.RAM_LOAD | ImageFlag.ROM_FIXED)

_VERSION_RE = re.compile(r"^(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\+(0|[1-9]\d*))?)?)?$")


@dataclass(frozen=True, order=True)
class ImageVersion:
    major: int
    minor: int = 0
    revision: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text: str) -> ImageVersion:
        """Parse MAJ.MIN.REV+BUILD (later parts optional, as imgtool accepts)."""
        m = _VERSION_RE.match(text.strip())
        if not m:
            raise UsageError(f"bad version {text!r}: expected MAJ.MIN.REV[+BUILD], e.g. 1.2.3+4")
        major, minor, revision, build = (int(g) if g else 0 for g in m.groups())
        limits = (("major", major, 0xFF), ("minor", minor, 0xFF), ("revision", revision, 0xFFFF),
                  ("build", build, 0xFFFFFFFF))
        for name, value, limit in limits:
            if value > limit:
                raise UsageError(f"bad version {text!r}: {name} {value} is over {limit}")
        return cls(major, minor, revision, build)

    def auto_security_counter(self) -> int:
        """imgtool's `-s auto`: (major << 24) + (minor << 16) + revision."""
        return (self.major << 24) + (self.minor << 16) + self.revision

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}+{self.build}"


@dataclass(frozen=True)
class ImageHeader:
    load_addr: int
    hdr_size: int
    protect_tlv_size: int
    img_size: int
    flags: int
    version: ImageVersion
    magic: int = IMAGE_MAGIC
    pad: int = 0

    _FORMAT = "<IIHHIIBBHII"

    def pack(self) -> bytes:
        v = self.version
        return struct.pack(self._FORMAT, self.magic, self.load_addr, self.hdr_size,
                           self.protect_tlv_size, self.img_size, self.flags,
                           v.major, v.minor, v.revision, v.build, self.pad)

    @classmethod
    def unpack(cls, data: bytes) -> ImageHeader:
        (magic, load_addr, hdr_size, prot, img_size, flags, major, minor, revision, build,
         pad) = struct.unpack_from(cls._FORMAT, data, 0)
        return cls(load_addr, hdr_size, prot, img_size, flags,
                   ImageVersion(major, minor, revision, build), magic, pad)


@dataclass(frozen=True)
class Tlv:
    type: int
    value: bytes
    offset: int = -1  # offset of the entry header in the image, when parsed

    def encode(self) -> bytes:
        return struct.pack("<HH", self.type, len(self.value)) + self.value

    @property
    def type_name(self) -> str:
        try:
            return TlvType(self.type).name
        except ValueError:
            return f"0x{self.type:02x}"


def encode_tlv_area(magic: int, tlvs: Sequence[Tlv]) -> bytes:
    body = b"".join(t.encode() for t in tlvs)
    total = TLV_INFO_SIZE + len(body)
    if total > 0xFFFF:
        raise UsageError(f"TLV area of {total} bytes is over the format's 65535")
    return struct.pack("<HH", magic, total) + body


def parse_uuid(value: str, namespace: uuid.UUID | None) -> bytes:
    """A vendor/class id as imgtool takes it: a UUID, 32 hex digits, or a name hashed to a
    UUIDv5 (vendor names in the DNS namespace, class names in the vendor's namespace)."""
    text = value.strip()
    if re.fullmatch(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", text):
        return bytes.fromhex(text.replace("-", ""))
    if re.fullmatch(r"[0-9a-fA-F]{32}", text):
        return bytes.fromhex(text)
    if text and text.isprintable():
        if namespace is None:
            raise UsageError(f"class id {value!r} is a name: give --vendor-id too (its namespace)")
        return uuid.uuid5(namespace, text).bytes
    raise UsageError(f"bad UUID {value!r}")


def vendor_uuid(vendor_id: str) -> bytes:
    return parse_uuid(vendor_id, uuid.NAMESPACE_DNS)


def class_uuid(class_id: str, vendor: bytes | None) -> bytes:
    return parse_uuid(class_id, uuid.UUID(bytes=vendor) if vendor is not None else None)


def signature_tlv_type(key_bits: int, scheme: SignatureScheme) -> TlvType:
    if scheme is SignatureScheme.PKCS1V15:
        return TlvType.MPBOOT_RSA_PKCS1V15
    return TlvType.RSA2048_PSS if key_bits == 2048 else TlvType.RSA3072_PSS


def protected_tlvs(security_counter: int | None, vendor_id: bytes | None,
                   class_id: bytes | None) -> list[Tlv]:
    """The protected TLVs in imgtool's order: SEC_CNT, UUID_VID, UUID_CID."""
    tlvs = []
    if security_counter is not None:
        tlvs.append(Tlv(TlvType.SEC_CNT, struct.pack("<I", security_counter)))
    if vendor_id is not None:
        tlvs.append(Tlv(TlvType.UUID_VID, vendor_id))
    if class_id is not None:
        tlvs.append(Tlv(TlvType.UUID_CID, class_id))
    return tlvs


def signature_tlvs(digest: bytes, key: SigningKey, scheme: SignatureScheme) -> list[Tlv]:
    """KEYHASH followed by the signature over the image digest."""
    return [
        Tlv(TlvType.KEYHASH, key.public().keyhash()),
        Tlv(signature_tlv_type(key.bits, scheme), key.sign_digest(digest, scheme)),
    ]


@dataclass(frozen=True)
class SignOptions:
    version: ImageVersion
    header_size: int = DEFAULT_HEADER_SIZE
    security_counter: int | None = None
    vendor_id: bytes | None = None
    class_id: bytes | None = None
    load_addr: int = 0
    scheme: SignatureScheme = SignatureScheme.PSS
    slot_size: int | None = None


def assemble_image(header: ImageHeader, body: bytes, protected: Sequence[Tlv],
                   unprotected: Callable[[bytes], Sequence[Tlv]]) -> bytes:
    """Lay out an image exactly as given: header over body[:32], body, the protected TLV
    area (omitted when empty), then the unprotected TLVs that `unprotected(digest)` returns.
    Checks nothing: build_image is the safe way in; tests use this to craft bad images."""
    prot_area = encode_tlv_area(TLV_PROT_INFO_MAGIC, protected) if protected else b""
    hashed = header.pack() + body[HEADER_SIZE:] + prot_area
    digest = hashlib.sha256(hashed).digest()
    return hashed + encode_tlv_area(TLV_INFO_MAGIC, unprotected(digest))


def build_image(body: bytes, key: SigningKey, options: SignOptions) -> bytes:
    """Sign `body`, which already starts with header_size bytes of room for the header
    (zeros or padding: see mpboot.pack), into an MCUboot v1 image."""
    hdr_size = options.header_size
    if not 0 <= options.load_addr <= 0xFFFFFFFF:
        raise UsageError(f"load address {options.load_addr:#x} is not a 32-bit address")
    if not HEADER_SIZE <= hdr_size <= 0xFFFF:
        raise UsageError(f"header size {hdr_size:#x} must be between 0x20 and 0xffff")
    if len(body) < hdr_size:
        raise UsageError(f"input is shorter than the {hdr_size:#x}-byte header")
    img_size = len(body) - hdr_size
    if img_size > 0xFFFFFFFF:
        raise UsageError("payload is over 4 GiB")
    counter = options.security_counter
    if counter is not None and not 0 <= counter <= 0xFFFFFFFF:
        raise UsageError(f"security counter {counter} is not a 32-bit unsigned number")
    prot = protected_tlvs(counter, options.vendor_id, options.class_id)
    prot_size = len(encode_tlv_area(TLV_PROT_INFO_MAGIC, prot)) if prot else 0
    flags = ImageFlag.RAM_LOAD if options.load_addr else 0
    header = ImageHeader(options.load_addr, hdr_size, prot_size, img_size, int(flags), options.version)

    def unprotected(digest: bytes) -> list[Tlv]:
        return [Tlv(TlvType.SHA256, digest), *signature_tlvs(digest, key, options.scheme)]

    image = assemble_image(header, body, prot, unprotected)
    if options.slot_size is not None and len(image) > options.slot_size:
        raise UsageError(
            f"signed image is {len(image)} bytes, over the slot size {options.slot_size}"
        )
    return image


@dataclass
class ParsedImage:
    """An image read back: header, both TLV areas, and the digest computed over it."""

    data: bytes
    header: ImageHeader
    protected: list[Tlv] = field(default_factory=list)
    unprotected: list[Tlv] = field(default_factory=list)
    digest: bytes = b""
    total_size: int = 0

    @property
    def payload(self) -> bytes:
        h = self.header
        return self.data[h.hdr_size : h.hdr_size + h.img_size]

    def _protected_value(self, kind: TlvType) -> bytes | None:
        for t in self.protected:
            if t.type == kind:
                return t.value
        return None

    @property
    def security_counter(self) -> int | None:
        value = self._protected_value(TlvType.SEC_CNT)
        return struct.unpack("<I", value)[0] if value is not None else None

    @property
    def vendor_id(self) -> bytes | None:
        return self._protected_value(TlvType.UUID_VID)

    @property
    def class_id(self) -> bytes | None:
        return self._protected_value(TlvType.UUID_CID)


@dataclass(frozen=True)
class VerifiedImage:
    image: ParsedImage
    key_index: int
    key: PublicKey
    scheme: SignatureScheme


def _need(data: bytes, end: int) -> None:
    if len(data) < end:
        raise ImageRejected(ImageErrorCode.TRUNCATED, f"needs {end} bytes, has {len(data)}")


def parse_header(data: bytes, slot_size: int | None = None) -> ImageHeader:
    """Check the 32-byte header on its own, as the device does before accepting a payload."""
    # A file that does not even start with the magic is not an image, whatever its size: say
    # that rather than "truncated" or "too large" (a text file given by mistake).
    if len(data) >= 4 and int.from_bytes(data[:4], "little") != IMAGE_MAGIC:
        raise ImageRejected(ImageErrorCode.BAD_MAGIC, f"magic {int.from_bytes(data[:4], 'little'):#010x}")
    if slot_size is not None and slot_size < HEADER_SIZE:
        raise ImageRejected(ImageErrorCode.TOO_LARGE, f"slot of {slot_size} bytes cannot hold a header")
    _need(data, HEADER_SIZE)
    header = ImageHeader.unpack(data)
    if header.magic != IMAGE_MAGIC:
        raise ImageRejected(ImageErrorCode.BAD_MAGIC, f"magic {header.magic:#010x}")
    if header.hdr_size < HEADER_SIZE:
        raise ImageRejected(ImageErrorCode.BAD_HEADER, f"hdr_size {header.hdr_size:#x}")
    if header.flags & ~FLAGS_ALLOWED:
        raise ImageRejected(ImageErrorCode.BAD_HEADER, f"unsupported flags {header.flags:#x}")
    prot = header.protect_tlv_size
    if prot and not TLV_INFO_SIZE <= prot <= MAX_PROTECTED_TLV_SIZE:
        raise ImageRejected(ImageErrorCode.BAD_TLV, f"protected TLV size {prot}")
    needed = header.hdr_size + header.img_size + prot + TLV_INFO_SIZE
    if slot_size is not None and needed > slot_size:
        raise ImageRejected(ImageErrorCode.TOO_LARGE, f"needs {needed} bytes, slot is {slot_size}")
    return header


def _iter_entries(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value offset, length) for each TLV entry in [start, end), bounded by end."""
    off = start
    while off < end:
        if off + TLV_ENTRY_HEADER_SIZE > end:
            raise ImageRejected(ImageErrorCode.BAD_TLV, f"partial TLV entry at {off}")
        _need(data, off + TLV_ENTRY_HEADER_SIZE)
        kind, length = struct.unpack_from("<HH", data, off)
        off += TLV_ENTRY_HEADER_SIZE
        if off + length > end:
            raise ImageRejected(ImageErrorCode.BAD_TLV, f"TLV 0x{kind:02x} at {off - 4} overruns its area")
        yield kind, off, length
        off += length


def _value(data: bytes, off: int, length: int) -> bytes:
    _need(data, off + length)
    return data[off : off + length]


def _parse_protected(data: bytes, start: int, size: int) -> list[Tlv]:
    area = data[start : start + size]
    magic, total = struct.unpack_from("<HH", area, 0)
    if magic != TLV_PROT_INFO_MAGIC or total != size:
        raise ImageRejected(ImageErrorCode.BAD_TLV, "protected TLV info does not match the header")
    tlvs: list[Tlv] = []
    seen: set[int] = set()
    for kind, off, length in _iter_entries(area, TLV_INFO_SIZE, total):
        expected = {TlvType.SEC_CNT: 4, TlvType.UUID_VID: 16, TlvType.UUID_CID: 16}.get(kind)
        if expected is not None and (length != expected or kind in seen):
            raise ImageRejected(ImageErrorCode.BAD_TLV, f"bad or repeated {TlvType(kind).name} TLV")
        seen.add(kind)
        tlvs.append(Tlv(kind, area[off : off + length], start + off - TLV_ENTRY_HEADER_SIZE))
    return tlvs


def _read_prefix(data: bytes, slot_size: int | None) -> tuple[ParsedImage, int, int]:
    """Header, hashed region and protected TLVs; returns (image, unprotected start, end)."""
    header = parse_header(data, slot_size)
    hashed_end = header.hdr_size + header.img_size
    _need(data, hashed_end)
    prot = header.protect_tlv_size
    protected: list[Tlv] = []
    if prot:
        _need(data, hashed_end + prot)
        protected = _parse_protected(data, hashed_end, prot)
    start = hashed_end + prot
    digest = hashlib.sha256(data[:start]).digest()
    _need(data, start + TLV_INFO_SIZE)
    magic, total = struct.unpack_from("<HH", data, start)
    if magic != TLV_INFO_MAGIC or total < TLV_INFO_SIZE:
        raise ImageRejected(ImageErrorCode.BAD_TLV, f"unprotected TLV info magic {magic:#06x}")
    if slot_size is not None and start + total > slot_size:
        raise ImageRejected(ImageErrorCode.TOO_LARGE, "unprotected TLV area runs past the slot")
    image = ParsedImage(data, header, protected, [], digest, start + total)
    return image, start + TLV_INFO_SIZE, start + total


def parse_image(data: bytes, slot_size: int | None = None) -> ParsedImage:
    """Parse an image's structure with every length bounded; checks no hash or signature."""
    image, start, end = _read_prefix(data, slot_size)
    image.unprotected = [
        Tlv(kind, _value(data, off, length), off - TLV_ENTRY_HEADER_SIZE)
        for kind, off, length in _iter_entries(data, start, end)
    ]
    return image


def verify_image(data: bytes, keys: Sequence[PublicKey], slot_size: int | None = None) -> VerifiedImage:
    """Verify as the device does: structure, exactly one matching SHA256 TLV, and a signature
    by one of `keys` (KEYHASH or PUBKEY naming it, then the signature TLV)."""
    image, start, end = _read_prefix(data, slot_size)
    keyhashes = [k.keyhash() for k in keys]
    hash_seen = False
    pending: int | None = None  # key index named by the last KEYHASH/PUBKEY (-1: unknown)
    unknown_key = False
    signatures = 0
    verified: VerifiedImage | None = None
    for kind, off, length in _iter_entries(data, start, end):
        image.unprotected.append(Tlv(kind, data[off : off + length], off - TLV_ENTRY_HEADER_SIZE))
        if kind == TlvType.SHA256:
            if length != 32:
                raise ImageRejected(ImageErrorCode.BAD_TLV, "SHA256 TLV is not 32 bytes")
            if hash_seen:
                raise ImageRejected(ImageErrorCode.DUPLICATE_HASH)
            hash_seen = True
            if _value(data, off, 32) != image.digest:
                raise ImageRejected(ImageErrorCode.HASH_MISMATCH)
        elif kind in (TlvType.KEYHASH, TlvType.PUBKEY):
            if (kind == TlvType.KEYHASH and length != 32) or length > MAX_PUBKEY_TLV_SIZE:
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"{TlvType(kind).name} TLV length {length}")
            value = _value(data, off, length)
            if kind == TlvType.PUBKEY:
                value = hashlib.sha256(value).digest()
            pending = keyhashes.index(value) if value in keyhashes else -1
        elif kind in RSA_SIGNATURE_TYPES or kind in OTHER_SIGNATURE_TYPES:
            if pending is None:
                raise ImageRejected(ImageErrorCode.SIG_WITHOUT_KEYHASH)
            index, pending = pending, None
            signatures += 1
            if signatures > MAX_SIGNATURES:
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"more than {MAX_SIGNATURES} signatures")
            if kind in OTHER_SIGNATURE_TYPES:
                continue
            if index < 0:
                unknown_key = True
                continue
            checked = _check_signature(image, kind, data, off, length, keys, index)
            verified = verified or checked  # the first good signature's key is reported
        elif kind in PROTECTED_ONLY_TYPES:
            raise ImageRejected(ImageErrorCode.UNPROTECTED_TLV, TlvType(kind).name)
        else:
            raise ImageRejected(ImageErrorCode.UNKNOWN_TLV, f"type 0x{kind:02x}")
    if not hash_seen:
        raise ImageRejected(ImageErrorCode.NO_HASH)
    if verified is None:
        raise ImageRejected(ImageErrorCode.UNKNOWN_KEY if unknown_key else ImageErrorCode.NO_SIGNATURE)
    return verified


def _check_signature(image: ParsedImage, kind: int, data: bytes, off: int, length: int,
                     keys: Sequence[PublicKey], index: int) -> VerifiedImage:
    key = keys[index]
    if length > MAX_SIGNATURE_SIZE or length != key.bits // 8:
        raise ImageRejected(ImageErrorCode.KEY_SIZE, f"{length}-byte signature, RSA-{key.bits} key")
    if (kind == TlvType.RSA2048_PSS and key.bits != 2048) or (
        kind == TlvType.RSA3072_PSS and key.bits != 3072
    ):
        raise ImageRejected(ImageErrorCode.KEY_SIZE, f"{TlvType(kind).name} with an RSA-{key.bits} key")
    scheme = SignatureScheme.PKCS1V15 if kind == TlvType.MPBOOT_RSA_PKCS1V15 else SignatureScheme.PSS
    key.verify_digest(_value(data, off, length), image.digest, scheme)
    return VerifiedImage(image, index, key, scheme)
