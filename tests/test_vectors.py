"""Golden vectors (tests/vectors/, written by tools/gen_vectors.py) through both verifiers:
the host's (mpboot.image.verify_image) and the device's (firmware/mpboot/image.py on the
MicroPython unix port). Both must reach the expected verdict with the same error code."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from conftest import ROOT, VECTORS, signing_key, trusted_public_keys
from mpboot.errors import ImageErrorCode, ImageRejected
from mpboot.image import ImageVersion, SignOptions, build_image, parse_image, verify_image
from mpboot.keys import SignatureScheme

sys.path.insert(0, str(ROOT / "tools"))
import gen_vectors  # noqa: E402

MANIFEST = json.loads((VECTORS / "vectors.json").read_text())
VECTOR_LIST = MANIFEST["vectors"]


def _expected_code(vec: dict) -> ImageErrorCode | None:
    return None if vec["expect"] == "OK" else ImageErrorCode[vec["expect"]]


def test_manifest_names_the_test_keys_in_device_order() -> None:
    from conftest import TRUSTED_KEY_FILES

    assert tuple(MANIFEST["trusted_keys"]) == TRUSTED_KEY_FILES
    assert all(name.startswith("TEST-ONLY-") for name in MANIFEST["trusted_keys"])
    assert {v["file"] for v in VECTOR_LIST} == {p.name for p in VECTORS.glob("*.bin")}


@pytest.mark.parametrize("vec", VECTOR_LIST, ids=[v["name"] for v in VECTOR_LIST])
def test_host_verifier(vec: dict) -> None:
    data = (VECTORS / vec["file"]).read_bytes()
    code = _expected_code(vec)
    if code is not None:
        with pytest.raises(ImageRejected) as err:
            verify_image(data, trusted_public_keys(), vec["slot_size"])
        assert err.value.code == code, vec["note"]
        return
    result = verify_image(data, trusted_public_keys(), vec["slot_size"])
    fields = vec["fields"]
    img = result.image
    assert str(img.header.version) == fields["version"]
    assert img.security_counter == fields["security_counter"]
    assert result.key_index == fields["key_index"]
    assert (img.vendor_id.hex() if img.vendor_id else None) == fields.get("vendor_id")
    assert (img.class_id.hex() if img.class_id else None) == fields.get("class_id")
    assert [[i, str(v)] for i, v in img.dependencies] == fields.get("deps", [])
    assert img.total_size == len(data)


def test_device_verifier(device) -> None:
    """All vectors in one MicroPython run: same verdicts and codes as the manifest."""
    items = [(VECTORS / v["file"], v["slot_size"]) for v in VECTOR_LIST]
    verdicts = device.verify_files(items)
    mismatches = []
    for vec, verdict in zip(VECTOR_LIST, verdicts):
        code = _expected_code(vec)
        if code is not None:
            if verdict.accepted or verdict.code != code:
                mismatches.append((vec["name"], vec["expect"], verdict))
            continue
        fields = vec["fields"]
        got = (verdict.accepted, verdict.version, verdict.security_counter, verdict.key_index,
               [list(d) for d in verdict.deps])
        if got != (True, fields["version"], fields["security_counter"], fields["key_index"], fields.get("deps", [])):
            mismatches.append((vec["name"], "OK", verdict))
    assert not mismatches


def test_pkcs1v15_vector_is_rebuilt_byte_for_byte() -> None:
    """PKCS#1 v1.5 signing is deterministic: the host builder reproduces the golden image."""
    golden = (VECTORS / "ok-rsa2048-pkcs1v15.bin").read_bytes()
    rebuilt = build_image(gen_vectors.body(), signing_key("TEST-ONLY-rsa2048.pem"),
                          SignOptions(ImageVersion(1, 0, 0), security_counter=1,
                                      scheme=SignatureScheme.PKCS1V15))
    assert rebuilt == golden


def test_pss_vector_unsigned_parts_are_rebuilt() -> None:
    """PSS signatures are randomised; everything before the signature is not."""
    golden = parse_image((VECTORS / "ok-rsa3072-pss.bin").read_bytes())
    v = ImageVersion(2, 0, 1)
    rebuilt = parse_image(build_image(gen_vectors.body(0x20), signing_key("TEST-ONLY-rsa3072.pem"),
                                      SignOptions(v, header_size=0x20,
                                                  security_counter=v.auto_security_counter())))
    sig_offset = golden.unprotected[-1].offset
    assert rebuilt.data[:sig_offset] == golden.data[:sig_offset]


@pytest.mark.parametrize("scheme", list(SignatureScheme))
def test_verify_digest_raises_on_a_bad_signature(scheme: SignatureScheme) -> None:
    """Verify means raise: a good signature returns nothing; another digest, another key or a
    flipped bit raises ImageRejected(BAD_SIGNATURE), never a bool a caller could ignore."""
    key = signing_key("TEST-ONLY-rsa2048.pem")
    digest = hashlib.sha256(b"image").digest()
    signature = key.sign_digest(digest, scheme)
    assert key.public().verify_digest(signature, digest, scheme) is None
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    for sig, dig, public in ((signature, hashlib.sha256(b"other").digest(), key.public()),
                             (flipped, digest, key.public()),
                             (signature, digest, signing_key("TEST-ONLY-rsa2048-untrusted.pem").public())):
        with pytest.raises(ImageRejected) as caught:
            public.verify_digest(sig, dig, scheme)
        assert caught.value.code is ImageErrorCode.BAD_SIGNATURE and caught.value.exit_code == 1
