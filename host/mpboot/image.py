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

from mpboot.errors import ImageErrorCode, ImageRejected, TrustRefused, UsageError
from mpboot.keys import PublicKey, SignatureScheme
from mpboot.signing import Signer
from mpboot.trust import (
    MAX_BODY_SIZE,
    MAX_IMAGE_SIGNATURES,
    Certificate,
    Envelope,
    ImageKind,
    TrustState,
    decode_signed,
)

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
MAX_SIGNATURES = MAX_IMAGE_SIGNATURES
# MPBOOT_CERT TLVs an image may carry, and the size of one (docs/KEYS.md section 4).
MAX_CERTIFICATES = 4
MAX_CERT_TLV_SIZE = MAX_BODY_SIZE
# DEPENDENCY TLVs (MCUboot's struct image_dependency): their size and how many an image may carry.
DEPENDENCY_SIZE = 12
MAX_DEPENDENCIES = 4
# The image ids a dependency may name (docs/FORMAT.md): an app on stage 1 (>= its version),
# an app or a stage-1 image on the firmware (its stage-0 ABI: same major, minor at most the
# firmware's). A stage-1 image on the app (0) is DEPENDENCY, any other id BAD_TLV.
DEPENDENCY_APP = 0
DEPENDENCY_STAGE1 = 1
DEPENDENCY_FIRMWARE = 255


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
    # docs/KEYS.md section 4: the image's kind (protected, u32, one bit) and a certificate
    # envelope (unprotected: it vouches for a key, it is not a claim about the image).
    MPBOOT_KIND = 0xA1
    MPBOOT_CERT = 0xA2


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
        TlvType.MPBOOT_KIND,
    }
)
RSA_SIGNATURE_TYPES = frozenset(
    {TlvType.RSA2048_PSS, TlvType.RSA3072_PSS, TlvType.MPBOOT_RSA_PKCS1V15}
)
OTHER_SIGNATURE_TYPES = frozenset({TlvType.ECDSA_SIG, TlvType.ED25519})
SIGNATURE_TYPES = RSA_SIGNATURE_TYPES | OTHER_SIGNATURE_TYPES  # all count towards MAX_SIGNATURES


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


Dependency = tuple[int, ImageVersion]  # (image id, minimum version) of one DEPENDENCY TLV


def encode_dependency(image_id: int, version: ImageVersion) -> bytes:
    """MCUboot's struct image_dependency, as imgtool packs it ('<B3xBBHI'): image_id, 3 zero
    pad bytes, the minimum version (major, minor, revision, build)."""
    return struct.pack("<B3xBBHI", image_id, version.major, version.minor, version.revision, version.build)


def decode_dependency(value: bytes) -> Dependency:
    """The (image id, minimum version) of a 12-byte DEPENDENCY value (its pad bytes are zero
    in a valid image: _parse_protected)."""
    image_id, major, minor, revision, build = struct.unpack("<B3xBBHI", value)
    return image_id, ImageVersion(major, minor, revision, build)


def dependency_refusal(image_id: int, kind: int) -> tuple[ImageErrorCode, str] | None:
    """Why an image of `kind` may not depend on `image_id` (the device's rule, mpboot.image),
    or None: an app on stage 1 or the firmware, a stage-1 image on the firmware only."""
    if image_id == DEPENDENCY_FIRMWARE or (image_id == DEPENDENCY_STAGE1 and kind == ImageKind.APP):
        return None
    if image_id == DEPENDENCY_APP and kind == ImageKind.UPDATER:
        return ImageErrorCode.DEPENDENCY, "a stage-1 (updater) image never depends on the app (image 0)"
    which = ("an app depends only on stage 1 (image 1) or the firmware (255)" if kind == ImageKind.APP else
             "a stage-1 (updater) image depends only on the firmware (255)")
    return ImageErrorCode.BAD_TLV, f"a dependency on image {image_id}: {which}"


def check_dependencies(dependencies: Sequence[Dependency], kind: int = ImageKind.APP) -> None:
    """What `sign --depends` may write: at most MAX_DEPENDENCIES, each image once, and only
    the images an image of `kind` may depend on (dependency_refusal)."""
    if len(dependencies) > MAX_DEPENDENCIES:
        raise UsageError(f"{len(dependencies)} dependencies: an image carries at most {MAX_DEPENDENCIES}")
    if dependencies and kind == ImageKind.FIRMWARE:
        raise UsageError("a firmware image (--kind firmware) carries no dependencies: devices do not check "
                         "them there (mpboot.espota), so leave --depends out")
    seen: set[int] = set()
    for image_id, _ in dependencies:
        why = dependency_refusal(image_id, kind)
        if why is not None:
            raise UsageError(f"{why[1]}; devices refuse such an image")
        if image_id in seen:
            raise UsageError(f"image {image_id} is given twice as a dependency: give each image one minimum version")
        seen.add(image_id)


def protected_tlvs(security_counter: int | None, vendor_id: bytes | None,
                   class_id: bytes | None, kind: ImageKind = ImageKind.APP,
                   dependencies: Sequence[Dependency] = ()) -> list[Tlv]:
    """The protected TLVs in imgtool's order: SEC_CNT, DEPENDENCY (each, as given), UUID_VID,
    UUID_CID; then MPBOOT_KIND, only for a kind other than app (an app image stays byte for
    byte what imgtool makes)."""
    tlvs = []
    if security_counter is not None:
        tlvs.append(Tlv(TlvType.SEC_CNT, struct.pack("<I", security_counter)))
    for image_id, version in dependencies:
        tlvs.append(Tlv(TlvType.DEPENDENCY, encode_dependency(image_id, version)))
    if vendor_id is not None:
        tlvs.append(Tlv(TlvType.UUID_VID, vendor_id))
    if class_id is not None:
        tlvs.append(Tlv(TlvType.UUID_CID, class_id))
    if kind is not ImageKind.APP:
        tlvs.append(Tlv(TlvType.MPBOOT_KIND, struct.pack("<I", kind)))
    return tlvs


def signature_tlvs(digest: bytes, key: Signer, scheme: SignatureScheme) -> list[Tlv]:
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
    kind: ImageKind = ImageKind.APP
    dependencies: tuple[Dependency, ...] = ()  # DEPENDENCY TLVs, in this order


@dataclass(frozen=True)
class ImageSigner:
    """One signature an image gets: `key`, and the certificate envelopes that make it trusted
    (parent first; none for a root), written just before its signature."""

    key: Signer
    certificates: tuple[bytes, ...] = ()


def assemble_image(header: ImageHeader, body: bytes, protected: Sequence[Tlv],
                   unprotected: Callable[[bytes], Sequence[Tlv]]) -> bytes:
    """Lay out an image exactly as given: header over body[:32], body, the protected TLV
    area (omitted when empty), then the unprotected TLVs that `unprotected(digest)` returns.
    Checks nothing: build_image is the safe way in; tests use this to craft bad images."""
    prot_area = encode_tlv_area(TLV_PROT_INFO_MAGIC, protected) if protected else b""
    hashed = header.pack() + body[HEADER_SIZE:] + prot_area
    digest = hashlib.sha256(hashed).digest()
    return hashed + encode_tlv_area(TLV_INFO_MAGIC, unprotected(digest))


def build_image(body: bytes, signers: Signer | Sequence[ImageSigner], options: SignOptions) -> bytes:
    """Sign `body`, which already starts with header_size bytes of room for the header
    (zeros or padding: see mpboot.pack), into an MCUboot v1 image.

    `signers`: one key (the plain image imgtool makes), or ImageSigners in the order their
    signatures go (each preceded by the certificates it needs that are not written yet); an
    empty sequence gives an image with its hash and no signature, for `cosign` to sign."""
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
    check_dependencies(options.dependencies, options.kind)
    signer_list = list(signers) if isinstance(signers, (list, tuple)) else [ImageSigner(signers)]
    _check_signers(signer_list)
    prot = protected_tlvs(counter, options.vendor_id, options.class_id, options.kind, options.dependencies)
    prot_size = len(encode_tlv_area(TLV_PROT_INFO_MAGIC, prot)) if prot else 0
    flags = ImageFlag.RAM_LOAD if options.load_addr else 0
    header = ImageHeader(options.load_addr, hdr_size, prot_size, img_size, int(flags), options.version)

    def unprotected(digest: bytes) -> list[Tlv]:
        tlvs = [Tlv(TlvType.SHA256, digest)]
        for signer in signer_list:
            tlvs += _signature_with_certificates(tlvs, digest, signer, options.scheme)
        return tlvs

    image = assemble_image(header, body, prot, unprotected)
    _check_slot(image, options.slot_size)
    return image


def _check_slot(image: bytes, slot_size: int | None) -> None:
    if slot_size is not None and len(image) > slot_size:
        raise UsageError(f"signed image is {len(image)} bytes, over the slot size {slot_size}")


def _check_certificate_tlv(data: bytes) -> None:
    """A certificate an image is to carry: a signed certificate envelope that fits a TLV."""
    try:
        signed = decode_signed(data)
    except TrustRefused as err:
        raise UsageError(f"not a signed certificate: {err}") from None
    if not isinstance(signed.body, Certificate):
        raise UsageError("a trust record, not a certificate: records go to devices (mpboot trust push)")
    if len(data) > MAX_CERT_TLV_SIZE:
        raise UsageError(f"certificate serial {signed.body.serial} is {len(data)} bytes, over the "
                         f"{MAX_CERT_TLV_SIZE} an image may carry")


def _check_signers(signers: Sequence[ImageSigner]) -> None:
    moduli = [s.key.public().modulus for s in signers]
    if len(set(moduli)) != len(moduli):
        raise UsageError("the same key is given twice: each key signs an image once")
    if len(signers) > MAX_SIGNATURES:
        raise UsageError(f"{len(signers)} signing keys: an image carries at most {MAX_SIGNATURES} signatures")
    certificates = {c for s in signers for c in s.certificates}
    if len(certificates) > MAX_CERTIFICATES:
        raise UsageError(f"{len(certificates)} certificates: an image carries at most {MAX_CERTIFICATES}")
    for cert in certificates:
        _check_certificate_tlv(cert)


def _signature_with_certificates(written: Sequence[Tlv], digest: bytes, signer: ImageSigner,
                                 scheme: SignatureScheme) -> list[Tlv]:
    """`certs..., KEYHASH, sig` for one signer: its certificates not already in `written`
    (a certificate must come before the signatures it vouches for, a parent before its
    children), then its signature."""
    present = {t.value for t in written if t.type == TlvType.MPBOOT_CERT}
    certs = [Tlv(TlvType.MPBOOT_CERT, c) for c in signer.certificates if c not in present]
    return [*certs, *signature_tlvs(digest, signer.key, scheme)]


def cosign(image: bytes, key: Signer, scheme: SignatureScheme, certificates: Sequence[bytes] = (),
           slot_size: int | None = None) -> bytes:
    """`image` with one more signature, by `key`, appended to its unprotected TLV area after
    the certificates it needs (those not in the image yet, parent first): the detached flow,
    where each holder of a key adds their own signature and no one holds another's key.

    UsageError when `key` has already signed, the image would carry more than MAX_SIGNATURES
    signatures or MAX_CERTIFICATES certificates, its SHA256 TLV does not match its contents,
    or the result is larger than `slot_size`."""
    parsed = parse_image(image)
    if len(image) != parsed.total_size:
        raise UsageError(f"{len(image) - parsed.total_size} bytes follow the image's TLV area: not an image "
                         "as mpboot sign writes it")
    hashes = [t.value for t in parsed.unprotected if t.type == TlvType.SHA256]
    if hashes != [parsed.digest]:
        raise UsageError("the image's SHA256 TLV is missing, repeated or does not match its contents: "
                         "not cosigning it")
    public = key.public()
    named = {t.value if t.type == TlvType.KEYHASH else hashlib.sha256(t.value).digest()
             for t in parsed.unprotected if t.type in (TlvType.KEYHASH, TlvType.PUBKEY)}
    if public.keyhash() in named:
        raise UsageError(f"key {public.keyhash().hex()[:16]} has already signed this image")
    signatures = sum(1 for t in parsed.unprotected if t.type in SIGNATURE_TYPES)
    if signatures >= MAX_SIGNATURES:
        raise UsageError(f"the image already carries {signatures} signatures, the most it may")
    for cert in certificates:
        _check_certificate_tlv(cert)
    present = {t.value for t in parsed.unprotected if t.type == TlvType.MPBOOT_CERT}
    certs = len(present | set(certificates))
    if certs > MAX_CERTIFICATES:
        raise UsageError(f"the image would carry {certs} certificates, over {MAX_CERTIFICATES}")
    added = _signature_with_certificates(parsed.unprotected, parsed.digest, ImageSigner(key, tuple(certificates)),
                                         scheme)
    start = parsed.total_size - _unprotected_total(parsed)
    area = encode_tlv_area(TLV_INFO_MAGIC, [*(Tlv(t.type, t.value) for t in parsed.unprotected), *added])
    signed = image[:start] + area
    _check_slot(signed, slot_size)
    return signed


def _unprotected_total(image: ParsedImage) -> int:
    start = image.header.hdr_size + image.header.img_size + image.header.protect_tlv_size
    return image.total_size - start


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

    @property
    def kind(self) -> int:
        """The MPBOOT_KIND bit (ImageKind.APP when the image has none)."""
        value = self._protected_value(TlvType.MPBOOT_KIND)
        return struct.unpack("<I", value)[0] if value is not None else int(ImageKind.APP)

    @property
    def dependencies(self) -> list[Dependency]:
        """(image id, minimum version) of each DEPENDENCY TLV, in order: 1 stage 1, 255 the
        firmware's stage-0 ABI (docs/FORMAT.md; the device checks them, docs/BOOT.md)."""
        return [decode_dependency(t.value) for t in self.protected if t.type == TlvType.DEPENDENCY]


@dataclass(frozen=True)
class TrustedKey:
    """A key whose signature counts for an image: a root of the trust state, or a key a
    certificate in the image vouches for (within that certificate's scope)."""

    key: PublicKey
    root_index: int  # its position in the trust state's roots; -1 for a certified key
    certificate: Certificate | None  # None for a root


@dataclass(frozen=True)
class CountedSignature:
    """A verified signature that counted towards the image threshold."""

    signer: TrustedKey
    scheme: SignatureScheme


@dataclass(frozen=True)
class VerifiedImage:
    """An accepted image. `key` and `scheme` are the first counted signature's; `key_index`
    is the position among the roots of the first root that counted (-1 when only certified
    keys did, as the device reports it); `signatures` lists every counted one, one per
    distinct key."""

    image: ParsedImage
    key_index: int
    key: PublicKey
    scheme: SignatureScheme
    signatures: tuple[CountedSignature, ...] = ()


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
        expected = {TlvType.SEC_CNT: 4, TlvType.UUID_VID: 16, TlvType.UUID_CID: 16,
                    TlvType.MPBOOT_KIND: 4}.get(kind)
        if expected is not None and (length != expected or kind in seen):
            raise ImageRejected(ImageErrorCode.BAD_TLV, f"bad or repeated {TlvType(kind).name} TLV")
        if kind == TlvType.MPBOOT_KIND:
            bits = struct.unpack_from("<I", area, off)[0]
            if bits == 0 or bits & (bits - 1):
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"MPBOOT_KIND {bits:#x} has not exactly one bit set")
        if kind == TlvType.DEPENDENCY:
            if length != DEPENDENCY_SIZE:
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"DEPENDENCY TLV of {length} bytes, not {DEPENDENCY_SIZE}")
            if sum(1 for t in tlvs if t.type == TlvType.DEPENDENCY) >= MAX_DEPENDENCIES:
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"more than {MAX_DEPENDENCIES} DEPENDENCY TLVs")
            if any(area[off + 1 : off + 4]):
                raise ImageRejected(ImageErrorCode.BAD_TLV, "DEPENDENCY TLV with non-zero pad bytes")
        seen.add(kind)
        tlvs.append(Tlv(kind, area[off : off + length], start + off - TLV_ENTRY_HEADER_SIZE))
    # Whom the image may depend on: known once its kind is (the whole area is read).
    kinds = [struct.unpack("<I", t.value)[0] for t in tlvs if t.type == TlvType.MPBOOT_KIND]
    image_kind = kinds[0] if kinds else int(ImageKind.APP)
    for t in tlvs:
        if t.type == TlvType.DEPENDENCY:
            why = dependency_refusal(t.value[0], image_kind)
            if why is not None:
                raise ImageRejected(*why)
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


def verify_image(data: bytes, trust: TrustState | Sequence[PublicKey], slot_size: int | None = None) -> VerifiedImage:
    """Verify as the device does (docs/FORMAT.md, docs/KEYS.md section 4): structure, exactly
    one matching SHA256 TLV, and signatures by at least the image threshold of distinct trusted
    keys: roots of `trust`, and keys certified by the image's MPBOOT_CERT TLVs whose scope holds
    the image. A bare key sequence is root set version 1 with both thresholds 1: a signature by
    any one of the keys (KEYHASH or PUBKEY naming it, then the signature TLV)."""
    state = trust if isinstance(trust, TrustState) else TrustState.initial(list(trust))
    image, start, end = _read_prefix(data, slot_size)
    signers = SignerWalk(state, image)
    hash_seen = False
    pending = False  # a KEYHASH/PUBKEY waits for its signature TLV
    named: TrustedKey | None = None  # the key it named, looked up then (None: not trusted)
    named_hash = b""
    signatures = 0
    certificates = 0
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
            named_hash = value if kind == TlvType.KEYHASH else hashlib.sha256(value).digest()
            named = signers.lookup(named_hash)
            pending = True
        elif kind == TlvType.MPBOOT_CERT:
            certificates += 1
            if certificates > MAX_CERTIFICATES:
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"more than {MAX_CERTIFICATES} certificates")
            if length > MAX_CERT_TLV_SIZE:
                raise ImageRejected(ImageErrorCode.CERT_INVALID, f"certificate of {length} bytes, over {MAX_CERT_TLV_SIZE}")
            signers.certificate(_value(data, off, length))
        elif kind in RSA_SIGNATURE_TYPES or kind in OTHER_SIGNATURE_TYPES:
            if not pending:
                raise ImageRejected(ImageErrorCode.SIG_WITHOUT_KEYHASH)
            pending = False
            signatures += 1
            if signatures > MAX_SIGNATURES:
                raise ImageRejected(ImageErrorCode.BAD_TLV, f"more than {MAX_SIGNATURES} signatures")
            if kind in OTHER_SIGNATURE_TYPES:
                continue
            signers.signature(named_hash, named, kind, data, off, length)
        elif kind in PROTECTED_ONLY_TYPES:
            raise ImageRejected(ImageErrorCode.UNPROTECTED_TLV, TlvType(kind).name)
        else:
            raise ImageRejected(ImageErrorCode.UNKNOWN_TLV, f"type 0x{kind:02x}")
    if not hash_seen:
        raise ImageRejected(ImageErrorCode.NO_HASH)
    return signers.verdict()


class SignerWalk:
    """The keys trusted while one image's unprotected area is walked, and what its signatures
    came to (docs/KEYS.md section 4; the device's image.verify and records.issue/add). Its
    certificate() and `certified` are the certificate rules other signed statements share
    (mpboot.channel checks a channel record's certificates with them)."""

    def __init__(self, state: TrustState, image: ParsedImage) -> None:
        self.state = state
        self.image = image
        self.revoked = frozenset(state.revoked_keys)
        # Every root, revoked or not (a revoked root's signature is remembered as REVOKED).
        self.roots: dict[bytes, TrustedKey] = {}
        for index, root in enumerate(state.roots):
            self.roots.setdefault(root.keyhash(), TrustedKey(root, index, None))
        self.certified: dict[bytes, TrustedKey] = {}  # keys certified in this image, in order
        self.counted: dict[bytes, CountedSignature] = {}  # by modulus: a key counts once
        self.why: ImageRejected | None = None  # the first reason a signer did not count
        self.unknown_key = False

    def lookup(self, keyhash: bytes) -> TrustedKey | None:
        """The key a KEYHASH/PUBKEY names, as trusted at that point of the walk."""
        return self.roots.get(keyhash) or self.certified.get(keyhash)

    def _remember(self, code: ImageErrorCode, detail: str) -> None:
        self.why = self.why or ImageRejected(code, detail)

    def certificate(self, value: bytes) -> None:
        """One MPBOOT_CERT, checked when it is met. CERT_INVALID and BAD_SIGNATURE reject the
        image; REVOKED, CERT_ISSUER and CERT_WIDER are remembered and the certificate
        certifies nothing. A valid one trusts its key for the rest of the walk."""
        try:
            signed = decode_signed(value)
        except TrustRefused as err:
            raise ImageRejected(ImageErrorCode.CERT_INVALID, err.detail) from None
        cert = signed.body
        if not isinstance(cert, Certificate):
            raise ImageRejected(ImageErrorCode.CERT_INVALID, "a trust record, not a certificate")
        where = f"certificate serial {cert.serial}"
        keyhash = cert.key.keyhash()
        if cert.serial in self.state.revoked_serials:
            return self._remember(ImageErrorCode.REVOKED, f"{where} is revoked")
        if keyhash in self.revoked:
            return self._remember(ImageErrorCode.REVOKED, f"{where}: its key {keyhash.hex()[:16]} is revoked")
        envelope = signed.envelope

        def bad(detail: str) -> ImageRejected:
            return ImageRejected(ImageErrorCode.BAD_SIGNATURE, f"{where}: {detail}")

        roots = envelope.verified_signers(self.state.trusted_roots(), bad)
        if len(roots) < self.state.threshold:
            issuer = self._delegate(envelope, bad)
            if issuer is None:
                if any(s.keyhash in self.revoked and s.keyhash in self.roots for s in envelope.signatures):
                    return self._remember(ImageErrorCode.REVOKED, f"{where}: its issuer is revoked")
                return self._remember(ImageErrorCode.CERT_ISSUER, where)
            if not cert.within(issuer):
                return self._remember(ImageErrorCode.CERT_WIDER, f"{where} under serial {issuer.serial}")
        if keyhash not in self.roots:  # a root, or a key certified already: adds nothing
            self.certified.setdefault(keyhash, TrustedKey(cert.key, -1, cert))

    def _delegate(self, envelope: Envelope, bad: Callable[[str], ImageRejected]) -> Certificate | None:
        """The certificate of the first signer, in signature order, certified earlier in this
        image with depth >= 1, once its signature verifies (others are not checked)."""
        for sig in envelope.signatures:
            delegate = self.certified.get(sig.keyhash)
            if delegate is None or delegate.certificate is None or delegate.certificate.depth < 1:
                continue
            envelope.check_signature(sig, delegate.key, bad)
            return delegate.certificate
        return None

    def signature(self, keyhash: bytes, named: TrustedKey | None, kind: int, data: bytes, off: int,
                  length: int) -> None:
        """An RSA signature TLV by the key its KEYHASH/PUBKEY named (`named`, None when that
        was not a trusted key): remembered (REVOKED, OUT_OF_SCOPE: not verified), skipped
        (an unknown key), or verified (KEY_SIZE, BAD_SIGNATURE at once) and counted."""
        if named is None:
            self.unknown_key = True
            return
        if keyhash in self.revoked:
            return self._remember(ImageErrorCode.REVOKED, f"key {keyhash.hex()[:16]} is revoked")
        cert = named.certificate
        img = self.image
        if cert is not None and not cert.covers(img.vendor_id, img.class_id, img.security_counter or 0, img.kind):
            return self._remember(ImageErrorCode.OUT_OF_SCOPE,
                                  f"key {keyhash.hex()[:16]}, certificate serial {cert.serial}")
        scheme = _check_signature(img.digest, kind, data, off, length, named.key)
        self.counted.setdefault(named.key.modulus, CountedSignature(named, scheme))

    def verdict(self) -> VerifiedImage:
        counted = list(self.counted.values())
        need = self.state.image_threshold
        if len(counted) >= need:
            first = counted[0]
            root_index = next((c.signer.root_index for c in counted if c.signer.certificate is None), -1)
            return VerifiedImage(self.image, root_index, first.signer.key, first.scheme, tuple(counted))
        if counted:
            raise ImageRejected(ImageErrorCode.THRESHOLD, f"{len(counted)} of the {need} needed")
        if self.why is not None:
            raise self.why
        raise ImageRejected(ImageErrorCode.UNKNOWN_KEY if self.unknown_key else ImageErrorCode.NO_SIGNATURE)


def _check_signature(digest: bytes, kind: int, data: bytes, off: int, length: int, key: PublicKey) -> SignatureScheme:
    if length > MAX_SIGNATURE_SIZE or length != key.bits // 8:
        raise ImageRejected(ImageErrorCode.KEY_SIZE, f"{length}-byte signature, RSA-{key.bits} key")
    if (kind == TlvType.RSA2048_PSS and key.bits != 2048) or (
        kind == TlvType.RSA3072_PSS and key.bits != 3072
    ):
        raise ImageRejected(ImageErrorCode.KEY_SIZE, f"{TlvType(kind).name} with an RSA-{key.bits} key")
    scheme = SignatureScheme.PKCS1V15 if kind == TlvType.MPBOOT_RSA_PKCS1V15 else SignatureScheme.PSS
    key.verify_digest(_value(data, off, length), digest, scheme)
    return scheme
