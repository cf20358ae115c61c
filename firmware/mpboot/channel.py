# The channel record (docs/KEYS.md section 3, body type 4): which image a channel ("stable")
# of one vendor and class points at, numbered. Stage 0 (firmware/manifest.py): it decides
# whether a device takes a record, and keeps the highest number taken in the trust area;
# mpboot.puller (not stage 0) fetches records and images over HTTP and calls it. The host's
# twin is host/mpboot/channel.py; the golden vectors (tests/vectors/channel/) hold both to the
# same verdicts. Kept out of mpboot.records so that a board that never pulls loads none of it.
#
# Checks, in this order (cheap first; docs/THREAT_MODEL.md "Device pull"): size and format
# (parse), then check(): channel name, vendor and class, number against the highest taken,
# signature (a root threshold, or a key certified for kind channel and this scope), security
# counter against the floor. Errors: ChannelError(code, detail), codes as mpboot.puller's.
import struct
from micropython import const

from mpboot import records
from mpboot.records import C_KEY, MAX_RECORD, TrustError
from mpboot.trust import REVOKED_KEYS, ROOTS, THRESHOLD

CHANNEL = const(4)  # the body type
KIND_CHANNEL = const(8)  # the certificate kind bit that lets a key sign channel records

# ChannelError codes (mpboot.puller E_*, host mpboot.errors.PullErrorCode: same numbers).
E_TOO_LARGE = const(3)
E_STALE = const(4)  # detail: the highest number taken
E_SIGNATURE = const(5)  # detail: records.E_SIGNATURES
E_PRODUCT = const(7)
E_RECORD = const(8)  # detail: records.E_MALFORMED
E_IMAGE = const(10)  # detail: 18, mpboot.slots.E_COUNTER_BELOW_FLOOR

_TYPE = const(1)
_H_NUMBER = const(30)
_H_NAME = const(31)
_H_VENDOR = const(32)
_H_CLASS = const(33)
_H_SHA = const(34)
_H_LEN = const(35)
_H_VERSION = const(36)
_H_COUNTER = const(37)
_H_PATH = const(38)
_H_CERTS = const(39)
_MAX_NAME = const(16)
_MAX_PATH = const(128)
_MAX_CHAIN = const(3)
_DIGEST = const(24)  # bytes of a taken record's signed digest kept beside its number
_U32 = const(0xFFFFFFFF)
_E_MALFORMED = const(17)  # records.E_MALFORMED
_E_SIGNATURES = const(18)  # records.E_SIGNATURES
_E_COUNTER_BELOW_FLOOR = const(18)  # mpboot.slots'

# A parsed channel record: a list read by these indices.
H_NUMBER = const(0)
H_NAME = const(1)  # str
H_VENDOR = const(2)  # 16 bytes
H_CLASS = const(3)
H_SHA = const(4)  # SHA-256 of the whole image file (32 bytes)
H_LEN = const(5)  # the image file's length
H_VERSION = const(6)  # 8 bytes, header layout
H_COUNTER = const(7)  # security counter
H_PATH = const(8)  # str: the image's URL relative to the record's
H_CERTS = const(9)  # list of certificate envelopes (memoryviews), parent first; [] none
H_DIGEST = const(10)  # the signed digest (SHA-256 of context || body): names the record
H_SIGS = const(11)  # signatures as records.open_envelope gives them


class ChannelError(Exception):
    # raise ChannelError(code, detail)
    pass


def _need(cond):
    if not cond:
        raise ValueError


def _uint(v, lo):
    _need(type(v) is int and lo <= v <= _U32)
    return v


def _bstr(v, n):
    _need(type(v) is memoryview and (not n or len(v) == n))
    return bytes(v) if n else v


def _text(v, most):
    _need(type(v) is str and 1 <= len(v) <= most)
    return v


def parse(buf):
    # The channel record in buf as the H_* list; ChannelError(E_TOO_LARGE / E_RECORD). Only
    # its format here: check() does the rest.
    if len(buf) > MAX_RECORD:
        raise ChannelError(E_TOO_LARGE, 0)
    try:
        f, sigs, digest = records.open_envelope(buf)
        for k in f:
            _need(k == _TYPE or _H_NUMBER <= k <= _H_CERTS)
        _need(f.get(_TYPE) == CHANNEL)
        certs = f.get(_H_CERTS)
        if certs is not None:
            _need(type(certs) is list and 1 <= len(certs) <= _MAX_CHAIN)
            for c in certs:
                _bstr(c, 0)
        path = _text(f.get(_H_PATH), _MAX_PATH)
        # A relative path below the record's directory: no scheme, host or parent.
        _need(path[0] != "/" and ":" not in path and ".." not in path and "\\" not in path)
        for ch in path:
            _need(" " < ch < "\x7f")
        return [
            _uint(f.get(_H_NUMBER), 1),
            _text(f.get(_H_NAME), _MAX_NAME),
            _bstr(f.get(_H_VENDOR), 16),
            _bstr(f.get(_H_CLASS), 16),
            _bstr(f.get(_H_SHA), 32),
            _uint(f.get(_H_LEN), 1),
            _bstr(f.get(_H_VERSION), 8),
            _uint(f.get(_H_COUNTER), 0),
            path,
            certs or [],
            digest,
            sigs,
        ]
    except (ValueError, TrustError):
        raise ChannelError(E_RECORD, _E_MALFORMED)


def signed(ch, trust):
    # Whether the record ch is signed by a root threshold of `trust`, or by a key its
    # certificates (H_CERTS, each issued as in an image: records.add) certify for kind
    # channel, its vendor, class and counter. A signature by a trusted key that does not
    # verify, or a certificate that does not parse, is False too.
    sigs = ch[H_SIGS]
    digest = ch[H_DIGEST]
    n, _ = records.count(sigs, digest, trust[ROOTS], trust[REVOKED_KEYS])
    if n < 0:
        return False
    if n >= trust[THRESHOLD]:
        return True
    info = {"vendor_id": ch[H_VENDOR], "class_id": ch[H_CLASS], "security_counter": ch[H_COUNTER],
            "kind": KIND_CHANNEL}
    certified = []
    for c in ch[H_CERTS]:
        if records.add(c, trust, certified, info) < 0:
            return False
    # As a certificate's issuer (records.issue): the first signature by a certified key
    # decides; records.add appended its scope verdict for this record last.
    for s in sigs:
        for c in certified:
            if c[C_KEY][0] == s[0]:
                return c[-1] and records.signature_ok(s[1], c[C_KEY], s[2], digest)
    return False


def check(ch, trust, vendor_id, class_id, name, taken, taken_digest, floor):
    # The checks of an opened record ch after its format, in order: product (channel name,
    # vendor, class), number against the highest taken (`taken`, and a prefix of that
    # record's digest), signature under `trust`, security counter against `floor`. Raises
    # ChannelError.
    if ch[H_NAME] != name or ch[H_VENDOR] != vendor_id or ch[H_CLASS] != class_id:
        raise ChannelError(E_PRODUCT, 0)
    number = ch[H_NUMBER]
    if number < taken or number == taken and ch[H_DIGEST][: len(taken_digest)] != taken_digest:
        raise ChannelError(E_STALE, taken)
    if not signed(ch, trust):
        raise ChannelError(E_SIGNATURE, _E_SIGNATURES)
    if ch[H_COUNTER] < floor:
        raise ChannelError(E_IMAGE, _E_COUNTER_BELOW_FLOOR)


def taken(store):
    # The highest channel number the trust area (mpboot.trust.TrustStore) holds, and the
    # first _DIGEST bytes of that record's signed digest: (0, zeros) when none was taken.
    t = store.tail()
    return struct.unpack_from("<I", t, 0)[0], bytes(t[4:])


def take(store, trust, ch):
    # Keeps ch's number and digest prefix in the trust area when the number is above the one
    # there: a whole trust record written twice, as every trust save, so it only grows. OSError
    # when the flash write fails.
    if ch[H_NUMBER] > taken(store)[0]:
        t = bytearray(4 + _DIGEST)
        struct.pack_into("<I", t, 0, ch[H_NUMBER])
        t[4:] = ch[H_DIGEST][:_DIGEST]
        store.save(trust, t)
