#!/usr/bin/env python3
"""Generate the golden image vectors in tests/vectors/ (read by host and device tests).

    .venv/bin/python tools/gen_vectors.py        # rewrites tests/vectors/*.bin + vectors.json

Images are signed with the TEST-ONLY keys in tests/keys/. PSS signatures are randomised, so a
re-run changes those files' bytes; the committed files are the reference. The PKCS#1 v1.5
vector is deterministic and tests/test_vectors.py rebuilds it byte for byte.

The crafting helpers here (raw RSA, forged PKCS#1 v1.5 blocks, hand-laid images) are also
used by the tests to build bad images on the fly.
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from mpboot.image import (  # noqa: E402
    DEFAULT_HEADER_SIZE,
    ImageHeader,
    ImageVersion,
    SignOptions,
    Tlv,
    TlvType,
    TLV_ENTRY_HEADER_SIZE,
    TLV_INFO_SIZE,
    assemble_image,
    build_image,
    class_uuid,
    encode_dependency,
    encode_tlv_area,
    protected_tlvs,
    signature_tlvs,
    vendor_uuid,
)
from mpboot.keys import SignatureScheme, SigningKey, load_signing_key  # noqa: E402

KEYS = ROOT / "tests" / "keys"
VECTORS = ROOT / "tests" / "vectors"
TRUSTED = ("TEST-ONLY-rsa2048.pem", "TEST-ONLY-rsa3072.pem")
UNTRUSTED = "TEST-ONLY-rsa2048-untrusted.pem"
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

PAYLOAD = bytes(range(256)) + b"mpboot golden vector payload\n"


@functools.cache
def key(name: str) -> SigningKey:
    return load_signing_key(KEYS / name)


def raw_rsa_sign(signer: SigningKey, block: bytes) -> bytes:
    """m^d mod n over an arbitrary encoded block: how to build well-signed malformed
    signatures (forgery-shaped encodings the verifier must refuse)."""
    numbers = signer.key.private_numbers()
    n = numbers.public_numbers.n
    k = signer.bits // 8
    return pow(int.from_bytes(block, "big"), numbers.d, n).to_bytes(k, "big")


def pkcs1v15_block(k: int, digest: bytes, *, garbage: bytes = b"", digest_info: bytes = SHA256_DIGEST_INFO) -> bytes:
    """00 01 FF.. 00 DigestInfo H [garbage]: with garbage, the padding is shortened so the
    block still fills k bytes (the Bleichenbacher 2006 shape)."""
    t = digest_info + digest + garbage
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


def body(header_size: int = DEFAULT_HEADER_SIZE, payload: bytes = PAYLOAD, fill: int = 0xFF) -> bytes:
    return bytes([fill]) * header_size + payload


def craft(signer: SigningKey, unprotected: Callable[[bytes, SigningKey], list[Tlv]], *,
          prot: Sequence[Tlv] | None = None, hdr_size: int = DEFAULT_HEADER_SIZE,
          version: ImageVersion = ImageVersion(1, 0, 0, 0), fields: dict[str, int] | None = None) -> bytes:
    """A signed image with a hand-picked unprotected TLV list (given the digest), protected
    TLVs (default: SEC_CNT 1) and, optionally, header fields overridden after layout."""
    prot = list(protected_tlvs(1, None, None) if prot is None else prot)
    b = body(hdr_size)
    prot_size = len(encode_tlv_area(0x6908, prot)) if prot else 0
    h = ImageHeader(0, hdr_size, prot_size, len(b) - hdr_size, 0, version)
    h = replace(h, **fields) if fields else h
    return assemble_image(h, b, prot, lambda digest: unprotected(digest, signer))


def standard(digest: bytes, signer: SigningKey) -> list[Tlv]:
    return [Tlv(TlvType.SHA256, digest), *signature_tlvs(digest, signer, SignatureScheme.PSS)]


def tlv_boundaries(image: bytes) -> list[int]:
    """Offsets of every TLV area and entry boundary (info headers, entry headers, values)."""
    h = ImageHeader.unpack(image)
    start = h.hdr_size + h.img_size
    cuts = {start}
    for area_start, area_len in ((start, h.protect_tlv_size),
                                 (start + h.protect_tlv_size, None)):
        if area_len == 0:
            continue
        total = struct.unpack_from("<HH", image, area_start)[1]
        off = area_start + TLV_INFO_SIZE
        cuts.add(off)
        while off < area_start + total:
            length = struct.unpack_from("<HH", image, off)[1]
            cuts.update({off + TLV_ENTRY_HEADER_SIZE, off + TLV_ENTRY_HEADER_SIZE + length})
            off += TLV_ENTRY_HEADER_SIZE + length
    return sorted(c for c in cuts if c < len(image))


@dataclass(frozen=True)
class Vector:
    name: str
    image: bytes
    expect: str  # "OK" or an ImageErrorCode name
    slot_size: int | None = None  # default: the image's length
    note: str = ""
    fields: dict[str, object] | None = None  # for OK: what the verifiers must report


def vectors() -> list[Vector]:
    k2048, k3072, other = key(TRUSTED[0]), key(TRUSTED[1]), key(UNTRUSTED)
    vid = vendor_uuid("example.com")
    cid = class_uuid("golden-widget", vid)
    v: list[Vector] = []

    def ok(name: str, image: bytes, note: str, **fields: object) -> None:
        v.append(Vector(name, image, "OK", None, note, fields))

    def bad(name: str, image: bytes, expect: str, note: str, slot_size: int | None = None) -> None:
        v.append(Vector(name, image, expect, slot_size, note))

    ok("ok-rsa2048-pss",
       build_image(body(), k2048, SignOptions(ImageVersion(1, 2, 3, 4), security_counter=7,
                                              vendor_id=vid, class_id=cid)),
       "RSA-2048 PSS, SEC_CNT 7, vendor/class ids", version="1.2.3+4", security_counter=7,
       key_index=0, vendor_id=vid.hex(), class_id=cid.hex())
    ok("ok-rsa3072-pss",
       build_image(body(0x20), k3072, SignOptions(ImageVersion(2, 0, 1), header_size=0x20,
                                                  security_counter=ImageVersion(2, 0, 1).auto_security_counter())),
       "RSA-3072 PSS, 32-byte header", version="2.0.1+0", security_counter=0x02000001, key_index=1)
    ok("ok-rsa2048-pkcs1v15",
       build_image(body(), k2048, SignOptions(ImageVersion(1, 0, 0), security_counter=1,
                                              scheme=SignatureScheme.PKCS1V15)),
       "vendor TLV 0xa0: RSASSA-PKCS1-v1_5 (deterministic: rebuilt byte for byte by the tests)",
       version="1.0.0+0", security_counter=1, key_index=0)
    ok("ok-no-protected-tlvs",
       craft(k2048, standard, prot=[]), "no protected TLV area (imgtool without -s)",
       version="1.0.0+0", security_counter=None, key_index=0)
    ok("ok-pubkey-tlv",
       craft(k3072, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.PUBKEY, s.public().pkcs1_der()),
                                  Tlv(TlvType.RSA3072_PSS, s.sign_digest(d, SignatureScheme.PSS))]),
       "PUBKEY TLV (full key) instead of KEYHASH", version="1.0.0+0", security_counter=1, key_index=1)
    ok("ok-untrusted-then-trusted",
       craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), *signature_tlvs(d, other, SignatureScheme.PSS),
                                  *signature_tlvs(d, s, SignatureScheme.PSS)]),
       "a signature by an unknown key, then one by a trusted key", version="1.0.0+0",
       security_counter=1, key_index=0)

    ok("ok-ecdsa-then-rsa",
       craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, bytes(32)),
                                  Tlv(TlvType.ECDSA_SIG, bytes(72)), *signature_tlvs(d, s, SignatureScheme.PSS)]),
       "an ECDSA signature (not checked: other algorithm), then RSA by a trusted key",
       version="1.0.0+0", security_counter=1, key_index=0)

    def dep(image_id: int, version: ImageVersion) -> Tlv:
        return Tlv(TlvType.DEPENDENCY, encode_dependency(image_id, version))

    sec = Tlv(TlvType.SEC_CNT, struct.pack("<I", 1))
    updater = Tlv(TlvType.MPBOOT_KIND, struct.pack("<I", 2))
    ok("ok-dependencies",
       craft(k2048, standard, prot=[sec, dep(1, ImageVersion(1, 2, 3, 4)), dep(255, ImageVersion(1, 0)),
                                    dep(1, ImageVersion(0, 9, 65535, 0xFFFFFFFF))]),
       "an app's DEPENDENCY TLVs (MCUboot struct image_dependency) on stage 1 (1) and the firmware (255), "
       "parsed in order (the boot and the test mark check them against stage 1 and the ABI)",
       version="1.0.0+0", security_counter=1, key_index=0,
       deps=[[1, "1.2.3+4"], [255, "1.0.0+0"], [1, "0.9.65535+4294967295"]])
    ok("ok-stage1-dependency-firmware",
       craft(k2048, standard, prot=[sec, dep(255, ImageVersion(1, 0)), updater]),
       "a stage-1 (updater) image depending on the firmware's stage-0 ABI 1.0",
       version="1.0.0+0", security_counter=1, key_index=0, deps=[[255, "1.0.0+0"]])

    good = craft(k2048, standard)
    h = ImageHeader.unpack(good)
    bad("bad-magic", craft(k2048, standard, fields={"magic": 0x96F3B83C}), "BAD_MAGIC", "header magic off by one bit")
    bad("bad-hdr-size", craft(k2048, standard, fields={"hdr_size": 16}), "BAD_HEADER",
        "hdr_size 16 is smaller than the header")
    bad("bad-flags-encrypted", craft(k2048, standard, fields={"flags": 0x04}), "BAD_HEADER",
        "ENCRYPTED_AES128 flag (signed): refused, cannot be booted verified")
    bad("img-size-beyond-slot", good, "TOO_LARGE", "slot one byte smaller than the image's header claims",
        slot_size=h.hdr_size + h.img_size + h.protect_tlv_size + 3)
    bad("img-size-huge", craft(k2048, standard, fields={"img_size": 0xFFFFFFF0}), "TOO_LARGE",
        "img_size 0xfffffff0 in a small slot", slot_size=0x10000)
    bad("truncated-payload", good[: h.hdr_size + 10], "TRUNCATED",
        "file ends inside the payload (slot is large)", slot_size=0x10000)
    bad("prot-size-mismatch", craft(k2048, standard, fields={"protect_tlv_size": h.protect_tlv_size + 4}), "BAD_TLV",
        "header's protect_tlv_size disagrees with the protected area", slot_size=0x10000)
    bad("prot-sec-cnt-twice", craft(k2048, standard, prot=[Tlv(TlvType.SEC_CNT, b"\x01\x00\x00\x00"),
                                                            Tlv(TlvType.SEC_CNT, b"\x09\x00\x00\x00")]),
        "BAD_TLV", "two SEC_CNT TLVs in the protected area")
    tlv_overrun = bytearray(good)
    last = len(good) - 256 - TLV_ENTRY_HEADER_SIZE  # signature TLV entry header
    struct.pack_into("<H", tlv_overrun, last + 2, 257)
    bad("tlv-length-past-end", bytes(tlv_overrun), "BAD_TLV", "last TLV's length runs one byte past its area")
    total_past = bytearray(good)
    start = h.hdr_size + h.img_size + h.protect_tlv_size
    struct.pack_into("<H", total_past, start + 2, len(good) - start + 4)
    bad("tlv-total-past-slot", bytes(total_past), "TOO_LARGE", "unprotected area total runs past the slot")
    bad("two-sha256", craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), *standard(d, s)]),
        "DUPLICATE_HASH", "two (matching) SHA256 TLVs")
    bad("no-sha256", craft(k2048, lambda d, s: signature_tlvs(d, s, SignatureScheme.PSS)), "NO_HASH",
        "signed, but no SHA256 TLV")
    tampered = bytearray(good)
    tampered[h.hdr_size] ^= 0x01
    bad("hash-mismatch", bytes(tampered), "HASH_MISMATCH", "one payload bit flipped after signing")
    bad("sig-without-keyhash",
        craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.RSA2048_PSS, s.sign_digest(d, SignatureScheme.PSS))]),
        "SIG_WITHOUT_KEYHASH", "signature TLV with no KEYHASH before it")
    bad("unknown-key", craft(other, standard), "UNKNOWN_KEY", "signed by a key the device does not hold")
    bad("key-size-type",
        craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, s.public().keyhash()),
                                   Tlv(TlvType.RSA3072_PSS, s.sign_digest(d, SignatureScheme.PSS))]),
        "KEY_SIZE", "RSA3072_PSS TLV with an RSA-2048 key")
    bad("key-size-length",
        craft(k3072, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, s.public().keyhash()),
                                   Tlv(TlvType.RSA3072_PSS, s.sign_digest(d, SignatureScheme.PSS)[:256])]),
        "KEY_SIZE", "RSA-3072 key, 256-byte signature")
    for kind, value in ((TlvType.SEC_CNT, b"\xff\xff\xff\xff"), (TlvType.UUID_VID, vid), (TlvType.UUID_CID, cid),
                        (TlvType.DEPENDENCY, bytes(12)), (TlvType.BOOT_RECORD, b"\xa0")):
        bad(f"unprotected-{kind.name.lower().replace('_', '-')}",
            craft(k2048, lambda d, s, kind=kind, value=value: [*standard(d, s), Tlv(kind, value)]),
            "UNPROTECTED_TLV", f"{kind.name} in the unprotected area (CVE-2024-32883)")
    bad("prot-dependency-short", craft(k2048, standard, prot=[sec, Tlv(TlvType.DEPENDENCY, bytes(11))]),
        "BAD_TLV", "an 11-byte DEPENDENCY TLV (struct image_dependency is 12)")
    bad("prot-dependency-long", craft(k2048, standard, prot=[sec, Tlv(TlvType.DEPENDENCY, bytes(16))]),
        "BAD_TLV", "a 16-byte DEPENDENCY TLV (struct image_dependency is 12)")
    bad("prot-dependency-too-many",
        craft(k2048, standard, prot=[sec, *(dep(i, ImageVersion(1)) for i in (1, 255, 1, 255, 1))]),
        "BAD_TLV", "five DEPENDENCY TLVs: more than the 4 an image may carry")
    padded = bytearray(encode_dependency(1, ImageVersion(1)))
    padded[2] = 1
    bad("prot-dependency-pad", craft(k2048, standard, prot=[sec, Tlv(TlvType.DEPENDENCY, bytes(padded))]),
        "BAD_TLV", "a DEPENDENCY TLV with a non-zero pad byte (imgtool writes zeros; fail closed)")
    bad("prot-dependency-unknown-image", craft(k2048, standard, prot=[sec, dep(7, ImageVersion(1))]),
        "BAD_TLV", "an app depending on image 7: only stage 1 (1) and the firmware (255) exist")
    bad("prot-dependency-app-on-itself", craft(k2048, standard, prot=[sec, dep(0, ImageVersion(1))]),
        "BAD_TLV", "an app depending on image 0 (the app itself)")
    bad("stage1-dependency-on-app", craft(k2048, standard, prot=[sec, dep(0, ImageVersion(1)), updater]),
        "DEPENDENCY", "a stage-1 (updater) image depending on the app: stage 1 never does")
    bad("stage1-dependency-on-stage1", craft(k2048, standard, prot=[sec, updater, dep(1, ImageVersion(1))]),
        "BAD_TLV", "a stage-1 (updater) image depending on stage 1 (itself)")
    bad("unknown-tlv", craft(k2048, lambda d, s: [*standard(d, s), Tlv(0x99, b"hi")]), "UNKNOWN_TLV",
        "unknown type 0x99 in the unprotected area")
    bad("tlv-type-high-byte",
        craft(k2048, lambda d, s: [Tlv(0x0110, d), *signature_tlvs(d, s, SignatureScheme.PSS)]),
        "UNKNOWN_TLV", "SHA256 with a non-zero high type byte (0x0110) is not SHA256")
    bad_sig = bytearray(good)
    bad_sig[-1] ^= 0x80
    bad("bad-signature", bytes(bad_sig), "BAD_SIGNATURE", "last signature byte flipped")
    bad("too-many-signatures",
        craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d)] + 7 * signature_tlvs(d, s, SignatureScheme.PSS)),
        "BAD_TLV", "seven valid signatures: more than the 6 an image may carry (bounds RSA work)")
    bad("slot-smaller-than-header", good, "TOO_LARGE", "a 16-byte slot cannot hold a header", slot_size=16)
    bad("no-signature", craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d)]), "NO_SIGNATURE",
        "hash only, no signature")
    bad("pkcs1v15-trailing-garbage",
        craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, s.public().keyhash()),
                                   Tlv(TlvType.MPBOOT_RSA_PKCS1V15,
                                       raw_rsa_sign(s, pkcs1v15_block(256, d, garbage=b"\x00" * 8)))]),
        "BAD_SIGNATURE", "PKCS#1 v1.5 block with 8 bytes after the hash (shortened padding)")
    bad("pkcs1v15-missing-null",
        craft(k2048, lambda d, s: [Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, s.public().keyhash()),
                                   Tlv(TlvType.MPBOOT_RSA_PKCS1V15,
                                       raw_rsa_sign(s, pkcs1v15_block(256, d, digest_info=bytes.fromhex(
                                           "302f300b0609608648016503040201" "0420"))))]),
        "BAD_SIGNATURE", "DigestInfo without NULL parameters (Wycheproof 'acceptable'): refused")
    return v


def main() -> None:
    VECTORS.mkdir(parents=True, exist_ok=True)
    for old in VECTORS.glob("*.bin"):
        old.unlink()
    manifest = {
        "about": "Golden MCUboot images for mpboot; regenerate with tools/gen_vectors.py. "
                 "trusted_keys: the keys a verifier embeds, in order (key_index).",
        "trusted_keys": list(TRUSTED),
        "vectors": [],
    }
    for vec in vectors():
        (VECTORS / f"{vec.name}.bin").write_bytes(vec.image)
        entry: dict[str, object] = {"name": vec.name, "file": f"{vec.name}.bin",
                                    "slot_size": vec.slot_size or len(vec.image),
                                    "expect": vec.expect, "note": vec.note}
        if vec.fields is not None:
            entry["fields"] = vec.fields
        manifest["vectors"].append(entry)  # type: ignore[attr-defined]
    (VECTORS / "vectors.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest['vectors'])} vectors to {VECTORS}")


if __name__ == "__main__":
    main()
