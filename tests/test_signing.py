"""Signing as a release pipeline does it (issue 17), without a token: the air-gapped flow
(`sign --digest-only`, a signature made by openssl elsewhere, `sign --attach-signature`;
the same for `cosign`, images and trust records), refusals of a signature over other bytes,
the signing log every signature is appended to before its file is written, `mpboot info`
matching an image's signatures to their log lines, and `pkcs11:` URI parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clikit import assert_error, assert_ok, run
from hsmkit import imgtool_verify, openssl_sign
from conftest import KEYS_DIR
from mpboot.errors import UsageError
from mpboot.image import TlvType, parse_image
from mpboot.pkcs11uri import parse_uri
from mpboot.signing import parse_key_ref
from mpboot.trust import decode_signed

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
PUB = KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem"
KEY3072 = KEYS_DIR / "TEST-ONLY-rsa3072.pem"
OTHER_PUB = KEYS_DIR / "TEST-ONLY-rsa2048-untrusted.pub.pem"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """An app folder: compiled and packed on every sign, so the flow also shows the build
    is reproducible (the digest of step 1 is the digest of step 2's rebuild)."""
    folder = tmp_path / "app"
    (folder / "lib").mkdir(parents=True)
    (folder / "main.py").write_text("import helper\nprint(helper.VERSION)\n")
    (folder / "lib" / "helper.py").write_text("VERSION = '2.1.0'\n")
    return folder


def sign_app(app: Path, out: Path, *extra: object, version: str = "2.1.0"):  # type: ignore[no-untyped-def]
    return run("sign", app, "--version", version, "--vendor-id", "example.com", "-o", out, *extra)


@pytest.mark.parametrize("scheme", ["pss", "pkcs1v15"])
def test_digest_signed_elsewhere_then_attached_verifies_everywhere(app: Path, tmp_path: Path, scheme: str) -> None:
    digest = tmp_path / "app.digest"
    said = assert_ok(sign_app(app, digest, "--digest-only", "--scheme", scheme)).stdout
    assert len(digest.read_bytes()) == 32 and digest.read_bytes().hex() in said
    assert ("RSA-PSS (SHA-256, MGF1-SHA-256, salt 32)" if scheme == "pss" else "PKCS1-v1_5") in said
    sig = tmp_path / "app.sig"
    openssl_sign(KEY, digest, sig, scheme)
    out = tmp_path / "app.bin"
    assert_ok(sign_app(app, out, "--attach-signature", sig, "-k", PUB, "--scheme", scheme))
    image = parse_image(out.read_bytes())
    assert image.digest == digest.read_bytes()
    assert image.unprotected[-1].value == sig.read_bytes()
    assert image.unprotected[-1].type == (TlvType.RSA2048_PSS if scheme == "pss" else TlvType.MPBOOT_RSA_PKCS1V15)
    checked = assert_ok(run("verify", out, "-k", PUB, "--device"))
    assert "host:   OK" in checked.stdout and "device: OK" in checked.stdout
    if scheme == "pss":
        imgtool_verify(out, PUB)


def test_a_signature_of_other_bytes_is_refused_and_nothing_written(app: Path, tmp_path: Path) -> None:
    digest, sig = tmp_path / "d", tmp_path / "s"
    assert_ok(sign_app(app, digest, "--digest-only"))
    openssl_sign(KEY, digest, sig)
    out = tmp_path / "app.bin"
    # Another version, another security counter, another app, another key, the other scheme.
    assert_error(sign_app(app, out, "--attach-signature", sig, "-k", PUB, version="2.1.1"), 2,
                 "not a signature of digest", "nothing written")
    assert_error(sign_app(app, out, "--attach-signature", sig, "-k", PUB, "--security-counter", "9"), 2,
                 "not a signature of digest")
    (app / "main.py").write_text("print('changed')\n")
    assert_error(sign_app(app, out, "--attach-signature", sig, "-k", PUB), 2, "not a signature of digest")
    (app / "main.py").write_text("import helper\nprint(helper.VERSION)\n")
    assert_error(sign_app(app, out, "--attach-signature", sig, "-k", OTHER_PUB), 2, "with another key")
    assert_error(sign_app(app, out, "--attach-signature", sig, "-k", PUB, "--scheme", "pkcs1v15"), 2,
                 "a pss signature", "--scheme pss")
    assert_error(sign_app(app, out, "--attach-signature", sig, "-k", KEYS_DIR / "TEST-ONLY-rsa3072.pub.pem"), 2,
                 "RSA-3072 signature is 384")
    assert not out.exists()
    # The app restored: the same signature attaches again.
    assert_ok(sign_app(app, out, "--attach-signature", sig, "-k", PUB))


def test_detached_flow_usage_errors(app: Path, tmp_path: Path) -> None:
    sig = tmp_path / "s"
    sig.write_bytes(bytes(256))
    assert_error(sign_app(app, tmp_path / "o", "--digest-only", "-k", KEY), 2, "--digest-only writes only the digest")
    assert_error(sign_app(app, tmp_path / "o", "--attach-signature", sig), 2, "give each signature's public key")
    big = tmp_path / "big.sig"
    big.write_bytes(bytes(1000))
    assert_error(sign_app(app, tmp_path / "o", "--attach-signature", big, "-k", PUB), 2, "not a raw RSA signature")
    assert_error(run("cosign", tmp_path / "o", "--digest-only"), 2, "give -o FILE")


def test_two_signatures_made_on_two_machines_make_a_two_of_two_image(app: Path, tmp_path: Path) -> None:
    digest = tmp_path / "d"
    assert_ok(sign_app(app, digest, "--digest-only"))
    sig_a, sig_b = tmp_path / "a.sig", tmp_path / "b.sig"
    openssl_sign(KEYS_DIR / "TEST-ONLY-root-a.pem", digest, sig_a)
    openssl_sign(KEYS_DIR / "TEST-ONLY-root-b.pem", digest, sig_b)
    out = tmp_path / "app.bin"
    assert_ok(sign_app(app, out, "--attach-signature", sig_a, "-k", KEYS_DIR / "TEST-ONLY-root-a.pub.pem",
                       "--attach-signature", sig_b, "-k", KEYS_DIR / "TEST-ONLY-root-b.pub.pem"))
    checked = assert_ok(run("verify", out, "-k", KEYS_DIR / "TEST-ONLY-root-a.pub.pem",
                            "-k", KEYS_DIR / "TEST-ONLY-root-b.pub.pem", "--image-threshold", "2"))
    assert "host:   OK" in checked.stdout


def test_cosign_an_image_and_a_record_through_a_digest(app: Path, tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    assert_ok(sign_app(app, image, "-k", KEYS_DIR / "TEST-ONLY-root-a.pem"))
    digest, sig = tmp_path / "d", tmp_path / "s"
    assert_ok(run("cosign", image, "--digest-only", "-o", digest))
    assert digest.read_bytes() == parse_image(image.read_bytes()).digest
    openssl_sign(KEYS_DIR / "TEST-ONLY-root-b.pem", digest, sig)
    before = image.read_bytes()
    assert_error(run("cosign", image, "-k", KEYS_DIR / "TEST-ONLY-root-c.pub.pem", "--attach-signature", sig), 2,
                 "with another key")
    assert image.read_bytes() == before
    assert_ok(run("cosign", image, "-k", KEYS_DIR / "TEST-ONLY-root-b.pub.pem", "--attach-signature", sig))
    checked = assert_ok(run("verify", image, "-k", KEYS_DIR / "TEST-ONLY-root-a.pub.pem",
                            "-k", KEYS_DIR / "TEST-ONLY-root-b.pub.pem", "--image-threshold", "2"))
    assert "host:   OK" in checked.stdout

    # A revocation record, unsigned, signed by root b on the air-gapped machine.
    record = tmp_path / "revoke.cbor"
    assert_ok(run("key", "revoke", "--number", "1", "--serial", "5", "--no-sign", "-o", record))
    assert_ok(run("cosign", record, "--digest-only", "-o", digest))
    assert digest.read_bytes() == decode_signed(record.read_bytes(), unsigned_ok=True).envelope.digest
    openssl_sign(KEYS_DIR / "TEST-ONLY-root-b.pem", digest, sig)
    assert_ok(run("cosign", record, "-k", KEYS_DIR / "TEST-ONLY-root-b.pub.pem", "--attach-signature", sig))
    applied = assert_ok(run("verify", image, "-k", KEYS_DIR / "TEST-ONLY-root-b.pub.pem", "--trust-record", record))
    assert "revocation 1" in applied.stdout


def _log(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_signature_is_logged_and_info_names_its_line(app: Path, tmp_path: Path) -> None:
    log = tmp_path / "release.jsonl"
    image = tmp_path / "app.bin"
    assert_ok(sign_app(app, image, "-k", KEY, "-k", KEY3072, "--signing-log", log))
    first, second = _log(log)
    assert first["what"] == "image" and first["version"] == "2.1.0+0" and first["security_counter"] == 0x02010000
    assert first["key_hash"] != second["key_hash"] and first["digest"] == second["digest"]
    assert first["digest"] == parse_image(image.read_bytes()).digest.hex()
    assert first["signer"] == {"kind": "file", "path": str(KEY.resolve())}
    assert (first["key_bits"], second["key_bits"]) == (2048, 3072)
    assert first["host"] and first["output"] == str(image.resolve())
    shown = assert_ok(run("info", image, "--signing-log", log)).stdout
    assert shown.count(f"with key file {KEY}") == 1 and shown.count(f"with key file {KEY3072}") == 1
    summary = json.loads(assert_ok(run("info", image, "--json", "--signing-log", log)).stdout)
    assert [s["log"]["signature_sha256"] for s in summary["signatures"]] == \
        [first["signature_sha256"], second["signature_sha256"]]

    # A cosignature appends its own line; another log knows none of them.
    assert_ok(run("cosign", image, "-k", KEYS_DIR / "TEST-ONLY-root-a.pem", "--signing-log", log))
    assert len(_log(log)) == 3 and _log(log)[2]["what"] == "image"
    elsewhere = assert_ok(run("info", image, "--signing-log", tmp_path / "other.jsonl")).stdout
    assert elsewhere.count("not in the signing log") == 3


def test_records_are_logged_too(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    assert_ok(run("key", "delegate", "--to", KEYS_DIR / "TEST-ONLY-ci.pub.pem", "--serial", "3",
                  "-k", KEYS_DIR / "TEST-ONLY-root-a.pem", "-o", tmp_path / "ci.cert", "--signing-log", log))
    (entry,) = _log(log)
    assert entry["what"] == "certificate" and entry["signer"]["kind"] == "file"
    assert entry["digest"] == decode_signed((tmp_path / "ci.cert").read_bytes()).envelope.digest.hex()


def test_an_attached_signature_is_logged_as_detached(app: Path, tmp_path: Path) -> None:
    digest, sig, log = tmp_path / "d", tmp_path / "s", tmp_path / "log.jsonl"
    assert_ok(sign_app(app, digest, "--digest-only", "--signing-log", log))
    assert not log.exists()  # no signature made yet
    openssl_sign(KEY, digest, sig)
    assert_ok(sign_app(app, tmp_path / "app.bin", "--attach-signature", sig, "-k", PUB, "--signing-log", log))
    (entry,) = _log(log)
    assert entry["signer"] == {"kind": "detached", "signature_file": str(sig)}


def test_the_log_defaults_to_the_working_directory(app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_ok(run("sign", app, "--version", "1.0.0", "-k", KEY, "-o", tmp_path / "app.bin",
                  env={"MPBOOT_SIGNING_LOG": None}))
    assert len(_log(tmp_path / "mpboot-signing.jsonl")) == 1


def test_an_unwritable_log_stops_the_signed_file(app: Path, tmp_path: Path) -> None:
    out = tmp_path / "app.bin"
    # The log's folder is missing: it cannot be appended to, so no image is written.
    assert_error(sign_app(app, out, "-k", KEY, "--signing-log", tmp_path / "no" / "such" / "log"), 2,
                 "signing log", "nothing written")
    assert not out.exists()


def test_a_torn_or_foreign_line_in_the_log_is_skipped(app: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"torn": \nnot json\n[1,2]\n')
    image = tmp_path / "app.bin"
    assert_ok(sign_app(app, image, "-k", KEY, "--signing-log", log))
    shown = assert_ok(run("info", image, "--signing-log", log)).stdout
    assert f"with key file {KEY}" in shown


def test_pkcs11_uris_parse_as_rfc_7512_says() -> None:
    u = parse_uri("pkcs11:token=Release%20HSM;object=fw%2Fsigner;id=%01%ff;type=private"
                  "?pin-source=file:/run/pin&module-path=/usr/lib/x.so")
    assert (u.token, u.object, u.id, u.type) == ("Release HSM", "fw/signer", b"\x01\xff", "private")
    assert (u.pin_source, u.module_path, u.pin_value) == ("file:/run/pin", "/usr/lib/x.so", None)
    secret = parse_uri("pkcs11:token=t;object=k?pin-value=123456&module-path=/m.so")
    assert secret.pin_value == "123456"
    assert "123456" not in str(secret) and "123456" not in repr(secret) and "module-path=/m.so" in str(secret)
    # A PIN put where it does not belong is refused, and the refusal does not repeat it.
    for misplaced in ("pkcs11:token=t;object=k;pin-value=123456", "pkcs11:token=t;object=k?PIN-VALUE=123456",
                      "pkcs11:pin-value=123456;token=t;object=k", "PKCS11:Pin-Value=123456"):
        with pytest.raises(UsageError) as refused:
            parse_uri(misplaced)
        assert "123456" not in str(refused.value)
        assert "123456" not in assert_error(run("pubkey", misplaced), 2, "does not use the URI attribute")
    assert parse_key_ref("PKCS11:object=k") == parse_uri("PKCS11:object=k")
    assert parse_key_ref("keys/release.pem") == Path("keys/release.pem")


@pytest.mark.parametrize(("text", "fragment"), [
    ("pkcs11:token=t", "object=LABEL or id="),
    ("pkcs11:token=t;object=k;slot-id=1", "'slot-id'"),
    ("pkcs11:object=a;object=b", "given twice"),
    ("pkcs11:object=a;type=cert", "type=cert"),
    ("pkcs11:object=a?module-name=softhsm2", "'module-name'"),
    ("pkcs11:object", "not attribute=value"),
    ("pkcs11:object=%ff%fe", "not UTF-8"),
])
def test_a_uri_mpboot_would_not_honour_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        parse_uri(text)
    assert_error(run("pubkey", text), 2, fragment)


def test_a_torn_last_line_does_not_swallow_the_next_entry(app: Path, tmp_path: Path) -> None:
    """A crash or a full disk can leave the log's last line without its newline: the next
    entry starts on a line of its own, so info still finds it."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"time": "2026-12-01T00:00:00Z", "signature_sha')
    image = tmp_path / "app.bin"
    assert_ok(sign_app(app, image, "-k", KEY, "--signing-log", log))
    assert log.read_bytes().count(b"\n") == 2
    assert f"with key file {KEY}" in assert_ok(run("info", image, "--signing-log", log)).stdout


def test_info_reads_only_a_regular_log_and_skips_what_is_not_a_line_of_ours(app: Path, tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    assert_ok(sign_app(app, image, "-k", KEY, "--signing-log", tmp_path / "real.jsonl"))
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)  # opened for reading, a FIFO would wait for a writer forever
    assert "not in the signing log" in assert_ok(run("info", image, "--signing-log", fifo)).stdout
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_bytes(b"[" * 60000 + b"\n" + b"x" * 200_000 + b"\n" + (tmp_path / "real.jsonl").read_bytes())
    assert f"with key file {KEY}" in assert_ok(run("info", image, "--signing-log", hostile)).stdout


def test_options_are_checked_before_anything_signs(app: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    assert_error(sign_app(app, tmp_path / "a.hex", "-k", KEY, "--hex-addr", "zzz", "--signing-log", log), 2,
                 "hex address")
    assert not log.exists() and not (tmp_path / "a.hex").exists()
    sig = tmp_path / "s"
    sig.write_bytes(bytes(256))
    assert_error(sign_app(app, tmp_path / "o", "--no-sign", "--attach-signature", sig), 2, "--attach-signature")


def test_cosign_digest_only_never_overwrites_its_input(app: Path, tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    assert_ok(sign_app(app, image, "--no-sign"))
    before = image.read_bytes()
    assert_error(run("cosign", image, "--digest-only", "-o", image), 2, "that is FILE itself")
    assert image.read_bytes() == before


def test_a_sparse_hex_file_is_refused_before_it_is_filled(tmp_path: Path) -> None:
    """Two records 3.75 GiB apart would be gigabytes of 0xff once gaps are filled."""
    from intelhex import IntelHex

    ih = IntelHex()
    ih[0] = 1
    ih[0xF0000000] = 2
    sparse = tmp_path / "sparse.hex"
    ih.write_hex_file(str(sparse))
    assert_error(run("cosign", sparse, "--digest-only", "-o", tmp_path / "d"), 2, "spans")
    assert_error(run("sign", sparse, "--version", "1.0.0", "--pad-header", "-k", KEY, "-o", tmp_path / "o.bin"), 2,
                 "spans")
