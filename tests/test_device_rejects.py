"""The device verifier refuses damaged images: every single-bit flip in the header and TLV
areas of one small image, truncation at every TLV boundary, and PKCS#1 v1.5 forgery shapes.
(The named malformations, e.g. two SHA256 TLVs or protected types in the unprotected area,
are golden vectors: tests/test_vectors.py.)"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT
from mpboot.errors import ImageErrorCode, ImageRejected
from mpboot.image import ImageHeader, Tlv, TlvType, verify_image
from mpboot.keys import SigningKey

sys.path.insert(0, str(ROOT / "tools"))
import gen_vectors  # noqa: E402


@pytest.fixture(scope="module")
def small_image(rsa2048: SigningKey) -> bytes:
    """hdr 0x20, 64-byte payload, SEC_CNT + VID, SHA256, KEYHASH, RSA2048_PSS."""
    from mpboot.image import ImageVersion, SignOptions, build_image, vendor_uuid

    return build_image(b"\0" * 0x20 + bytes(range(64)), rsa2048,
                       SignOptions(ImageVersion(1, 0, 0), header_size=0x20, security_counter=3,
                                   vendor_id=vendor_uuid("example.com")))


def test_every_bit_flip_in_header_and_tlvs_is_rejected(device, small_image: bytes, tmp_path,
                                                       record_property) -> None:
    h = ImageHeader.unpack(small_image)
    assert device.verify_bytes(small_image).accepted  # the unflipped image is good
    path = tmp_path / "small.bin"
    path.write_bytes(small_image)
    tlv_start = h.hdr_size + h.img_size
    flips = 0
    for start, end in ((0, h.hdr_size), (tlv_start, len(small_image))):
        out = device.run("dev_bitflip", path, len(small_image), start, end).splitlines()
        accepted = out[0].split()[1:]
        assert accepted == [], f"bit flips accepted at bit offsets {accepted}"
        counts = dict(map(int, pair.split(":")) for pair in out[1].split()[1:])
        flips += sum(counts.values())
        assert sum(counts.values()) == (end - start) * 8
    record_property("summary", f"bit flips: {flips} single-bit mutants of header and TLV areas, 0 accepted")


@pytest.mark.parametrize("fill", ["eof", "erased"])
def test_truncation_at_every_tlv_boundary_is_rejected(device, small_image: bytes, tmp_path, fill: str) -> None:
    """Cut at each TLV boundary: the medium ends there (eof), or the rest of the slot reads
    as erased NOR flash (0xff), as after an interrupted write."""
    slot = len(small_image) + 64
    cuts = gen_vectors.tlv_boundaries(small_image)
    assert len(cuts) >= 10
    items = []
    for cut in cuts:
        data = small_image[:cut]
        if fill == "erased":
            data += b"\xff" * (slot - cut)
        p = tmp_path / f"cut-{cut}.bin"
        p.write_bytes(data)
        items.append((p, slot))
    verdicts = device.verify_files(items)
    accepted = [cut for cut, v in zip(cuts, verdicts) if v.accepted]
    assert accepted == []
    for (p, _), verdict in zip(items, verdicts):  # and the host agrees on why
        with pytest.raises(ImageRejected) as err:
            verify_image(p.read_bytes(), _trusted(), slot)
        assert err.value.code == verdict.code, p.name


def _trusted():
    from conftest import trusted_public_keys

    return trusted_public_keys()


FORGERIES = {
    "garbage-after-hash": dict(garbage=b"\x01" * 16),
    "garbage-one-byte": dict(garbage=b"\x00"),
    "no-null-params": dict(digest_info=bytes.fromhex("302f300b06096086480165030402010420")),
    "sha1-digest-info": dict(digest_info=bytes.fromhex("3021300906052b0e03021a05000414")),
}


@pytest.mark.parametrize("shape", sorted(FORGERIES))
def test_pkcs1v15_forgery_shapes_are_rejected(device, rsa2048: SigningKey, shape: str) -> None:
    """Well-formed RSA operations over malformed PKCS#1 v1.5 blocks: the device compares the
    whole block, so none passes (the classic e=3 forgeries need exactly such lenience)."""

    def unprotected(digest: bytes, s: SigningKey) -> list[Tlv]:
        block = gen_vectors.pkcs1v15_block(256, digest, **FORGERIES[shape])
        return [Tlv(TlvType.SHA256, digest), Tlv(TlvType.KEYHASH, s.public().keyhash()),
                Tlv(TlvType.MPBOOT_RSA_PKCS1V15, gen_vectors.raw_rsa_sign(s, block))]

    image = gen_vectors.craft(rsa2048, unprotected)
    verdict = device.verify_bytes(image)
    assert not verdict.accepted and verdict.code == ImageErrorCode.BAD_SIGNATURE
    # The same construction with the correct block is accepted: the harness is sound.
    good = gen_vectors.craft(rsa2048, lambda d, s: [
        Tlv(TlvType.SHA256, d), Tlv(TlvType.KEYHASH, s.public().keyhash()),
        Tlv(TlvType.MPBOOT_RSA_PKCS1V15, gen_vectors.raw_rsa_sign(s, gen_vectors.pkcs1v15_block(256, d)))])
    assert device.verify_bytes(good).accepted


@pytest.mark.parametrize("block_size", [512, 4096])
def test_verify_through_a_block_device(device, small_image: bytes, tmp_path, block_size: int) -> None:
    """block_reader over the extended block protocol: reads cross block boundaries at byte
    offsets, and the erased rest of the slot does not confuse the verifier."""
    blocks = -(-len(small_image) // block_size) + 1
    path = tmp_path / "img.bin"
    path.write_bytes(small_image)
    words = device.run("dev_block_verify", path, block_size, blocks).split()
    assert words[:2] == ["OK", str(len(small_image))]
    assert int(words[2]) > 5  # header, payload chunks, TLV entries: streamed, not one read
    tampered = bytearray(small_image)
    tampered[0x20] ^= 1
    path.write_bytes(tampered)
    assert device.run("dev_block_verify", path, block_size, blocks).split() == ["REJECT", str(int(ImageErrorCode.HASH_MISMATCH))]
    # An image whose header claims more than the partition holds is refused from the header
    # alone (the fake device raises on any read past its end, which would fail the run).
    oversized = bytearray(small_image)
    oversized[12:16] = (blocks * block_size).to_bytes(4, "little")  # img_size
    path.write_bytes(oversized)
    assert device.run("dev_block_verify", path, block_size, blocks).split() == ["REJECT", str(int(ImageErrorCode.TOO_LARGE))]
