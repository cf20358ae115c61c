#!/usr/bin/env python3
"""Generate the trust-model golden vectors in tests/vectors/trust/ (docs/KEYS.md), read by
the host tests (tests/test_trust_host.py) and the device tests.

    .venv/bin/python tools/gen_trust_vectors.py   # rewrites tests/vectors/trust/*

Images (*.bin) carry certificates and several signatures; records (*.cbor) are root and
revocation records. Both are signed with the TEST-ONLY keys in tests/keys/. PSS signatures
are randomised, so a re-run changes those bytes (and nothing else): the committed files are
the reference, and every verdict must stay the same.

trust.json, one entry per vector (a file may appear under several trust states):

    images:  {"name", "file", "note", "trust", "slot_size", "expect"}
    records: {"name", "file", "note", "trust", "expect", "after"}

"trust" is the verifier's state before: {"root_version", "roots" (public key files under
tests/keys, in order), "threshold", "image_threshold", "revocation", "revoked_keys" (key
hashes, hex), "revoked_serials"}. "expect" is "ok", an ImageErrorCode name (images) or a
TrustErrorCode name (records). "after" is the trust state once the record is applied (the
state before when it is refused), with "roots" as key hashes (hex).
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from mpboot.image import (  # noqa: E402
    DEFAULT_HEADER_SIZE,
    ImageHeader,
    ImageSigner,
    ImageVersion,
    SignOptions,
    Tlv,
    TlvType,
    assemble_image,
    build_image,
    class_uuid,
    encode_tlv_area,
    protected_tlvs,
    signature_tlvs,
    vendor_uuid,
)
from mpboot.keys import PublicKey, SignatureScheme, SigningKey, load_public_key, load_signing_key  # noqa: E402
from mpboot.trust import (  # noqa: E402
    Certificate,
    Envelope,
    EnvelopeSignature,
    ImageKind,
    RevocationRecord,
    RootRecord,
    SignatureAlg,
    sign_envelope,
    signature_alg,
    trust_digest,
)

KEYS = ROOT / "tests" / "keys"
OUT = ROOT / "tests" / "vectors" / "trust"
PSS = SignatureScheme.PSS
PAYLOAD = bytes(range(256)) + b"mpboot trust vector payload\n"
VENDOR = vendor_uuid("example.com")
CLASS = class_uuid("golden-widget", VENDOR)
OTHER_VENDOR = vendor_uuid("other.example")
OTHER_CLASS = class_uuid("other-widget", VENDOR)
COUNTER = 100

# Serials of the certificates below (revocation vectors name them).
TEAM_SERIAL = 10  # team (RSA-3072), issued by roots a+b, depth 1
CI_SERIAL = 20  # ci, issued by roots a+b, depth 0
CI_BY_TEAM_SERIAL = 21  # ci, issued by team, depth 0


@functools.cache
def key(name: str) -> SigningKey:
    return load_signing_key(KEYS / f"TEST-ONLY-{name}.pem")


def pub(name: str) -> PublicKey:
    return load_public_key(KEYS / f"TEST-ONLY-{name}.pub.pem")


def pub_file(name: str) -> str:
    return f"TEST-ONLY-{name}.pub.pem"


# --- trust states ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    roots: tuple[str, ...] = ("root-a", "root-b", "root-c")
    threshold: int = 2
    image_threshold: int = 1
    root_version: int = 1
    revocation: int = 0
    revoked_keys: tuple[str, ...] = ()  # key names
    revoked_serials: tuple[int, ...] = ()

    def manifest(self) -> dict[str, Any]:
        return {"root_version": self.root_version, "roots": [pub_file(r) for r in self.roots],
                "threshold": self.threshold, "image_threshold": self.image_threshold,
                "revocation": self.revocation, "revoked_keys": [pub(k).keyhash().hex() for k in self.revoked_keys],
                "revoked_serials": list(self.revoked_serials)}

    def after(self) -> dict[str, Any]:
        m = self.manifest()
        return {"root_version": m["root_version"], "threshold": m["threshold"],
                "image_threshold": m["image_threshold"], "roots": [pub(r).keyhash().hex() for r in self.roots],
                "revocation": m["revocation"], "revoked_keys": m["revoked_keys"],
                "revoked_serials": m["revoked_serials"]}


T0 = Trust()  # roots a, b, c; 2 of them sign certificates and records; 1 signature per image
ROTATED = Trust(roots=("root-c", "root-d"), threshold=1, root_version=2)


# --- envelopes ------------------------------------------------------------------------------


def envelope_signature(signer: SigningKey, body: bytes, alg: SignatureAlg | None = None) -> EnvelopeSignature:
    scheme = SignatureScheme.PKCS1V15 if alg is SignatureAlg.RSA_PKCS1V15 else PSS
    return EnvelopeSignature(signer.public().keyhash(), alg or signature_alg(signer.bits, scheme),
                             signer.sign_digest(trust_digest(body), scheme))


def signed_raw(body: bytes, *signers: SigningKey) -> bytes:
    """An envelope around arbitrary body bytes (rules broken on purpose), really signed."""
    return Envelope(body, tuple(envelope_signature(s, body) for s in signers)).encode()


def signed(body: Certificate | RootRecord | RevocationRecord, *signers: str) -> bytes:
    return sign_envelope(body, [key(s) for s in signers], PSS)


def flip_signature(envelope: bytes, index: int) -> bytes:
    env = Envelope.decode(envelope)
    sigs = list(env.signatures)
    s = sigs[index]
    sigs[index] = replace(s, signature=bytes([s.signature[0] ^ 1]) + s.signature[1:])
    return replace(env, signatures=tuple(sigs)).encode()


def indefinite_map(envelope: bytes) -> bytes:
    """The same envelope as an indefinite-length map: the same values, not canonical CBOR."""
    env = Envelope.decode(envelope)
    signatures = [[s.keyhash, int(s.alg), s.signature] for s in env.signatures]
    return b"\xbf\x01" + cbor2.dumps(env.body) + b"\x02" + cbor2.dumps(signatures) + b"\xff"


def certificate(serial: int, subject: str, **scope: Any) -> Certificate:
    return Certificate(serial, pub(subject), **scope)


TEAM = certificate(TEAM_SERIAL, "team", vendors=(VENDOR,), counters=(0, 10000), kinds=3, depth=1)
CI = certificate(CI_SERIAL, "ci", vendors=(VENDOR,), classes=(CLASS,), counters=(1, 1000), kinds=1)
CI_BY_TEAM = replace(CI, serial=CI_BY_TEAM_SERIAL)


# --- images ---------------------------------------------------------------------------------


def options(**changes: Any) -> SignOptions:
    base = SignOptions(ImageVersion(1, 2, 0), security_counter=COUNTER, vendor_id=VENDOR, class_id=CLASS)
    return replace(base, **changes)


def body() -> bytes:
    return b"\xff" * DEFAULT_HEADER_SIZE + PAYLOAD


def build(signers: Sequence[tuple[str, Sequence[bytes]]], **changes: Any) -> bytes:
    return build_image(body(), [ImageSigner(key(k), tuple(c)) for k, c in signers], options(**changes))


def craft(unprotected: Callable[[bytes], list[Tlv]], prot: list[Tlv] | None = None) -> bytes:
    """An image with a hand-laid unprotected area (given the digest): orders and repeats
    build_image never writes."""
    prot = protected_tlvs(COUNTER, VENDOR, CLASS) if prot is None else prot
    b = body()
    prot_size = len(encode_tlv_area(0x6908, prot)) if prot else 0
    header = ImageHeader(0, DEFAULT_HEADER_SIZE, prot_size, len(b) - DEFAULT_HEADER_SIZE, 0, ImageVersion(1, 2, 0))
    return assemble_image(header, b, prot, unprotected)


def sig(digest: bytes, signer: str) -> list[Tlv]:
    return signature_tlvs(digest, key(signer), PSS)


def cert_tlv(envelope: bytes) -> Tlv:
    return Tlv(TlvType.MPBOOT_CERT, envelope)


@dataclass
class Vectors:
    images: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    def _file(self, name: str, data: bytes, suffix: str) -> str:
        filename = f"{name}{suffix}"
        assert self.files.get(filename, data) == data, filename
        self.files[filename] = data
        return filename

    def image(self, name: str, data: bytes | str, trust: Trust, expect: str, note: str) -> None:
        """`data`: image bytes (written as NAME.bin), or the name of an earlier image file."""
        filename = data if isinstance(data, str) else self._file(name, data, ".bin")
        self.images.append({"name": name, "file": filename, "note": note, "trust": trust.manifest(),
                            "slot_size": len(self.files[filename]), "expect": expect})

    def record(self, name: str, data: bytes | str, trust: Trust, expect: str, note: str,
               after: Trust | None = None) -> None:
        filename = data if isinstance(data, str) else self._file(name, data, ".cbor")
        assert (expect == "ok") == (after is not None), name
        self.records.append({"name": name, "file": filename, "note": note, "trust": trust.manifest(),
                             "expect": expect, "after": (after or trust).after()})


def image_vectors(v: Vectors) -> None:
    team = signed(TEAM, "root-a", "root-b")
    ci = signed(CI, "root-a", "root-b")
    ci_by_team = signed(CI_BY_TEAM, "team")
    depth1 = [("ci", [ci])]
    depth2 = [("ci", [team, ci_by_team])]
    two = replace(T0, image_threshold=2)

    v.image("plain-root", build([("root-a", [])]), T0, "ok", "one root signature, no certificate: an imgtool image")
    v.image("delegated-depth1", build(depth1), T0, "ok", "ci certified by roots a+b (2 of 3), signs in scope")
    v.image("delegated-depth2", build(depth2), T0, "ok",
            "team (depth 1) certified by a+b certifies ci (depth 0), which signs in scope")
    v.image("team-signs-updater", build([("team", [team])], kind=ImageKind.UPDATER), T0, "ok",
            "a depth-1 key also signs images: team's scope holds updater images")
    v.image("two-of-three", build([("root-a", []), ("root-c", [])]), two, "ok", "image threshold 2: roots a and c")
    v.image("two-of-three-one-signer", "plain-root.bin", two, "THRESHOLD", "image threshold 2, one root signed")
    v.image("root-and-delegate", build([("root-b", []), ("ci", [ci])]), two, "ok",
            "image threshold 2: a root and a certified key count alike")
    v.image("one-key-signs-twice", craft(lambda d: [Tlv(TlvType.SHA256, d), *sig(d, "root-a"), *sig(d, "root-a")]),
            two, "THRESHOLD", "root a signs twice (two PSS signatures): one distinct key")
    v.image("duplicated-signature-tlvs",
            craft(lambda d: [Tlv(TlvType.SHA256, d), *(sig(d, "root-a") * 2)]), two, "THRESHOLD",
            "root a's KEYHASH and signature TLVs repeated byte for byte: one distinct key")
    v.image("one-key-two-encodings",
            craft(lambda d: [Tlv(TlvType.SHA256, d), *sig(d, "root-a"), Tlv(TlvType.PUBKEY, pub("root-a").pkcs1_der()),
                             Tlv(TlvType.RSA2048_PSS, key("root-a").sign_digest(d, PSS))]), two, "THRESHOLD",
            "root a named once by KEYHASH and once by PUBKEY: one distinct key")
    v.image("six-signatures", craft(lambda d: [Tlv(TlvType.SHA256, d), *(sig(d, "root-a") * 6)]), T0, "ok",
            "six signature TLVs: the most an image may carry")
    v.image("seven-signatures", craft(lambda d: [Tlv(TlvType.SHA256, d), *(sig(d, "root-a") * 7)]), T0, "BAD_TLV",
            "seven signature TLVs: one more than an image may carry")
    v.image("five-certificates", craft(lambda d: [Tlv(TlvType.SHA256, d), *[cert_tlv(ci)] * 5, *sig(d, "ci")]), T0,
            "BAD_TLV", "five MPBOOT_CERT TLVs: one more than an image may carry")

    # scope
    v.image("out-of-scope-vendor", build(depth1, vendor_id=OTHER_VENDOR, class_id=None), T0, "OUT_OF_SCOPE",
            "ci's certificate lists example.com; the image is for other.example")
    v.image("out-of-scope-no-vendor", build(depth1, vendor_id=None, class_id=None), T0, "OUT_OF_SCOPE",
            "an image without UUID_VID is outside a certificate that lists vendors")
    v.image("out-of-scope-class", build(depth1, class_id=OTHER_CLASS), T0, "OUT_OF_SCOPE",
            "ci's certificate lists golden-widget; the image is for other-widget")
    v.image("out-of-scope-counter", build(depth1, security_counter=5000), T0, "OUT_OF_SCOPE",
            "security counter 5000, outside ci's 1..1000")
    v.image("out-of-scope-no-counter", build(depth1, security_counter=None), T0, "OUT_OF_SCOPE",
            "no SEC_CNT counts as 0, below ci's 1..1000")
    v.image("out-of-scope-kind", build(depth1, kind=ImageKind.UPDATER), T0, "OUT_OF_SCOPE",
            "an updater image; ci's certificate covers apps only")
    v.image("out-of-scope-bad-signature",
            craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(ci), Tlv(TlvType.KEYHASH, pub("ci").keyhash()),
                             Tlv(TlvType.RSA2048_PSS, bytes(256))], prot=protected_tlvs(5000, VENDOR, CLASS)),
            T0, "OUT_OF_SCOPE", "counter 5000 is outside ci's scope: its (zero) signature is not even verified")
    v.image("updater-by-root", build([("root-a", [])], kind=ImageKind.UPDATER), T0, "ok",
            "MPBOOT_KIND updater, signed by a root (roots cover everything)")
    v.image("kind-two-bits", craft(lambda d: [Tlv(TlvType.SHA256, d), *sig(d, "root-a")],
                                   prot=[*protected_tlvs(COUNTER, VENDOR, CLASS),
                                         Tlv(TlvType.MPBOOT_KIND, struct.pack("<I", 3))]),
            T0, "BAD_TLV", "MPBOOT_KIND 3: not one bit")
    v.image("kind-unprotected", craft(lambda d: [Tlv(TlvType.SHA256, d), *sig(d, "root-a"),
                                                 Tlv(TlvType.MPBOOT_KIND, struct.pack("<I", 2))]),
            T0, "UNPROTECTED_TLV", "MPBOOT_KIND in the unprotected area: a claim the signature must cover")

    # width
    for name, child, note in (
        ("cert-wider-vendor", replace(CI_BY_TEAM, vendors=None), "ci (any vendor) under team (example.com)"),
        ("cert-wider-counter", replace(CI_BY_TEAM, counters=(0, 20000)), "ci 0..20000 under team 0..10000"),
        ("cert-wider-kind", replace(CI_BY_TEAM, kinds=None), "ci (every kind) under team (app, updater)"),
        ("cert-wider-depth", replace(CI_BY_TEAM, depth=1), "ci depth 1 under team depth 1"),
    ):
        v.image(name, build([("ci", [team, signed(child, "team")])]), T0, "CERT_WIDER", note)

    # issuers
    ci_issues = signed(certificate(30, "team", vendors=(VENDOR,), classes=(CLASS,), counters=(1, 1000), kinds=1),
                       "ci")
    v.image("cert-issuer-depth0", build([("team", [ci, ci_issues])]), T0, "CERT_ISSUER",
            "a certificate signed by ci, whose certificate has depth 0")
    v.image("cert-by-stranger", build([("ci", [signed(CI, "rsa2048-untrusted")])]), T0, "CERT_ISSUER",
            "ci's certificate signed by a key the device does not trust")
    v.image("cert-one-root-of-two", build([("ci", [signed(CI, "root-a")])]), T0, "CERT_ISSUER",
            "ci's certificate signed by root a alone: the root threshold is 2")
    v.image("cert-signature-bad", build([("ci", [flip_signature(ci, 0)])]), T0, "BAD_SIGNATURE",
            "root a's signature on ci's certificate has a flipped bit")
    wrong_alg = Envelope(CI.encode(), (envelope_signature(key("root-a"), CI.encode(), SignatureAlg.RSA3072_PSS),
                                       envelope_signature(key("root-b"), CI.encode()))).encode()
    v.image("cert-signature-wrong-alg", build([("ci", [wrong_alg])]), T0, "BAD_SIGNATURE",
            "root a (RSA-2048) signs ci's certificate under alg 0x23 (RSA-3072 PSS)")
    v.image("child-cert-before-parent", build([("ci", [ci_by_team, team])]), T0, "CERT_ISSUER",
            "ci's certificate (issued by team) comes before team's")
    v.image("signature-before-cert", craft(lambda d: [Tlv(TlvType.SHA256, d), *sig(d, "ci"), cert_tlv(ci)]),
            T0, "UNKNOWN_KEY", "ci's signature comes before its certificate: not trusted yet")
    v.image("keyhash-before-cert",
            craft(lambda d: [Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, pub("ci").keyhash()), cert_tlv(ci),
                             Tlv(TlvType.RSA2048_PSS, key("ci").sign_digest(d, PSS))]), T0, "UNKNOWN_KEY",
            "ci's KEYHASH, then its certificate, then its signature: the key is looked up at the KEYHASH")
    v.image("wider-but-cosigned", build([("ci", [team, signed(replace(CI_BY_TEAM, vendors=None), "team")]),
                                         ("root-b", [])]), T0, "ok",
            "ci's certificate is wider than team's (it certifies nothing), but root b signed too")
    v.image("first-reason-wins",
            craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(signed(CI, "rsa2048-untrusted")), *sig(d, "ci"),
                             *sig(d, "root-a")]), replace(T0, revocation=1, revoked_keys=("root-a",)),
            "CERT_ISSUER", "ci's certificate by a stranger (CERT_ISSUER), then revoked root a signs (REVOKED): "
            "the first reason is the code")
    junk = Envelope.decode(signed(TEAM, "root-a", "root-b"))
    junk = replace(junk, signatures=(EnvelopeSignature(pub("ci").keyhash(), SignatureAlg.RSA2048_PSS, bytes(256)),
                                     *junk.signatures)).encode()
    v.image("cert-junk-by-depth0-key", build([("ci", [ci]), ("team", [junk])]), replace(T0, image_threshold=2),
            "ok", "team's certificate also carries a junk signature by ci (certified, depth 0): not checked")

    # malformed certificates
    ci_env = cbor2.loads(ci)
    junk_alg = cbor2.dumps({1: ci_env[1], 2: [*ci_env[2], [pub("rsa2048-untrusted").keyhash(), 5, bytes(10)]]},
                           canonical=True)
    v.image("cert-stranger-unknown-alg",
            craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(junk_alg), *sig(d, "ci"), *sig(d, "root-a")]), T0,
            "CERT_INVALID",
            "ci's certificate also carries a stranger's entry with alg 5: refused whoever signed it")
    ci_body = CI.encode()
    v.image("cert-not-canonical",
            craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(indefinite_map(ci)), *sig(d, "ci")]), T0,
            "CERT_INVALID", "ci's certificate envelope is an indefinite-length map (not canonical CBOR)")
    unknown_field = cbor2.loads(ci_body) | {9: 1}
    v.image("cert-unknown-field",
            craft(lambda d: [Tlv(TlvType.SHA256, d),
                             cert_tlv(signed_raw(cbor2.dumps(unknown_field, canonical=True), key("root-a"),
                                                 key("root-b"))), *sig(d, "ci")]), T0, "CERT_INVALID",
            "ci's certificate body has a key 9 (unknown), signed by a+b")
    v.image("cert-unsigned",
            craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(Envelope(ci_body).encode()), *sig(d, "ci")]), T0,
            "CERT_INVALID", "ci's certificate envelope has no signature")
    revocation = signed(RevocationRecord(1, serials=(99,)), "root-a", "root-b")
    v.image("cert-is-a-record", craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(revocation), *sig(d, "root-a")]),
            T0, "CERT_INVALID", "an MPBOOT_CERT TLV holding a revocation record")
    big = Envelope(ci_body, tuple(envelope_signature(key(k), ci_body) for k in
                                  ("root-a", "root-b", "root-c", "root-d", "team", "rsa2048-untrusted", "rsa3072",
                                   "rsa2048"))).encode()
    assert len(big) > 2048
    v.image("cert-too-large", craft(lambda d: [Tlv(TlvType.SHA256, d), cert_tlv(big), *sig(d, "ci")]), T0,
            "CERT_INVALID", f"ci's certificate with 8 signatures: {len(big)} bytes, over 2048")

    # revocation
    v.image("revoked-key", "delegated-depth1.bin", replace(T0, revocation=1, revoked_keys=("ci",)), "REVOKED",
            "ci's key is revoked")
    v.image("revoked-serial", "delegated-depth1.bin", replace(T0, revocation=1, revoked_serials=(CI_SERIAL,)),
            "REVOKED", "ci's certificate serial is revoked")
    v.image("revoked-issuer-key", "delegated-depth2.bin", replace(T0, revocation=1, revoked_keys=("team",)),
            "REVOKED", "team, which issued ci's certificate, is revoked")
    v.image("revoked-issuer-serial", "delegated-depth2.bin",
            replace(T0, revocation=1, revoked_serials=(TEAM_SERIAL,)), "REVOKED",
            "team's certificate serial is revoked: it certifies nothing, so neither does ci's")
    v.image("revoked-root", "plain-root.bin", replace(T0, revocation=1, revoked_keys=("root-a",)), "REVOKED",
            "root a, the only signer, is revoked")
    v.image("revoked-but-cosigned", build([("ci", [ci]), ("root-b", [])]), replace(T0, revocation=1,
                                                                                  revoked_keys=("ci",)),
            "ok", "ci is revoked, but root b signed too (the runbook: cosign before revoking)")
    v.image("revoked-not-others", "delegated-depth1.bin", replace(T0, revocation=1, revoked_keys=("team",),
                                                                  revoked_serials=(CI_BY_TEAM_SERIAL,)),
            "ok", "what is revoked is another key and another serial")

    # rotation
    v.image("rotation-transition", build([("root-a", []), ("root-d", [])]), T0, "ok",
            "signed by old root a and new root d: boots before the rotation...")
    v.image("rotation-transition-after", "rotation-transition.bin", ROTATED, "ok", "...and after it")
    v.image("old-root-after-rotation", "plain-root.bin", ROTATED, "UNKNOWN_KEY",
            "root a's image once the root set is c, d")
    v.image("stale-cert-after-rotation", build([("ci", [ci]), ("root-c", [])]), ROTATED, "ok",
            "ci's certificate by a+b (roots no more) certifies nothing, but root c signed too")
    v.image("stale-cert-alone-after-rotation", "delegated-depth1.bin", ROTATED, "CERT_ISSUER",
            "ci's certificate by a+b, roots no more: it certifies nothing, and ci alone signed")
    ci_both = signed(CI, "root-a", "root-b", "root-d")
    v.image("cert-across-rotation", build([("ci", [ci_both])]), T0, "ok",
            "ci's certificate signed by a+b (old threshold) and d (new threshold)...")
    v.image("cert-across-rotation-after", "cert-across-rotation.bin", ROTATED, "ok", "...valid on both sides")


def record_vectors(v: Vectors) -> None:
    new_roots = ("root-b", "root-c", "root-d")
    rotation = RootRecord(2, tuple(pub(r) for r in new_roots), 2, 1)
    rotated = Trust(roots=new_roots, threshold=2, image_threshold=1, root_version=2)
    ok_rotation = signed(rotation, "root-a", "root-b", "root-d")
    v.record("rotation-ok", ok_rotation, T0, "ok", "version 2 = b, c, d (2 of 3): a+b sign for the old set, "
             "b+d for the new", after=rotated)
    v.record("rotation-replay", "rotation-ok.cbor", rotated, "STALE", "the same rotation again: version 2 is current")
    v.record("rotation-version-skip", signed(replace(rotation, version=3), "root-a", "root-b", "root-d"), T0,
             "STALE", "version 3 while the device holds 1")
    v.record("rotation-too-few-old", signed(rotation, "root-b", "root-d"), T0, "SIGNATURES",
             "only b of the current roots signed (threshold 2)")
    v.record("rotation-too-few-new", signed(RootRecord(2, (pub("root-c"), pub("root-d")), 2, 1),
                                            "root-a", "root-b", "root-d"), T0, "NEW_SIGNATURES",
             "new set c, d (2 of 2): only d of it signed")
    v.record("rotation-bad-old-signature", flip_signature(ok_rotation, 0), T0, "SIGNATURES",
             "root a's signature has a flipped bit")
    v.record("rotation-bad-new-signature", flip_signature(ok_rotation, 2), T0, "NEW_SIGNATURES",
             "root d's (new only) signature has a flipped bit")
    rotation_body = rotation.encode()
    v.record("rotation-one-key-twice", signed_raw(rotation_body, key("root-a"), key("root-a"), key("root-d")), T0,
             "SIGNATURES", "root a signs twice: one distinct current root of the 2 needed")
    v.record("rotation-revoked-signer", "rotation-ok.cbor", replace(T0, revocation=1, revoked_keys=("root-a",)),
             "SIGNATURES", "root a is revoked: its signature counts for nothing")
    v.record("rotation-names-revoked-key", "rotation-ok.cbor", replace(T0, revocation=1, revoked_keys=("root-c",)),
             "REVOKED_ROOT", "the new set holds root c, which is revoked")
    v.record("rotation-to-one-root", signed(RootRecord(2, (pub("root-d"),), 1, 2), "root-a", "root-c", "root-d"),
             T0, "ok", "version 2 = d alone, image threshold 2",
             after=Trust(roots=("root-d",), threshold=1, image_threshold=2, root_version=2))
    spki = cbor2.loads(rotation_body) | {11: [pub("root-b").pkcs1_der(), pub("root-c").pkcs1_der(),
                                               pub("root-d").key.public_bytes(*_SPKI)]}
    v.record("malformed-spki-root-key", signed_raw(cbor2.dumps(spki, canonical=True), key("root-a"), key("root-b"),
                                                   key("root-d")), T0, "MALFORMED",
             "a new root given as SubjectPublicKeyInfo DER, not PKCS#1 RSAPublicKey")
    for name, changes, note in (
        ("malformed-threshold-above-keys", {12: 4}, "threshold 4 with 3 keys"),
        ("malformed-image-threshold-7", {13: 7}, "image threshold 7: an image carries at most 6 signatures"),
        ("malformed-duplicate-roots", {11: [pub("root-b").pkcs1_der()] * 2 + [pub("root-d").pkcs1_der()]},
         "root b twice in the new set"),
        ("malformed-version-bool", {10: True}, "version is CBOR true, not an unsigned integer"),
    ):
        body = cbor2.dumps(cbor2.loads(rotation_body) | changes, canonical=True)
        v.record(name, signed_raw(body, key("root-a"), key("root-b"), key("root-d")), T0, "MALFORMED", note)

    revocation = RevocationRecord(1, (pub("ci").keyhash(),), (CI_SERIAL,))
    revoked = replace(T0, revocation=1, revoked_keys=("ci",), revoked_serials=(CI_SERIAL,))
    ok_revocation = signed(revocation, "root-a", "root-b")
    v.record("revocation-ok", ok_revocation, T0, "ok", "number 1: ci's key and serial 20", after=revoked)
    v.record("revocation-replay", "revocation-ok.cbor", revoked, "STALE", "number 1 again")
    v.record("revocation-older", "revocation-ok.cbor", replace(revoked, revocation=5), "STALE",
             "number 1 while the device holds 5")
    v.record("revocation-too-few", signed(replace(revocation, number=2), "root-a"), T0, "SIGNATURES",
             "signed by root a alone (threshold 2)")
    v.record("revocation-old-roots", "revocation-ok.cbor", ROTATED, "SIGNATURES",
             "signed by a+b, which are no longer roots")
    v.record("revocation-clears", signed(RevocationRecord(2), "root-b", "root-c"), revoked, "ok",
             "number 2, empty: it replaces the whole list", after=replace(T0, revocation=2))
    v.record("revocation-stranger-and-one-root", signed(replace(revocation, number=2), "rsa2048-untrusted", "root-c"),
             T0, "SIGNATURES", "a stranger's signature is skipped: one root of the 2 needed")

    rev_body = revocation.encode()
    v.record("malformed-certificate", signed(CI, "root-a", "root-b"), T0, "MALFORMED",
             "a certificate is not a trust record")
    v.record("malformed-unsigned", Envelope(rev_body).encode(), T0, "MALFORMED", "no signature (sign --no-sign)")
    env = Envelope.decode(ok_revocation)
    v.record("malformed-nine-signatures",
             replace(env, signatures=env.signatures + tuple(envelope_signature(key(k), rev_body) for k in
                                                            ("root-c", "root-d", "team", "ci", "rsa2048",
                                                             "rsa3072", "rsa2048-untrusted"))).encode(),
             T0, "MALFORMED", "nine signatures (at most 8)")
    v.record("malformed-unknown-field",
             signed_raw(cbor2.dumps(cbor2.loads(rev_body) | {23: 1}, canonical=True), key("root-a"), key("root-b")),
             T0, "MALFORMED", "revocation body with key 23 (unknown)")
    v.record("malformed-body-too-large",
             signed_raw(cbor2.dumps(cbor2.loads(rev_body) | {22: list(range(1, 17)), 21: [bytes(32)] * 16,
                                                              24: bytes(1500)}, canonical=True),
                        key("root-a"), key("root-b")), T0, "MALFORMED", "a body over 2048 bytes")
    v.record("malformed-truncated", ok_revocation[:-1], T0, "MALFORMED", "the last byte is missing")
    v.record("malformed-trailing-byte", ok_revocation + b"\x00", T0, "MALFORMED", "a byte after the envelope")
    v.record("malformed-not-canonical", indefinite_map(ok_revocation), T0, "MALFORMED",
             "the envelope is an indefinite-length map")
    v.record("malformed-seventeen-serials",
             signed_raw(cbor2.dumps({1: 3, 20: 2, 22: list(range(1, 18))}, canonical=True), key("root-a"),
                        key("root-b")), T0, "MALFORMED", "17 revoked serials (at most 16)")
    ok_env = cbor2.loads(ok_revocation)
    stranger = pub("rsa2048-untrusted").keyhash()
    v.record("malformed-stranger-unknown-alg",
             cbor2.dumps({1: ok_env[1], 2: [*ok_env[2], [stranger, 5, bytes(10)]]}, canonical=True), T0,
             "MALFORMED", "a stranger's entry with alg 5 and a 10-byte signature: refused whoever signed it")
    v.record("malformed-stranger-signature-length",
             cbor2.dumps({1: ok_env[1], 2: [*ok_env[2], [stranger, 0x20, bytes(100)]]}, canonical=True), T0,
             "MALFORMED", "a stranger's PSS entry of 100 bytes (256 or 384 only)")
    v.record("malformed-revoked-serial-zero",
             signed_raw(cbor2.dumps({1: 3, 20: 2, 22: [0]}, canonical=True), key("root-a"), key("root-b")),
             T0, "MALFORMED", "serial 0 (certificate serials start at 1)")
    v.record("too-large", ok_revocation + bytes(4097 - len(ok_revocation)), T0, "TOO_LARGE",
             "4097 bytes: over the 4096 a record may be")


def _spki() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


_SPKI = _spki()


def main() -> None:
    v = Vectors()
    image_vectors(v)
    record_vectors(v)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in [*OUT.glob("*.bin"), *OUT.glob("*.cbor")]:
        old.unlink()
    for name, data in v.files.items():
        (OUT / name).write_bytes(data)
    manifest = {
        "about": "Trust-model golden vectors (docs/KEYS.md); regenerate with tools/gen_trust_vectors.py. "
                 "trust: the state before (roots: public key files under tests/keys); after: the state "
                 "once a record is taken (the state before when it is refused; roots as key hashes).",
        "images": v.images,
        "records": v.records,
    }
    (OUT / "trust.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(v.images)} image and {len(v.records)} record vectors ({len(v.files)} files) to {OUT}")


if __name__ == "__main__":
    main()
