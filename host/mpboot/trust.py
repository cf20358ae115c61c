"""The trust model (docs/KEYS.md): certificates and trust records in their signed CBOR
envelope, signing them, and the trust state a device keeps, with the device's rules for
taking a record.

The host's one implementation; the device's is firmware/mpboot/records.py and trust.py. The
golden vectors in tests/vectors/trust/ hold both to the same answers. Images use this module
(mpboot.image checks the certificates an image carries); it never imports mpboot.image.

Decoding is strict and raises TrustRefused(MALFORMED) for anything KEYS.md sections 2-3 do
not allow; building checks the same rules on entry and raises UsageError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag
from typing import Any, TypeVar

import cbor2
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mpboot.errors import ImageRejected, MpbootError, TrustErrorCode, TrustRefused, UsageError
from mpboot.keys import KEY_TYPES, PUBLIC_EXPONENT, PublicKey, SignatureScheme
from mpboot.signing import Signer

# The 16 bytes in front of a body before it is hashed: a trust signature can never stand for
# an image signature (an image digest covers bytes starting with the image magic).
TRUST_DOMAIN = b"mpboot trust v1\x00"
MAX_ENVELOPE_SIGNATURES = 8
MAX_BODY_SIZE = 2048
MAX_RECORD_SIZE = 4096  # a whole record envelope, as the device's trust command takes it
MAX_ROOTS = 4
MAX_VENDORS = 4
MAX_CLASSES = 8
MAX_DEPTH = 3
ROOT_DEPTH = 4  # a root-issued certificate's issuer scope: everything, depth 4
MAX_REVOKED = 16  # key hashes, and serials, one revocation record lists
# Signatures an image may carry (and so the highest image threshold): bounds the RSA work.
MAX_IMAGE_SIGNATURES = 6
U32_MAX = 0xFFFFFFFF
ALL_KINDS = U32_MAX  # a certificate without kinds covers every kind
KEYHASH_SIZE = 32
UUID_SIZE = 16


class BodyType(IntEnum):
    CERTIFICATE = 1
    ROOT = 2
    REVOCATION = 3
    CHANNEL = 4

    @property
    def words(self) -> str:
        """For people: "certificate", "root record", "revocation record"."""
        return "certificate" if self is BodyType.CERTIFICATE else f"{self.name.lower()} record"


class SignatureAlg(IntEnum):
    """An envelope signature's algorithm: the numbers of the image signature TLVs."""

    RSA2048_PSS = 0x20
    RSA3072_PSS = 0x23
    RSA_PKCS1V15 = 0xA0


class ImageKind(IntFlag):
    """What an image is (the protected TLV MPBOOT_KIND; app when absent), and the kinds a
    certificate may sign for."""

    APP = 1
    UPDATER = 2
    FIRMWARE = 4  # the MicroPython firmware itself (esp32: an ESP-IDF app image as payload)


# CBOR map keys (KEYS.md sections 2-3).
_ENV_BODY = 1
_ENV_SIGNATURES = 2
_TYPE = 1
_SERIAL = 2
_KEY = 3
_VENDORS = 4
_CLASSES = 5
_COUNTERS = 6
_KINDS = 7
_DEPTH = 8
_VERSION = 10
_ROOT_KEYS = 11
_THRESHOLD = 12
_IMAGE_THRESHOLD = 13
_NUMBER = 20
_REVOKED_KEYS = 21
_REVOKED_SERIALS = 22
_CH_NUMBER = 30
_CH_NAME = 31
_CH_VENDOR = 32
_CH_CLASS = 33
_CH_SHA = 34
_CH_LENGTH = 35
_CH_VERSION = 36
_CH_COUNTER = 37
_CH_PATH = 38
_CH_CERTS = 39

# The certificate kind bit that lets a key sign channel records (a certificate without kinds
# covers it too, as it covers every kind).
CHANNEL_KIND = 8
MAX_CHANNEL_NAME = 16
MAX_CHANNEL_PATH = 128
MAX_CHANNEL_CERTS = 3


class _Invalid(Exception):
    """A value breaks a rule of KEYS.md: MALFORMED when decoding, UsageError when building."""


def _require(ok: bool, detail: str) -> None:
    if not ok:
        raise _Invalid(detail)


def _uint(value: object, lo: int, hi: int, what: str) -> int:
    # type() and not isinstance(): a CBOR true decodes to Python True, which is an int.
    _require(type(value) is int and lo <= value <= hi, f"{what} must be an unsigned integer {lo}..{hi}")
    assert isinstance(value, int)
    return value


def _bstr(value: object, what: str, size: int | None = None) -> bytes:
    _require(type(value) is bytes, f"{what} must be a byte string")
    assert isinstance(value, bytes)
    _require(size is None or len(value) == size, f"{what} must be {size} bytes")
    return value


def _array(value: object, lo: int, hi: int, what: str) -> list[Any]:
    _require(type(value) is list, f"{what} must be an array")
    assert isinstance(value, list)
    _require(lo <= len(value) <= hi, f"{what} must have {lo}..{hi} entries, has {len(value)}")
    return value


def _fields(value: object, required: Iterable[int], optional: Iterable[int], what: str) -> dict[int, Any]:
    _require(type(value) is dict, f"{what} must be a map")
    assert isinstance(value, dict)
    allowed = set(required) | set(optional)
    for key in value:
        _require(type(key) is int and key in allowed, f"{what} has an unknown key {key!r}")
    for key in required:
        _require(key in value, f"{what} lacks its key {key}")
    return value


def _canonical(data: bytes, what: str) -> object:
    """Decode one CBOR item that must be the whole of `data`, in canonical form (definite
    lengths, shortest forms, sorted map keys: re-encoding gives the same bytes)."""
    try:
        value = cbor2.loads(data)
        again = cbor2.dumps(value, canonical=True)
    except Exception as err:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise _Invalid(f"{what} is not CBOR ({err})") from None
    _require(again == data, f"{what} is not canonical CBOR (or has bytes after it)")
    return value


def _encode(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def public_key_from_der(der: bytes) -> PublicKey:
    """A key as certificates and root records carry it: PKCS#1 RSAPublicKey DER of an RSA-2048
    or 3072 key, e = 65537, in its one minimal encoding (so its hash names it uniquely)."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise _Invalid("a key is not PKCS#1 RSAPublicKey DER") from None
    _require(isinstance(key, rsa.RSAPublicKey), "a key is not an RSA key")
    assert isinstance(key, rsa.RSAPublicKey)
    _require(key.key_size in KEY_TYPES.values(), f"a key is RSA-{key.key_size}, not 2048 or 3072")
    _require(key.public_numbers().e == PUBLIC_EXPONENT, "a key's exponent is not 65537")
    public = PublicKey(key)
    _require(public.pkcs1_der() == der, "a key is not in minimal PKCS#1 RSAPublicKey DER")
    return public


def _distinct_moduli(keys: Iterable[PublicKey]) -> int:
    return len({k.modulus for k in keys})


# --- bodies -------------------------------------------------------------------------------


_B = TypeVar("_B")


def _built(make: Callable[[], _B]) -> _B:
    """A body built from decoded values: its own checks (UsageError, for callers building
    one) are MALFORMED here."""
    try:
        return make()
    except UsageError as err:
        raise _Invalid(str(err)) from None


def _check_uuids(values: Sequence[bytes] | None, most: int, what: str) -> None:
    if values is not None:
        _require(1 <= len(values) <= most, f"{what} must list 1..{most} ids, has {len(values)}")
        for v in values:
            _bstr(v, f"a {what[:-1]} id", UUID_SIZE)


@dataclass(frozen=True)
class Certificate:
    """Binds `key` to a scope (KEYS.md section 3, type 1). None for vendors, classes,
    counters or kinds means "any" (the key is absent from the body)."""

    serial: int
    key: PublicKey
    vendors: tuple[bytes, ...] | None = None
    classes: tuple[bytes, ...] | None = None
    counters: tuple[int, int] | None = None
    kinds: int | None = None
    depth: int = 0

    def __post_init__(self) -> None:
        try:
            self.check()
        except _Invalid as err:
            raise UsageError(f"certificate: {err}") from None

    def check(self) -> None:
        _uint(self.serial, 1, U32_MAX, "serial")
        _check_uuids(self.vendors, MAX_VENDORS, "vendors")
        _check_uuids(self.classes, MAX_CLASSES, "classes")
        if self.counters is not None:
            lo, hi = self.counters
            _uint(lo, 0, U32_MAX, "counter low")
            _uint(hi, lo, U32_MAX, "counter high (at least the low)")
        if self.kinds is not None:
            _uint(self.kinds, 1, U32_MAX, "kinds")
        _uint(self.depth, 0, MAX_DEPTH, "depth")

    @property
    def counter_range(self) -> tuple[int, int]:
        return self.counters if self.counters is not None else (0, U32_MAX)

    @property
    def kind_mask(self) -> int:
        return self.kinds if self.kinds is not None else ALL_KINDS

    def covers(self, vendor_id: bytes | None, class_id: bytes | None, counter: int, kind: int) -> bool:
        """Whether an image with these protected values (counter 0 when it has no SEC_CNT,
        kind APP when it has no MPBOOT_KIND) is inside this certificate's scope."""
        if self.vendors is not None and vendor_id not in self.vendors:
            return False
        if self.classes is not None and class_id not in self.classes:
            return False
        lo, hi = self.counter_range
        return lo <= counter <= hi and kind & self.kind_mask != 0

    def within(self, issuer: Certificate | None) -> bool:
        """Whether this certificate is at most as wide as `issuer` (None: issued by a root
        threshold, whose scope is everything at depth ROOT_DEPTH)."""
        if issuer is None:
            return self.depth < ROOT_DEPTH
        for mine, theirs in ((self.vendors, issuer.vendors), (self.classes, issuer.classes)):
            if theirs is not None and (mine is None or not set(mine) <= set(theirs)):
                return False
        lo, hi = self.counter_range
        issuer_lo, issuer_hi = issuer.counter_range
        return (issuer_lo <= lo and hi <= issuer_hi and self.kind_mask & ~issuer.kind_mask == 0
                and self.depth < issuer.depth)

    def encode(self) -> bytes:
        """The canonical CBOR body."""
        body: dict[int, Any] = {_TYPE: BodyType.CERTIFICATE.value, _SERIAL: self.serial,
                                _KEY: self.key.pkcs1_der()}
        if self.vendors is not None:
            body[_VENDORS] = list(self.vendors)
        if self.classes is not None:
            body[_CLASSES] = list(self.classes)
        if self.counters is not None:
            body[_COUNTERS] = list(self.counters)
        if self.kinds is not None:
            body[_KINDS] = self.kinds
        if self.depth:
            body[_DEPTH] = self.depth
        return _encode(body)

    @classmethod
    def _from_fields(cls, f: dict[int, Any]) -> Certificate:
        _fields(f, (_TYPE, _SERIAL, _KEY), (_VENDORS, _CLASSES, _COUNTERS, _KINDS, _DEPTH), "certificate")
        vendors = classes = counters = None
        if _VENDORS in f:
            vendors = tuple(_array(f[_VENDORS], 1, MAX_VENDORS, "vendors"))
        if _CLASSES in f:
            classes = tuple(_array(f[_CLASSES], 1, MAX_CLASSES, "classes"))
        if _COUNTERS in f:
            lo, hi = _array(f[_COUNTERS], 2, 2, "counters")
            counters = (_uint(lo, 0, U32_MAX, "counter low"), _uint(hi, 0, U32_MAX, "counter high"))
            _require(counters[0] <= counters[1], "counters must have low <= high")
        return _built(lambda: cls(f[_SERIAL], public_key_from_der(_bstr(f[_KEY], "key")), vendors, classes,
                                  counters, f.get(_KINDS), f.get(_DEPTH, 0)))


@dataclass(frozen=True)
class RootRecord:
    """Root set `version`: its keys and thresholds (KEYS.md section 3, type 2)."""

    version: int
    keys: tuple[PublicKey, ...]
    threshold: int
    image_threshold: int

    def __post_init__(self) -> None:
        try:
            self.check()
        except _Invalid as err:
            raise UsageError(f"root record: {err}") from None

    def check(self) -> None:
        _uint(self.version, 2, U32_MAX, "version")
        _require(1 <= len(self.keys) <= MAX_ROOTS, f"a root set has 1..{MAX_ROOTS} keys, not {len(self.keys)}")
        _require(_distinct_moduli(self.keys) == len(self.keys), "the roots must be distinct keys")
        _uint(self.threshold, 1, len(self.keys), "threshold")
        _uint(self.image_threshold, 1, MAX_IMAGE_SIGNATURES, "image threshold")

    def encode(self) -> bytes:
        return _encode({_TYPE: BodyType.ROOT.value, _VERSION: self.version,
                        _ROOT_KEYS: [k.pkcs1_der() for k in self.keys], _THRESHOLD: self.threshold,
                        _IMAGE_THRESHOLD: self.image_threshold})

    @classmethod
    def _from_fields(cls, f: dict[int, Any]) -> RootRecord:
        _fields(f, (_TYPE, _VERSION, _ROOT_KEYS, _THRESHOLD, _IMAGE_THRESHOLD), (), "root record")
        keys = tuple(public_key_from_der(_bstr(k, "a root key"))
                     for k in _array(f[_ROOT_KEYS], 1, MAX_ROOTS, "keys"))
        return _built(lambda: cls(f[_VERSION], keys, f[_THRESHOLD], f[_IMAGE_THRESHOLD]))


@dataclass(frozen=True)
class RevocationRecord:
    """The whole revocation list, numbered (KEYS.md section 3, type 3): revoked key hashes
    and certificate serials."""

    number: int
    keys: tuple[bytes, ...] = ()
    serials: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            self.check()
        except _Invalid as err:
            raise UsageError(f"revocation record: {err}") from None

    def check(self) -> None:
        _uint(self.number, 1, U32_MAX, "number")
        _require(len(self.keys) <= MAX_REVOKED, f"at most {MAX_REVOKED} revoked keys, not {len(self.keys)}")
        _require(len(self.serials) <= MAX_REVOKED, f"at most {MAX_REVOKED} revoked serials, not {len(self.serials)}")
        for h in self.keys:
            _bstr(h, "a revoked key hash", KEYHASH_SIZE)
        for s in self.serials:
            _uint(s, 1, U32_MAX, "a revoked serial")  # (certificate serials start at 1)

    def encode(self) -> bytes:
        body: dict[int, Any] = {_TYPE: BodyType.REVOCATION.value, _NUMBER: self.number}
        if self.keys:
            body[_REVOKED_KEYS] = list(self.keys)
        if self.serials:
            body[_REVOKED_SERIALS] = list(self.serials)
        return _encode(body)

    @classmethod
    def _from_fields(cls, f: dict[int, Any]) -> RevocationRecord:
        _fields(f, (_TYPE, _NUMBER), (_REVOKED_KEYS, _REVOKED_SERIALS), "revocation record")
        keys = tuple(_array(f.get(_REVOKED_KEYS, []), 0, MAX_REVOKED, "revoked keys"))
        serials = tuple(_array(f.get(_REVOKED_SERIALS, []), 0, MAX_REVOKED, "revoked serials"))
        return _built(lambda: cls(f[_NUMBER], keys, serials))


def _check_channel_path(path: object) -> str:
    """A channel record's image path: relative to the record's URL, printable ASCII, no
    scheme, host, parent or backslash (the device's mpboot.channel.parse rule)."""
    _require(type(path) is str and 1 <= len(path) <= MAX_CHANNEL_PATH,
             f"path must be text of 1..{MAX_CHANNEL_PATH} characters")
    assert isinstance(path, str)
    _require(not path.startswith("/") and ":" not in path and ".." not in path and "\\" not in path
             and all(" " < c < "\x7f" for c in path),
             f"path {path!r} must be relative (no '/' first, ':', '..', '\\', spaces or non-ASCII)")
    return path


@dataclass(frozen=True)
class ChannelRecord:
    """Which image a channel of one vendor/class points at (KEYS.md section 3, type 4): the
    device pulls it (mpboot.pull) and takes it only with a number not below the highest it
    has taken. `certificates`: certificate envelopes (parent first) for a delegated signer."""

    number: int
    name: str
    vendor_id: bytes
    class_id: bytes
    sha256: bytes  # SHA-256 of the whole signed image file
    length: int
    version: bytes  # 8 bytes, header layout
    counter: int
    path: str
    certificates: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        try:
            self.check()
        except _Invalid as err:
            raise UsageError(f"channel record: {err}") from None

    def check(self) -> None:
        _uint(self.number, 1, U32_MAX, "number")
        _require(type(self.name) is str and 1 <= len(self.name) <= MAX_CHANNEL_NAME,
                 f"name must be text of 1..{MAX_CHANNEL_NAME} characters")
        _bstr(self.vendor_id, "vendor id", UUID_SIZE)
        _bstr(self.class_id, "class id", UUID_SIZE)
        _bstr(self.sha256, "sha256", 32)
        _uint(self.length, 1, U32_MAX, "length")
        _bstr(self.version, "version", 8)
        _uint(self.counter, 0, U32_MAX, "counter")
        _check_channel_path(self.path)
        _require(len(self.certificates) <= MAX_CHANNEL_CERTS,
                 f"at most {MAX_CHANNEL_CERTS} certificates, not {len(self.certificates)}")
        for c in self.certificates:
            _bstr(c, "a certificate")

    def encode(self) -> bytes:
        body: dict[int, Any] = {_TYPE: BodyType.CHANNEL.value, _CH_NUMBER: self.number, _CH_NAME: self.name,
                                _CH_VENDOR: self.vendor_id, _CH_CLASS: self.class_id, _CH_SHA: self.sha256,
                                _CH_LENGTH: self.length, _CH_VERSION: self.version, _CH_COUNTER: self.counter,
                                _CH_PATH: self.path}
        if self.certificates:
            body[_CH_CERTS] = list(self.certificates)
        return _encode(body)

    @classmethod
    def _from_fields(cls, f: dict[int, Any]) -> ChannelRecord:
        required = (_TYPE, _CH_NUMBER, _CH_NAME, _CH_VENDOR, _CH_CLASS, _CH_SHA, _CH_LENGTH, _CH_VERSION,
                    _CH_COUNTER, _CH_PATH)
        _fields(f, required, (_CH_CERTS,), "channel record")
        certs = tuple(_array(f[_CH_CERTS], 1, MAX_CHANNEL_CERTS, "certificates")) if _CH_CERTS in f else ()
        return _built(lambda: cls(f[_CH_NUMBER], f[_CH_NAME], f[_CH_VENDOR], f[_CH_CLASS], f[_CH_SHA],
                                  f[_CH_LENGTH], f[_CH_VERSION], f[_CH_COUNTER], f[_CH_PATH], certs))


Body = Certificate | RootRecord | RevocationRecord | ChannelRecord
_BODY_TYPES: dict[int, Any] = {BodyType.CERTIFICATE: Certificate, BodyType.ROOT: RootRecord,
                               BodyType.REVOCATION: RevocationRecord, BodyType.CHANNEL: ChannelRecord}


def body_type(body: Body) -> BodyType:
    if isinstance(body, Certificate):
        return BodyType.CERTIFICATE
    if isinstance(body, ChannelRecord):
        return BodyType.CHANNEL
    return BodyType.ROOT if isinstance(body, RootRecord) else BodyType.REVOCATION


def decode_body(data: bytes) -> Body:
    """A body's canonical CBOR bytes, checked against every rule of KEYS.md section 3;
    TrustRefused(MALFORMED) otherwise."""
    try:
        _require(len(data) <= MAX_BODY_SIZE, f"body of {len(data)} bytes is over {MAX_BODY_SIZE}")
        fields = _canonical(data, "body")
        _require(type(fields) is dict, "body must be a map")
        assert isinstance(fields, dict)
        _require(_TYPE in fields, "body lacks its type (key 1)")
        kind = _uint(fields[_TYPE], 1, len(_BODY_TYPES), "body type")
        return _BODY_TYPES[kind]._from_fields(fields)  # type: ignore[no-any-return]
    except _Invalid as err:
        raise TrustRefused(TrustErrorCode.MALFORMED, str(err)) from None


# --- the envelope ---------------------------------------------------------------------------


def trust_digest(body: bytes) -> bytes:
    """What an envelope signature signs: SHA-256("mpboot trust v1" 0x00 || body)."""
    return hashlib.sha256(TRUST_DOMAIN + body).digest()


def signature_alg(bits: int, scheme: SignatureScheme) -> SignatureAlg:
    if scheme is SignatureScheme.PKCS1V15:
        return SignatureAlg.RSA_PKCS1V15
    return SignatureAlg.RSA2048_PSS if bits == 2048 else SignatureAlg.RSA3072_PSS


@dataclass(frozen=True)
class EnvelopeSignature:
    keyhash: bytes  # SHA-256 of the signer's PKCS#1 RSAPublicKey DER
    alg: SignatureAlg
    signature: bytes

    def fits(self, key: PublicKey) -> bool:
        """Whether this signature has the algorithm and length `key` makes."""
        if self.alg is SignatureAlg.RSA2048_PSS and key.bits != 2048:
            return False
        if self.alg is SignatureAlg.RSA3072_PSS and key.bits != 3072:
            return False
        return len(self.signature) == key.bits // 8

    @property
    def scheme(self) -> SignatureScheme:
        return SignatureScheme.PKCS1V15 if self.alg is SignatureAlg.RSA_PKCS1V15 else SignatureScheme.PSS


@dataclass(frozen=True)
class Envelope:
    """A body's bytes and the signatures over them (KEYS.md section 2). An envelope with no
    signature exists only as a file of the detached flow (`--no-sign`, then cosign): decode
    it with `unsigned_ok`; a device and every check here refuse it."""

    body: bytes
    signatures: tuple[EnvelopeSignature, ...] = ()

    @property
    def digest(self) -> bytes:
        return trust_digest(self.body)

    def encode(self) -> bytes:
        return _encode({_ENV_BODY: self.body,
                        _ENV_SIGNATURES: [[s.keyhash, int(s.alg), s.signature] for s in self.signatures]})

    @classmethod
    def decode(cls, data: bytes, *, unsigned_ok: bool = False) -> Envelope:
        """The envelope in `data` (its body bytes not decoded: decode_body); TrustRefused
        (MALFORMED) for anything section 2 does not allow."""
        try:
            fields = _fields(_canonical(data, "envelope"), (_ENV_BODY, _ENV_SIGNATURES), (), "envelope")
            body = _bstr(fields[_ENV_BODY], "body")
            _require(len(body) <= MAX_BODY_SIZE, f"body of {len(body)} bytes is over {MAX_BODY_SIZE}")
            entries = _array(fields[_ENV_SIGNATURES], 0 if unsigned_ok else 1, MAX_ENVELOPE_SIGNATURES,
                             "signatures")
            signatures = []
            for entry in entries:
                keyhash, alg, sig = _array(entry, 3, 3, "a signature")
                _uint(alg, 0, 0xFF, "a signature's alg")
                _require(alg in SignatureAlg._value2member_map_, f"unknown signature alg {alg:#x}")
                signatures.append(EnvelopeSignature(_bstr(keyhash, "a signer's key hash", KEYHASH_SIZE),
                                                    SignatureAlg(alg), _bstr(sig, "a signature")))
                _require(len(sig) in (2048 // 8, 3072 // 8), "a signature must be 256 or 384 bytes")
        except _Invalid as err:
            raise TrustRefused(TrustErrorCode.MALFORMED, str(err)) from None
        return cls(body, tuple(signatures))

    def verified_signers(self, trusted: Mapping[bytes, PublicKey],
                         error: Callable[[str], MpbootError]) -> list[PublicKey]:
        """The keys of `trusted` (by key hash) whose signature verified, each once, in
        signature order. A signature naming no key of `trusted` is skipped; one naming such
        a key with the wrong alg or length, or that does not verify, raises `error(detail)`."""
        found: dict[bytes, PublicKey] = {}
        for sig in self.signatures:
            key = trusted.get(sig.keyhash)
            if key is not None:
                self.check_signature(sig, key, error)
                found.setdefault(key.modulus, key)
        return list(found.values())

    def check_signature(self, sig: EnvelopeSignature, key: PublicKey, error: Callable[[str], MpbootError]) -> None:
        """Raise `error(detail)` unless `sig` is `key`'s signature over this body, with the
        algorithm and length `key` makes."""
        who = f"key {sig.keyhash.hex()[:16]}"
        if not sig.fits(key):
            raise error(f"{who}: {sig.alg.name} signature of {len(sig.signature)} bytes, RSA-{key.bits} key")
        try:
            key.verify_digest(sig.signature, self.digest, sig.scheme)
        except ImageRejected:
            raise error(f"{who}: signature does not verify") from None


@dataclass(frozen=True)
class Signed:
    """A decoded envelope and its decoded body."""

    envelope: Envelope
    body: Body

    @property
    def type(self) -> BodyType:
        return body_type(self.body)


def decode_signed(data: bytes, *, unsigned_ok: bool = False) -> Signed:
    """Envelope and body (TrustRefused MALFORMED for anything KEYS.md sections 2-3 refuse)."""
    envelope = Envelope.decode(data, unsigned_ok=unsigned_ok)
    return Signed(envelope, decode_body(envelope.body))


def sign_envelope(body: Body, signers: Sequence[Signer], scheme: SignatureScheme) -> bytes:
    """`body` in an envelope signed by each of `signers` in turn (none: the unsigned
    envelope of the detached flow, for add_signature)."""
    data = Envelope(body.encode()).encode()
    for key in signers:
        data = add_signature(data, key, scheme)
    return data


def add_signature(envelope: bytes, key: Signer, scheme: SignatureScheme) -> bytes:
    """`envelope` (signed or not) with one more signature, by `key`: the cosign flow, where
    each holder adds their own. UsageError for a key that already signed, a ninth signature,
    or an envelope over MAX_RECORD_SIZE."""
    signed = decode_signed(envelope, unsigned_ok=True)
    env = signed.envelope
    keyhash = key.public().keyhash()
    if any(s.keyhash == keyhash for s in env.signatures):
        raise UsageError(f"key {keyhash.hex()[:16]} has already signed this {signed.type.words}")
    if len(env.signatures) >= MAX_ENVELOPE_SIGNATURES:
        raise UsageError(f"this {signed.type.words} already has {MAX_ENVELOPE_SIGNATURES} signatures, "
                         "the most an envelope holds")
    sig = EnvelopeSignature(keyhash, signature_alg(key.bits, scheme), key.sign_digest(env.digest, scheme))
    data = replace(env, signatures=(*env.signatures, sig)).encode()
    if len(data) > MAX_RECORD_SIZE:
        raise UsageError(f"signed, the {signed.type.words} would be {len(data)} bytes, over {MAX_RECORD_SIZE}")
    return data


def chain_for(key: PublicKey, certificates: Sequence[bytes]) -> tuple[bytes, ...]:
    """The certificates among `certificates` an image needs for a signature by `key`: the one
    that certifies it and, recursively, those of its signers, each after the certificates of
    its own signers (parent first, as the verifier needs them). Empty when none certifies
    `key` (a root needs none)."""
    by_key: dict[bytes, tuple[bytes, Envelope]] = {}
    for data in certificates:
        signed = decode_signed(data)
        if not isinstance(signed.body, Certificate):
            raise UsageError(f"a {signed.type.words} is not a certificate")
        by_key.setdefault(signed.body.key.keyhash(), (data, signed.envelope))
    needed: dict[bytes, set[bytes]] = {}  # key hash -> the needed key hashes that signed its certificate
    wanted = [key.keyhash()]
    while wanted:
        keyhash = wanted.pop()
        if keyhash in by_key and keyhash not in needed:
            signers = {s.keyhash for s in by_key[keyhash][1].signatures if s.keyhash in by_key}
            needed[keyhash] = signers
            wanted.extend(signers)
    chain: list[bytes] = []
    placed: set[bytes] = set()
    while len(placed) < len(needed):
        ready = [h for h in needed if h not in placed and needed[h] <= placed]
        # a cycle (two certificates signed by each other's keys) cannot be ordered: given order
        for keyhash in ready or [h for h in needed if h not in placed][:1]:
            placed.add(keyhash)
            chain.append(by_key[keyhash][0])
    return tuple(chain)


# --- the trust state ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustState:
    """What a device trusts (KEYS.md sections 1 and 5): root set `version` with its roots and
    thresholds, and the revocation list numbered `revocation` (0: none taken)."""

    version: int
    roots: tuple[PublicKey, ...]
    threshold: int
    image_threshold: int
    revocation: int = 0
    revoked_keys: tuple[bytes, ...] = ()
    revoked_serials: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        distinct = _distinct_moduli(self.roots)
        if not self.roots:
            raise UsageError("a trust state needs at least one root key")
        if not 1 <= self.threshold <= distinct:
            raise UsageError(f"root threshold {self.threshold} is not within 1..{distinct} (the distinct roots)")
        if not 1 <= self.image_threshold <= MAX_IMAGE_SIGNATURES:
            raise UsageError(f"image threshold {self.image_threshold} is not within 1..{MAX_IMAGE_SIGNATURES}")

    @classmethod
    def initial(cls, roots: Sequence[PublicKey], threshold: int = 1, image_threshold: int = 1) -> TrustState:
        """Root set version 1, nothing revoked: a device with `roots` frozen into its firmware
        (mpboot_keys.KEYS, THRESHOLD, IMAGE_THRESHOLD) and a blank trust area."""
        return cls(1, tuple(roots), threshold, image_threshold)

    def is_revoked(self, key: PublicKey) -> bool:
        return key.keyhash() in self.revoked_keys

    def trusted_roots(self) -> dict[bytes, PublicKey]:
        """The roots whose signatures count, by key hash: revoked roots count for nothing."""
        return {k.keyhash(): k for k in self.roots if not self.is_revoked(k)}

    def apply(self, record: bytes) -> TrustState:
        """The state after taking `record`, by the device's rules in the device's order:
        TOO_LARGE, MALFORMED, STALE, REVOKED_ROOT, SIGNATURES, NEW_SIGNATURES (TrustRefused)."""
        if len(record) > MAX_RECORD_SIZE:
            raise TrustRefused(TrustErrorCode.TOO_LARGE, f"{len(record)} bytes")
        signed = decode_signed(record)
        body, envelope = signed.body, signed.envelope
        if isinstance(body, Certificate):
            raise TrustRefused(TrustErrorCode.MALFORMED, "a certificate, not a trust record: it goes in images")
        if isinstance(body, ChannelRecord):
            raise TrustRefused(TrustErrorCode.MALFORMED, "a channel record, not a trust record: devices pull it")
        if isinstance(body, RootRecord):
            if body.version != self.version + 1:
                raise TrustRefused(TrustErrorCode.STALE, f"root version {body.version}, the device holds {self.version}")
            for key in body.keys:
                if self.is_revoked(key):
                    raise TrustRefused(TrustErrorCode.REVOKED_ROOT, f"key {key.keyhash().hex()[:16]}")
        elif body.number <= self.revocation:
            raise TrustRefused(TrustErrorCode.STALE,
                               f"revocation number {body.number}, the device holds {self.revocation}")
        self._check_threshold(envelope, self.trusted_roots(), self.threshold, TrustErrorCode.SIGNATURES)
        if isinstance(body, RootRecord):
            self._check_threshold(envelope, {k.keyhash(): k for k in body.keys}, body.threshold,
                                  TrustErrorCode.NEW_SIGNATURES)
            return replace(self, version=body.version, roots=body.keys, threshold=body.threshold,
                           image_threshold=body.image_threshold)
        return replace(self, revocation=body.number, revoked_keys=body.keys, revoked_serials=body.serials)

    def apply_all(self, records: Iterable[bytes]) -> TrustState:
        state = self
        for record in records:
            state = state.apply(record)
        return state

    @staticmethod
    def _check_threshold(envelope: Envelope, trusted: Mapping[bytes, PublicKey], threshold: int,
                         code: TrustErrorCode) -> None:
        signers = envelope.verified_signers(trusted, lambda detail: TrustRefused(code, detail))
        if len(signers) < threshold:
            raise TrustRefused(code, f"{len(signers)} valid signature(s) of the {threshold} needed")


__all__ = [
    "ALL_KINDS", "CHANNEL_KIND", "ChannelRecord", "MAX_BODY_SIZE", "MAX_ENVELOPE_SIGNATURES", "MAX_IMAGE_SIGNATURES", "MAX_RECORD_SIZE",
    "TRUST_DOMAIN", "Body", "BodyType", "Certificate", "Envelope", "EnvelopeSignature", "ImageKind",
    "RevocationRecord", "RootRecord", "SignatureAlg", "Signed", "TrustState", "add_signature", "body_type",
    "chain_for", "decode_body", "decode_signed", "public_key_from_der", "sign_envelope", "signature_alg",
    "trust_digest",
]
