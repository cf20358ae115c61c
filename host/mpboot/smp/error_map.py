"""How an SMP error reply becomes an mpboot error: the wire mapping, done once, here. The
types and code enums themselves are in mpboot.errors.

An SMP v1 error is `{"rc": MGMT_ERR, "rsn": "..."}`; mpboot devices put a machine-readable
reason in `rsn`: "image:N" (ImageErrorCode), "update:N" (UpdateErrorCode), "factory:N"
(FactoryErrorCode) or "trust:N" (TrustErrorCode). An SMP v2 error is
`{"err": {"group": G, "rc": R}}` with the group's own code (ImgMgmtErrorCode for the image
group; FactoryErrorCode or TrustErrorCode, disjoint numbers, for the mpboot group).
`error_from_response` turns either into one SMPError subclass whose message is one line fit
for a user:

    device refused the image: image is for another vendor (vendor id) (image error 16, SMP rc 3 EINVAL)
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from mpboot.errors import (
    ZUPLOAD_BAD_CHUNK,
    CommandNotSupported,
    CompressedChunkRefused,
    FactoryRefused,
    ImageRefused,
    ImgMgmtErrorCode,
    MgmtErrorCode,
    SMPError,
    TrustErrorCode,
    TrustRefused,
    UpdateRefused,
    WireDetails,
)
from mpboot.smp.header import Group

MGMT_ERR_TEXT: dict[MgmtErrorCode, str] = {
    MgmtErrorCode.EOK: "no error",
    MgmtErrorCode.EUNKNOWN: "unknown error",
    MgmtErrorCode.ENOMEM: "out of memory",
    MgmtErrorCode.EINVAL: "invalid value",
    MgmtErrorCode.ETIMEOUT: "timed out",
    MgmtErrorCode.ENOENT: "no such entry",
    MgmtErrorCode.EBADSTATE: "not allowed in the current state",
    MgmtErrorCode.EMSGSIZE: "message too large",
    MgmtErrorCode.ENOTSUP: "command not supported",
    MgmtErrorCode.ECORRUPT: "corrupt data",
    MgmtErrorCode.EBUSY: "busy",
    MgmtErrorCode.EACCESSDENIED: "access denied",
    MgmtErrorCode.UNSUPPORTED_TOO_OLD: "SMP version too old for the device",
    MgmtErrorCode.UNSUPPORTED_TOO_NEW: "SMP version too new for the device",
}


# Image-group v2 codes that mean "this image is not acceptable" (docs/PROTOCOL.md table).
_IMAGE_REFUSAL_CODES = frozenset({
    ImgMgmtErrorCode.INVALID_TLV, ImgMgmtErrorCode.TLV_MULTIPLE_HASHES_FOUND, ImgMgmtErrorCode.TLV_INVALID_SIZE,
    ImgMgmtErrorCode.INVALID_IMAGE_HEADER, ImgMgmtErrorCode.INVALID_IMAGE_HEADER_MAGIC, ImgMgmtErrorCode.INVALID_HASH,
    ImgMgmtErrorCode.CURRENT_VERSION_IS_NEWER, ImgMgmtErrorCode.INVALID_IMAGE_TOO_LARGE,
    ImgMgmtErrorCode.INVALID_LENGTH, ImgMgmtErrorCode.INVALID_IMAGE_VECTOR_TABLE,
})
# Image-group v2 codes of an update step (or erase) the updater refused: no slot to write
# (mpboot: a test boot runs, or a permanent image waits for its reset), data past `len`.
_UPDATE_REFUSAL_CODES = frozenset({ImgMgmtErrorCode.NO_FREE_SLOT, ImgMgmtErrorCode.INVALID_IMAGE_DATA_OVERRUN})


def _name(enum: type[IntEnum], value: int) -> str:
    try:
        return f"{value} {enum(value).name}"
    except ValueError:
        return str(value)


def _rc_text(rc: int) -> str:
    try:
        code = MgmtErrorCode(rc)
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
    code: MgmtErrorCode | int
    try:
        code = MgmtErrorCode(rc)
    except ValueError:
        code = rc
    wire = WireDetails(rc=code, rsn=rsn)
    kind, _, number = (rsn or "").partition(":")
    if kind == "stage1" and number in _STAGE1_TEXT:
        return UpdateRefused(f"{what} refused: {_STAGE1_TEXT[number]} ({_rc_text(rc)})", **wire)
    if kind == "probe" and number.isdigit() and int(number) in _PROBE_TEXT:
        return SMPError(f"{what} failed: {_PROBE_TEXT[int(number)]} ({_rc_text(rc)})", **wire)
    if number.isdigit():
        if kind == "factory":
            return FactoryRefused.from_number(int(number), what, _rc_text(rc), **wire)
        if kind == "image":
            return ImageRefused.from_number(int(number), _rc_text(rc), **wire)
        if kind == "update":
            return UpdateRefused.from_number(int(number), _rc_text(rc), erase=what == "image erase", **wire)
        if kind == "trust" and int(number) in _TRUST_CODES:
            return _trust_refused(int(number), _rc_text(rc), wire)
        if kind == "zupload" and int(number) == ZUPLOAD_BAD_CHUNK:
            return _chunk_refused(_rc_text(rc), wire)
    meaning = MGMT_ERR_TEXT.get(code, "unknown code") if isinstance(code, MgmtErrorCode) else "unknown code"
    detail = f": {rsn}" if rsn else ""
    cls = CommandNotSupported if code == MgmtErrorCode.ENOTSUP else SMPError
    return cls(f"{what} failed: {_rc_text(rc)} ({meaning}){detail}", **wire)


def _v2_error(err: dict[str, Any], what: str) -> SMPError | None:
    group, rc = err.get("group"), err.get("rc")
    if not isinstance(group, int) or not isinstance(rc, int):
        return SMPError(f"{what}: malformed error {err!r} in the response")
    if rc == 0:
        return None
    wire = WireDetails(err_group=group, err_rc=rc)
    if group == Group.IMAGE:
        text = f"image group error {_name(ImgMgmtErrorCode, rc)}"
        if rc in _IMAGE_REFUSAL_CODES:
            return ImageRefused(f"device refused the image: {text}", **wire)
        if rc in _UPDATE_REFUSAL_CODES:
            return UpdateRefused(f"device refused the {'erase' if what == 'image erase' else 'update'}: {text}",
                                 **wire)
        return SMPError(f"{what} failed: {text}", **wire)
    if group == Group.OS:
        return SMPError(f"{what} failed: OS group error {rc}", **wire)
    if group == Group.MPBOOT:
        if rc in _TRUST_CODES:
            return _trust_refused(rc, f"mpboot group rc {rc}", wire)
        if rc == ZUPLOAD_BAD_CHUNK:
            return _chunk_refused(f"mpboot group rc {rc}", wire)
        if rc in _PROBE_TEXT:
            return SMPError(f"{what} failed: {_PROBE_TEXT[rc]} (mpboot group rc {rc})", **wire)
        return FactoryRefused.from_number(rc, what, f"mpboot group rc {rc}", **wire)
    return SMPError(f"{what} failed: group {group} error {rc}", **wire)


_TRUST_CODES = frozenset(c.value for c in TrustErrorCode)
# Stage 1's refusals (docs/PROTOCOL.md, "Stage 1"): v1 `rsn` "stage1:test", "stage1:unproven"
# (v2: image group 32 IMAGE_CONFIRMATION_DENIED), and the probe's group-64 codes.
_STAGE1_TEXT = {
    "test": "a stage-1 image is confirmed only on its own test boot, once proven: mark it for a test "
            "boot instead (mpboot flash --image stage1 --test --reset)",
    "unproven": "stage 1 runs its test boot unproven: an upload or a probe must complete over this link "
                "first (mpboot confirm --image stage1 probes, then confirms)",
}
_PROBE_TEXT = {
    26: "the device refused the probe: a request out of order, or a length out of bounds",
    27: "the probe's bytes arrived changed: their hash does not match (the link corrupts data)",
}


def _trust_refused(number: int, where: str, wire: WireDetails) -> TrustRefused:
    """The device's refusal of a trust record (group 64 command 6): the same type as the
    host's trust rules raise, with the wire details."""
    code = TrustErrorCode(number)
    return TrustRefused(code, f"refused by the device: trust error {number} {code.name}, {where}", **wire)


def _chunk_refused(where: str, wire: WireDetails) -> CompressedChunkRefused:
    return CompressedChunkRefused(f"device refused a compressed upload chunk: not one whole deflate stream "
                                  f"of its announced length, or out of bounds (zupload error "
                                  f"{ZUPLOAD_BAD_CHUNK}, {where})", **wire)
