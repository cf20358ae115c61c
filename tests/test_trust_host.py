"""The trust model on the host (docs/KEYS.md): every golden vector in tests/vectors/trust/
through mpboot.trust and mpboot.image, and the rules the vectors do not spell out byte by
byte (strict CBOR, domain separation, the cosign and build paths)."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import pytest

from conftest import KEYS_DIR, ROOT, VECTORS
from mpboot.errors import ImageErrorCode, ImageRejected, TrustErrorCode, TrustRefused, UsageError
from mpboot.image import (
    MAX_SIGNATURES,
    ImageSigner,
    ImageVersion,
    SignOptions,
    Tlv,
    TlvType,
    build_image,
    cosign,
    parse_image,
    verify_image,
)
from mpboot.keys import PublicKey, SignatureScheme, SigningKey, load_public_key
from mpboot.trust import (
    Certificate,
    Envelope,
    EnvelopeSignature,
    ImageKind,
    RevocationRecord,
    RootRecord,
    SignatureAlg,
    TrustState,
    add_signature,
    chain_for,
    decode_signed,
    sign_envelope,
    trust_digest,
)

sys.path.insert(0, str(ROOT / "tools"))
import gen_trust_vectors  # noqa: E402

TRUST_VECTORS = VECTORS / "trust"
MANIFEST = json.loads((TRUST_VECTORS / "trust.json").read_text())
PSS = SignatureScheme.PSS


def key(name: str) -> SigningKey:
    return gen_trust_vectors.key(name)


def pub(name: str) -> PublicKey:
    return key(name).public()


def state_of(trust: dict[str, Any]) -> TrustState:
    """The manifest's trust state (what a device would hold) as a TrustState."""
    return TrustState(trust["root_version"], tuple(load_public_key(KEYS_DIR / r) for r in trust["roots"]),
                      trust["threshold"], trust["image_threshold"], trust["revocation"],
                      tuple(bytes.fromhex(h) for h in trust["revoked_keys"]), tuple(trust["revoked_serials"]))


def after_of(state: TrustState) -> dict[str, Any]:
    return {"root_version": state.version, "threshold": state.threshold, "image_threshold": state.image_threshold,
            "roots": [k.keyhash().hex() for k in state.roots], "revocation": state.revocation,
            "revoked_keys": [h.hex() for h in state.revoked_keys], "revoked_serials": list(state.revoked_serials)}


# --- the golden vectors -----------------------------------------------------------------------


def test_manifest_is_whole_and_uses_test_only_keys() -> None:
    files = {p.name for p in TRUST_VECTORS.iterdir() if p.name != "trust.json"}
    listed = {v["file"] for v in MANIFEST["images"] + MANIFEST["records"]}
    assert files == listed
    names = [v["name"] for v in MANIFEST["images"] + MANIFEST["records"]]
    assert len(names) == len(set(names))
    for vec in MANIFEST["images"] + MANIFEST["records"]:
        assert all(r.startswith("TEST-ONLY-") and (KEYS_DIR / r).is_file() for r in vec["trust"]["roots"])
    assert {v["expect"] for v in MANIFEST["images"]} - {"ok"} <= set(ImageErrorCode.__members__)
    assert {v["expect"] for v in MANIFEST["records"]} - {"ok"} <= set(TrustErrorCode.__members__)
    # every new image code and every record code a device can reach from a record alone
    assert {"CERT_INVALID", "CERT_ISSUER", "CERT_WIDER", "OUT_OF_SCOPE", "REVOKED", "THRESHOLD"} <= {
        v["expect"] for v in MANIFEST["images"]}
    assert {"MALFORMED", "SIGNATURES", "NEW_SIGNATURES", "STALE", "REVOKED_ROOT", "TOO_LARGE"} <= {
        v["expect"] for v in MANIFEST["records"]}


@pytest.mark.parametrize("vec", MANIFEST["images"], ids=[v["name"] for v in MANIFEST["images"]])
def test_image_vector(vec: dict[str, Any]) -> None:
    data = (TRUST_VECTORS / vec["file"]).read_bytes()
    state = state_of(vec["trust"])
    if vec["expect"] == "ok":
        result = verify_image(data, state, vec["slot_size"])
        assert len(result.signatures) >= state.image_threshold, vec["note"]
        return
    with pytest.raises(ImageRejected) as caught:
        verify_image(data, state, vec["slot_size"])
    assert caught.value.code.name == vec["expect"], (vec["note"], str(caught.value))


@pytest.mark.parametrize("vec", MANIFEST["records"], ids=[v["name"] for v in MANIFEST["records"]])
def test_record_vector(vec: dict[str, Any]) -> None:
    data = (TRUST_VECTORS / vec["file"]).read_bytes()
    state = state_of(vec["trust"])
    if vec["expect"] == "ok":
        assert after_of(state.apply(data)) == vec["after"], vec["note"]
        return
    with pytest.raises(TrustRefused) as caught:
        state.apply(data)
    assert caught.value.code.name == vec["expect"], (vec["note"], str(caught.value))
    assert after_of(state) == vec["after"]  # a refused record changes nothing


def test_generator_reruns_to_the_same_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PSS makes the bytes differ on each run; names, states, sizes and verdicts must not."""
    monkeypatch.setattr(gen_trust_vectors, "OUT", tmp_path)
    gen_trust_vectors.main()
    again = json.loads((tmp_path / "trust.json").read_text())
    assert again == MANIFEST
    for vec in MANIFEST["records"]:
        if vec["expect"] == "ok":
            fresh = (tmp_path / vec["file"]).read_bytes()
            assert after_of(state_of(vec["trust"]).apply(fresh)) == vec["after"]


# --- envelopes: strict decoding -----------------------------------------------------------------


def _revocation() -> bytes:
    return sign_envelope(RevocationRecord(1, (pub("ci").keyhash(),), (20,)), [key("root-a")], PSS)


def _mutated(fields: dict[int, Any]) -> bytes:
    return cbor2.dumps(fields, canonical=True)


@pytest.mark.parametrize("name,make", [
    ("integer not in its shortest form", lambda env: b"\xa2\x01" + cbor2.dumps(env.body) + b"\x18\x02" +
     cbor2.dumps([[s.keyhash, int(s.alg), s.signature] for s in env.signatures])),
    ("map keys out of order", lambda env: b"\xa2\x02" + cbor2.dumps([[s.keyhash, int(s.alg), s.signature]
                                                                     for s in env.signatures]) +
     b"\x01" + cbor2.dumps(env.body)),
    ("text key", lambda env: _mutated({1: env.body, 2: [], "x": 1})),
    ("tagged body", lambda env: b"\xa2\x01\xd8\x18" + cbor2.dumps(env.body) + b"\x02" +
     cbor2.dumps([[s.keyhash, int(s.alg), s.signature] for s in env.signatures])),
    ("unknown alg", lambda env: _mutated({1: env.body, 2: [[s.keyhash, 0x24, s.signature] for s in env.signatures]})),
    ("short key hash", lambda env: _mutated({1: env.body, 2: [[s.keyhash[:31], int(s.alg), s.signature]
                                                            for s in env.signatures]})),
    ("255-byte signature", lambda env: _mutated({1: env.body, 2: [[s.keyhash, int(s.alg), s.signature[:255]]
                                                                for s in env.signatures]})),
    ("signature of 2 fields", lambda env: _mutated({1: env.body, 2: [[s.keyhash, int(s.alg)] for s in env.signatures]})),
    ("alg as a float", lambda env: _mutated({1: env.body, 2: [[s.keyhash, 32.0, s.signature] for s in env.signatures]})),
    ("body as text", lambda env: _mutated({1: "x", 2: [[s.keyhash, int(s.alg), s.signature] for s in env.signatures]})),
    ("a third key", lambda env: _mutated({1: env.body, 2: [[s.keyhash, int(s.alg), s.signature]
                                                         for s in env.signatures], 3: 0})),
])
def test_envelope_refuses(name: str, make: Any) -> None:
    env = Envelope.decode(_revocation())
    with pytest.raises(TrustRefused) as caught:
        decode_signed(make(env))
    assert caught.value.code is TrustErrorCode.MALFORMED, name


@pytest.mark.parametrize("name,fields", [
    ("negative serial", {1: 1, 2: -1}),
    ("serial 0", {1: 1, 2: 0}),
    ("serial over 32 bits", {1: 1, 2: 1 << 32}),
    ("vendor of 15 bytes", {1: 1, 2: 5, 4: [bytes(15)]}),
    ("no vendor in the list", {1: 1, 2: 5, 4: []}),
    ("five vendors", {1: 1, 2: 5, 4: [bytes(16)] * 5}),
    ("nine classes", {1: 1, 2: 5, 5: [bytes(16)] * 9}),
    ("counters reversed", {1: 1, 2: 5, 6: [10, 9]}),
    ("three counters", {1: 1, 2: 5, 6: [1, 2, 3]}),
    ("kinds 0", {1: 1, 2: 5, 7: 0}),
    ("depth 4", {1: 1, 2: 5, 8: 4}),
    ("no key", {1: 1, 2: 5, "no key": None}),
    ("type 4", {1: 4, 2: 5}),
])
def test_certificate_body_refuses(name: str, fields: dict[Any, Any]) -> None:
    body = {k: v for k, v in fields.items() if k != "no key"}
    if "no key" not in fields:
        body[3] = pub("ci").pkcs1_der()
    data = Envelope(_mutated(body), (EnvelopeSignature(bytes(32), SignatureAlg.RSA2048_PSS, bytes(256)),)).encode()
    with pytest.raises(TrustRefused) as caught:
        decode_signed(data)
    assert caught.value.code is TrustErrorCode.MALFORMED, name


def test_certificate_key_must_be_minimal_pkcs1_with_65537() -> None:
    der = pub("ci").pkcs1_der()
    # the same key with its modulus INTEGER given a redundant leading zero byte (BER, not DER)
    n = pub("ci").key.public_numbers().n.to_bytes(257, "big")
    assert n[0] == 0
    ber = bytes.fromhex("30820110") + bytes.fromhex("02820102") + b"\x00" + n + bytes.fromhex("0203010001")
    for bad in (ber, der[:-1], der + b"\x00"):
        with pytest.raises(TrustRefused):
            decode_signed(Envelope(_mutated({1: 1, 2: 5, 3: bad}),
                                   (EnvelopeSignature(bytes(32), SignatureAlg.RSA2048_PSS, bytes(256)),)).encode())


def test_a_trust_signature_is_never_an_image_signature() -> None:
    """The 16-byte domain prefix: a signature over a body does not verify over the SHA-256 of
    the same bytes (an image digest), and an image signature does not verify in an envelope."""
    signer = key("root-a")
    body = RevocationRecord(1).encode()
    trust_sig = signer.sign_digest(trust_digest(body), PSS)
    with pytest.raises(ImageRejected):
        signer.public().verify_digest(trust_sig, hashlib.sha256(body).digest(), PSS)
    image_sig = signer.sign_digest(hashlib.sha256(body).digest(), PSS)
    forged = Envelope(body, (EnvelopeSignature(signer.public().keyhash(), SignatureAlg.RSA2048_PSS, image_sig),))
    state = TrustState.initial([signer.public()])
    with pytest.raises(TrustRefused) as caught:
        state.apply(forged.encode())
    assert caught.value.code is TrustErrorCode.SIGNATURES


def test_add_signature_refuses_a_second_signature_by_a_key_and_a_ninth() -> None:
    unsigned = sign_envelope(RevocationRecord(3), [], PSS)
    assert decode_signed(unsigned, unsigned_ok=True).envelope.signatures == ()
    with pytest.raises(TrustRefused):
        decode_signed(unsigned)  # an unsigned envelope is a file of the detached flow, never a record
    once = add_signature(unsigned, key("root-a"), PSS)
    with pytest.raises(UsageError, match="already signed"):
        add_signature(once, key("root-a"), SignatureScheme.PKCS1V15)
    data = once
    for name in ("root-b", "root-c", "root-d", "ci", "team", "rsa2048", "rsa3072"):
        data = add_signature(data, key(name), PSS)
    with pytest.raises(UsageError, match="8 signatures"):
        add_signature(data, key("rsa2048-untrusted"), PSS)
    env = decode_signed(data).envelope
    assert [s.alg for s in env.signatures[:3]] == [SignatureAlg.RSA2048_PSS] * 3
    assert env.signatures[3].alg is SignatureAlg.RSA3072_PSS


def test_pkcs1v15_envelope_signatures_count() -> None:
    record = sign_envelope(RevocationRecord(1), [key("root-a"), key("root-b")], SignatureScheme.PKCS1V15)
    assert {s.alg for s in decode_signed(record).envelope.signatures} == {SignatureAlg.RSA_PKCS1V15}
    state = TrustState.initial([pub("root-a"), pub("root-b")], threshold=2)
    assert state.apply(record).revocation == 1


# --- trust state rules ------------------------------------------------------------------------


def test_bad_signatures_by_keys_that_do_not_count_are_skipped() -> None:
    """A stranger's or a revoked root's signature is not checked: it counts for nothing either way."""
    body = RevocationRecord(2).encode()
    garbage = [EnvelopeSignature(pub("root-a").keyhash(), SignatureAlg.RSA2048_PSS, bytes(256)),
               EnvelopeSignature(pub("rsa2048-untrusted").keyhash(), SignatureAlg.RSA2048_PSS, bytes(256))]
    good = [EnvelopeSignature(k.public().keyhash(), SignatureAlg.RSA2048_PSS, k.sign_digest(trust_digest(body), PSS))
            for k in (key("root-b"), key("root-c"))]
    state = replace(TrustState.initial([pub("root-a"), pub("root-b"), pub("root-c")], threshold=2),
                    revocation=1, revoked_keys=(pub("root-a").keyhash(),))
    assert state.apply(Envelope(body, (*garbage, *good)).encode()).revocation == 2


def test_rotation_revocation_and_images_in_sequence() -> None:
    """A device's life: roots a, b, c (2 of 3); the roots rotate to c, d; then ci is revoked.
    Each step's image verdicts follow."""
    state = TrustState.initial([pub("root-a"), pub("root-b"), pub("root-c")], threshold=2)
    ci_cert = sign_envelope(Certificate(7, pub("ci"), counters=(1, 50)), [key("root-c"), key("root-d"),
                                                                         key("root-a"), key("root-b")], PSS)
    body = b"\xff" * 0x200 + b"app"
    opts = SignOptions(ImageVersion(1, 0, 0), security_counter=5)
    by_ci = build_image(body, [ImageSigner(key("ci"), (ci_cert,))], opts)
    by_a = build_image(body, key("root-a"), opts)
    assert verify_image(by_ci, state).key_index == -1 and verify_image(by_a, state).key_index == 0

    rotation = sign_envelope(RootRecord(2, (pub("root-c"), pub("root-d")), 2, 1), [key("root-a"), key("root-c")], PSS)
    with pytest.raises(TrustRefused) as caught:
        state.apply(rotation)
    assert caught.value.code is TrustErrorCode.NEW_SIGNATURES  # c signed for the new set, d has not yet
    rotation = add_signature(rotation, key("root-d"), PSS)
    state = state.apply(rotation)
    assert (state.version, state.threshold) == (2, 2)
    with pytest.raises(ImageRejected) as rejected:
        verify_image(by_a, state)
    assert rejected.value.code is ImageErrorCode.UNKNOWN_KEY
    assert verify_image(by_ci, state).signatures[0].signer.certificate is not None  # c+d signed the cert too

    revocation = sign_envelope(RevocationRecord(1, (pub("ci").keyhash(),)), [key("root-c"), key("root-d")], PSS)
    state = state.apply(revocation)
    with pytest.raises(ImageRejected) as rejected:
        verify_image(by_ci, state)
    assert rejected.value.code is ImageErrorCode.REVOKED
    with pytest.raises(TrustRefused) as caught:
        state.apply(rotation)
    assert caught.value.code is TrustErrorCode.STALE


def test_initial_state_checks_its_thresholds() -> None:
    with pytest.raises(UsageError):
        TrustState.initial([pub("root-a"), pub("root-a")], threshold=2)  # one distinct key
    with pytest.raises(UsageError):
        TrustState.initial([pub("root-a")], image_threshold=MAX_SIGNATURES + 1)
    with pytest.raises(UsageError):
        TrustState.initial([])


def test_building_bodies_checks_the_rules() -> None:
    with pytest.raises(UsageError, match="depth"):
        Certificate(1, pub("ci"), depth=4)
    with pytest.raises(UsageError, match="counter"):
        Certificate(1, pub("ci"), counters=(5, 4))
    with pytest.raises(UsageError, match="threshold"):
        RootRecord(2, (pub("root-a"),), 2, 1)
    with pytest.raises(UsageError, match="distinct"):
        RootRecord(2, (pub("root-a"), pub("root-a")), 1, 1)
    with pytest.raises(UsageError, match="16"):
        RevocationRecord(1, serials=tuple(range(17)))


# --- images: build, cosign, certificates ----------------------------------------------------------

BODY = b"\xff" * 0x200 + bytes(range(256))
OPTS = SignOptions(ImageVersion(2, 1, 0), security_counter=3)
ROOTS3 = TrustState.initial([pub("root-a"), pub("root-b"), pub("root-c")], threshold=2)


def test_one_signer_list_builds_the_plain_imgtool_image() -> None:
    """PKCS#1 v1.5 is deterministic: a key and a one-signer list give the same bytes, with no
    MPBOOT_KIND for an app."""
    opts = replace(OPTS, scheme=SignatureScheme.PKCS1V15)
    plain = build_image(BODY, key("root-a"), opts)
    assert build_image(BODY, [ImageSigner(key("root-a"))], opts) == plain
    assert [t.type for t in parse_image(plain).unprotected] == [TlvType.SHA256, TlvType.KEYHASH,
                                                                TlvType.MPBOOT_RSA_PKCS1V15]
    assert TlvType.MPBOOT_KIND not in {t.type for t in parse_image(plain).protected}
    updater = parse_image(build_image(BODY, key("root-a"), replace(opts, kind=ImageKind.UPDATER)))
    assert updater.protected[-1] == Tlv(TlvType.MPBOOT_KIND, struct.pack("<I", 2), updater.protected[-1].offset)
    assert updater.kind == ImageKind.UPDATER


def test_no_sign_then_cosign_is_what_signing_with_both_keys_writes() -> None:
    unsigned = build_image(BODY, [], OPTS)
    with pytest.raises(ImageRejected) as caught:
        verify_image(unsigned, ROOTS3)
    assert caught.value.code is ImageErrorCode.NO_SIGNATURE
    cosigned = cosign(cosign(unsigned, key("root-a"), PSS), key("root-c"), PSS)
    both = build_image(BODY, [ImageSigner(key("root-a")), ImageSigner(key("root-c"))], OPTS)
    assert len(cosigned) == len(both)
    assert [(t.type, len(t.value)) for t in parse_image(cosigned).unprotected] == \
        [(t.type, len(t.value)) for t in parse_image(both).unprotected]
    result = verify_image(cosigned, replace(ROOTS3, image_threshold=2))
    assert [s.signer.root_index for s in result.signatures] == [0, 2]
    area = len(unsigned) - 40  # the unsigned image's unprotected area: info, SHA256
    assert struct.unpack_from("<HH", cosigned, area) == (0x6907, len(cosigned) - area)  # tlv_tot grew with it


def test_cosign_refuses() -> None:
    signed = build_image(BODY, key("root-a"), OPTS)
    with pytest.raises(UsageError, match="already signed"):
        cosign(signed, key("root-a"), SignatureScheme.PKCS1V15)
    with pytest.raises(UsageError, match="slot size"):
        cosign(signed, key("root-b"), PSS, slot_size=len(signed) + 100)
    tampered = bytearray(signed)
    tampered[0x200] ^= 1
    with pytest.raises(UsageError, match="SHA256"):
        cosign(bytes(tampered), key("root-b"), PSS)
    with pytest.raises(UsageError, match="follow"):
        cosign(signed + b"\xff", key("root-b"), PSS)
    full = signed
    for name in ("root-b", "root-c", "root-d", "ci", "team"):
        full = cosign(full, key(name), PSS)
    with pytest.raises(UsageError, match="6 signatures"):
        cosign(full, key("rsa2048"), PSS)
    revocation = sign_envelope(RevocationRecord(1), [key("root-a")], PSS)
    with pytest.raises(UsageError, match="not a certificate"):
        cosign(signed, key("ci"), PSS, [revocation])


def test_cosign_writes_a_delegates_chain_once() -> None:
    team = sign_envelope(Certificate(10, pub("team"), depth=1), [key("root-a"), key("root-b")], PSS)
    ci = sign_envelope(Certificate(11, pub("ci")), [key("team")], PSS)
    assert chain_for(pub("ci"), [ci, team]) == (team, ci)  # parent first, whatever the order given
    assert chain_for(pub("root-a"), [ci, team]) == ()
    image = build_image(BODY, [ImageSigner(key("team"), (team,))], OPTS)
    image = cosign(image, key("ci"), PSS, chain_for(pub("ci"), [team, ci]))
    kinds = [t.type for t in parse_image(image).unprotected]
    assert kinds == [TlvType.SHA256, TlvType.MPBOOT_CERT, TlvType.KEYHASH, TlvType.RSA3072_PSS,
                     TlvType.MPBOOT_CERT, TlvType.KEYHASH, TlvType.RSA2048_PSS]
    assert len(verify_image(image, replace(ROOTS3, image_threshold=2)).signatures) == 2


def test_build_refuses_the_same_key_twice_and_too_many_signers() -> None:
    with pytest.raises(UsageError, match="twice"):
        build_image(BODY, [ImageSigner(key("root-a")), ImageSigner(key("root-a"))], OPTS)
    names = ("root-a", "root-b", "root-c", "root-d", "ci", "team", "rsa2048")
    with pytest.raises(UsageError, match="at most 6"):
        build_image(BODY, [ImageSigner(key(n)) for n in names], OPTS)


def test_a_certificate_for_a_root_adds_nothing() -> None:
    """A narrow certificate for a key that is already a root does not narrow the root."""
    narrow = sign_envelope(Certificate(5, pub("root-c"), counters=(100, 200)), [key("root-a"), key("root-b")], PSS)
    image = build_image(BODY, [ImageSigner(key("root-c"), (narrow,))], OPTS)  # counter 3: outside 100..200
    assert verify_image(image, ROOTS3).key_index == 2


def test_plain_key_list_keeps_the_old_verdicts() -> None:
    """A bare key list is version 1, thresholds 1: first verified key reported, a bad
    signature by a held key rejects at once even when another verifies."""
    a_then_b = build_image(BODY, [ImageSigner(key("root-a")), ImageSigner(key("root-b"))], OPTS)
    assert verify_image(a_then_b, [pub("root-b"), pub("root-a")]).key_index == 1
    flipped = bytearray(a_then_b)
    flipped[-1] ^= 1  # root b's signature
    with pytest.raises(ImageRejected) as caught:
        verify_image(bytes(flipped), [pub("root-a"), pub("root-b")])
    assert caught.value.code is ImageErrorCode.BAD_SIGNATURE
    assert verify_image(bytes(flipped), [pub("root-a")]).key_index == 0  # b unknown: skipped
