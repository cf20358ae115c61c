"""DEPENDENCY TLVs (0x40, MCUboot's struct image_dependency) on the host: `mpboot sign
--depends`, `mpboot info`, the library's refusals, and the device's on crafted images. The
golden vectors (tests/vectors/ok-dependencies, prot-dependency-*) hold host and device to the
same parse; tests/test_imgtool_interop.py checks imgtool reads and writes the same bytes."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from clikit import assert_error, assert_ok, run
from conftest import KEYS_DIR, ROOT, signing_key
from mpboot.errors import ImageErrorCode, ImageRejected, UsageError
from mpboot.image import (
    ImageKind,
    ImageVersion,
    SignOptions,
    Tlv,
    TlvType,
    build_image,
    encode_dependency,
    parse_image,
)

sys.path.insert(0, str(ROOT / "tools"))
import gen_vectors  # noqa: E402

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
BODY = b"\xff" * 0x200 + bytes(range(256))


def _sign(tmp_path: Path, *extra: str) -> tuple[Path, object]:
    src = tmp_path / "fw.bin"
    src.write_bytes(bytes(range(256)))
    out = tmp_path / "signed.bin"
    return out, run("sign", src, "-k", KEY, "--version", "2.0.0", "--pad-header", "-o", out, *extra)


def test_encoding_is_mcuboot_struct_image_dependency() -> None:
    """image_id u8, 3 zero pad bytes, then struct image_version (u8, u8, u16, u32), little endian."""
    assert encode_dependency(1, ImageVersion(1, 2, 0x0304, 0x05060708)) == bytes.fromhex("010000000102040308070605")


def test_sign_depends_writes_protected_tlvs_in_the_order_given(tmp_path: Path) -> None:
    out, result = _sign(tmp_path, "--depends", "firmware:1.0", "--depends", "1:1.2.3+4", "--vendor-id", "example.com")
    assert_ok(result)
    image = parse_image(out.read_bytes())
    assert image.dependencies == [(255, ImageVersion(1, 0)), (1, ImageVersion(1, 2, 3, 4))]
    # imgtool's order: SEC_CNT, the dependencies, then UUID_VID
    assert [t.type for t in image.protected] == [TlvType.SEC_CNT, TlvType.DEPENDENCY, TlvType.DEPENDENCY,
                                                 TlvType.UUID_VID]
    assert not any(t.type == TlvType.DEPENDENCY for t in image.unprotected)


def test_sign_without_depends_is_unchanged(tmp_path: Path) -> None:
    """No --depends: the same protected area as before the option existed."""
    out, result = _sign(tmp_path)
    assert_ok(result)
    image = parse_image(out.read_bytes())
    assert image.dependencies == [] and [t.type for t in image.protected] == [TlvType.SEC_CNT]
    assert image.header.protect_tlv_size == 4 + 8


@pytest.mark.parametrize("args,says", [
    (["--depends", "1:1.0", "--depends", "stage1:2.0"], "image 1 is given twice"),
    (["--depends", "0:1.0"], "a dependency on image 0: an app depends only on stage 1 (image 1) or the firmware"),
    (["--depends", "7:1.0"], "a dependency on image 7: an app depends only on"),
    (["--kind", "updater", "--depends", "0:1.0"], "a stage-1 (updater) image never depends on the app"),
    (["--kind", "updater", "--depends", "stage1:1.0"], "a stage-1 (updater) image depends only on the firmware"),
    (["--depends", "1.0"], "expected IMAGE:VERSION"),
    (["--depends", "x:1.0"], "expected IMAGE:VERSION"),
    (["--depends", "firmwar:1.0"], "expected IMAGE:VERSION"),
    (["--depends", "-1:1.0"], "expected IMAGE:VERSION"),
    (["--depends", "1:1.x"], "bad version"),
    ([a for i in range(5) for a in ("--depends", f"{i}:1.0")], "at most 4"),
])
def test_sign_depends_refusals_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    out, result = _sign(tmp_path, *args)
    assert_error(result, 2, says)
    assert not out.exists()


def test_library_refuses_what_the_cli_refuses() -> None:
    with pytest.raises(UsageError, match="twice"):
        build_image(BODY, signing_key("TEST-ONLY-rsa2048.pem"),
                    SignOptions(ImageVersion(1), dependencies=((1, ImageVersion(1)), (1, ImageVersion(3)))))
    with pytest.raises(UsageError, match="never depends on the app"):
        build_image(BODY, signing_key("TEST-ONLY-rsa2048.pem"),
                    SignOptions(ImageVersion(1), kind=ImageKind.UPDATER, dependencies=((0, ImageVersion(1)),)))


def test_sign_depends_firmware_writes_image_255(tmp_path: Path, device) -> None:  # type: ignore[no-untyped-def]
    """`--depends firmware:1.0` (either kind): image id 255, the firmware's stage-0 ABI; the
    device's verifier reads it back (the ABI itself is its policy's: tests/device/dev_stages.py)."""
    for kind in ("app", "updater"):
        (tmp_path / kind).mkdir()
        out, result = _sign(tmp_path / kind, "--kind", kind, "--depends", "firmware:1.0")
        assert_ok(result)
        assert parse_image(out.read_bytes()).dependencies == [(255, ImageVersion(1, 0))]
        verdict = device.verify_bytes(out.read_bytes())
        assert verdict.accepted and verdict.deps == ((255, "1.0.0+0"),), verdict
        assert "firmware ABI (image 255) >= 1.0.0+0" in assert_ok(run("info", out)).stdout


def test_info_shows_dependencies(tmp_path: Path) -> None:
    out, result = _sign(tmp_path, "--depends", "1:1.2.3", "--depends", "firmware:1.0.0+9")
    assert_ok(result)
    text = assert_ok(run("info", out)).stdout
    assert "dependencies:     stage 1 (image 1) >= 1.2.3+0, firmware ABI (image 255) >= 1.0.0+9\n" in text
    summary = json.loads(assert_ok(run("info", out, "--json")).stdout)
    assert summary["dependencies"] == [{"image": 1, "min_version": "1.2.3+0"},
                                       {"image": 255, "min_version": "1.0.0+9"}]
    (tmp_path / "plain").mkdir()
    plain, result = _sign(tmp_path / "plain")
    assert_ok(result)
    assert "dependencies:     none (no DEPENDENCY TLV)\n" in assert_ok(run("info", plain)).stdout
    assert json.loads(assert_ok(run("info", plain, "--json")).stdout)["dependencies"] == []


def _with_protected(prot: list[Tlv]) -> bytes:
    return gen_vectors.craft(signing_key("TEST-ONLY-rsa2048.pem"), gen_vectors.standard, prot=prot)


SEC = Tlv(TlvType.SEC_CNT, struct.pack("<I", 1))


@pytest.mark.parametrize("length", [0, 8, 11, 13, 12 + 4])
def test_wrong_length_is_bad_tlv_on_host_and_device(device, length: int) -> None:
    image = _with_protected([SEC, Tlv(TlvType.DEPENDENCY, bytes(length))])
    with pytest.raises(ImageRejected) as err:
        parse_image(image)
    assert err.value.code is ImageErrorCode.BAD_TLV
    verdict = device.verify_bytes(image)
    assert not verdict.accepted and verdict.code == ImageErrorCode.BAD_TLV


IDS = (1, 255, 1, 255, 1)


def test_four_dependencies_pass_five_do_not_on_host_and_device(device) -> None:
    deps = [Tlv(TlvType.DEPENDENCY, encode_dependency(i, ImageVersion(n, 1))) for n, i in enumerate(IDS)]
    four = _with_protected([SEC, *deps[:4]])
    verdict = device.verify_bytes(four)
    assert verdict.accepted and verdict.deps == tuple((i, f"{n}.1.0+0") for n, i in enumerate(IDS[:4]))
    assert parse_image(four).dependencies == [(i, ImageVersion(n, 1)) for n, i in enumerate(IDS[:4])]
    five = _with_protected([SEC, *deps])
    assert device.verify_bytes(five).code == ImageErrorCode.BAD_TLV
    with pytest.raises(ImageRejected) as err:
        parse_image(five)
    assert err.value.code is ImageErrorCode.BAD_TLV


@pytest.mark.parametrize("pad", [b"\x00\x00\x01", b"\x80\x00\x00", b"\xaa\xbb\xcc"])
def test_non_zero_pad_bytes_are_bad_tlv_on_host_and_device(device, pad: bytes) -> None:
    """imgtool writes zeros; a newer MCUboot may give them a meaning (a slot number): fail closed."""
    value = bytes([1]) + pad + encode_dependency(1, ImageVersion(1, 2, 3, 4))[4:]
    image = _with_protected([SEC, Tlv(TlvType.DEPENDENCY, value)])
    assert device.verify_bytes(image).code == ImageErrorCode.BAD_TLV
    with pytest.raises(ImageRejected) as err:
        parse_image(image)
    assert err.value.code is ImageErrorCode.BAD_TLV


KIND2 = Tlv(TlvType.MPBOOT_KIND, struct.pack("<I", 2))


@pytest.mark.parametrize("image_id,updater,code", [
    (1, False, None), (255, False, None), (255, True, None),
    (0, False, ImageErrorCode.BAD_TLV), (2, False, ImageErrorCode.BAD_TLV), (254, False, ImageErrorCode.BAD_TLV),
    (0, True, ImageErrorCode.DEPENDENCY), (1, True, ImageErrorCode.BAD_TLV), (7, True, ImageErrorCode.BAD_TLV),
])
def test_who_may_depend_on_whom_on_host_and_device(device, image_id: int, updater: bool,
                                                   code: ImageErrorCode | None) -> None:
    """An app on stage 1 (1) or the firmware (255); a stage-1 image on the firmware only, on the
    app never (DEPENDENCY, 27); any other id BAD_TLV. The kind TLV may come before or after."""
    dep = Tlv(TlvType.DEPENDENCY, encode_dependency(image_id, ImageVersion(1)))
    for prot in ([SEC, dep, KIND2], [SEC, KIND2, dep]) if updater else ([SEC, dep],):
        image = _with_protected(prot)
        verdict = device.verify_bytes(image)
        if code is None:
            assert verdict.accepted and verdict.deps == ((image_id, "1.0.0+0"),)
            assert parse_image(image).dependencies == [(image_id, ImageVersion(1))]
            continue
        assert not verdict.accepted and verdict.code == code, verdict
        with pytest.raises(ImageRejected) as err:
            parse_image(image)
        assert err.value.code is code


def test_an_image_without_dependencies_reports_none(device) -> None:
    image = _with_protected([SEC])
    verdict = device.verify_bytes(image)
    assert verdict.accepted and verdict.deps == ()
