"""Every error type mpboot raises on purpose, and every code enum: one module, one type per
cause, one attribute (`code`) for the cause's code.

Every message is one line fit to show a user as it is. The CLI prints it and exits with the
type's `exit_code`: 1 when an image or a request was rejected or refused, 2 when something
cannot be done as asked (usage, a file, key, port or database that cannot be used), 3 when the
link to the device fails.

    MpbootError (2)
    ├── UsageError (2)
    │   ├── InputFileError
    │   ├── KeyFileError
    │   │   └── KeyPasswordRequired, PrivateKeyRefused
    │   ├── TokenError              a PKCS#11 module, token or key object (mpboot.hsm)
    │   │   └── TokenPinError, TokenKeyError, TokenMechanismMissing, TokenSignatureInvalid
    │   ├── SignatureMismatch       an attached signature is not over these bytes by that key
    │   ├── RequestTooLarge         larger than the device's buf_size
    │   ├── SerialsExhausted
    │   └── RepositoryError         a TUF repository directory (`mpboot repo`)
    │       └── TargetRefused (1)   an image refused as a target (scope, unsigned, no ids)
    ├── DeviceRunError (2)          the MicroPython unix port could not be run
    ├── DatabaseError (2)           the factory database
    │   └── SchemaTooNew, SchemaTooOld
    ├── ImageRejected (1)           mpboot's own verifier says no: .code ImageErrorCode
    ├── TrustRefused (1)            a trust record or certificate is refused, by the host's
    │                               rules (mpboot.trust) or by a device: .code TrustErrorCode
    ├── SMPError (1)                the device says no: .rc .err_group .err_rc .rsn (SMP wire)
    │   ├── CommandNotSupported
    │   ├── ImageRefused            .code ImageErrorCode | None
    │   │   └── VerificationFailed  (it arrived whole, then failed the device's check)
    │   ├── UpdateRefused           .code UpdateErrorCode | None
    │   └── FactoryRefused          .code FactoryErrorCode | None
    ├── BoardFailed (1)             the factory station gave up on one board
    │   └── BoardRefused            not a board it may provision: nothing written
    ├── RepositoryRefused (1)       a TUF repository served what is refused: .code RepositoryErrorCode
    ├── ChannelRefused (1)          a channel record a device would refuse: .code PullErrorCode
    └── LinkError (3)
        ├── PortError (2)
        ├── RepositoryUnavailable   no mirror of a TUF repository reachable in time
        ├── TransportError
        │   └── LinkLost
        ├── DeviceSilent
        └── ProtocolError

ImageRejected or ImageRefused: `except ImageRejected` catches the host's verdict on an image
(`mpboot verify`, `flashing.prepare`): nothing reached a device. `except ImageRefused` catches
a device's refusal of an image, whether it came over SMP (mpboot.smp.error_map.error_from_response)
or from the simulator (mpboot.sim.install_result): the same type and the same `code` for the
same reason. Both share ImageErrorCode and exit code 1; catch both to mean "not installable".
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Final, TypedDict, TypeVar, Unpack


class MpbootError(Exception):
    """Base class of every error mpboot raises on purpose."""

    exit_code = 2


# --- asked for what cannot be done (exit 2) -----------------------------------------------------


class UsageError(MpbootError):
    """The user asked for something that cannot be done as asked (exit 2)."""


class InputFileError(UsageError):
    """An input file is missing, unreadable, or not of the kind expected."""


class KeyFileError(UsageError):
    """A key file cannot be loaded, or holds a key of the wrong type or size."""


class KeyPasswordRequired(KeyFileError):
    """The private key is encrypted and no passphrase was given."""


class PrivateKeyRefused(KeyFileError):
    """A private key was given where only a public key belongs (a factory station)."""


class TokenError(UsageError):
    """A PKCS#11 module cannot be loaded, or its token cannot be found or used."""


class TokenPinError(TokenError):
    """The token's PIN is missing, wrong or locked."""


class TokenKeyError(TokenError):
    """The key object a pkcs11: URI names is missing, ambiguous, or not an RSA-2048/3072 key
    with e = 65537; or keygen would overwrite one."""


class TokenSignatureInvalid(TokenError):
    """The token's signature does not verify with the key's public half: another key behind
    the name, or a faulty token. Nothing is written."""


class TokenMechanismMissing(TokenError):
    """The token does not offer the signature mechanism asked for (RSA-PSS or PKCS#1 v1.5)."""


class SignatureMismatch(UsageError):
    """A signature made elsewhere (sign --attach-signature) does not verify: it is over other
    bytes, by another key, or in the other scheme. Nothing is written."""


class RequestTooLarge(UsageError):
    """A request would not fit the device's receive buffer (its MCUmgr buf_size)."""


class SerialsExhausted(UsageError):
    """The factory station's serial source has no serial left for a new board."""


class DeviceRunError(MpbootError):
    """The MicroPython unix port could not be run, or did not answer as expected."""


class DatabaseError(MpbootError):
    """The factory database cannot be opened or used (exit 2)."""


class SchemaTooNew(DatabaseError):
    """The factory database was written by a newer mpboot: its schema version is unknown here."""


class SchemaTooOld(DatabaseError):
    """Opened read-only, the database has an older schema than this code reads: a station
    (a read-write open) would migrate it first."""


_Code = TypeVar("_Code", bound=IntEnum)


# --- cause codes --------------------------------------------------------------------------------


class ImageErrorCode(IntEnum):
    """Why an image was rejected. Same numbers and names as the device's ImageError codes
    (firmware/mpboot/image.py); the golden vectors check that both sides agree."""

    BAD_MAGIC = 1
    BAD_HEADER = 2
    TOO_LARGE = 3
    TRUNCATED = 4
    BAD_TLV = 5
    UNPROTECTED_TLV = 6
    UNKNOWN_TLV = 7
    NO_HASH = 8
    DUPLICATE_HASH = 9
    HASH_MISMATCH = 10
    SIG_WITHOUT_KEYHASH = 11
    UNKNOWN_KEY = 12
    KEY_SIZE = 13
    BAD_SIGNATURE = 14
    NO_SIGNATURE = 15
    # Device policy (firmware/mpboot/slots.py): the image is valid but not for this device.
    VENDOR_MISMATCH = 16
    CLASS_MISMATCH = 17
    COUNTER_BELOW_FLOOR = 18
    DOWNGRADE = 19
    # Trust model (docs/KEYS.md section 4): certificates, revocation, M-of-N.
    CERT_INVALID = 20  # a certificate TLV does not parse or breaks a format rule
    CERT_ISSUER = 21  # a certificate is not issued by a root threshold or an allowed delegate
    CERT_WIDER = 22  # a certificate is wider than its issuer
    OUT_OF_SCOPE = 23  # a signer's certificate does not cover this image
    REVOKED = 24  # a signer, a certificate or its issuer is revoked
    THRESHOLD = 25  # fewer distinct trusted signers than the image threshold
    WRONG_KIND = 26  # an image of another kind (MPBOOT_KIND): an updater in the app's slots
    DEPENDENCY = 27  # a DEPENDENCY TLV not met (stage 1, the firmware's ABI), or a stage-1 image depending on the app
    # esp32 firmware images (firmware/mpboot/espota.py, docs/FORMAT.md "Firmware images (esp32)")
    NOT_ESP_APP = 30  # the firmware payload is not an ESP-IDF app image this chip boots


class BootErrorCode(IntEnum):
    """Why a slot whose image verified cannot run (firmware/mpboot/boot.py, negative so they
    never meet an ImageErrorCode): the device prints them as "slot N cannot run (error C)"."""

    NO_ROMFS = -19  # the payload does not mount as a ROMFS
    NO_ENTRY = -2  # the ROMFS has no entry module (main.py / main.mpy)
    NO_RAM = -12  # the port cannot map flash and the image does not fit in RAM
    STAGE1_IMPORT = -5  # a stage-1 image whose service does not import (mpboot.boot.E_S1_IMPORT)


class UpdateErrorCode(IntEnum):
    """Why the device's updater refused an update step (firmware/mpboot/update.py)."""

    BUSY = 1  # a test boot runs, or an image made permanent waits for its reset
    STATE = 2  # write/finish without a begin, or finish before every byte arrived
    RANGE = 3  # data beyond the announced length
    LENGTH = 4  # the announced length cannot hold the image or does not fit the slot


class FactoryErrorCode(IntEnum):
    """The mpboot group's (64) provisioning codes: v2 group rc, v1 `rsn` "factory:N"
    (docs/FACTORY.md section 2)."""

    SEALED = 1
    NO_IDENTITY = 2
    SERIAL_MISMATCH = 3
    INVALID = 4
    FIXED_BY_BUILD = 5
    NO_FACTORY_AREA = 6
    FLASH = 7
    TEST_BOOT_REQUIRED = 8


class TrustErrorCode(IntEnum):
    """The mpboot group's (64) trust-record codes (command 6): v2 group rc, v1 `rsn`
    "trust:N" (docs/KEYS.md section 5). Disjoint from FactoryErrorCode: same group."""

    NO_TRUST_AREA = 16  # the board has no trust area
    MALFORMED = 17  # the record does not parse, or is a certificate
    SIGNATURES = 18  # not signed by a threshold of the current roots
    NEW_SIGNATURES = 19  # a root record not signed by its own new threshold
    STALE = 20  # root version not current + 1, or revocation number not above the current one
    REVOKED_ROOT = 21  # a root record names a revoked key
    FLASH = 22  # the trust area write failed (the old state stays)
    TOO_LARGE = 23  # the record is over 4096 bytes
    CHUNK = 24  # a chunk offset other than the next expected byte


# SMP's own codes, as they come over the wire (their texts: mpboot.smp.error_map).


class MgmtErrorCode(IntEnum):
    """SMP's generic result codes (Zephyr MGMT_ERR_*)."""

    EOK = 0
    EUNKNOWN = 1
    ENOMEM = 2
    EINVAL = 3
    ETIMEOUT = 4
    ENOENT = 5
    EBADSTATE = 6
    EMSGSIZE = 7
    ENOTSUP = 8
    ECORRUPT = 9
    EBUSY = 10
    EACCESSDENIED = 11
    UNSUPPORTED_TOO_OLD = 12
    UNSUPPORTED_TOO_NEW = 13


class ImgMgmtErrorCode(IntEnum):
    """The image group's SMP v2 codes (Zephyr IMG_MGMT_ERR_*)."""

    OK = 0
    UNKNOWN = 1
    FLASH_CONFIG_QUERY_FAIL = 2
    NO_IMAGE = 3
    NO_TLVS = 4
    INVALID_TLV = 5
    TLV_MULTIPLE_HASHES_FOUND = 6
    TLV_INVALID_SIZE = 7
    HASH_NOT_FOUND = 8
    NO_FREE_SLOT = 9
    FLASH_OPEN_FAILED = 10
    FLASH_READ_FAILED = 11
    FLASH_WRITE_FAILED = 12
    FLASH_ERASE_FAILED = 13
    INVALID_SLOT = 14
    NO_FREE_MEMORY = 15
    FLASH_CONTEXT_ALREADY_SET = 16
    FLASH_CONTEXT_NOT_SET = 17
    FLASH_AREA_DEVICE_NULL = 18
    INVALID_PAGE_OFFSET = 19
    INVALID_OFFSET = 20
    INVALID_LENGTH = 21
    INVALID_IMAGE_HEADER = 22
    INVALID_IMAGE_HEADER_MAGIC = 23
    INVALID_HASH = 24
    INVALID_FLASH_ADDRESS = 25
    VERSION_GET_FAILED = 26
    CURRENT_VERSION_IS_NEWER = 27
    IMAGE_ALREADY_PENDING = 28
    INVALID_IMAGE_VECTOR_TABLE = 29
    INVALID_IMAGE_TOO_LARGE = 30
    INVALID_IMAGE_DATA_OVERRUN = 31
    IMAGE_CONFIRMATION_DENIED = 32
    IMAGE_SETTING_TEST_TO_ACTIVE_DENIED = 33


# What each cause code means, in one line (the messages of the refusals below).

_IMAGE_DESCRIPTIONS: dict[ImageErrorCode, str] = {
    ImageErrorCode.BAD_MAGIC: "not an MCUboot image (bad header magic)",
    ImageErrorCode.BAD_HEADER: "image header field out of range",
    ImageErrorCode.TOO_LARGE: "image does not fit in the slot",
    ImageErrorCode.TRUNCATED: "image is truncated",
    ImageErrorCode.BAD_TLV: "malformed TLV area",  # also: more than MAX_SIGNATURES signatures
    ImageErrorCode.UNPROTECTED_TLV: "protected-only TLV found in the unprotected area",
    ImageErrorCode.UNKNOWN_TLV: "unknown TLV type in the unprotected area",
    ImageErrorCode.NO_HASH: "image has no SHA256 TLV",
    ImageErrorCode.DUPLICATE_HASH: "image has more than one SHA256 TLV",
    ImageErrorCode.HASH_MISMATCH: "image hash does not match its SHA256 TLV",
    ImageErrorCode.SIG_WITHOUT_KEYHASH: "signature TLV without a KEYHASH or PUBKEY before it",
    ImageErrorCode.UNKNOWN_KEY: "image is signed by a key that is not trusted",
    ImageErrorCode.KEY_SIZE: "signature does not match the key size",
    ImageErrorCode.BAD_SIGNATURE: "signature does not verify",
    ImageErrorCode.NO_SIGNATURE: "image has no signature by a trusted key",
    ImageErrorCode.VENDOR_MISMATCH: "image is for another vendor (vendor id)",
    ImageErrorCode.CLASS_MISMATCH: "image is for another device class (class id)",
    ImageErrorCode.COUNTER_BELOW_FLOOR: "image security counter is below the device's anti-rollback floor",
    ImageErrorCode.DOWNGRADE: "image version is older than the confirmed image (downgrades refused)",
    ImageErrorCode.CERT_INVALID: "a certificate in the image does not parse or breaks a format rule",
    ImageErrorCode.CERT_ISSUER: "a certificate in the image is not issued by a root threshold or an allowed delegate",
    ImageErrorCode.CERT_WIDER: "a certificate in the image is wider than its issuer",
    ImageErrorCode.OUT_OF_SCOPE: "the signer's certificate does not cover this image",
    ImageErrorCode.REVOKED: "a signer, a certificate or its issuer is revoked",
    ImageErrorCode.THRESHOLD: "fewer distinct trusted signers than the image threshold",
    ImageErrorCode.WRONG_KIND: "image is of another kind (an updater image, not an app)",
    ImageErrorCode.DEPENDENCY: "image's dependency is not met (stage 1 too old, or another firmware ABI)",
    ImageErrorCode.NOT_ESP_APP: "the firmware image's payload is not an ESP-IDF app image this chip boots",
}

_TRUST_DESCRIPTIONS: dict[TrustErrorCode, str] = {
    TrustErrorCode.NO_TRUST_AREA: "the board has no trust area",
    TrustErrorCode.MALFORMED: "the trust record does not parse, or is a certificate",
    TrustErrorCode.SIGNATURES: "the trust record is not signed by a threshold of the current roots",
    TrustErrorCode.NEW_SIGNATURES: "the root record is not signed by its own new threshold",
    TrustErrorCode.STALE: "the trust record is stale (root version not current + 1, or revocation number not above the current one)",
    TrustErrorCode.REVOKED_ROOT: "the root record names a revoked key",
    TrustErrorCode.FLASH: "the trust area write failed (the old state stays)",
    TrustErrorCode.TOO_LARGE: "the trust record is over 4096 bytes",
    TrustErrorCode.CHUNK: "a trust record chunk came at an offset other than the next expected byte",
}


_BOOT_DESCRIPTIONS: dict[BootErrorCode, str] = {
    BootErrorCode.NO_ROMFS: "its payload is not a ROMFS image",
    BootErrorCode.NO_ENTRY: "its ROMFS has no entry module (main.py)",
    BootErrorCode.NO_RAM: "it does not fit in RAM (a port that cannot map flash copies it there)",
    BootErrorCode.STAGE1_IMPORT: "its update service (stage 1) raised while it was imported",
}


_UPDATE_DESCRIPTIONS: dict[UpdateErrorCode, str] = {
    UpdateErrorCode.BUSY: ("the device runs an unconfirmed test image, or an image made permanent waits "
                           "for its reset: confirm or reset first"),
    UpdateErrorCode.STATE: "update steps out of order (no begin, or finished before all data)",
    UpdateErrorCode.RANGE: "update data beyond the announced length",
    UpdateErrorCode.LENGTH: "announced image length does not hold the image or does not fit the slot",
}

# An erase request meets the updater's BUSY when the slot is in use, not mid-update.
_ERASE_DESCRIPTIONS = {**_UPDATE_DESCRIPTIONS,
                       UpdateErrorCode.BUSY: "the slot is running, or holds the image a test boot reverts to"}

_FACTORY_DESCRIPTIONS: dict[FactoryErrorCode, str] = {
    FactoryErrorCode.SEALED: "the board is sealed: identity and policy are read-only",
    FactoryErrorCode.NO_IDENTITY: "the board has no identity yet: write one before sealing",
    FactoryErrorCode.SERIAL_MISMATCH: "the serial named is not the board's",
    FactoryErrorCode.INVALID: "a value is outside the device's limits",
    FactoryErrorCode.FIXED_BY_BUILD: "the vendor or class id is fixed by the board's build",
    FactoryErrorCode.NO_FACTORY_AREA: "the board was started without a factory area",
    FactoryErrorCode.FLASH: "the factory record could not be written",
    FactoryErrorCode.TEST_BOOT_REQUIRED: "the board's policy requires a test boot: images cannot be made permanent",
}


def image_error_text(code: ImageErrorCode) -> str:
    """The one-line meaning of an image error code ("image is for another vendor (vendor id)")."""
    return _IMAGE_DESCRIPTIONS[ImageErrorCode(code)]


def trust_error_text(code: TrustErrorCode) -> str:
    """The one-line meaning of a trust error code ("the root record names a revoked key")."""
    return _TRUST_DESCRIPTIONS[TrustErrorCode(code)]


def slot_error_text(number: int) -> str:
    """Why a slot cannot boot, from the number the device gives (its image error, or a
    negative boot error): "BAD_MAGIC: empty, or not an MCUboot image"."""
    if number == ImageErrorCode.BAD_MAGIC:
        return "BAD_MAGIC: empty, or not an MCUboot image"
    for enum, texts in ((ImageErrorCode, _IMAGE_DESCRIPTIONS), (BootErrorCode, _BOOT_DESCRIPTIONS)):
        try:
            code = enum(number)
        except ValueError:
            continue
        return f"{code.name}: {texts[code]}"  # type: ignore[index]
    return "an error this host does not know"


def _reason(enum: type[_Code], number: int, kind: str, where: str, texts: Mapping[_Code, str],
            named: bool = False) -> tuple[_Code | None, str]:
    """The device's `kind` error `number` as (code, words): (ImageErrorCode.VENDOR_MISMATCH,
    "image is for another vendor (vendor id) (image error 16, SMP rc 3 EINVAL)"), `where`
    saying how it came; (None, "image error 99 (SMP rc 3 EINVAL)") for a number not known here."""
    try:
        code = enum(number)
    except ValueError:
        return None, f"{kind} error {number}" + (f" ({where})" if where else "")
    words = f"{kind} error {number}" + (f" {code.name}" if named else "")
    return code, f"{texts[code]} " + (f"({words}, {where})" if where else f"({words})")


# --- mpboot's own verifier rejects an image (exit 1) --------------------------------------------


class ImageRejected(MpbootError):
    """The host's verifier rejected an image: malformed, or not signed by a given key (exit 1).
    Nothing was sent to a device; a device's refusal is ImageRefused."""

    exit_code = 1

    def __init__(self, code: ImageErrorCode, detail: str = "") -> None:
        self.code = ImageErrorCode(code)
        message = image_error_text(self.code)
        super().__init__(f"{message} ({detail})" if detail else message)


class TrustRefused(MpbootError):
    """A trust record or a certificate is refused: it does not parse, is not signed by enough
    roots, is stale... (exit 1). By the host's trust rules (mpboot.trust, docs/KEYS.md), or by
    a device's trust command (mpboot group 64 command 6, mapped by
    mpboot.smp.error_map.error_from_response): the same codes for the same checks, in the
    same order. From a device it carries SMPError's wire details (`rc`, `err_group`,
    `err_rc`, `rsn`); from the host's rules they are None. `detail`: the words after the
    code's meaning."""

    exit_code = 1

    def __init__(self, code: TrustErrorCode, detail: str = "", **wire: Unpack[WireDetails]) -> None:
        self.code = TrustErrorCode(code)
        self.detail = detail
        self.rc = wire.get("rc")
        self.err_group = wire.get("err_group")
        self.err_rc = wire.get("err_rc")
        self.rsn = wire.get("rsn")
        message = trust_error_text(self.code)
        super().__init__(f"{message} ({detail})" if detail else message)


# --- the device says no (exit 1) ----------------------------------------------------------------


class WireDetails(TypedDict, total=False):
    """How an SMP error reply said it (SMPError's attributes; none of them from the simulator)."""

    rc: MgmtErrorCode | int | None
    err_group: int | None
    err_rc: int | None
    rsn: str | None


class SMPError(MpbootError):
    """The device answered a request with an error (exit 1).

    Wire details, None where the reply did not carry them (and all None for a refusal the
    simulator reported directly): `rc`, the SMP v1 result code (MgmtErrorCode, or a plain int
    when unknown), None for a v2 group error; `err_group`/`err_rc`, the v2 group error; `rsn`,
    the v1 reason text. The cause, where one is known, is the subclasses' `code`."""

    exit_code = 1

    def __init__(self, message: str, **wire: Unpack[WireDetails]) -> None:
        super().__init__(message)
        self.rc = wire.get("rc")
        self.err_group = wire.get("err_group")
        self.err_rc = wire.get("err_rc")
        self.rsn = wire.get("rsn")


class CommandNotSupported(SMPError):
    """The device does not implement the command (MGMT_ERR ENOTSUP)."""


class ImageRefused(SMPError):
    """The device refused an image: its header, TLVs, signature, or the device's policy (vendor,
    class, floor, downgrade). Over SMP or from the simulator alike. `code` is None when the
    device gave no mpboot reason (an SMP v2 error, or a server other than mpboot)."""

    def __init__(self, message: str, *, code: ImageErrorCode | None = None,
                 **wire: Unpack[WireDetails]) -> None:
        super().__init__(message, **wire)
        self.code = code

    @classmethod
    def from_number(cls, number: int, where: str = "", **wire: Unpack[WireDetails]) -> ImageRefused:
        """The refusal for the device's image error `number`; `where` says how it came
        ("SMP rc 3 EINVAL"). A number this host does not know leaves `code` None."""
        code, words = _reason(ImageErrorCode, number, "image", where, _IMAGE_DESCRIPTIONS)
        return cls(f"device refused the image: {words}", code=code, **wire)

    def after_upload(self) -> VerificationFailed:
        """This refusal, met once the whole image had arrived: the device's verification failed."""
        return VerificationFailed(
            str(self).replace("device refused the image", "image verification on the device failed", 1),
            code=self.code, rc=self.rc, err_group=self.err_group, err_rc=self.err_rc, rsn=self.rsn)


class VerificationFailed(ImageRefused):
    """The image arrived whole but failed verification on the device (hash, signature, policy,
    or the file's SHA-256 did not match)."""


class UpdateRefused(SMPError):
    """The device's updater refused an update step (or an erase): busy, out of order, out of
    range. `code` is None for a code this host does not know."""

    def __init__(self, message: str, *, code: UpdateErrorCode | None = None,
                 **wire: Unpack[WireDetails]) -> None:
        super().__init__(message, **wire)
        self.code = code

    @classmethod
    def from_number(cls, number: int, where: str = "", *, erase: bool = False,
                    **wire: Unpack[WireDetails]) -> UpdateRefused:
        """The refusal for the device's update error `number` (`erase`: of an erase request)."""
        texts = _ERASE_DESCRIPTIONS if erase else _UPDATE_DESCRIPTIONS
        code, words = _reason(UpdateErrorCode, number, "update", where, texts)
        return cls(f"device refused the {'erase' if erase else 'update'}: {words}", code=code, **wire)


class FactoryRefused(SMPError):
    """The device refused a provisioning step or an action its policy forbids. `code` is None
    for a code this host does not know."""

    def __init__(self, message: str, *, code: FactoryErrorCode | None = None,
                 **wire: Unpack[WireDetails]) -> None:
        super().__init__(message, **wire)
        self.code = code

    @classmethod
    def from_number(cls, number: int, what: str, where: str = "",
                    **wire: Unpack[WireDetails]) -> FactoryRefused:
        """The refusal of the request `what` ("seal") for the device's factory error `number`."""
        code, words = _reason(FactoryErrorCode, number, "factory", where, _FACTORY_DESCRIPTIONS, named=True)
        return cls(f"{what} refused: {words}", code=code, **wire)


ZUPLOAD_BAD_CHUNK: Final = 25  # the mpboot group's (64) code for a bad compressed chunk (rsn "zupload:25")


class CompressedChunkRefused(SMPError):
    """The device refused a compressed upload chunk (group 64 command 7): not one whole raw
    deflate stream of exactly its `ulen` bytes, or out of bounds. The device closed the
    upload (opening it again resumes from its last checkpoint)."""


# --- the factory station gives up on a board (exit 1) -------------------------------------------


class BoardFailed(MpbootError):
    """The factory station gave up on one board (mpboot.factory.station): the reason is the
    message. The station records it as the board's outcome, failed."""

    exit_code = 1


class BoardRefused(BoardFailed):
    """The board is not one the station may provision (not the expected bootloader build):
    nothing was written to it. Recorded as refused."""


# --- talking to a device fails (exit 3) ---------------------------------------------------------
# (mpboot.transport, mpboot.smp: 2 for a port that cannot be used as given, 3 when the link
# fails or the device does not answer; a device that answers with an error is an SMPError.)


class LinkError(MpbootError):
    """Talking to the device failed: no port, a broken link, or no (usable) answer (exit 3)."""

    exit_code = 3


class PortError(LinkError):
    """The port cannot be opened: missing, busy, or not permitted (exit 2)."""

    exit_code = 2


class TransportError(LinkError):
    """The link failed while in use (I/O error, device unplugged, port closed)."""


class LinkLost(TransportError):
    """The connection dropped while open (a BLE disconnect): opening again may recover."""


class DeviceSilent(LinkError):
    """No reply from the device within the timeout, after the allowed retries."""


class ProtocolError(LinkError):
    """The device answered, but not with what the protocol says (undecodable or missing fields)."""


def reason(err: BaseException) -> str:
    """An exception's reason for people, one line: an OSError's text without its errno
    ("Connection refused", not "[Errno 111] Connect call failed ('127.0.0.1', 1)")."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


# --- a TUF repository refuses or cannot be reached (`mpboot sync --repo URL`, mpboot.tufsource) --


class RepositoryErrorCode(IntEnum):
    """Why a TUF repository's metadata or a target from it is refused."""

    EXPIRED = 1  # expired metadata: a stale or frozen mirror, or a repository nobody re-signs
    ROLLBACK = 2  # a version older than one seen before (or than the snapshot says)
    UNSIGNED = 3  # not signed by a threshold of the role's keys
    MISMATCH = 4  # bytes not those the metadata names (length or hash)
    BAD_METADATA = 5  # metadata that does not parse or breaks TUF's rules otherwise
    BAD_CUSTOM = 6  # a target's custom "mpboot" metadata is malformed or disagrees with its image
    TOO_LARGE = 7  # a file larger than the client accepts


class RepositoryRefused(MpbootError):
    """A TUF repository answered, but what it served is refused (exit 1): nothing from it is
    sent to a device. `.code` RepositoryErrorCode, `.url` the mirror (or None)."""

    exit_code = 1

    def __init__(self, code: RepositoryErrorCode, message: str, url: str | None = None) -> None:
        self.code = RepositoryErrorCode(code)
        self.url = url
        super().__init__(message)


class RepositoryUnavailable(LinkError):
    """No mirror of a TUF repository could be reached in time: down, hung, trickling, HTTP
    errors (exit 3). Nothing is sent to a device."""


_REPOSITORY_HINTS = {
    RepositoryErrorCode.EXPIRED: "a stale or frozen mirror",
    RepositoryErrorCode.ROLLBACK: "rolled back, or behind what a mirror served before",
    RepositoryErrorCode.UNSIGNED: "not signed by enough of its role's keys",
}


def repository_error(err: BaseException, url: str | None = None) -> MpbootError:
    """A python-tuf exception (tuf.api.exceptions) as an mpboot error, one line, with the
    mirror's URL in front: RepositoryRefused (exit 1) for what a mirror served and TUF refused,
    RepositoryUnavailable (exit 3) for a mirror that could not be read. An MpbootError is
    returned as it is."""
    if isinstance(err, MpbootError):
        return err
    from tuf.api import exceptions as tx  # (python-tuf: imported only when a repository is used)

    text = str(err) or type(err).__name__
    where = f"{url}: " if url and not text.startswith(url) else ""  # (our fetcher names the file's URL)
    code: RepositoryErrorCode | None = None
    if isinstance(err, tx.ExpiredMetadataError):
        code = RepositoryErrorCode.EXPIRED
    elif isinstance(err, tx.BadVersionNumberError):
        code = RepositoryErrorCode.ROLLBACK
    elif isinstance(err, tx.UnsignedMetadataError):
        code = RepositoryErrorCode.UNSIGNED
    elif isinstance(err, tx.LengthOrHashMismatchError):
        code = RepositoryErrorCode.MISMATCH
    elif isinstance(err, tx.DownloadLengthMismatchError):
        code = RepositoryErrorCode.TOO_LARGE
        text += " (more bytes than allowed)"
    elif isinstance(err, tx.RepositoryError):
        code = RepositoryErrorCode.BAD_METADATA
    if code is None:
        return RepositoryUnavailable(f"{where}{text}")
    hint = _REPOSITORY_HINTS.get(code)
    return RepositoryRefused(code, f"{where}{text}" + (f" ({hint})" if hint else ""), url)

# --- a TUF repository (mpboot.repo; `mpboot repo`) ----------------------------------------------


class RepositoryError(UsageError):
    """A TUF repository directory cannot be used as asked (exit 2): not one, already one, an
    unknown role, a key that is not the role's, a change that would break what clients
    verify. Nothing was written."""


class TargetRefused(RepositoryError):
    """An image is refused as a repository target (exit 1): malformed, unsigned, without a
    SHA256 TLV or vendor/class ids, or outside the role's vendor/class scope. Nothing was
    written."""

    exit_code = 1

# --- device pull (issue 20): the codes of mpboot.pull's PullError on the device -----------------


class PullErrorCode(IntEnum):
    """Why a device's `mpboot.pull` failed (device firmware/mpboot/puller.py E_*, same names and
    numbers); the host's channel checks (mpboot.channel.check_channel) use the record ones."""

    NETWORK = 1  # connect/recv failed or timed out, too often
    HTTP = 2  # a status other than 200/206, or a response the client refuses
    TOO_LARGE = 3  # the record over 4096 bytes, or a body longer than expected
    STALE = 4  # a channel number below the highest taken, or equal with another body
    SIGNATURE = 5  # not signed by a root threshold or a key certified for channel records
    MISMATCH = 6  # the image is not the one the record names
    PRODUCT = 7  # the record is for another channel name, vendor or class
    RECORD = 8  # the record does not parse
    NO_TRUST_AREA = 9  # the board cannot keep the channel number
    IMAGE = 10  # the image or the policy refused it (detail: the image code)
    UPDATE = 11  # the updater refused (detail: the update code)
    FLASH = 12  # the trust area write failed
    NOT_BOOTED = 13  # not started by mpboot.boot
    INTERNAL = 14  # another exception in the pull, e.g. MemoryError (detail 12)


class ChannelRefused(MpbootError):
    """A channel record a device would refuse (exit 1), by the device's checks in the device's
    order (docs/THREAT_MODEL.md "Device pull"). `detail`: the words after the code's name."""

    exit_code = 1

    def __init__(self, code: PullErrorCode, detail: str = "") -> None:
        self.code = PullErrorCode(code)
        self.detail = detail
        message = f"channel record refused: {self.code.name.lower().replace('_', ' ')}"
        super().__init__(f"{message} ({detail})" if detail else message)
