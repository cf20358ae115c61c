"""Interop with MCUboot's imgtool (PyPI imgtool 2.5.0) both ways: imgtool-signed images pass
the device verifier and `mpboot verify`; mpboot-signed images pass `imgtool verify`, and
`imgtool dumpinfo` reads the same version and security counter, and the same dependencies
(`-d` / `--depends`: DEPENDENCY TLVs, byte for byte the same protected area)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import KEYS_DIR, trusted_public_keys
from mpboot.cli import cli
from mpboot.errors import ImageErrorCode, ImageRejected
from mpboot.image import parse_image, verify_image

IMGTOOL = str(Path(sys.executable).parent / "imgtool")
SLOT = 0x20000
PAYLOAD = bytes(range(256)) * 8


def imgtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = IMGTOOL if Path(IMGTOOL).exists() else shutil.which("imgtool")
    assert exe, "imgtool is part of the test extra"
    return subprocess.run([exe, *args], capture_output=True, text=True)


CASES = [
    # (key file, imgtool extra args, pad_header, expected security counter, key index)
    ("TEST-ONLY-rsa2048.pem", [], True, None, 0),
    ("TEST-ONLY-rsa2048.pem", ["-s", "5"], True, 5, 0),
    ("TEST-ONLY-rsa2048.pem", ["-s", "auto"], False, (1 << 24) + (2 << 16) + 3, 0),
    ("TEST-ONLY-rsa3072.pem", [], False, None, 1),
    ("TEST-ONLY-rsa3072.pem", ["-s", "auto", "--vid", "example.com", "--cid", "widget"], True,
     (1 << 24) + (2 << 16) + 3, 1),
]


@pytest.mark.parametrize("key_file,extra,pad_header,counter,key_index", CASES,
                         ids=[f"{c[0][10:17]}-{'+'.join(c[1]) or 'plain'}-{'pad' if c[2] else 'zeros'}" for c in CASES])
def test_imgtool_signed_images_verify_on_device_and_host(device, tmp_path: Path, key_file: str, extra: list[str],
                                                          pad_header: bool, counter: int | None, key_index: int) -> None:
    src = tmp_path / "app.bin"
    src.write_bytes(PAYLOAD if pad_header else bytes(0x200) + PAYLOAD)
    out = tmp_path / "signed.bin"
    args = ["sign", "-k", str(KEYS_DIR / key_file), "-H", "0x200", "-S", hex(SLOT), "-v", "1.2.3+9",
            *extra, *(["--pad-header"] if pad_header else []), str(src), str(out)]
    proc = imgtool(*args)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()

    verdict = device.verify_files([(out, SLOT)])[0]
    assert verdict.accepted, verdict
    assert (verdict.version, verdict.security_counter, verdict.key_index) == ("1.2.3+9", counter, key_index)

    host = verify_image(data, trusted_public_keys(), SLOT)
    assert host.image.security_counter == counter and host.key_index == key_index
    assert host.image.payload == PAYLOAD

    result = CliRunner().invoke(cli, ["verify", str(out), "-k", str(KEYS_DIR / key_file), "--slot-size", hex(SLOT)])
    assert result.exit_code == 0 and "host:   OK version 1.2.3+9" in result.stdout
    assert f"security counter {'none' if counter is None else counter}, key" in result.stdout
    assert "None" not in result.stdout


def _dumpinfo_fields(path: Path) -> tuple[str, int | None]:
    proc = imgtool("dumpinfo", str(path))
    assert proc.returncode == 0, proc.stderr
    version = re.search(r"^version:\s+(\S+)", proc.stdout, re.M)
    assert version
    counter = None
    m = re.search(r"type: SEC_CNT \(0x50\)\s+len:\s+0x4\s+data:\s+((?:0x[0-9a-f]{2}\s*){4})", proc.stdout)
    if m:
        counter = struct.unpack("<I", bytes(int(b, 16) for b in m.group(1).split()))[0]
    return version.group(1), counter


@pytest.mark.parametrize("key_file", ["TEST-ONLY-rsa2048.pem", "TEST-ONLY-rsa3072.pem"])
@pytest.mark.parametrize("input_kind", ["bin", "app"])
def test_mpboot_signed_images_pass_imgtool(tmp_path: Path, key_file: str, input_kind: str) -> None:
    if input_kind == "bin":
        src = tmp_path / "fw.bin"
        src.write_bytes(PAYLOAD)
        pad = ["--pad-header"]
    else:
        src = tmp_path / "app"
        src.mkdir()
        (src / "main.py").write_text("print('hello')\n")
        pad = []
    out = tmp_path / "signed.bin"
    result = CliRunner().invoke(cli, ["sign", str(src), "-k", str(KEYS_DIR / key_file), "--version", "3.4.5+6",
                                      "--security-counter", "42", "--vendor-id", "example.com",
                                      "--class-id", "widget", *pad, "-o", str(out)])
    assert result.exit_code == 0, result.output
    proc = imgtool("verify", "-k", str(KEYS_DIR / key_file), str(out))
    assert proc.returncode == 0 and "Image was correctly validated" in proc.stdout, proc.stdout + proc.stderr
    assert _dumpinfo_fields(out) == ("3.4.5+6", 42)


def test_imgtool_rejects_mpboot_image_signed_by_other_key(tmp_path: Path) -> None:
    """Control for the test above: imgtool verify does check our signature."""
    src = tmp_path / "fw.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "signed.bin"
    result = CliRunner().invoke(cli, ["sign", str(src), "-k", str(KEYS_DIR / "TEST-ONLY-rsa2048.pem"),
                                      "--version", "1.0.0", "--pad-header", "-o", str(out)])
    assert result.exit_code == 0
    proc = imgtool("verify", "-k", str(KEYS_DIR / "TEST-ONLY-rsa2048-untrusted.pem"), str(out))
    assert "Image was correctly validated" not in proc.stdout


# DEPENDENCY TLVs (0x40): imgtool 2.5.0 writes `-d "(ID,VERSION), ..."` as MCUboot's struct
# image_dependency ('<B3xBBHI'), after SEC_CNT and before UUID_VID; `mpboot sign --depends
# ID:VERSION` must give the same bytes, and each side must read the other's.
DEPS_IMGTOOL = "(1,1.2.3+4), (255, 1.0.0)"
DEPS_MPBOOT = ["--depends", "stage1:1.2.3+4", "--depends", "firmware:1.0.0"]
DEPS = [(1, "1.2.3+4"), (255, "1.0.0+0")]


def test_imgtool_dependencies_verify_on_device_and_parse_on_host(device, tmp_path: Path) -> None:
    src = tmp_path / "app.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "signed.bin"
    proc = imgtool("sign", "-k", str(KEYS_DIR / "TEST-ONLY-rsa2048.pem"), "-H", "0x200", "-S", hex(SLOT),
                   "-v", "1.0.0", "-s", "5", "--pad-header", "-d", DEPS_IMGTOOL, str(src), str(out))
    assert proc.returncode == 0, proc.stderr

    verdict = device.verify_files([(out, SLOT)])[0]
    assert verdict.accepted and verdict.deps == tuple(DEPS), verdict
    host = verify_image(out.read_bytes(), trusted_public_keys(), SLOT)
    assert [(i, str(v)) for i, v in host.image.dependencies] == DEPS
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert "dependencies:     stage 1 (image 1) >= 1.2.3+4, firmware ABI (image 255) >= 1.0.0+0" in result.stdout


@pytest.mark.parametrize("deps,code", [("(255, 1.0.0)", None), ("(0, 1.0.0)", ImageErrorCode.DEPENDENCY),
                                       ("(1, 1.0.0)", ImageErrorCode.BAD_TLV)])
def test_imgtool_stage1_image_dependencies_on_device_and_host(device, tmp_path: Path, deps: str,
                                                              code: ImageErrorCode | None) -> None:
    """A stage-1 image made by imgtool (`--custom-tlv 0xa1 0x02000000`: MPBOOT_KIND updater)
    may depend on the firmware's ABI only: on the app it is DEPENDENCY (27), on stage 1 BAD_TLV."""
    src = tmp_path / "s1.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "signed.bin"
    proc = imgtool("sign", "-k", str(KEYS_DIR / "TEST-ONLY-rsa2048.pem"), "-H", "0x200", "-S", hex(SLOT),
                   "-v", "1.0.0", "-s", "5", "--pad-header", "--custom-tlv", "0xa1", "0x02000000",
                   "-d", deps, str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    verdict = device.verify_files([(out, SLOT)])[0]
    if code is None:
        assert verdict.accepted and verdict.deps == ((255, "1.0.0+0"),), verdict
        assert parse_image(out.read_bytes()).kind == 2
        return
    assert not verdict.accepted and verdict.code == code, verdict
    with pytest.raises(ImageRejected) as err:
        verify_image(out.read_bytes(), trusted_public_keys(), SLOT)
    assert err.value.code is code


def _dumpinfo_dependencies(path: Path) -> list[tuple[int, str]]:
    proc = imgtool("dumpinfo", str(path))
    assert proc.returncode == 0, proc.stderr
    found = []
    for m in re.finditer(r"type: DEPENDENCY \(0x40\)\s+len:\s+0xc\s+data:\s+((?:0x[0-9a-f]{2}\s*){12})", proc.stdout):
        image_id, major, minor, revision, build = struct.unpack("<B3xBBHI", bytes(int(b, 16) for b in m.group(1).split()))
        found.append((image_id, f"{major}.{minor}.{revision}+{build}"))
    return found


def test_mpboot_dependencies_pass_imgtool_and_match_its_bytes(tmp_path: Path) -> None:
    src = tmp_path / "fw.bin"
    src.write_bytes(PAYLOAD)
    ours = tmp_path / "ours.bin"
    key = str(KEYS_DIR / "TEST-ONLY-rsa2048.pem")
    result = CliRunner().invoke(cli, ["sign", str(src), "-k", key, "--version", "1.0.0", "--security-counter", "5",
                                      "--vendor-id", "example.com", *DEPS_MPBOOT, "--pad-header", "-o", str(ours)])
    assert result.exit_code == 0, result.output
    proc = imgtool("verify", "-k", key, str(ours))
    assert proc.returncode == 0 and "Image was correctly validated" in proc.stdout, proc.stdout + proc.stderr
    assert _dumpinfo_dependencies(ours) == DEPS

    theirs = tmp_path / "theirs.bin"
    proc = imgtool("sign", "-k", key, "-H", "0x200", "-S", hex(SLOT), "-v", "1.0.0", "-s", "5", "--vid", "example.com",
                   "--pad-header", "-d", DEPS_IMGTOOL, str(src), str(theirs))
    assert proc.returncode == 0, proc.stderr
    # Everything the signature covers is byte for byte the same: header, payload, protected TLVs.
    a, b = parse_image(ours.read_bytes()), parse_image(theirs.read_bytes())
    end = a.header.hdr_size + a.header.img_size + a.header.protect_tlv_size
    assert a.header == b.header and a.data[:end] == b.data[:end] and a.digest == b.digest
