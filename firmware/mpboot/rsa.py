# RSA public-key signature verification (RFC 8017) for MicroPython.
#
# Only what a bootloader needs: SHA-256, RSASSA-PSS (MGF1-SHA-256, salt exactly 32 bytes)
# and RSASSA-PKCS1-v1_5. Embedded keys always use e = 65537 (the default); `e` is a
# parameter only so that test suites with other exponents (Wycheproof) run unchanged.
# Both functions return True/False and never raise on bad signatures. The modulus and
# its bit size come from an embedded (trusted) key; the image verifier checks that the
# modulus length matches the stated size before calling in.
import hashlib
from micropython import const

_E = const(65537)
_HLEN = const(32)
_SALT_LEN = const(32)

# DER DigestInfo prefix for SHA-256 (RFC 8017 section 9.2, note 1).
_SHA256_DIGEST_INFO = b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20"


def _public_op(n, bits, sig, e):
    # RSAVP1. Returns the integer representative m, or -1 when the signature is malformed.
    if len(sig) != (bits + 7) // 8:
        return -1
    s = int.from_bytes(sig, "big")
    if s >= n:
        return -1
    return pow(s, e, n)


def verify_pss(n, bits, sig, mhash, e=_E):
    # RFC 8017 9.1.2 EMSA-PSS-VERIFY with sLen = 32. n: modulus (int) of exactly `bits`
    # bits (MicroPython ints have no bit_length(): the trusted key states it), mhash: the
    # 32-byte message hash (for MCUboot images, the image digest).
    if len(mhash) != _HLEN:
        return False
    m = _public_op(n, bits, sig, e)
    if m < 0:
        return False
    em_bits = bits - 1
    em_len = (em_bits + 7) // 8
    try:
        em = m.to_bytes(em_len, "big")
    except OverflowError:
        return False
    m = None
    if em_len < _HLEN + _SALT_LEN + 2 or em[-1] != 0xBC:
        return False
    db_len = em_len - _HLEN - 1
    top_mask = 0xFF >> (8 * em_len - em_bits)
    if em[0] & ~top_mask & 0xFF:
        return False
    h = em[db_len : db_len + _HLEN]
    # DB = maskedDB ^ MGF1-SHA-256(H), unmasked one 32-byte block at a time and checked as
    # it goes (PS zeros, then 0x01, then the salt): no second em-sized buffer.
    ps_len = db_len - _SALT_LEN - 1
    salt = bytearray(_SALT_LEN)
    c = bytearray(4)
    done = 0
    while done < db_len:
        c[2] = (done // _HLEN >> 8) & 0xFF
        c[3] = (done // _HLEN) & 0xFF
        g = hashlib.sha256(h)
        g.update(c)
        block = g.digest()
        for i in range(min(_HLEN, db_len - done)):
            j = done + i
            b = em[j] ^ block[i]
            if j == 0:
                b &= top_mask
            if j < ps_len:
                if b:
                    return False
            elif j == ps_len:
                if b != 0x01:
                    return False
            else:
                salt[j - ps_len - 1] = b
        done += _HLEN
    hp = hashlib.sha256(b"\x00\x00\x00\x00\x00\x00\x00\x00")
    hp.update(mhash)
    hp.update(salt)
    return hp.digest() == h


def verify_pkcs1v15(n, bits, sig, mhash, e=_E):
    # RFC 8017 8.2.2 with EMSA-PKCS1-v1_5 and SHA-256: build the one valid encoding and
    # compare the whole block (no ASN.1 parsing, so no room for lenient-parser forgeries).
    if len(mhash) != _HLEN:
        return False
    k = (bits + 7) // 8
    m = _public_op(n, bits, sig, e)
    if m < 0:
        return False
    t_len = len(_SHA256_DIGEST_INFO) + _HLEN
    if k < t_len + 11:
        return False
    try:
        em = m.to_bytes(k, "big")
    except OverflowError:
        return False
    ps_end = k - t_len - 1
    expected = bytearray(k)
    expected[1] = 0x01
    for i in range(2, ps_end):
        expected[i] = 0xFF
    expected[ps_end + 1 : ps_end + 1 + len(_SHA256_DIGEST_INFO)] = _SHA256_DIGEST_INFO
    expected[k - _HLEN :] = mhash
    return em == expected
