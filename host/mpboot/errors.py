"""Error types. Every message is one line fit to show a user as it is."""

from __future__ import annotations

from enum import IntEnum


class MpbootError(Exception):
    """Base class of every error mpboot raises on purpose."""

    exit_code = 2


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


class DeviceRunError(MpbootError):
    """The MicroPython unix port could not be run, or did not answer as expected."""


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


class UpdateErrorCode(IntEnum):
    """Why the device's updater refused an update step (firmware/mpboot/update.py)."""

    BUSY = 1  # a test boot runs, or an image made permanent waits for its reset
    STATE = 2  # write/finish without a begin, or finish before every byte arrived
    RANGE = 3  # data beyond the announced length
    LENGTH = 4  # the announced length cannot hold the image or does not fit the slot


_DESCRIPTIONS = {
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
}


_UPDATE_DESCRIPTIONS = {
    UpdateErrorCode.BUSY: ("the device runs an unconfirmed test image, or an image made permanent waits "
                           "for its reset: confirm or reset first"),
    UpdateErrorCode.STATE: "update steps out of order (no begin, or finished before all data)",
    UpdateErrorCode.RANGE: "update data beyond the announced length",
    UpdateErrorCode.LENGTH: "announced image length does not hold the image or does not fit the slot",
}


class UpdateRefused(MpbootError):
    """The device's updater refused an update step (exit 1)."""

    exit_code = 1

    def __init__(self, code: UpdateErrorCode) -> None:
        self.code = UpdateErrorCode(code)
        super().__init__(f"update refused: {_UPDATE_DESCRIPTIONS[self.code]}")


class ImageRejected(MpbootError):
    """An image failed verification or is malformed (exit 1)."""

    exit_code = 1

    def __init__(self, code: ImageErrorCode, detail: str = "") -> None:
        self.code = ImageErrorCode(code)
        message = _DESCRIPTIONS[self.code]
        super().__init__(f"{message} ({detail})" if detail else message)


# Talking to a device (mpboot.transport, mpboot.smp). Exit codes: 2 for a port that cannot be
# used as given, 3 when the link fails or the device does not answer; a device that answers
# with an error is an mpboot.smp.SMPError (exit 1).


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


def image_error_text(code: ImageErrorCode) -> str:
    """The one-line meaning of an image error code ("image is for another vendor (vendor id)")."""
    return _DESCRIPTIONS[ImageErrorCode(code)]


def update_error_text(code: UpdateErrorCode) -> str:
    """The one-line meaning of an updater error code."""
    return _UPDATE_DESCRIPTIONS[UpdateErrorCode(code)]
