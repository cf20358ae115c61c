# MCUboot image verifier for MicroPython (format: docs/FORMAT.md).
#
# verify(reader, trust, slot_size) streams the image through one fixed buffer: every size
# from the header is bounded against the slot before anything is read, the TLV areas are
# walked with every length bounded, and nothing is trusted until the SHA-256 over
# header + payload + protected TLVs matches and RSA signatures by as many distinct trusted
# keys as the image threshold verify: roots, or keys certified in the image whose scope
# holds it (docs/KEYS.md; certificates are checked by mpboot.records, imported only when an
# image carries one). Failures raise ImageError with a numeric code (one per cause).
import hashlib
import struct
from micropython import const

from mpboot import rsa

# Format constants are private consts: compiled in, costing no module-dict RAM.
_IMAGE_MAGIC = const(0x96F3B83D)
HEADER_SIZE = const(32)
_TLV_INFO_MAGIC = const(0x6907)
_TLV_PROT_INFO_MAGIC = const(0x6908)

_TLV_KEYHASH = const(0x01)
_TLV_PUBKEY = const(0x02)
_TLV_SHA256 = const(0x10)
_TLV_RSA2048_PSS = const(0x20)
_TLV_ECDSA_SIG = const(0x22)
_TLV_RSA3072_PSS = const(0x23)
_TLV_ED25519 = const(0x24)
_TLV_DEPENDENCY = const(0x40)
_TLV_SEC_CNT = const(0x50)
_TLV_BOOT_RECORD = const(0x60)
_TLV_DECOMP_SIZE = const(0x70)
_TLV_DECOMP_SHA = const(0x71)
_TLV_DECOMP_SIGNATURE = const(0x72)
_TLV_UUID_VID = const(0x74)
_TLV_UUID_CID = const(0x75)
# Vendor TLV (MCUboot reserves 0xa0-0xfe for vendors): RSASSA-PKCS1-v1_5 / SHA-256 over
# the image digest, for signing keys held in HSMs that cannot do PSS. Length = key size.
_TLV_MPBOOT_RSA_PKCS1V15 = const(0xA0)
# Vendor TLVs of the trust model (docs/KEYS.md section 4): the image kind (protected, u32
# with one bit: 1 app, 2 updater; absent: app) and a certificate envelope (unprotected).
_TLV_MPBOOT_KIND = const(0xA1)
_TLV_MPBOOT_CERT = const(0xA2)
# Trust state indices (mpboot.trust, which the verifier does not import: it costs heap)
_IMAGE_THRESHOLD = const(2)  # trust.IMAGE_THRESHOLD
_ROOTS = const(3)  # trust.ROOTS
_REVOKED_KEYS = const(5)  # trust.REVOKED_KEYS

# Header flags we accept: PIC, NON_BOOTABLE, RAM_LOAD, ROM_FIXED. Encrypted or compressed
# images (and any flag we do not know) are refused: we could not boot them as verified.
_FLAGS_ALLOWED = const(0x0131)

# Default read buffer. Any size of at least _MIN_BUF works: a larger one hashes in fewer
# reads, a smaller one leaves more heap (2 KiB keeps a whole verify under a 24 KiB heap
# with the modules loaded as .mpy; frozen modules cost no heap at all).
BUF_SIZE = const(2048)
_MIN_BUF = const(1024)
# Bounds on TLV areas read whole into the buffer (MCUboot's are far smaller).
_MAX_PROT_SIZE = const(1024)
_MAX_PUBKEY_SIZE = const(1024)
# Signature TLVs an image may carry (of any algorithm), and certificates: bound the RSA
# work one image costs.
_MAX_SIGNATURES = const(6)
_MAX_CERTS = const(4)
_MAX_CERT_SIZE = const(2048)
# DEPENDENCY TLVs an image may carry (MCUboot's struct image_dependency: 12 bytes each).
_MAX_DEPS = const(4)
_DEP_SIZE = const(12)
# Image ids a dependency may name (docs/FORMAT.md): the app, stage 1, the firmware (stage 0's ABI).
_DEP_APP = const(0)
_DEP_STAGE1 = const(1)
_DEP_FIRMWARE = const(255)
_KIND_APP = const(1)
_KIND_UPDATER = const(2)

# Error codes (ImageError.code): E_ + the host's name (mpboot.errors.ImageErrorCode), same number.
E_BAD_MAGIC = const(1)  # header magic is not 0x96f3b83d
E_BAD_HEADER = const(2)  # header field out of range (hdr_size, flags)
E_TOO_LARGE = const(3)  # header/payload/TLV sizes do not fit in the slot
E_TRUNCATED = const(4)  # the medium ended before the image did
E_BAD_TLV = const(5)  # malformed TLV area: magic, sizes, entry length, repeated entry, too many signatures
E_UNPROTECTED_TLV = const(6)  # protected-only TLV type in the unprotected area
E_UNKNOWN_TLV = const(7)  # unknown TLV type in the unprotected area
E_NO_HASH = const(8)  # no SHA256 TLV
E_DUPLICATE_HASH = const(9)  # more than one SHA256 TLV
E_HASH_MISMATCH = const(10)  # SHA256 TLV differs from the computed digest
E_SIG_WITHOUT_KEYHASH = const(11)  # signature TLV not preceded by KEYHASH/PUBKEY
E_UNKNOWN_KEY = const(12)  # key hash matches no embedded key
E_KEY_SIZE = const(13)  # signature type or length does not match the key size
E_BAD_SIGNATURE = const(14)  # signature by an embedded key does not verify
E_NO_SIGNATURE = const(15)  # no signature by an embedded key
# Trust model (docs/KEYS.md section 4); 16-19 are the device policy's (mpboot.slots).
# (E_CERT_INVALID 20, E_CERT_ISSUER 21, E_CERT_WIDER 22: in mpboot.records, which finds them)
_E_CERT_INVALID = const(20)  # records.E_CERT_INVALID, here for a certificate over 2048 bytes
E_OUT_OF_SCOPE = const(23)  # a signer's certificate does not cover this image
E_REVOKED = const(24)  # a signer, a certificate or its issuer is revoked
E_THRESHOLD = const(25)  # fewer distinct trusted signers than the image threshold
# (E_WRONG_KIND 26: mpboot.slots' policy)
E_DEPENDENCY = const(27)  # a stage-1 image depends on the app (here); a dependency unmet (slots, pairs)


class ImageError(Exception):
    # raise ImageError(code): e.args[0] is the code. Names live on the host
    # (mpboot.errors.ImageErrorCode), not in device RAM; no methods either: each class
    # member costs a MicroPython heap hundreds of bytes at import.
    pass


# verify() returns a dict (allocated per call rather than a class costing RAM at import):
#   "version": (major, minor, revision, build)   "security_counter": int or None
#   "vendor_id", "class_id": 16-byte UUIDs or None   "flags", "load_addr": header fields
#   "hdr_size": payload offset   "img_size": payload size
#   "total_size": header + payload + both TLV areas   "digest": SHA-256 image digest
#   "key_index": which root key signed it first (-1: only certified keys)
#   "kind": the MPBOOT_KIND bit (1 app, 2 updater), only when the image has one (else an app)
#   "deps": ((image_id, (major, minor, revision, build)), ...) in TLV order, only when the
#     image has DEPENDENCY TLVs: image 1 (stage 1, in an app) or 255 (the firmware's stage-0
#     ABI), checked by mpboot.slots' policy and mpboot.pairs (docs/FORMAT.md).


def _read(read, offset, buf):
    if read(offset, buf) != len(buf):
        raise ImageError(E_TRUNCATED)


def parse_header(hdr, slot_size, info):
    # Checks the 32-byte header against the slot; fills the info dict. Used alone by an
    # updater to refuse an image before any payload arrives. Returns the protected TLV size.
    magic, load_addr, hdr_size, prot_size, img_size, flags = struct.unpack_from("<IIHHII", hdr, 0)
    if magic != _IMAGE_MAGIC:
        raise ImageError(E_BAD_MAGIC)
    if hdr_size < HEADER_SIZE or flags & ~_FLAGS_ALLOWED:
        raise ImageError(E_BAD_HEADER)
    if prot_size and (prot_size < 4 or prot_size > _MAX_PROT_SIZE):
        raise ImageError(E_BAD_TLV)
    # The smallest unprotected TLV area is its 4-byte info header.
    if hdr_size + img_size + prot_size + 4 > slot_size:
        raise ImageError(E_TOO_LARGE)
    info["version"] = struct.unpack_from("<BBHI", hdr, 20)
    info["flags"] = flags
    info["load_addr"] = load_addr
    info["hdr_size"] = hdr_size
    info["img_size"] = img_size
    return prot_size


def walk_protected(area, info):
    # area: the whole protected TLV area, already hashed. Every entry must lie inside it.
    magic, total = struct.unpack_from("<HH", area, 0)
    if magic != _TLV_PROT_INFO_MAGIC or total != len(area):
        raise ImageError(E_BAD_TLV)
    off = 4
    while off < total:
        if off + 4 > total:
            raise ImageError(E_BAD_TLV)
        kind, length = struct.unpack_from("<HH", area, off)
        off += 4
        if off + length > total:
            raise ImageError(E_BAD_TLV)
        name = None
        if kind == _TLV_SEC_CNT or kind == _TLV_MPBOOT_KIND:
            name = "security_counter" if kind == _TLV_SEC_CNT else "kind"
            value = struct.unpack_from("<I", area, off)[0] if length == 4 else 0
            # (a kind is exactly one bit)
            if length != 4 or kind == _TLV_MPBOOT_KIND and (not value or value & (value - 1)):
                raise ImageError(E_BAD_TLV)
        elif kind == _TLV_UUID_VID or kind == _TLV_UUID_CID:
            if length != 16:
                raise ImageError(E_BAD_TLV)
            name = "vendor_id" if kind == _TLV_UUID_VID else "class_id"
            value = bytes(area[off : off + 16])
        elif kind == _TLV_DEPENDENCY:
            # MCUboot's struct image_dependency: image_id u8, 3 pad bytes (zero: imgtool
            # writes zeros, and a newer MCUboot may give them a meaning we do not know), the
            # minimum version (u8 major, u8 minor, u16 revision, u32 build).
            deps = info.get("deps", ())
            if length != _DEP_SIZE or len(deps) >= _MAX_DEPS or area[off + 1] | area[off + 2] | area[off + 3]:
                raise ImageError(E_BAD_TLV)
            info["deps"] = deps + ((area[off], struct.unpack_from("<BBHI", area, off + 4)),)
        if name:
            if info.get(name) is not None:
                raise ImageError(E_BAD_TLV)  # repeated
            info[name] = value
        # Other protected types (boot record, custom) are covered by the hash and carry
        # nothing this verifier acts on.
        off += length
    # Whom an image may depend on (the kind is known once the whole area is read): an app on
    # stage 1 (1), either kind on the firmware (255); stage 1 never on the app (0).
    k = info.get("kind", _KIND_APP)
    for d in info.get("deps", ()):
        i = d[0]
        if i == _DEP_APP and k == _KIND_UPDATER:
            raise ImageError(E_DEPENDENCY)
        if i != _DEP_FIRMWARE and (i != _DEP_STAGE1 or k != _KIND_APP):
            raise ImageError(E_BAD_TLV)


def _is_protected_only(kind):
    return kind in (
        _TLV_SEC_CNT,
        _TLV_UUID_VID,
        _TLV_UUID_CID,
        _TLV_DEPENDENCY,
        _TLV_BOOT_RECORD,
        _TLV_DECOMP_SIZE,
        _TLV_DECOMP_SHA,
        _TLV_DECOMP_SIGNATURE,
        _TLV_MPBOOT_KIND,
    )


def _find_key(keys, keyhash):
    for i in range(len(keys)):
        if keys[i][0] == keyhash:
            return i
    return -1


def _check_signature(kind, key, sig, digest):
    bits = key[1]
    k = bits // 8
    if len(sig) != k or len(key[2]) != k:
        raise ImageError(E_KEY_SIZE)
    if kind == _TLV_RSA2048_PSS and bits != 2048 or kind == _TLV_RSA3072_PSS and bits != 3072:
        raise ImageError(E_KEY_SIZE)
    n = int.from_bytes(key[2], "big")
    if kind == _TLV_MPBOOT_RSA_PKCS1V15:
        ok = rsa.verify_pkcs1v15(n, bits, sig, digest)
    else:
        ok = rsa.verify_pss(n, bits, sig, digest)
    if not ok:
        raise ImageError(E_BAD_SIGNATURE)


def verify(read, trust, slot_size, buf=None):
    # read: a reader (see mpboot.reader). trust: the trust state (mpboot.trust), or a bare
    # sequence of (key hash, modulus bits, modulus bytes) as written by `mpboot pubkey
    # --format micropython` (version 1, one signature). slot_size: bytes the image may
    # occupy. buf: optional preallocated bytearray of at least 1 KiB (default: BUF_SIZE).
    # Returns the info dict described above; raises ImageError.
    if type(trust[0]) is not int:
        trust = (1, 1, 1, trust, 0, (), ())  # bare keys: trust.initial(trust)
    keys = trust[_ROOTS]
    revoked = trust[_REVOKED_KEYS]
    if buf is None:
        buf = bytearray(BUF_SIZE)
    size = len(buf)
    if size < _MIN_BUF:
        raise ValueError("buffer")
    mv = memoryview(buf)
    info = {
        "security_counter": None,
        "vendor_id": None,
        "class_id": None,
        "total_size": 0,
        "digest": None,
        "key_index": -1,
    }

    if slot_size < HEADER_SIZE:
        raise ImageError(E_TOO_LARGE)
    hdr = mv[:HEADER_SIZE]
    _read(read, 0, hdr)
    prot_size = parse_header(hdr, slot_size, info)

    # Hash the header exactly as parsed, then the rest of [0, hdr_size + img_size).
    h = hashlib.sha256(hdr)
    off = HEADER_SIZE
    end = info["hdr_size"] + info["img_size"]
    while off < end:
        n = end - off
        chunk = mv if n >= size else mv[:n]
        _read(read, off, chunk)
        h.update(chunk)
        off += len(chunk)

    if prot_size:
        area = mv[:prot_size]
        _read(read, off, area)
        h.update(area)
        walk_protected(area, info)
        off += prot_size
    digest = h.digest()
    info["digest"] = digest

    # Unprotected TLV area: not covered by the hash, so only types that are checked
    # against the digest or an embedded key may appear in it.
    _read(read, off, mv[:4])
    magic, total = struct.unpack_from("<HH", mv, 0)
    if magic != _TLV_INFO_MAGIC or total < 4:
        raise ImageError(E_BAD_TLV)
    if off + total > slot_size:
        raise ImageError(E_TOO_LARGE)
    info["total_size"] = off + total
    end = off + total
    off += 4
    hash_seen = False
    key_index = -1  # root named by the last KEYHASH/PUBKEY (-1: none we hold)
    key_cert = None  # else the certificate (mpboot.records C_* list) of the key it names
    key_pending = False  # a KEYHASH/PUBKEY waits for its signature TLV
    unknown_key = False
    signatures = 0
    certs = 0
    certified = []  # certificates accepted in this image, each with its scope verdict last
    signed = []  # moduli of the distinct trusted keys whose signature verified
    why = 0  # the first reason a signer did not count (E_REVOKED, E_OUT_OF_SCOPE, E_CERT_*)
    while off < end:
        if off + 4 > end:
            raise ImageError(E_BAD_TLV)
        _read(read, off, mv[:4])
        kind, length = struct.unpack_from("<HH", mv, 0)
        off += 4
        if off + length > end:
            raise ImageError(E_BAD_TLV)
        if kind == _TLV_SHA256:
            if length != 32:
                raise ImageError(E_BAD_TLV)
            if hash_seen:
                raise ImageError(E_DUPLICATE_HASH)
            hash_seen = True
            _read(read, off, mv[:32])
            if bytes(mv[:32]) != digest:
                raise ImageError(E_HASH_MISMATCH)
        elif kind == _TLV_KEYHASH or kind == _TLV_PUBKEY:
            if kind == _TLV_KEYHASH and length != 32 or length > _MAX_PUBKEY_SIZE:
                raise ImageError(E_BAD_TLV)
            value = mv[:length]
            _read(read, off, value)
            value = hashlib.sha256(value).digest() if kind == _TLV_PUBKEY else bytes(value)
            key_index = _find_key(keys, value)
            key_cert = None
            if key_index < 0:
                for c in certified:
                    if c[1][0] == value:  # records.C_KEY
                        key_cert = c
                        break
            key_pending = True
        elif kind == _TLV_MPBOOT_CERT:
            certs += 1
            if certs > _MAX_CERTS:
                raise ImageError(E_BAD_TLV)
            if length > _MAX_CERT_SIZE or length > size:
                raise ImageError(_E_CERT_INVALID)
            value = mv[:length]
            _read(read, off, value)
            from mpboot import records

            c = records.add(value, trust, certified, info)
            if c < 0:
                raise ImageError(-c)
            why = why or c
        elif kind in (_TLV_RSA2048_PSS, _TLV_RSA3072_PSS, _TLV_MPBOOT_RSA_PKCS1V15, _TLV_ECDSA_SIG, _TLV_ED25519):
            if not key_pending:
                raise ImageError(E_SIG_WITHOUT_KEYHASH)
            key_pending = False
            signatures += 1
            if signatures > _MAX_SIGNATURES:
                raise ImageError(E_BAD_TLV)
            key = keys[key_index] if key_index >= 0 else key_cert[1] if key_cert else None
            if kind == _TLV_ECDSA_SIG or kind == _TLV_ED25519:
                # Other algorithms' signatures (multi-signed images): not ours to check.
                pass
            elif key is None:
                # Signed by a key this device does not hold: not a reason to fail while
                # another signature may be by a key it does.
                unknown_key = True
            elif key[0] in revoked:
                why = why or E_REVOKED
            elif key_cert and not key_cert[-1]:
                why = why or E_OUT_OF_SCOPE
            else:
                if length > 384:
                    raise ImageError(E_KEY_SIZE)
                sig = mv[:length]
                _read(read, off, sig)
                _check_signature(kind, key, sig, digest)
                if key[2] not in signed:
                    signed.append(key[2])
                if key_index >= 0 and info["key_index"] < 0:
                    info["key_index"] = key_index  # the first good root signature's key
        elif _is_protected_only(kind):
            raise ImageError(E_UNPROTECTED_TLV)
        else:
            raise ImageError(E_UNKNOWN_TLV)
        off += length

    if not hash_seen:
        raise ImageError(E_NO_HASH)
    n = len(signed)
    if n < trust[_IMAGE_THRESHOLD]:
        if n:
            raise ImageError(E_THRESHOLD)
        raise ImageError(why or (E_UNKNOWN_KEY if unknown_key else E_NO_SIGNATURE))
    return info
