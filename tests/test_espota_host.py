"""Firmware images on the host (docs/FORMAT.md "Firmware images (esp32)"): `mpboot sign
--kind firmware` around an ESP-IDF app image, `info` and `verify` showing it, and the
refusals (one line, non-zero exit); the host's ESP-IDF app image check (mpboot.espimg) gives
the verdicts the device's and esptool give on the golden vectors (tests/vectors/esp/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import espkit
from clikit import assert_error, assert_ok, run
from conftest import KEYS_DIR, VECTORS, signing_key
from mpboot import espimg
from mpboot.image import ImageVersion, SignOptions, build_image, parse_image
from mpboot.trust import ImageKind

ESP = VECTORS / "esp"
MANIFEST = json.loads((ESP / "vectors.json").read_text())
KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
PUB = KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem"


@pytest.mark.parametrize("vec", MANIFEST["vectors"], ids=[v["name"] for v in MANIFEST["vectors"]])
def test_host_check_gives_the_vector_verdicts(vec: dict) -> None:
    data = (ESP / vec["file"]).read_bytes()
    try:
        app = espimg.check(data, vec["part_size"])
    except espimg.NotEspApp as err:
        assert err.why.name == vec["expect"], vec["note"]
        return
    assert vec["expect"] == "OK", vec["note"]
    assert {"chip_id": app.chip_id, "entry": app.entry, "segments": app.segments, "length": app.length,
            "sha256": app.sha256.hex(), "version": app.version, "project": app.project,
            "idf_ver": app.idf_ver} == vec["fields"]


def test_envelope_offset_rule() -> None:
    s = 0x30000
    assert espimg.envelope_offset(0x1000, 0x1000 + 900, s) == s - 0x1000
    assert espimg.envelope_offset(s - 0x1000, s - 0x1000 + 900, s) == s - 0x1000  # exactly full
    assert espimg.envelope_offset(s - 0x1000 + 1, s - 0x1000 + 901, s) is None  # a shared sector
    assert espimg.envelope_offset(0x1000, 0x1000 + 0x1001, s) == s - 0x2000
    assert espimg.envelope_offset(0x1000, 0x1000 + 0x4000, s) == s - 0x4000
    assert espimg.envelope_offset(0x1000, 0x1000 + 0x4001, s) is None  # envelope over 16 KiB


@pytest.fixture
def app_bin(tmp_path: Path) -> Path:
    path = tmp_path / "micropython.bin"
    path.write_bytes(espkit.app_image("1.28"))
    return path


def test_sign_info_verify_firmware(tmp_path: Path, app_bin: Path) -> None:
    out = tmp_path / "fw.bin"
    assert_ok(run("sign", "--kind", "firmware", app_bin, "-k", KEY, "--version", "1.28.0", "--security-counter", "7",
                  "--slot-size", "0x180000", "-o", out))
    img = parse_image(out.read_bytes())
    assert img.kind == ImageKind.FIRMWARE == 4 and img.security_counter == 7
    h = img.header
    assert out.read_bytes()[h.hdr_size : h.hdr_size + h.img_size] == app_bin.read_bytes()  # the payload, as is
    info = assert_ok(run("info", out)).stdout
    assert "kind:             firmware; payload ESP-IDF app image for ESP32, " in info
    assert "app version '1.28', project 'micropython'" in info
    js = json.loads(assert_ok(run("info", "--json", out)).stdout)
    assert js["esp_app"]["chip"] == "ESP32" and js["esp_app"]["length"] == app_bin.stat().st_size
    line = assert_ok(run("verify", out, "-k", PUB, "--slot-size", "0x180000")).stdout
    assert line.startswith("host:   OK version 1.28.0+0, security counter 7") and "firmware: ESP-IDF app image" in line


def test_an_app_image_shows_no_firmware_line(tmp_path: Path, app_bin: Path) -> None:
    out = tmp_path / "app.bin"
    assert_ok(run("sign", app_bin, "--pad-header", "-k", KEY, "--version", "1.0.0", "-o", out))
    assert "kind:" not in assert_ok(run("info", out)).stdout
    assert "esp_app" not in json.loads(assert_ok(run("info", "--json", out)).stdout)


@pytest.mark.parametrize("payload, words", [
    (b"\x00" * 100, "first byte is not 0xe9 (BAD_MAGIC)"),
    (espkit.app_image("1.0", hash_appended=False), "no appended SHA-256"),
    (espkit.app_image("1.0")[:-1] + b"\x00", "(HASH_MISMATCH)"),
    (espkit.app_image("1.0")[:1000], "(TOO_LARGE)"),  # a segment runs past the payload's end
])
def test_sign_refuses_a_payload_that_is_not_an_esp_app(tmp_path: Path, payload: bytes, words: str) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(payload)
    out = tmp_path / "fw.bin"
    line = assert_error(run("sign", "--kind", "firmware", src, "-k", KEY, "--version", "1.0.0", "-o", out), 1,
                        "payload is not an ESP-IDF app image", words)
    assert line.count("not an ESP-IDF app image") == 1, line
    assert not out.exists()


def test_sign_refuses_a_firmware_that_does_not_fit_its_partition(tmp_path: Path, app_bin: Path) -> None:
    out = tmp_path / "fw.bin"
    # the app image needs one sector and its envelope another: 8 KiB
    assert_error(run("sign", "--kind", "firmware", app_bin, "-k", KEY, "--version", "1.0.0", "--slot-size", "0x1fff",
                     "-o", out), 1, "do not fit an OTA partition of 8191 bytes")
    assert not out.exists()
    assert_ok(run("sign", "--kind", "firmware", app_bin, "-k", KEY, "--version", "1.0.0", "--slot-size", "0x2000",
                  "-o", out))
    assert_error(run("verify", out, "-k", PUB, "--slot-size", "0x1fff"), 1, prefix="host:   REJECTED TOO_LARGE")


def test_verify_rejects_a_firmware_image_with_a_bad_payload(tmp_path: Path) -> None:
    """Signed correctly (built around the payload without the CLI's check): verify says no."""
    opts = SignOptions(ImageVersion.parse("1.0.0"), security_counter=1, kind=ImageKind.FIRMWARE)
    out = tmp_path / "fw.bin"
    out.write_bytes(build_image(b"\xff" * 0x200 + b"\x00" * 64, signing_key(KEY.name), opts))
    assert_error(run("verify", out, "-k", PUB), 1, "NOT_ESP_APP", prefix="host:   REJECTED")
    assert "NOT VALID: " in assert_ok(run("info", out)).stdout


def test_porting_ota_table() -> None:
    """docs/PORTING.md's OTA table: ESP-IDF's layout rules, otadata and two OTA app partitions
    that hold a 1,672 KB MicroPython app (the size cited there) plus 48 KiB of frozen mpboot
    with its envelope, and Recipe 2's mpboot partitions unchanged in kind."""
    import re

    import test_porting_doc as doc

    text = doc.DOC.read_text()
    m = re.search(r"^## ESP32: updating MicroPython itself.*?(?=^## )", text, re.M | re.S)
    assert m
    rows = {}
    for line in doc.one_block(m.group(0), "csv", "otadata").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, kind, sub, offset, size, _ = (f.strip() for f in line.split(","))
        rows[name] = (doc.ESP_TYPES[kind], doc.ESP_SUBTYPES[kind][sub], int(offset, 0), int(size, 0))
    spans = sorted((r[2], r[2] + r[3]) for r in rows.values())
    assert spans[0][0] >= doc.ESP32_TABLE_END and spans[-1][1] == 8 << 20
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for t, _, offset, size in rows.values():
        assert offset % (doc.ESP_APP_ALIGN if t == 0 else doc.ESP_DATA_ALIGN) == 0 and size % 4096 == 0
    assert rows["otadata"][:2] == (1, 0) and rows["otadata"][3] == 0x2000
    assert rows["ota_0"][:2] == (0, 0x10) and rows["ota_1"][:2] == (0, 0x11)
    app = 1672 * 1024 + 48 * 1024
    assert espimg.envelope_offset(app, app + 1024, rows["ota_0"][3]) is not None
    assert rows["ota_0"][3] == rows["ota_1"][3]
    recipe2 = {p["name"]: p for p in doc.esp32_table()}
    for label in ("mpboot", "mpb_slot0", "mpb_slot1"):
        assert rows[label][:2] == (recipe2[label]["type"], recipe2[label]["subtype"])
        assert rows[label][3] == recipe2[label]["size"]


def test_sign_refuses_dependencies_on_a_firmware_image(tmp_path: Path, app_bin: Path) -> None:
    """A firmware image's DEPENDENCY TLVs are not checked by devices (mpboot.espota): signing
    refuses them rather than promise what no device keeps."""
    out = tmp_path / "fw.bin"
    assert_error(run("sign", "--kind", "firmware", app_bin, "-k", KEY, "--version", "1.0.0", "--depends",
                     "firmware:1.0", "-o", out), 2, "carries no dependencies")
    assert not out.exists()
