# Certificates and trust records (docs/KEYS.md): the signed CBOR envelope, the three body
# types, signature counting, certificate scopes, and applying a root or revocation record to
# the trust state (mpboot.trust). Loaded only when an image carries a certificate or a record
# arrives: a board whose images are signed by a root never imports it.
#
# Every field from outside is type- and range-checked before use; anything unexpected is
# ValueError here, turned into the caller's code (image CERT_INVALID, record MALFORMED).
import hashlib
from micropython import const

from mpboot import rsa
from mpboot.cbor import Decoder  # (a codec with no SMP in it; strict mode for records)
from mpboot.trust import (
    IMAGE_THRESHOLD, REVOCATION, REVOKED_KEYS, REVOKED_SERIALS, ROOT_VERSION, ROOTS, THRESHOLD,
)

_CONTEXT = b"mpboot trust v1\x00"  # signed digest = SHA-256(_CONTEXT || body)
MAX_RECORD = const(4096)  # whole envelope
_MAX_BODY = const(2048)
_MAX_SIGS = const(8)
_MAX_ROOTS = const(4)
_MAX_REVOKED = const(16)
_MAX_VENDORS = const(4)
_MAX_CLASSES = const(8)
_MAX_DEPTH = const(3)
_MAX_IMAGE_THRESHOLD = const(6)
_U32 = const(0xFFFFFFFF)
_KIND_APP = const(1)  # an image without MPBOOT_KIND

# Signature algorithms (the image signature TLV types)
_ALG_PSS2048 = const(0x20)
_ALG_PSS3072 = const(0x23)
_ALG_PKCS1 = const(0xA0)

# Body types and keys (docs/KEYS.md section 3)
_TYPE = const(1)
CERT = const(1)
ROOT = const(2)
REVOKE = const(3)
_C_SERIAL = const(2)
_C_KEY = const(3)
_C_VENDORS = const(4)
_C_CLASSES = const(5)
_C_COUNTERS = const(6)
_C_KINDS = const(7)
_C_DEPTH = const(8)
_R_VERSION = const(10)
_R_KEYS = const(11)
_R_THRESHOLD = const(12)
_R_IMAGE_THRESHOLD = const(13)
_V_NUMBER = const(20)
_V_KEYS = const(21)
_V_SERIALS = const(22)

# A parsed certificate: a list read by these indices.
C_SERIAL = const(0)
C_KEY = const(1)  # (keyhash, bits, modulus), as mpboot_keys.KEYS
C_VENDORS = const(2)  # list of 16-byte ids, or None: any
C_CLASSES = const(3)
C_LO = const(4)  # security-counter range [lo, hi]
C_HI = const(5)
C_KINDS = const(6)  # bit mask
C_DEPTH = const(7)

# TrustError codes: the group-64 rc (host mpboot.errors.TrustErrorCode, same names).
E_MALFORMED = const(17)
E_SIGNATURES = const(18)
E_NEW_SIGNATURES = const(19)
E_STALE = const(20)
E_REVOKED_ROOT = const(21)
E_TOO_LARGE = const(23)


class TrustError(Exception):
    # raise TrustError(code): e.args[0] is the code.
    pass


def _strict(buf):
    d = Decoder()
    d.strict = True
    return d.decode(buf)


def _need(cond):
    if not cond:
        raise ValueError


def _uint(v, lo, hi):
    _need(type(v) is int and lo <= v <= hi)
    return v


def _bstr(v, n=0):
    _need(type(v) is memoryview and (not n or len(v) == n))
    return v


def _array(v, lo, hi):
    _need(type(v) is list and lo <= len(v) <= hi)
    return v


def _der_len(b, p):
    # Minimal DER length at b[p]: (value start, value length).
    _need(p < len(b))
    n = b[p]
    if n < 0x80:
        return p + 1, n
    if n == 0x81:
        _need(p + 1 < len(b) and b[p + 1] >= 0x80)
        return p + 2, b[p + 1]
    _need(n == 0x82 and p + 2 < len(b))
    n = b[p + 1] << 8 | b[p + 2]
    _need(n >= 0x100)
    return p + 3, n


def _der_item(b, p, tag):
    _need(p < len(b) and b[p] == tag)
    s, n = _der_len(b, p + 1)
    _need(s + n <= len(b))
    return s, s + n


def der_key(der):
    # A PKCS#1 RSAPublicKey DER (minimal encoding, RSA-2048 or 3072, e = 65537) as
    # (keyhash, bits, modulus): the key tuple mpboot_keys.KEYS uses. ValueError otherwise.
    b = der  # (a memoryview: no copy of the whole encoding on the heap)
    s, end = _der_item(b, 0, 0x30)
    _need(end == len(b))
    s, e = _der_item(b, s, 0x02)
    _need(e - s > 1 and b[s] == 0 and b[s + 1] >= 0x80)  # positive, no extra zero byte
    n = s + 1
    m = e
    s, e = _der_item(b, e, 0x02)
    _need(e == end and e - s == 3 and b[s] == 1 and b[s + 1] == 0 and b[s + 2] == 1)
    bits = (m - n) * 8
    _need(bits == 2048 or bits == 3072)
    return (hashlib.sha256(b).digest(), bits, bytes(b[n:m]))


def open_envelope(buf):
    # The envelope in buf: (body fields dict, signatures as (keyhash bytes, alg, sig), signed
    # digest). ValueError if it breaks a format rule. Other byte strings are memoryviews
    # into buf.
    _need(len(buf) <= MAX_RECORD)
    env = _strict(buf)
    _need(len(env) == 2 and 1 in env and 2 in env)
    body = _bstr(env[1])
    _need(len(body) <= _MAX_BODY)
    sigs = []
    for s in _array(env[2], 1, _MAX_SIGS):
        _array(s, 3, 3)
        # Every entry well formed, whoever signed it (docs/KEYS.md section 2): a known alg and
        # an RSA-2048 or 3072 length.
        a = _uint(s[1], _ALG_PSS2048, _ALG_PKCS1)
        _need(a == _ALG_PSS2048 or a == _ALG_PSS3072 or a == _ALG_PKCS1)
        sig = _bstr(s[2])
        _need(len(sig) == 256 or len(sig) == 384)
        sigs.append((bytes(_bstr(s[0], 32)), a, sig))
    h = hashlib.sha256(_CONTEXT)
    h.update(body)
    return _strict(body), sigs, h.digest()


def signature_ok(alg, key, sig, digest):
    # alg: the signature's algorithm (an image signature TLV type); key: (hash, bits, modulus).
    bits = key[1]
    if len(sig) != bits // 8 or len(key[2]) != bits // 8:
        return False
    if alg == _ALG_PKCS1:
        return rsa.verify_pkcs1v15(int.from_bytes(key[2], "big"), bits, sig, digest)
    if alg == _ALG_PSS2048 and bits == 2048 or alg == _ALG_PSS3072 and bits == 3072:
        return rsa.verify_pss(int.from_bytes(key[2], "big"), bits, sig, digest)
    return False


def _find(keys, keyhash):
    for k in keys:
        if k[0] == keyhash:
            return k
    return None


def count(sigs, digest, keys, revoked):
    # Distinct keys of `keys` (by modulus) whose signature in sigs verified, and whether a
    # revoked one was passed over: (n, revoked_seen). A signature naming one of `keys` that
    # does not verify: n = -1. Signatures by other keys are skipped.
    good = []
    passed = False
    for s in sigs:
        k = _find(keys, s[0])
        if k is None:
            continue
        if k[0] in revoked:
            passed = True
            continue
        if not signature_ok(s[1], k, s[2], digest):
            return -1, passed
        if k[2] not in good:
            good.append(k[2])
    return len(good), passed


def _ids(v, most):
    if v is None:
        return None
    a = _array(v, 1, most)
    for x in a:
        _bstr(x, 16)
    return [bytes(x) for x in a]


def parse_cert(f):
    # Body fields of a certificate as the C_* list; ValueError if they break the rules.
    for k in f:
        _need(k == _TYPE or _C_SERIAL <= k <= _C_DEPTH)
    _need(f.get(_TYPE) == CERT)
    r = f.get(_C_COUNTERS)
    lo, hi = 0, _U32
    if r is not None:
        _array(r, 2, 2)
        lo = _uint(r[0], 0, _U32)
        hi = _uint(r[1], lo, _U32)
    kinds = f.get(_C_KINDS)
    return [
        _uint(f.get(_C_SERIAL), 1, _U32),
        der_key(_bstr(f.get(_C_KEY))),
        _ids(f.get(_C_VENDORS), _MAX_VENDORS),
        _ids(f.get(_C_CLASSES), _MAX_CLASSES),
        lo,
        hi,
        _U32 if kinds is None else _uint(kinds, 1, _U32),
        _uint(f.get(_C_DEPTH, 0), 0, _MAX_DEPTH),
    ]


def _subset(child, parent):
    if parent is None:
        return True
    if child is None:
        return False
    for x in child:
        if x not in parent:
            return False
    return True


def narrower(c, p):
    # Is certificate c at most as wide as its issuer's certificate p?
    return (_subset(c[C_VENDORS], p[C_VENDORS]) and _subset(c[C_CLASSES], p[C_CLASSES])
            and p[C_LO] <= c[C_LO] and c[C_HI] <= p[C_HI] and not c[C_KINDS] & ~p[C_KINDS]
            and c[C_DEPTH] < p[C_DEPTH])


def covers(c, info):
    # Does certificate c's scope hold the image described by info (image.verify's dict)?
    v = c[C_VENDORS]
    if v is not None and info["vendor_id"] not in v:
        return False
    v = c[C_CLASSES]
    if v is not None and info["class_id"] not in v:
        return False
    ctr = info["security_counter"] or 0
    return c[C_LO] <= ctr <= c[C_HI] and bool(c[C_KINDS] & info.get("kind", _KIND_APP))


# Outcomes of issue() other than a certificate (image.py maps them to its codes).
ISSUER = const(1)  # issued by neither a root threshold nor a certified key of depth >= 1
WIDER = const(2)  # wider than the certified key that issued it
REVOKED = const(3)  # its serial, key or issuer is revoked
BAD_SIGNATURE = const(4)  # a signature by a trusted key does not verify


def issue(buf, trust, certified):
    # Checks the certificate envelope in buf against the trust state and the certificates
    # already accepted for this image (`certified`, a list of C_* lists). Returns the C_*
    # list, or one of the outcome codes above; ValueError if malformed.
    f, sigs, digest = open_envelope(buf)
    c = parse_cert(f)
    f = None  # the body's map: its heap is the RSA operations' below
    revoked = trust[REVOKED_KEYS]
    if c[C_SERIAL] in trust[REVOKED_SERIALS] or c[C_KEY][0] in revoked:
        return REVOKED
    n, passed = count(sigs, digest, trust[ROOTS], revoked)
    if n < 0:
        return BAD_SIGNATURE
    if n >= trust[THRESHOLD]:
        return c  # a root threshold: the issuer's scope is everything
    for s in sigs:
        for p in certified:
            k = p[C_KEY]
            if k[0] != s[0] or p[C_DEPTH] < 1:
                continue
            # (k is not revoked: a certificate whose key is revoked never enters `certified`)
            if not signature_ok(s[1], k, s[2], digest):
                return BAD_SIGNATURE
            return c if narrower(c, p) else WIDER
    return REVOKED if passed else ISSUER


# Image error codes add() returns: E_ + the host's ImageErrorCode name, same number (the
# others are mpboot.image's; 14 and 24 are image.E_BAD_SIGNATURE and image.E_REVOKED).
_E_BAD_SIGNATURE = const(14)
E_CERT_INVALID = const(20)  # a certificate TLV does not parse or breaks a format rule
E_CERT_ISSUER = const(21)  # a certificate issued by neither a root threshold nor a delegate
E_CERT_WIDER = const(22)  # a certificate wider than its issuer
_E_REVOKED = const(24)


def add(buf, trust, certified, info):
    # An image's certificate TLV (its value in buf) for image.verify: appended to `certified`
    # with its scope verdict for this image (info: the protected TLVs' findings) last, when
    # it holds. Returns 0, or why it certifies nothing (an image code the image may still
    # pass despite: CERT_ISSUER, CERT_WIDER, REVOKED), or minus a code that rejects the
    # image (CERT_INVALID, BAD_SIGNATURE).
    try:
        c = issue(buf, trust, certified)
    except ValueError:
        return -E_CERT_INVALID
    if c == BAD_SIGNATURE:
        return -_E_BAD_SIGNATURE
    if type(c) is int:
        return E_CERT_ISSUER if c == ISSUER else E_CERT_WIDER if c == WIDER else _E_REVOKED
    k = c[C_KEY][0]
    if _find(trust[ROOTS], k) is None:
        for p in certified:
            if p[C_KEY][0] == k:
                return 0  # already certified in this image: adds nothing
        c.append(covers(c, info))
        certified.append(c)
    return 0


def _keys(a):
    # Root keys from their DER encodings: distinct moduli, each a valid key.
    out = []
    for der in a:
        k = der_key(_bstr(der))
        for o in out:
            _need(o[2] != k[2])
        out.append(k)
    return out


def apply(trust, buf):
    # The trust state after the root or revocation record in buf (a new list; `trust` is
    # not changed). Raises TrustError(code).
    if len(buf) > MAX_RECORD:
        raise TrustError(E_TOO_LARGE)
    try:
        f, sigs, digest = open_envelope(buf)
        t = f.get(_TYPE)
        if t == ROOT:
            for k in f:
                _need(k == _TYPE or _R_VERSION <= k <= _R_IMAGE_THRESHOLD)
            version = _uint(f.get(_R_VERSION), 2, _U32)
            roots = _keys(_array(f.get(_R_KEYS), 1, _MAX_ROOTS))
            threshold = _uint(f.get(_R_THRESHOLD), 1, len(roots))
            image_threshold = _uint(f.get(_R_IMAGE_THRESHOLD), 1, _MAX_IMAGE_THRESHOLD)
        else:
            _need(t == REVOKE)
            for k in f:
                _need(k == _TYPE or _V_NUMBER <= k <= _V_SERIALS)
            number = _uint(f.get(_V_NUMBER), 1, _U32)
            rkeys = [bytes(_bstr(x, 32)) for x in _array(f.get(_V_KEYS, []), 0, _MAX_REVOKED)]
            serials = [_uint(x, 1, _U32) for x in _array(f.get(_V_SERIALS, []), 0, _MAX_REVOKED)]
    except ValueError:
        raise TrustError(E_MALFORMED)
    # Checks in the order of docs/KEYS.md section 5: staleness first (a replay costs no RSA).
    revoked = trust[REVOKED_KEYS]
    if t == ROOT and version != trust[ROOT_VERSION] + 1 or t == REVOKE and number <= trust[REVOCATION]:
        raise TrustError(E_STALE)
    if t == ROOT:
        for k in roots:
            if k[0] in revoked:
                raise TrustError(E_REVOKED_ROOT)
    n, _ = count(sigs, digest, trust[ROOTS], revoked)
    if n < trust[THRESHOLD]:
        raise TrustError(E_SIGNATURES)
    new = list(trust)
    if t == ROOT:
        n, _ = count(sigs, digest, roots, revoked)
        if n < threshold:
            raise TrustError(E_NEW_SIGNATURES)
        new[ROOT_VERSION] = version
        new[THRESHOLD] = threshold
        new[IMAGE_THRESHOLD] = image_threshold
        new[ROOTS] = roots
    else:
        new[REVOCATION] = number
        new[REVOKED_KEYS] = rkeys
        new[REVOKED_SERIALS] = serials
    return new
