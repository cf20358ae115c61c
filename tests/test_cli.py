"""The `mpboot` command line as a user meets it.

Covers every subcommand (keygen, pubkey, sign, verify, info, firmware export) through
click's CliRunner, checking outputs against the library and the image bytes themselves, and
the error contract: a user error exits 2, a rejected image exits 1, and either prints exactly
one line on stderr and never a Python traceback. A few tests run the real `mpboot` console
script in a subprocess to prove that no traceback reaches a user's terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import struct
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from intelhex import IntelHex

from clikit import assert_error, assert_ok, describe, run
from mpboot.cli import cli
from mpboot.errors import KeyFileError
from mpboot.image import ParsedImage, TlvType, parse_image
from mpboot.keys import PublicKey, load_public_key, load_signing_key

ROOT = Path(__file__).resolve().parents[1]
KEYS_DIR = ROOT / "tests" / "keys"
KEY2048 = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
KEY3072 = KEYS_DIR / "TEST-ONLY-rsa3072.pem"
UNTRUSTED = KEYS_DIR / "TEST-ONLY-rsa2048-untrusted.pem"
MPBOOT_SCRIPT = Path(sys.executable).parent / "mpboot"
ROMFS_MAGIC = b"\xd2\xcd\x31"
HEADER_SIZE = 0x200
PAYLOAD = bytes(range(256)) * 8  # 2 KiB that does not start with zeros
PASSWORD_VAR = "MPBOOT_TEST_KEY_PASSWORD"


# --------------------------------------------------------------------------- helpers


def sign(input_path: Path, output: Path, *extra: object, key: Path = KEY2048,
         version: str = "1.2.3+4", env: dict[str, str | None] | None = None) -> Result:
    return run("sign", input_path, "-k", key, "--version", version, "-o", output, *extra, env=env)


def write_bin(path: Path, data: bytes = PAYLOAD) -> Path:
    path.write_bytes(data)
    return path


def parsed(path: Path) -> ParsedImage:
    if path.suffix == ".hex":
        return parse_image(bytes(IntelHex(str(path)).tobinarray()))
    return parse_image(path.read_bytes())


def info_json(path: Path) -> dict[str, Any]:
    result = assert_ok(run("info", path, "--json"))
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def tlv_names(summary: dict[str, Any], area: str = "tlvs") -> list[str]:
    return [t["name"] for t in summary[area]]


def public(path: Path) -> PublicKey:
    return load_public_key(path)


def make_romfs(source: Path) -> bytes:
    from mpremote.romfs import make_romfs as build

    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(build(str(source), mpy_cross=False))


def run_console(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed `mpboot` console script, as a user runs it."""
    assert MPBOOT_SCRIPT.is_file(), f"{MPBOOT_SCRIPT} is not installed"
    return subprocess.run([str(MPBOOT_SCRIPT), *(str(a) for a in args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good image: PAYLOAD signed with the RSA-2048 test key, version 1.2.3+4."""
    folder = tmp_path_factory.mktemp("signed")
    out = folder / "image.bin"
    assert_ok(sign(write_bin(folder / "app.bin"), out, "--pad-header"))
    return out


@pytest.fixture()
def tampered(signed: Path, tmp_path: Path) -> Path:
    """The good image with one payload byte flipped."""
    data = bytearray(signed.read_bytes())
    data[HEADER_SIZE + 100] ^= 0x01
    out = tmp_path / "tampered.bin"
    out.write_bytes(bytes(data))
    return out


# --------------------------------------------------------------------------- keygen


@pytest.mark.parametrize("key_type, bits", [("rsa-2048", 2048), ("rsa-3072", 3072)])
def test_keygen_writes_a_loadable_key_of_the_right_size(tmp_path: Path, key_type: str, bits: int) -> None:
    out = tmp_path / "key.pem"
    result = assert_ok(run("keygen", "--type", key_type, "-o", out))
    key = load_signing_key(out)
    assert key.bits == bits
    assert key.public().key.public_numbers().e == 65537
    assert key.public().keyhash().hex() in result.stdout
    assert out.stat().st_mode & 0o077 == 0, "a private key file must not be readable by others"
    assert result.stderr == ""


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    out.write_bytes(b"precious")
    assert_error(run("keygen", "-o", out), 2, str(out), "already exists")
    assert out.read_bytes() == b"precious"


def test_keygen_password_env_encrypts_and_sign_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "enc.pem"
    env: dict[str, str | None] = {PASSWORD_VAR: "correct horse"}
    assert_ok(run("keygen", "-o", out, "--password-env", PASSWORD_VAR, env=env))
    assert b"ENCRYPTED PRIVATE KEY" in out.read_bytes()
    with pytest.raises(KeyFileError):
        load_signing_key(out)
    with pytest.raises(KeyFileError):
        load_signing_key(out, b"wrong")
    key = load_signing_key(out, b"correct horse")
    assert key.bits == 2048

    source = write_bin(tmp_path / "app.bin")
    image = tmp_path / "image.bin"
    assert_ok(sign(source, image, "--pad-header", "--password-env", PASSWORD_VAR, key=out, env=env))
    assert parsed(image).unprotected[1].value == key.public().keyhash()
    assert_ok(run("verify", image, "-k", out, "--password-env", PASSWORD_VAR, env=env))
    # The same key without its password, or with a wrong one: one line, exit 2.
    other = tmp_path / "other.bin"
    assert_error(sign(source, other, "--pad-header", key=out, env={PASSWORD_VAR: None}), 2, str(out))
    assert_error(sign(source, other, "--pad-header", "--password-env", PASSWORD_VAR, key=out,
                      env={PASSWORD_VAR: "wrong"}), 2, "password")
    assert not other.exists()


def test_keygen_password_env_unset_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    line = assert_error(run("keygen", "-o", out, "--password-env", PASSWORD_VAR, env={PASSWORD_VAR: None}),
                        2, PASSWORD_VAR)
    assert "not set" in line
    assert not out.exists()


# --------------------------------------------------------------------------- pubkey


def test_pubkey_pem_is_the_spki_public_key(tmp_path: Path) -> None:
    result = assert_ok(run("pubkey", KEY2048))
    loaded = serialization.load_pem_public_key(result.stdout.encode())
    assert result.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == public(KEY2048).key.public_numbers()
    # A public key file is accepted too, and gives the same output.
    pem = tmp_path / "pub.pem"
    pem.write_text(result.stdout)
    assert assert_ok(run("pubkey", pem)).stdout == result.stdout


def test_pubkey_der_is_spki(tmp_path: Path) -> None:
    result = assert_ok(run("pubkey", KEY3072, "--format", "der"))
    expected = public(KEY3072).key.public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    assert result.stdout_bytes == expected
    loaded = serialization.load_der_public_key(result.stdout_bytes)
    assert isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size == 3072


def test_pubkey_raw_is_pkcs1_and_hashes_to_the_image_keyhash(signed: Path) -> None:
    raw = assert_ok(run("pubkey", KEY2048, "--format", "raw")).stdout_bytes
    assert raw == public(KEY2048).pkcs1_der()
    spki = public(KEY2048).key.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert raw != spki and spki.endswith(raw)  # SPKI wraps the PKCS#1 key in a BIT STRING
    keyhash = [t.value for t in parsed(signed).unprotected if t.type == TlvType.KEYHASH]
    assert keyhash == [hashlib.sha256(raw).digest()]


def _c_bytes(text: str) -> bytes:
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})\b", text))


def test_pubkey_c_holds_the_pkcs1_der_bytes() -> None:
    text = assert_ok(run("pubkey", KEY2048, "--format", "c")).stdout
    der = public(KEY2048).pkcs1_der()
    assert "rsa_pub_key[]" in text
    assert f"rsa_pub_key_len = {len(der)};" in text
    assert _c_bytes(text) == der


def test_pubkey_c_takes_several_keys() -> None:
    text = assert_ok(run("pubkey", KEY2048, KEY3072, "--format", "c")).stdout
    assert "rsa_pub_key_0[]" in text and "rsa_pub_key_1[]" in text
    assert _c_bytes(text) == public(KEY2048).pkcs1_der() + public(KEY3072).pkcs1_der()


def test_pubkey_micropython_module_executes_to_keys() -> None:
    text = assert_ok(run("pubkey", KEY2048, KEY3072, "--format", "micropython")).stdout
    namespace: dict[str, Any] = {}
    exec(compile(text, "mpboot_keys.py", "exec"), namespace)  # noqa: S102 - our own generated module
    keys = namespace["KEYS"]
    assert len(keys) == 2
    for entry, path in zip(keys, (KEY2048, KEY3072)):
        key = public(path)
        assert entry == (key.keyhash(), key.bits, key.modulus)
    assert keys[0][1] == 2048 and len(keys[0][2]) == 256
    assert keys[1][1] == 3072 and len(keys[1][2]) == 384
    assert namespace["THRESHOLD"] == 1 and namespace["IMAGE_THRESHOLD"] == 1  # root set version 1


def test_pubkey_micropython_thresholds() -> None:
    text = assert_ok(run("pubkey", KEY2048, KEY3072, "--format", "micropython", "--threshold", "2",
                         "--image-threshold", "3")).stdout
    namespace: dict[str, Any] = {}
    exec(compile(text, "mpboot_keys.py", "exec"), namespace)  # noqa: S102 - our own generated module
    assert namespace["THRESHOLD"] == 2 and namespace["IMAGE_THRESHOLD"] == 3


@pytest.mark.parametrize(("args", "says"), [
    (["--threshold", "3"], "threshold 3"),  # more than the two keys
    (["--threshold", "0"], "threshold 0"),
    (["--image-threshold", "7"], "image threshold 7"),
])
def test_pubkey_micropython_refuses_thresholds_out_of_range(args: list[str], says: str) -> None:
    assert_error(run("pubkey", KEY2048, KEY3072, "--format", "micropython", *args), 2, says)


def test_pubkey_thresholds_belong_to_the_micropython_format() -> None:
    assert_error(run("pubkey", KEY2048, "--format", "pem", "--threshold", "1"), 2, "micropython")


@pytest.mark.parametrize("fmt", ["pem", "der", "raw"])
def test_pubkey_single_key_formats_refuse_several_keys(fmt: str) -> None:
    result = run("pubkey", KEY2048, KEY3072, "--format", fmt)
    assert_error(result, 2, fmt)
    assert result.stdout == ""


def test_pubkey_output_file(tmp_path: Path) -> None:
    out = tmp_path / "mpboot_keys.py"
    result = assert_ok(run("pubkey", KEY2048, "--format", "micropython", "-o", out))
    assert result.stdout == ""
    assert out.read_text() == assert_ok(run("pubkey", KEY2048, "--format", "micropython")).stdout
    raw = tmp_path / "key.der"
    assert_ok(run("pubkey", KEY2048, "--format", "raw", "-o", raw))
    assert raw.read_bytes() == public(KEY2048).pkcs1_der()


def test_pubkey_missing_key_file(tmp_path: Path) -> None:
    assert_error(run("pubkey", tmp_path / "nope.pem"), 2, "nope.pem")


def _write_ec_key(path: Path) -> Path:
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def _write_encrypted_key(path: Path, password: bytes) -> Path:
    path.write_bytes(load_signing_key(KEY2048).private_pem(password))
    return path


def test_pubkey_of_an_encrypted_key(tmp_path: Path) -> None:
    key = _write_encrypted_key(tmp_path / "enc.pem", b"s3cret")
    result = assert_ok(run("pubkey", key, "--format", "raw", "--password-env", PASSWORD_VAR,
                           env={PASSWORD_VAR: "s3cret"}))
    assert result.stdout_bytes == public(KEY2048).pkcs1_der()


@pytest.mark.parametrize("case, password, expected", [
    ("ec", None, "not an rsa key"),
    ("encrypted", None, "password"),
    ("encrypted", "wrong", "password"),
])
def test_pubkey_says_why_a_private_key_cannot_be_used(tmp_path: Path, case: str, password: str | None,
                                                       expected: str) -> None:
    """`pubkey` (and `verify -k`) load private keys too; their errors should say what `sign`
    says for the same file, not that it is no key at all."""
    key = _write_ec_key(tmp_path / "ec.pem") if case == "ec" else _write_encrypted_key(tmp_path / "enc.pem", b"ok")
    extra = ["--password-env", PASSWORD_VAR] if password else []
    sign_line = assert_error(sign(write_bin(tmp_path / "app.bin"), tmp_path / "image.bin", "--pad-header",
                                  *extra, key=key, env={PASSWORD_VAR: password}), 2, str(key))
    assert expected in sign_line.lower(), sign_line
    pubkey_line = assert_error(run("pubkey", key, *extra, env={PASSWORD_VAR: password}), 2, str(key))
    assert expected in pubkey_line.lower(), f"sign says {sign_line!r} but pubkey says {pubkey_line!r}"


# --------------------------------------------------------------------------- sign: inputs


def test_sign_bin_with_pad_header(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    result = assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header"))
    assert str(out) in result.stdout
    img = parsed(out)
    assert img.header.hdr_size == HEADER_SIZE
    assert img.header.img_size == len(PAYLOAD)
    assert img.payload == PAYLOAD
    assert img.data[32:HEADER_SIZE] == b"\xff" * (HEADER_SIZE - 32)
    assert img.header.flags == 0 and img.header.load_addr == 0
    assert_ok(run("verify", out, "-k", KEY2048))


def test_sign_bin_without_room_for_the_header_needs_pad_header(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_error(sign(write_bin(tmp_path / "app.bin"), out), 2, "--pad-header")
    assert not out.exists()


def test_sign_bin_that_starts_with_zeroed_header_room(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin", bytes(HEADER_SIZE) + PAYLOAD), out))
    img = parsed(out)
    assert img.payload == PAYLOAD
    assert img.data[32:HEADER_SIZE] == bytes(HEADER_SIZE - 32)
    assert_ok(run("verify", out, "-k", KEY2048))


def test_sign_intel_hex_in_and_out(tmp_path: Path) -> None:
    ih = IntelHex()
    ih.frombytes(PAYLOAD, offset=0x10000)
    source = tmp_path / "app.hex"
    ih.tofile(str(source), format="hex")
    out = tmp_path / "image.hex"
    assert_ok(sign(source, out, "--pad-header"))
    signed_hex = IntelHex(str(out))
    assert signed_hex.minaddr() == 0x10000 - HEADER_SIZE
    assert parsed(out).payload == PAYLOAD
    result = assert_ok(run("verify", out, "-k", KEY2048))
    assert "host:   OK" in result.stdout
    assert info_json(out)["hash_matches"] is True


def test_sign_bin_to_hex_at_hex_addr(tmp_path: Path) -> None:
    out = tmp_path / "image.hex"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", "--hex-addr", "0x8000000"))
    assert IntelHex(str(out)).minaddr() == 0x8000000
    assert_ok(run("verify", out, "-k", KEY2048))


def test_sign_romfs_file(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data.txt").write_text("hello from romfs\n")
    (tree / "main.py").write_text("print(open('data.txt').read())\n")
    romfs = make_romfs(tree)
    assert romfs.startswith(ROMFS_MAGIC)
    source = tmp_path / "fs.romfs"
    source.write_bytes(romfs)
    out = tmp_path / "image.bin"
    result = assert_ok(sign(source, out))  # ROMFS always gets room for the header
    assert "romfs" in result.stdout
    img = parsed(out)
    assert img.header.hdr_size == HEADER_SIZE
    assert img.payload == romfs
    assert_ok(run("verify", out, "-k", KEY2048))


@pytest.mark.parametrize("entry_args, files", [
    ((), {"data.txt": "no app here\n"}),                      # no .py at all
    ((), {"app.py": "print(1)\n", "lib/main.py": ""}),        # main.py only below the top
    (("--entry", "start"), {"main.py": "print(1)\n"}),        # not the entry asked for
])
def test_sign_refuses_an_app_without_its_entry_module(tmp_path: Path, entry_args: tuple[str, ...],
                                                      files: dict[str, str]) -> None:
    tree = tmp_path / "tree"
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    romfs = tmp_path / "fs.romfs"
    romfs.write_bytes(make_romfs(tree))
    entry = entry_args[1] if entry_args else "main"
    for source in (tree, romfs):  # an app folder, and the ROMFS image of one
        out = tmp_path / "image.bin"
        assert_error(sign(source, out, *entry_args), 2, f"no {entry}.py at its top")
        assert not out.exists()


def test_sign_romfs_file_without_romfs_header(tmp_path: Path) -> None:
    source = write_bin(tmp_path / "fs.romfs")
    assert_error(sign(source, tmp_path / "image.bin"), 2, "ROMFS")


def _app_dir(root: Path) -> Path:
    app = root / "app"
    (app / "lib").mkdir(parents=True)
    (app / "main.py").write_text("import lib.util\nprint(lib.util.greet())\n")
    (app / "lib" / "__init__.py").write_text("")
    (app / "lib" / "util.py").write_text("def greet():\n    return 'hi'\n")
    return app


def test_sign_app_directory_packs_compiled_romfs(tmp_path: Path) -> None:
    app = _app_dir(tmp_path)
    before = sorted(p.relative_to(app) for p in app.rglob("*"))
    out = tmp_path / "image.bin"
    result = assert_ok(sign(app, out))
    assert "(app," in result.stdout
    payload = parsed(out).payload
    assert payload.startswith(ROMFS_MAGIC)
    for name in (b"main.mpy", b"lib", b"util.mpy", b"__init__.mpy"):
        assert name in payload, name
    assert b"def greet" not in payload, "sources must be compiled, not shipped"
    assert sorted(p.relative_to(app) for p in app.rglob("*")) == before, "the app directory was modified"
    assert_ok(run("verify", out, "-k", KEY2048))


def test_sign_app_with_a_syntax_error(tmp_path: Path) -> None:
    app = _app_dir(tmp_path)
    (app / "lib" / "broken.py").write_text("def oops(:\n")
    out = tmp_path / "image.bin"
    assert_error(sign(app, out), 2, "mpy-cross", "broken.py")
    assert not out.exists()


def test_sign_app_syntax_error_names_the_users_file(tmp_path: Path) -> None:
    """The error must point at the user's file, not at a deleted temporary staging copy."""
    app = _app_dir(tmp_path)
    (app / "lib" / "broken.py").write_text("def oops(:\n")
    line = assert_error(sign(app, tmp_path / "image.bin"), 2, "mpy-cross")
    assert "mpboot-app-" not in line, f"names a temporary staging path: {line}"
    assert str(app / "lib" / "broken.py") in line, line


def test_sign_empty_app_directory(tmp_path: Path) -> None:
    app = tmp_path / "empty"
    app.mkdir()
    assert_error(sign(app, tmp_path / "image.bin"), 2, "empty")


# --------------------------------------------------------------------------- sign: options


def test_sign_vendor_and_class_names_are_uuid5(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header",
                   "--vendor-id", "example.com", "--class-id", "blinky-board"))
    vid = uuid.uuid5(uuid.NAMESPACE_DNS, "example.com")
    cid = uuid.uuid5(vid, "blinky-board")
    summary = info_json(out)
    assert summary["vendor_id"] == str(vid)
    assert summary["class_id"] == str(cid)
    assert tlv_names(summary, "protected_tlvs") == ["SEC_CNT", "UUID_VID", "UUID_CID"]
    assert_ok(run("verify", out, "-k", KEY2048))


def test_sign_explicit_uuids_pass_through(tmp_path: Path) -> None:
    vid, cid = uuid.uuid4(), uuid.uuid4()
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header",
                   "--vendor-id", str(vid), "--class-id", cid.hex))
    summary = info_json(out)
    assert (summary["vendor_id"], summary["class_id"]) == (str(vid), str(cid))


def test_sign_class_name_without_vendor_is_an_error(tmp_path: Path) -> None:
    assert_error(sign(write_bin(tmp_path / "app.bin"), tmp_path / "image.bin", "--pad-header",
                      "--class-id", "blinky"), 2, "--vendor-id")


@pytest.mark.parametrize("version, counter_arg, expected", [
    ("1.2.3+4", None, (1 << 24) + (2 << 16) + 3),
    ("7.0.65535", "auto", (7 << 24) + 65535),
    ("1.2.3", "42", 42),
    ("1.2.3", "0x10", 16),
    ("0.0.0", "4294967295", 0xFFFFFFFF),
])
def test_sign_security_counter(tmp_path: Path, version: str, counter_arg: str | None, expected: int) -> None:
    extra = ["--security-counter", counter_arg] if counter_arg is not None else []
    out = tmp_path / "image.bin"
    result = assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", *extra, version=version))
    assert f"security counter {expected}" in result.stdout
    summary = info_json(out)
    assert summary["security_counter"] == expected
    assert summary["protected_tlvs"][0]["value"] == struct.pack("<I", expected).hex()


@pytest.mark.parametrize("value", ["abc", "-1", "4294967296", "1.5"])
def test_sign_bad_security_counter(tmp_path: Path, value: str) -> None:
    out = tmp_path / "image.bin"
    assert_error(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", "--security-counter", value),
                 2, "security counter")
    assert not out.exists()


@pytest.mark.parametrize("version", ["1.2.3.4", "x", "256.0.0", "1.256.0", "1.2.65536", "", "01.2.3"])
def test_sign_bad_version(tmp_path: Path, version: str) -> None:
    out = tmp_path / "image.bin"
    assert_error(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", version=version),
                 2, "bad version")
    assert not out.exists()


def test_sign_version_is_in_the_header(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", version="255.255.65535+4294967295"))
    v = parsed(out).header.version
    assert (v.major, v.minor, v.revision, v.build) == (255, 255, 65535, 0xFFFFFFFF)


def test_sign_slot_size(tmp_path: Path) -> None:
    source = write_bin(tmp_path / "app.bin")
    out = tmp_path / "image.bin"
    assert_error(sign(source, out, "--pad-header", "--slot-size", "2k"), 2, "slot size")
    assert not out.exists()
    assert_error(sign(source, out, "--pad-header", "--slot-size", "lots"), 2, "slot size")
    assert_ok(sign(source, out, "--pad-header", "--slot-size", "0x1000"))
    assert len(out.read_bytes()) <= 0x1000


def test_sign_pkcs1v15_scheme(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", "--scheme", "pkcs1v15", key=KEY3072))
    types = [t.type for t in parsed(out).unprotected]
    assert 0xA0 in types
    assert TlvType.RSA2048_PSS not in types and TlvType.RSA3072_PSS not in types
    result = assert_ok(run("verify", out, "-k", KEY3072))
    assert "pkcs1v15" in result.stdout and "RSA-3072" in result.stdout


def test_sign_pss_tlv_follows_key_size(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", key=KEY3072))
    assert tlv_names(info_json(out)) == ["SHA256", "KEYHASH", "RSA3072_PSS"]


def test_sign_load_addr_sets_ram_load(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_ok(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", "--load-addr", "0x20000000"))
    header = parsed(out).header
    assert header.flags & 0x20
    assert header.load_addr == 0x20000000
    assert_ok(run("verify", out, "-k", KEY2048))


def test_sign_load_addr_over_32_bits(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    assert_error(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", "--load-addr", "0x100000000"),
                 2, "load address")
    assert not out.exists()


def test_sign_with_an_ec_key(tmp_path: Path) -> None:
    ec_key = _write_ec_key(tmp_path / "ec.pem")
    out = tmp_path / "image.bin"
    assert_error(sign(write_bin(tmp_path / "app.bin"), out, "--pad-header", key=ec_key), 2, "not an RSA key")
    assert not out.exists()


def test_sign_with_a_public_key(tmp_path: Path) -> None:
    pub = tmp_path / "pub.pem"
    pub.write_text(assert_ok(run("pubkey", KEY2048)).stdout)
    assert_error(sign(write_bin(tmp_path / "app.bin"), tmp_path / "image.bin", "--pad-header", key=pub),
                 2, "not a private key")


def test_sign_missing_input(tmp_path: Path) -> None:
    assert_error(sign(tmp_path / "nope.bin", tmp_path / "image.bin", "--pad-header"), 2, "nope.bin")


def test_sign_missing_key(tmp_path: Path) -> None:
    assert_error(sign(write_bin(tmp_path / "app.bin"), tmp_path / "image.bin", "--pad-header",
                      key=tmp_path / "nokey.pem"), 2, "nokey.pem")


def test_sign_output_in_a_missing_folder(tmp_path: Path) -> None:
    assert_error(sign(write_bin(tmp_path / "app.bin"), tmp_path / "no" / "image.bin", "--pad-header"),
                 2, "image.bin")


def test_sign_malformed_intel_hex(tmp_path: Path) -> None:
    source = tmp_path / "bad.hex"
    source.write_text("this is not intel hex\n")
    assert_error(sign(source, tmp_path / "image.bin", "--pad-header"), 2, "bad.hex")


def test_sign_overlapping_intel_hex(tmp_path: Path) -> None:
    """Two records for one address: intelhex raises AddressOverlapError, which is not a
    HexRecordError; it must still come out as one line, not a traceback."""
    source = tmp_path / "overlap.hex"
    source.write_text(":0100000001FE\n:0100000002FD\n:00000001FF\n")
    assert_error(sign(source, tmp_path / "image.bin", "--pad-header"), 2, "overlap.hex")


# --------------------------------------------------------------------------- verify


def test_verify_good_image(signed: Path) -> None:
    result = assert_ok(run("verify", signed, "-k", KEY2048))
    assert result.stdout.startswith("host:   OK version 1.2.3+4")
    assert "RSA-2048 pss" in result.stdout
    assert result.stderr == ""


def test_verify_names_the_key_that_verified(signed: Path) -> None:
    result = assert_ok(run("verify", signed, "-k", KEY3072, "-k", UNTRUSTED, "-k", KEY2048))
    assert f"key {KEY2048}" in result.stdout


def test_verify_with_the_public_key_only(signed: Path, tmp_path: Path) -> None:
    der = tmp_path / "pub.der"
    assert_ok(run("pubkey", KEY2048, "--format", "raw", "-o", der))  # PKCS#1 DER is accepted too
    assert_ok(run("verify", signed, "-k", der))


def test_verify_wrong_key(signed: Path) -> None:
    result = run("verify", signed, "-k", UNTRUSTED)
    assert_error(result, 1, "UNKNOWN_KEY", prefix="host:   REJECTED")
    assert result.stdout == ""


def test_verify_tampered_payload(tampered: Path) -> None:
    assert_error(run("verify", tampered, "-k", KEY2048), 1, "HASH_MISMATCH", prefix="host:   REJECTED")


def test_verify_slot_too_small(signed: Path) -> None:
    assert_error(run("verify", signed, "-k", KEY2048, "--slot-size", "1k"), 1, "TOO_LARGE",
                 prefix="host:   REJECTED")


def test_verify_on_device_good_image(signed: Path) -> None:
    result = assert_ok(run("verify", signed, "-k", KEY3072, "-k", KEY2048, "--device"))
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["host", "device"], lines
    assert lines[1].startswith("device: OK version 1.2.3+4")
    assert f"security counter {(1 << 24) + (2 << 16) + 3}" in lines[1]
    assert f"key {KEY2048}" in lines[1]
    assert result.stderr == ""


def test_verify_on_device_tampered_image(tampered: Path) -> None:
    result = run("verify", tampered, "-k", KEY2048, "--device")
    assert result.exit_code == 1, describe(result)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("host:   REJECTED HASH_MISMATCH")
    assert lines[1].startswith("device: REJECTED HASH_MISMATCH")
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("heapsize", ["lots", "24q", "-1k", ""])
def test_verify_bad_heapsize(signed: Path, heapsize: str) -> None:
    assert_error(run("verify", signed, "-k", KEY2048, "--device", "--heapsize", heapsize), 2, "--heapsize")


def test_verify_missing_image(tmp_path: Path) -> None:
    assert_error(run("verify", tmp_path / "nope.bin", "-k", KEY2048), 2, "nope.bin")


def test_verify_malformed_intel_hex(tmp_path: Path) -> None:
    image = tmp_path / "bad.hex"
    image.write_text("this is not intel hex\n")
    assert_error(run("verify", image, "-k", KEY2048), 2, "bad.hex")


# --------------------------------------------------------------------------- info


def test_info_text(signed: Path) -> None:
    result = assert_ok(run("info", signed))
    out = result.stdout
    assert re.search(r"^version:\s+1\.2\.3\+4$", out, re.M), out
    assert re.search(rf"^security counter:\s+{(1 << 24) + (2 << 16) + 3}$", out, re.M), out
    assert "matches TLV" in out and "DOES NOT MATCH" not in out
    assert public(KEY2048).keyhash().hex() in out
    assert "RSA2048_PSS" in out


def test_info_json(signed: Path) -> None:
    summary = info_json(signed)
    assert summary["version"] == "1.2.3+4"
    assert summary["security_counter"] == (1 << 24) + (2 << 16) + 3
    assert summary["hash_matches"] is True
    assert summary["computed_sha256"] == summary["sha256_tlv"]
    assert summary["keyhash"] == public(KEY2048).keyhash().hex()
    assert tlv_names(summary) == ["SHA256", "KEYHASH", "RSA2048_PSS"]
    assert tlv_names(summary, "protected_tlvs") == ["SEC_CNT"]
    assert summary["header"]["hdr_size"] == HEADER_SIZE
    assert summary["header"]["img_size"] == len(PAYLOAD)
    assert summary["header"]["magic"] == "0x96f3b83d"
    assert summary["total_size"] == len(signed.read_bytes())
    assert summary["vendor_id"] is None and summary["class_id"] is None


def test_info_tampered_image_shows_the_mismatch(tampered: Path) -> None:
    assert info_json(tampered)["hash_matches"] is False
    assert "DOES NOT MATCH TLV" in assert_ok(run("info", tampered)).stdout


def test_info_garbage(tmp_path: Path) -> None:
    garbage = write_bin(tmp_path / "garbage.bin", b"\x00not an image at all" * 10)
    assert_error(run("info", garbage), 1, "magic")
    assert_error(run("info", garbage, "--json"), 1, "magic")


def test_info_truncated_image(signed: Path, tmp_path: Path) -> None:
    cut = write_bin(tmp_path / "cut.bin", signed.read_bytes()[:HEADER_SIZE + 10])
    assert_error(run("info", cut), 1, "truncated")


def test_info_malformed_intel_hex(tmp_path: Path) -> None:
    image = tmp_path / "bad.hex"
    image.write_text("this is not intel hex\n")
    assert_error(run("info", image), 2, "bad.hex")


# --------------------------------------------------------------------------- firmware export


def test_firmware_export(tmp_path: Path) -> None:
    dest = tmp_path / "fw"
    result = assert_ok(run("firmware", "export", dest))
    assert "manifest.py" in result.stdout
    for rel in ("manifest.py", "mpboot/__init__.py", "mpboot/image.py", "mpboot/rsa.py", "mpboot/reader.py"):
        assert (dest / rel).read_bytes() == (ROOT / "firmware" / rel).read_bytes(), rel
    assert not (dest / "mpboot_keys.py").exists()
    assert not list(dest.rglob("__pycache__"))

    manifest_before = (dest / "manifest.py").read_bytes()
    (dest / "manifest.py").write_bytes(b"# edited by the user\n")
    assert_error(run("firmware", "export", dest), 2, "already exists")
    assert (dest / "manifest.py").read_bytes() == b"# edited by the user\n" != manifest_before


def test_firmware_export_onto_a_file(tmp_path: Path) -> None:
    """click itself rejects a file as DESTINATION (its usage message, not ours)."""
    target = write_bin(tmp_path / "file")
    result = run("firmware", "export", target)
    assert result.exit_code == 2, describe(result)
    assert isinstance(result.exception, SystemExit), describe(result)
    assert "is a file" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert target.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- the real console script


def _assert_console_error(proc: subprocess.CompletedProcess[str], exit_code: int) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == exit_code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr


def test_console_script_round_trip(tmp_path: Path) -> None:
    version = run_console("--version", cwd=tmp_path)
    assert version.returncode == 0 and "mpboot" in version.stdout
    write_bin(tmp_path / "app.bin")
    signed = run_console("sign", "app.bin", "-k", KEY2048, "--version", "2.0.0", "--pad-header",
                         "-o", "image.hex", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    verified = run_console("verify", "image.hex", "-k", KEY2048, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("host:   OK version 2.0.0+0")
    assert verified.stderr == ""


CONSOLE_ERRORS: dict[str, tuple[Sequence[object], int]] = {
    "info-garbage": (("info", "garbage.bin"), 1),
    "verify-wrong-key": (("verify", "image.bin", "-k", UNTRUSTED), 1),
    "sign-missing-input": (("sign", "nope.bin", "-k", KEY2048, "--version", "1.0.0", "-o", "o.bin"), 2),
    "sign-bad-version": (("sign", "app.bin", "-k", KEY2048, "--version", "1.2.3.4", "-o", "o.bin"), 2),
    "keygen-existing": (("keygen", "-o", "app.bin"), 2),
    "info-bad-hex": (("info", "bad.hex"), 2),
    "sign-overlapping-hex": (("sign", "overlap.hex", "-k", KEY2048, "--version", "1.0.0", "--pad-header",
                              "-o", "o.bin"), 2),
}


@pytest.mark.parametrize("case", sorted(CONSOLE_ERRORS))
def test_console_script_errors_have_no_traceback(case: str, tmp_path: Path, signed: Path) -> None:
    args, exit_code = CONSOLE_ERRORS[case]
    write_bin(tmp_path / "garbage.bin", b"garbage" * 20)
    write_bin(tmp_path / "app.bin")
    write_bin(tmp_path / "image.bin", signed.read_bytes())
    (tmp_path / "bad.hex").write_text("this is not intel hex\n")
    (tmp_path / "overlap.hex").write_text(":0100000001FE\n:0100000002FD\n:00000001FF\n")
    _assert_console_error(run_console(*args, cwd=tmp_path), exit_code)
    assert not (tmp_path / "o.bin").exists()


def _all_commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import click

    out = [prefix]
    ctx = click.Context(group)
    for name in group.list_commands(ctx) if isinstance(group, click.Group) else ():
        command = group.get_command(ctx, name)
        assert command is not None, (prefix, name)
        out += _all_commands(command, (*prefix, name)) if isinstance(command, click.Group) else [(*prefix, name)]
    return out


def test_every_family_command_is_in_the_lazy_map() -> None:
    """The root loads a family only for its own commands: the map must name every command
    each family module defines, and nothing else."""
    import importlib

    from mpboot.cli import FAMILIES

    defined = {}
    for family in set(FAMILIES.values()):
        for command in importlib.import_module(f"mpboot.cli.{family}").COMMANDS:
            defined[command.name] = family
    assert defined == FAMILIES


def test_signing_loads_neither_ble_nor_the_factory() -> None:
    """`mpboot sign` starts in a fresh process without importing the BLE stack, the
    simulator or the factory: it is a release tool, often on a locked-down machine."""
    import subprocess
    import sys

    code = ("import sys\nfrom mpboot.cli import cli\n"
            "try:\n    cli(['sign', '--help'], prog_name='mpboot')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('bleak', 'bumble', 'mpboot.cli.', "
            "'mpboot.factory', 'mpboot.sim', 'pkcs11', 'tuf', 'securesystemslib', "
            "'mpboot.repo'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "['mpboot.cli.common', 'mpboot.cli.sign']"


def test_every_command_has_help() -> None:
    """Each command family is its own module over cli/common: every command and group
    imports and renders its help (click's advice for CLIs split across modules)."""
    commands = _all_commands(cli)
    assert {("flash",), ("sim", "init"), ("provision", "report"), ("sync",), ("firmware", "export")} <= set(commands)
    for path in commands:
        result = run(*path, "--help")
        assert result.exit_code == 0 and "Usage: mpboot" in result.stdout, (path, describe(result))


def test_console_prints_outside_text_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """Device and file names reach the CLI's tables and lines from outside: `[/]` in a BLE
    name is text, not rich markup (it used to end sync with a MarkupError)."""
    from rich.table import Table

    from mpboot.cli.common import console

    out = console()
    out.print("sync: [/]: app[link=evil].bin")
    table = Table(title="[/]")
    table.add_column("device")
    table.add_row("[bold]x[/bold]")
    out.print(table)
    text = capsys.readouterr().out
    assert "sync: [/]: app[link=evil].bin" in text and "[bold]x[/bold]" in text
