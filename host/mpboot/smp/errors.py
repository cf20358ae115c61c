"""SMP error codes and the exceptions a device's error response becomes (mapped once, here).

An SMP v1 error is `{"rc": MGMT_ERR, "rsn": "..."}`; mpboot devices put a machine-readable
reason in `rsn`: "image:N" (mpboot.errors.ImageErrorCode) or "update:N" (UpdateErrorCode).
An SMP v2 error is `{"err": {"group": G, "rc": R}}` with the group's own code (IMG_MGMT_ERR
for the image group). `error_from_response` turns either into one SMPError subclass whose
message is one line fit for a user:

    device refused the image: image is for another vendor (vendor id) (image error 16, SMP rc 3 EINVAL)
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from mpboot.errors import (
    ImageErrorCode,
    MpbootError,
    UpdateErrorCode,
    image_error_text,
    update_error_text,
)
from mpboot.smp.header import Group


class MgmtErr(IntEnum):
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


MGMT_ERR_TEXT: dict[MgmtErr, str] = {
    MgmtErr.EOK: "no error",
    MgmtErr.EUNKNOWN: "unknown error",
    MgmtErr.ENOMEM: "out of memory",
    MgmtErr.EINVAL: "invalid value",
    MgmtErr.ETIMEOUT: "timed out",
    MgmtErr.ENOENT: "no such entry",
    MgmtErr.EBADSTATE: "not allowed in the current state",
    MgmtErr.EMSGSIZE: "message too large",
    MgmtErr.ENOTSUP: "command not supported",
    MgmtErr.ECORRUPT: "corrupt data",
    MgmtErr.EBUSY: "busy",
    MgmtErr.EACCESSDENIED: "access denied",
    MgmtErr.UNSUPPORTED_TOO_OLD: "SMP version too old for the device",
    MgmtErr.UNSUPPORTED_TOO_NEW: "SMP version too new for the device",
}


class ImgMgmtErr(IntEnum):
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


# Image-group v2 codes that mean "this image is not acceptable" (docs/PROTOCOL.md table).
_IMAGE_REFUSAL_CODES = frozenset({
    ImgMgmtErr.INVALID_TLV, ImgMgmtErr.TLV_MULTIPLE_HASHES_FOUND, ImgMgmtErr.TLV_INVALID_SIZE,
    ImgMgmtErr.INVALID_IMAGE_HEADER, ImgMgmtErr.INVALID_IMAGE_HEADER_MAGIC, ImgMgmtErr.INVALID_HASH,
    ImgMgmtErr.CURRENT_VERSION_IS_NEWER, ImgMgmtErr.INVALID_IMAGE_TOO_LARGE,
    ImgMgmtErr.INVALID_LENGTH, ImgMgmtErr.INVALID_IMAGE_VECTOR_TABLE,
})


class FactoryErr(IntEnum):
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


FACTORY_ERR_TEXT: dict[FactoryErr, str] = {
    FactoryErr.SEALED: "the board is sealed: identity and policy are read-only",
    FactoryErr.NO_IDENTITY: "the board has no identity yet: write one before sealing",
    FactoryErr.SERIAL_MISMATCH: "the serial named is not the board's",
    FactoryErr.INVALID: "a value is outside the device's limits",
    FactoryErr.FIXED_BY_BUILD: "the vendor or class id is fixed by the board's build",
    FactoryErr.NO_FACTORY_AREA: "the board was started without a factory area",
    FactoryErr.FLASH: "the factory record could not be written",
    FactoryErr.TEST_BOOT_REQUIRED: "the board's policy requires a test boot: images cannot be made permanent",
}


def _name(enum: type[IntEnum], value: int) -> str:
    try:
        return f"{value} {enum(value).name}"
    except ValueError:
        return str(value)


class SMPError(MpbootError):
    """The device answered a request with an error (exit 1).

    `rc`: the SMP v1 result code (MgmtErr, or a plain int when unknown), None for a v2 group
    error; `err_group`/`err_rc`: the v2 group error; `rsn`: the v1 reason text, if any."""

    exit_code = 1

    def __init__(self, message: str, *, rc: MgmtErr | int | None = None, err_group: int | None = None,
                 err_rc: int | None = None, rsn: str | None = None) -> None:
        super().__init__(message)
        self.rc = rc
        self.err_group = err_group
        self.err_rc = err_rc
        self.rsn = rsn


class CommandNotSupported(SMPError):
    """The device does not implement the command (MGMT_ERR ENOTSUP)."""


class ImageRefused(SMPError):
    """The device refused the image: its header, TLVs, signature or the device policy.
    `image_code` is None when the device gave no mpboot reason (v2 error, or another server)."""

    def __init__(self, message: str, *, image_code: ImageErrorCode | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.image_code = image_code


class VerificationFailed(ImageRefused):
    """The image arrived whole but failed verification on the device (hash, signature, policy,
    or the file's SHA-256 did not match)."""


class FactoryRefused(SMPError):
    """The device refused a provisioning step or a policy-forbidden action (FactoryErr);
    `factory_code` is None for a code this host does not know."""

    def __init__(self, message: str, *, factory_code: FactoryErr | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.factory_code = factory_code


def _factory_error(n: int, what: str, where: str, **kw: Any) -> FactoryRefused:
    try:
        code = FactoryErr(n)
    except ValueError:
        return FactoryRefused(f"{what} refused: factory error {n} ({where})", **kw)
    return FactoryRefused(f"{what} refused: {FACTORY_ERR_TEXT[code]} (factory error {n} {code.name}, {where})",
                          factory_code=code, **kw)


class UpdateStepRefused(SMPError):
    """The device's updater refused an upload step (mpboot.errors.UpdateErrorCode)."""

    def __init__(self, message: str, *, update_code: UpdateErrorCode | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.update_code = update_code


def _rc_text(rc: int) -> str:
    try:
        code = MgmtErr(rc)
    except ValueError:
        return f"SMP rc {rc}"
    return f"SMP rc {rc} {code.name}"


def error_from_response(payload: dict[str, Any], what: str) -> SMPError | None:
    """The SMPError a response payload carries, or None for a success. `what` names the
    request for messages without an mpboot reason ("image state write")."""
    err = payload.get("err")
    if isinstance(err, dict):
        return _v2_error(err, what)
    rc = payload.get("rc", 0)
    if not isinstance(rc, int) or isinstance(rc, bool):
        return SMPError(f"{what}: malformed rc {rc!r} in the response")
    if rc == 0:
        return None
    rsn = payload.get("rsn")
    rsn = rsn if isinstance(rsn, str) else None
    code: MgmtErr | int
    try:
        code = MgmtErr(rc)
    except ValueError:
        code = rc
    kw: dict[str, Any] = {"rc": code, "rsn": rsn}
    kind, _, number = (rsn or "").partition(":")
    if kind == "factory" and number.isdigit():
        return _factory_error(int(number), what, _rc_text(rc), **kw)
    if kind in ("image", "update") and number.isdigit():
        n = int(number)
        if kind == "image":
            try:
                image_code = ImageErrorCode(n)
            except ValueError:
                return ImageRefused(f"device refused the image: image error {n} ({_rc_text(rc)})",
                                    **kw)
            return ImageRefused(f"device refused the image: {image_error_text(image_code)} "
                                f"(image error {n}, {_rc_text(rc)})", image_code=image_code, **kw)
        try:
            update_code = UpdateErrorCode(n)
        except ValueError:
            return UpdateStepRefused(f"device refused the update: update error {n} ({_rc_text(rc)})",
                                     **kw)
        text = update_error_text(update_code)
        if what == "image erase" and update_code is UpdateErrorCode.BUSY:
            text = "the slot is running, or holds the image a test boot reverts to"
        return UpdateStepRefused(f"device refused the {'erase' if what == 'image erase' else 'update'}: "
                                 f"{text} (update error {n}, {_rc_text(rc)})", update_code=update_code, **kw)
    meaning = MGMT_ERR_TEXT.get(code, "unknown code") if isinstance(code, MgmtErr) else "unknown code"
    detail = f": {rsn}" if rsn else ""
    cls = CommandNotSupported if code == MgmtErr.ENOTSUP else SMPError
    return cls(f"{what} failed: {_rc_text(rc)} ({meaning}){detail}", **kw)


def _v2_error(err: dict[str, Any], what: str) -> SMPError | None:
    group, rc = err.get("group"), err.get("rc")
    if not isinstance(group, int) or not isinstance(rc, int):
        return SMPError(f"{what}: malformed error {err!r} in the response")
    if rc == 0:
        return None
    kw: dict[str, Any] = {"err_group": group, "err_rc": rc}
    if group == Group.IMAGE:
        text = f"image group error {_name(ImgMgmtErr, rc)}"
        if rc in _IMAGE_REFUSAL_CODES:
            return ImageRefused(f"device refused the image: {text}", **kw)
        return SMPError(f"{what} failed: {text}", **kw)
    if group == Group.OS:
        return SMPError(f"{what} failed: OS group error {rc}", **kw)
    if group == Group.MPBOOT:
        return _factory_error(rc, what, f"mpboot group rc {rc}", **kw)
    return SMPError(f"{what} failed: group {group} error {rc}", **kw)
