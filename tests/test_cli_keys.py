"""The trust-model commands as a release manager uses them (docs/KEYS.md section 6): sign
with several keys, the detached --no-sign + cosign flow, delegation chains, root rotation
and revocation records checked with `verify --trust-record`, `key show`; and their errors
(one line, the right exit code, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clikit import assert_error, assert_ok, run
from conftest import KEYS_DIR
from mpboot.image import TlvType, parse_image
from mpboot.trust import Certificate, RevocationRecord, RootRecord, decode_signed

PAYLOAD = bytes(range(256)) * 4
VENDOR = "example.com"
CLASS = "golden-widget"


def k(name: str) -> Path:
    """A TEST-ONLY private key file."""
    return KEYS_DIR / f"TEST-ONLY-{name}.pem"


def p(name: str) -> Path:
    """A TEST-ONLY public key file."""
    return KEYS_DIR / f"TEST-ONLY-{name}.pub.pem"


def roots(*names: str) -> list[object]:
    out: list[object] = []
    for name in names:
        out += ["-k", p(name)]
    return out


ABC = ("root-a", "root-b", "root-c")


@pytest.fixture
def fw(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(PAYLOAD)
    return path


def sign(fw: Path, out: Path, *extra: object, counter: int = 100) -> str:
    return assert_ok(run("sign", fw, "--pad-header", "--version", "1.2.0", "--security-counter", counter,
                  "--vendor-id", VENDOR, "--class-id", CLASS, "-o", out, *extra)).stdout


def verify(image: Path, *extra: object, names: tuple[str, ...] = ABC) -> object:
    return run("verify", image, *roots(*names), *extra)


def test_sign_with_three_keys_meets_an_image_threshold_of_three(fw: Path, tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    assert "3 signatures" in sign(fw, image, "-k", k("root-a"), "-k", k("root-b"), "-k", k("root-c"))
    kinds = [t.type for t in parse_image(image.read_bytes()).unprotected]
    assert kinds.count(TlvType.KEYHASH) == 3
    out = assert_ok(verify(image, "--threshold", "2", "--image-threshold", "3")).stdout
    assert "keys " in out and str(p("root-c")) in out
    assert_error(verify(image, "--image-threshold", "4", names=(*ABC, "root-d")), 1, prefix="host:   REJECTED THRESHOLD")
    assert_error(run("sign", fw, "--pad-header", "--version", "1.0.0", "-o", tmp_path / "x.bin",
                     "-k", k("root-a"), "-k", k("root-a")), 2, "twice")


def test_detached_no_sign_then_cosign_two_of_three(fw: Path, tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    assert "unsigned" in sign(fw, image, "--no-sign")
    assert_error(verify(image), 1, prefix="host:   REJECTED NO_SIGNATURE")
    out = assert_ok(run("cosign", image, "-k", k("root-a"))).stdout
    assert "1 signature" in out
    assert_error(verify(image, "--image-threshold", "2"), 1, prefix="host:   REJECTED THRESHOLD")
    signed_c = tmp_path / "app-c.bin"
    assert "2 signatures" in assert_ok(run("cosign", image, "-k", k("root-c"), "--scheme", "pkcs1v15",
                                           "-o", signed_c)).stdout
    assert_ok(verify(signed_c, "--image-threshold", "2"))
    assert_error(run("cosign", signed_c, "-k", k("root-a")), 2, "already signed")
    assert_error(run("cosign", signed_c, "-k", k("root-b"), "--slot-size", "1k"), 2, "slot size")
    assert_error(run("sign", fw, "--pad-header", "--version", "1.0.0", "-o", tmp_path / "x.bin", "--no-sign",
                     "-k", k("root-a")), 2, "--no-sign")
    assert_error(run("sign", fw, "--pad-header", "--version", "1.0.0", "-o", tmp_path / "x.bin"), 2, "-k KEY")


def test_delegation_chain_root_team_ci(fw: Path, tmp_path: Path) -> None:
    team, ci = tmp_path / "team.cert", tmp_path / "ci.cert"
    assert_ok(run("key", "delegate", "-k", k("root-a"), "-k", k("root-b"), "--to", p("team"), "--serial", 10,
                  "--vendor-id", VENDOR, "--counter", "0:10000", "--kind", "app", "--kind", "updater",
                  "--depth", 1, "-o", team))
    # detached: the CI key's certificate is written unsigned, then team (the issuer) cosigns
    assert "unsigned" in assert_ok(run("key", "delegate", "--no-sign", "--to", p("ci"), "--serial", 11,
                                       "--vendor-id", VENDOR, "--class-id", CLASS, "--counter", "1:1000",
                                       "--kind", "app", "-o", ci)).stdout
    assert_ok(run("cosign", ci, "-k", k("team")))
    cert = decode_signed(ci.read_bytes()).body
    assert isinstance(cert, Certificate) and cert.depth == 0 and cert.counters == (1, 1000) and cert.kinds == 1

    image = tmp_path / "app.bin"
    sign(fw, image, "-k", k("ci"), "--cert", ci, "--cert", team)  # any order: written parent first
    tlvs = [t for t in parse_image(image.read_bytes()).unprotected if t.type == TlvType.MPBOOT_CERT]
    assert [t.value for t in tlvs] == [team.read_bytes(), ci.read_bytes()]
    out = assert_ok(verify(image, "--threshold", "2")).stdout
    assert "certificate serial 11" in out
    assert_ok(verify(image))  # root threshold 1: a+b more than meet it
    assert_error(verify(image, names=("root-c",)), 1, prefix="host:   REJECTED CERT_ISSUER")  # a, b no roots

    wide = tmp_path / "wide.bin"
    sign(fw, wide, "-k", k("ci"), "--cert", team, "--cert", ci, counter=5000)
    assert_error(verify(wide, "--threshold", "2"), 1, prefix="host:   REJECTED OUT_OF_SCOPE")
    assert_error(run("sign", fw, "--pad-header", "--version", "1.0.0", "-o", tmp_path / "x.bin", "-k", k("root-a"),
                     "--cert", ci), 2, "certifies none")


def test_rotate_root_and_revoke_then_verify_with_trust_records(fw: Path, tmp_path: Path) -> None:
    ci = tmp_path / "ci.cert"
    assert_ok(run("key", "delegate", "-k", k("root-a"), "-k", k("root-b"), "--to", p("ci"), "--serial", 20,
                  "-o", ci))
    by_ci, transition = tmp_path / "ci.bin", tmp_path / "transition.bin"
    sign(fw, by_ci, "-k", k("ci"), "--cert", ci)
    sign(fw, transition, "-k", k("root-a"), "-k", k("root-d"))  # old and new root: boots on both sides

    # rotation a, b, c (2 of 3) -> c, d (1 of 2): the holders sign in turn
    rotation = tmp_path / "rotation.cbor"
    assert_ok(run("key", "rotate-root", "--no-sign", "--version", 2, "--root", p("root-c"), "--root", p("root-d"),
                  "--threshold", 1, "--image-threshold", 1, "-o", rotation))
    assert_ok(run("cosign", rotation, "-k", k("root-a")))
    assert_error(verify(transition, "--threshold", 2, "--trust-record", rotation), 1,
                 "not signed by a threshold of the current roots", "rotation.cbor")
    assert_ok(run("cosign", rotation, "-k", k("root-b")))
    record = decode_signed(rotation.read_bytes()).body
    assert isinstance(record, RootRecord) and record.version == 2
    # a and b signed (old threshold) but neither is a new root: the new threshold is missing
    assert_error(verify(transition, "--threshold", 2, "--trust-record", rotation), 1,
                 "not signed by its own new threshold")
    assert_ok(run("cosign", rotation, "-k", k("root-d")))
    out = assert_ok(verify(transition, "--threshold", 2, "--trust-record", rotation)).stdout
    assert "root set version 2, 2 roots, threshold 1" in out and "key root " in out
    assert_error(verify(by_ci, "--threshold", 2, "--trust-record", rotation), 1, prefix="host:   REJECTED CERT_ISSUER")
    assert_error(verify(transition, "--threshold", 2, "--trust-record", rotation, "--trust-record", rotation), 1,
                 "stale")

    # revocation of the ci key, by the current (version 1) roots: ci's image stops verifying
    revocation = tmp_path / "revoke.cbor"
    assert_ok(run("key", "revoke", "-k", k("root-b"), "-k", k("root-c"), "--number", 1, "--pubkey", p("ci"),
                  "--serial", 20, "-o", revocation))
    rev = decode_signed(revocation.read_bytes()).body
    assert isinstance(rev, RevocationRecord) and rev.serials == (20,)
    assert_ok(verify(by_ci, "--threshold", 2))
    assert_error(verify(by_ci, "--threshold", 2, "--trust-record", revocation), 1, prefix="host:   REJECTED REVOKED")
    assert_ok(run("cosign", by_ci, "-k", k("root-c")))  # the runbook: a good key cosigns first
    assert_ok(verify(by_ci, "--threshold", 2, "--trust-record", revocation))


def test_key_show_text_and_json(tmp_path: Path) -> None:
    cert, rec, rot = tmp_path / "c.cert", tmp_path / "r.cbor", tmp_path / "rot.cbor"
    assert_ok(run("key", "delegate", "-k", k("root-a"), "--to", p("ci"), "--serial", 7, "--vendor-id", VENDOR,
                  "--class-id", CLASS, "--kind", "updater", "-o", cert))
    lines = assert_ok(run("key", "show", cert)).stdout.splitlines()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}
    assert fields["type"] == "certificate" and fields["serial"] == "7" and fields["depth"] == "0"
    assert fields["vendors"] == "cfbff0d1-9375-5685-968c-48ce8b15ae17"
    assert fields["classes"] == "53684caa-e303-5884-9c44-dafb86b33b50"
    assert fields["counters"] == "any" and fields["kinds"] == "updater (mask 0x2)"
    ci_hash = decode_signed(cert.read_bytes()).body.key.keyhash().hex()  # type: ignore[union-attr]
    assert ci_hash in fields["key"]
    root_a = decode_signed(cert.read_bytes()).envelope.signatures[0].keyhash.hex()
    assert fields["signature"] == f"key hash {root_a} RSA2048_PSS"
    shown = json.loads(assert_ok(run("key", "show", cert, "--json")).stdout)
    assert shown["key"]["keyhash"] == ci_hash and shown["kinds"] == ["updater"] and len(shown["signatures"]) == 1

    assert_ok(run("key", "revoke", "--no-sign", "--number", 3, "--key-hash", "ab" * 32, "--serial", 9, "-o", rec))
    out = assert_ok(run("key", "show", rec)).stdout
    assert "revoked key:      " + "ab" * 32 in out and "revoked serial:   9" in out and "signatures:       none" in out
    assert_ok(run("key", "rotate-root", "-k", k("root-a"), "--version", 2, "--root", p("root-c"), "--root",
                  p("root-d"), "--threshold", 2, "--image-threshold", 2, "-o", rot))
    shown = json.loads(assert_ok(run("key", "show", rot, "--json")).stdout)
    assert shown["type"] == "root record" and [r["bits"] for r in shown["roots"]] == [2048, 3072]


def test_updater_kind_is_written_only_for_updaters(fw: Path, tmp_path: Path) -> None:
    app, updater = tmp_path / "app.bin", tmp_path / "updater.bin"
    sign(fw, app, "-k", k("root-a"))
    sign(fw, updater, "-k", k("root-a"), "--kind", "updater")
    assert TlvType.MPBOOT_KIND not in {t.type for t in parse_image(app.read_bytes()).protected}
    assert parse_image(updater.read_bytes()).kind == 2
    assert_ok(verify(updater))


@pytest.mark.parametrize("args,code,fragment", [
    (["key", "delegate", "-k", k("root-a"), "--to", k("ci"), "--serial", 1, "-o", "x.cert"], 2, "private key"),
    (["key", "delegate", "-k", k("root-a"), "--to", p("ci"), "--serial", 1, "--vendor-id", "a.example",
      "--vendor-id", "b.example", "--class-id", "widget", "-o", "x.cert"], 2, "exactly one --vendor-id"),
    (["key", "delegate", "-k", k("root-a"), "--to", p("ci"), "--serial", 1, "--counter", "9:1", "-o", "x.cert"], 2,
     "--counter"),
    (["key", "delegate", "--to", p("ci"), "--serial", 1, "-o", "x.cert"], 2, "-k KEY"),
    (["key", "revoke", "-k", k("root-a"), "--number", 1, "--key-hash", "abc", "-o", "x.cbor"], 2, "64 hex"),
    (["key", "rotate-root", "-k", k("root-a"), "--version", 2, "--root", p("root-c"), "--threshold", 2,
      "--image-threshold", 1, "-o", "x.cbor"], 2, "threshold"),
    (["key", "rotate-root", "-k", k("root-a"), "-k", k("root-a"), "--version", 2, "--root", p("root-c"),
      "--threshold", 1, "--image-threshold", 1, "-o", "x.cbor"], 2, "twice"),
    (["key", "show", KEYS_DIR / "TEST-ONLY-ci.pub.pem"], 1, "does not parse"),
    (["verify", KEYS_DIR / "TEST-ONLY-ci.pub.pem", "-k", p("root-a"), "--device", "--threshold", 1,
      "--image-threshold", 2], 2, "--device"),
])
def test_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[object], code: int,
                             fragment: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert_error(run(*args), code, fragment)


def test_show_and_cosign_tell_images_and_records_apart(fw: Path, tmp_path: Path) -> None:
    image, rec = tmp_path / "app.bin", tmp_path / "r.cbor"
    sign(fw, image, "-k", k("root-a"))
    assert_error(run("key", "show", image), 2, "mpboot info")
    assert_ok(run("key", "revoke", "-k", k("root-a"), "--number", 1, "-o", rec))
    assert_error(run("cosign", rec, "-k", k("root-b"), "--cert", rec), 2, "not an image")
    assert "revocation record" in assert_ok(run("cosign", rec, "-k", k("root-b"))).stdout
    assert_error(run("cosign", rec, "-k", k("root-b")), 2, "already signed")
    assert_error(run("verify", image, "-k", p("root-a"), "--trust-record", image), 1, "does not parse")


@pytest.mark.parametrize("path", [("cosign",), ("key",), ("key", "delegate"), ("key", "revoke"),
                                  ("key", "rotate-root"), ("key", "show")])
def test_new_commands_have_help(path: tuple[str, ...]) -> None:
    out = assert_ok(run(*path, "--help")).stdout
    assert out.startswith(f"Usage: mpboot {' '.join(path)}")


def test_cosign_with_a_delegated_key_writes_its_chain_parent_first(fw: Path, tmp_path: Path) -> None:
    team, ci, rec = tmp_path / "team.cert", tmp_path / "ci.cert", tmp_path / "r.cbor"
    assert_ok(run("key", "delegate", "-k", k("root-a"), "-k", k("root-b"), "--to", p("team"), "--serial", 10,
                  "--depth", 1, "-o", team))
    assert_ok(run("key", "delegate", "-k", k("team"), "--to", p("ci"), "--serial", 11, "-o", ci))
    image = tmp_path / "app.bin"
    sign(fw, image, "-k", k("root-c"))
    assert_ok(run("cosign", image, "-k", k("ci"), "--cert", ci, "--cert", team))
    certs = [t.value for t in parse_image(image.read_bytes()).unprotected if t.type == TlvType.MPBOOT_CERT]
    assert certs == [team.read_bytes(), ci.read_bytes()]
    assert_ok(verify(image, "--threshold", 2, "--image-threshold", 2))
    assert_ok(run("key", "revoke", "-k", k("root-a"), "--number", 1, "-o", rec))
    assert_error(run("cosign", image, "-k", k("root-a"), "--cert", rec), 2, "not a certificate", str(rec))
