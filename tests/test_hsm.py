"""Release signing with keys on a PKCS#11 token (issue 17), against SoftHSM2 from Debian: keys
made by `mpboot keygen --pkcs11`, by OpenSC's pkcs11-tool and imported with softhsm2-util;
images and trust records signed on the token and checked by the host verifier, by the device
verifier on MicroPython, and by imgtool; the private key shown never to leave the token; each
way a token can be unusable gives one line, exit 2 and nothing written; a token key and a
file key together meet a 2-of-3 policy on the device; the air-gapped flow with the token's
own tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clikit import assert_error, assert_ok, run
from conftest import KEYS_DIR
from hsmkit import USER_PIN, SoftHsm, files_in, imgtool_verify, pin_file, uri
from trustkit import device_trust_verdicts, trust_state
from mpboot.image import TlvType, parse_image
from mpboot.keys import load_public_key, load_signing_key

PAYLOAD = bytes(range(256)) * 8
TOKEN = "release"


@pytest.fixture
def hsm(tmp_path: Path) -> SoftHsm:
    store = SoftHsm.create(tmp_path / "hsm")
    store.init_token(TOKEN)
    return store


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding only the payload to sign, so 'nothing written' can be checked."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "fw.bin").write_bytes(PAYLOAD)
    return folder


def mp(hsm: SoftHsm, *args: object, env: dict[str, str | None] | None = None):  # type: ignore[no-untyped-def]
    return run(*args, env={**hsm.env, **(env or {})})


def sign(hsm: SoftHsm, work: Path, out: str, *extra: object, env: dict[str, str | None] | None = None):  # type: ignore[no-untyped-def]
    return mp(hsm, "sign", work / "fw.bin", "--pad-header", "--version", "1.4.0", "--security-counter", "7",
              "-o", work / out, *extra, env=env)


def device_verdict(image: Path, pubkey: Path) -> str:
    """`mpboot verify --device`: the host's and the MicroPython verifier's lines."""
    result = assert_ok(run("verify", image, "-k", pubkey, "--device"))
    assert "host:   OK" in result.stdout and "device: OK" in result.stdout, result.stdout
    return result.stdout


def test_keygen_on_the_token_signs_images_every_verifier_accepts(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    key = uri(TOKEN, "fw-release", pin_file=pin_file(tmp_path))
    made = assert_ok(mp(hsm, "keygen", "--pkcs11", key, "-o", tmp_path / "release.pub.pem")).stdout
    assert "non-extractable" in made and f"token '{TOKEN}' object 'fw-release'" in made
    public = load_public_key(tmp_path / "release.pub.pem")
    assert public.keyhash().hex() in made
    # pubkey exports the same public half from the token (no PIN needed: a public object).
    exported = assert_ok(mp(hsm, "pubkey", uri(TOKEN, "fw-release"))).stdout
    assert exported == (tmp_path / "release.pub.pem").read_text()
    # Without -o, keygen's standard output is the public key alone (`> key.pub.pem`).
    second = assert_ok(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, "fw-second", pin_file=pin_file(tmp_path))))
    assert second.stdout.startswith("-----BEGIN PUBLIC KEY-----") and "non-extractable" in second.stderr

    assert_ok(sign(hsm, work, "app.bin", "-k", key))
    image = parse_image((work / "app.bin").read_bytes())
    assert [t.type for t in image.unprotected] == [TlvType.SHA256, TlvType.KEYHASH, TlvType.RSA2048_PSS]
    assert image.unprotected[1].value == public.keyhash()
    device_verdict(work / "app.bin", tmp_path / "release.pub.pem")
    imgtool_verify(work / "app.bin", tmp_path / "release.pub.pem")


def test_the_private_key_never_leaves_the_token(hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    assert_ok(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, "locked", "id=%42", pin_file=pin_file(tmp_path))))
    # The token says so itself (sensitive, never extractable), refuses to show the private
    # exponent, and refuses to wrap the key out under a key of ours.
    monkeypatch.setenv("SOFTHSM2_CONF", hsm.env["SOFTHSM2_CONF"])
    lib = pkcs11.lib(hsm.module)
    lib.reinitialize()  # read this test's token store
    try:
        with lib.get_token(token_label=TOKEN).open(user_pin=USER_PIN) as session:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="locked")
            assert key[Attribute.ID] == b"\x42"
            assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
            assert key[Attribute.NEVER_EXTRACTABLE]
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[Attribute.PRIVATE_EXPONENT]
            wrapping = session.generate_key(pkcs11.KeyType.AES, 256, capabilities=pkcs11.MechanismFlag.WRAP)
            with pytest.raises(pkcs11.exceptions.KeyUnextractable):
                wrapping.wrap_key(key, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)
    finally:
        lib.finalize()


def test_keys_made_by_pkcs11_tool_sign_rsa_2048_and_3072(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    hsm.tool_keypair(TOKEN, "rsa:2048", "tool-2048", "02")
    hsm.tool_keypair(TOKEN, "rsa:3072", "tool-3072", "03")
    env = {"MPBOOT_PKCS11_PIN": USER_PIN}
    for name, key_id, tlv in (("tool-2048", "%02", TlvType.RSA2048_PSS), ("tool-3072", "%03", TlvType.RSA3072_PSS)):
        pub = tmp_path / f"{name}.pem"
        # Named by id alone, as pkcs11-tool --list-objects shows it: the store's one
        # initialised token is the token meant (its free slot's blank token is no candidate).
        key = f"pkcs11:id={key_id}"
        assert_ok(mp(hsm, "pubkey", key, "-o", pub))
        assert_ok(sign(hsm, work, f"{name}.bin", "-k", key, env=env))
        assert parse_image((work / f"{name}.bin").read_bytes()).unprotected[-1].type == tlv
        device_verdict(work / f"{name}.bin", pub)
        imgtool_verify(work / f"{name}.bin", pub)


def test_an_imported_key_signs_byte_for_byte_as_its_file_did(hsm: SoftHsm, work: Path) -> None:
    """PKCS#1 v1.5 signatures are deterministic: the same key on the token and in a file
    must give the same image."""
    key_file = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
    hsm.import_key(TOKEN, key_file, "imported", "0a")
    env = {"MPBOOT_PKCS11_PIN": USER_PIN}
    assert_ok(sign(hsm, work, "token.bin", "-k", uri(TOKEN, "imported"), "--scheme", "pkcs1v15", env=env))
    assert_ok(sign(hsm, work, "file.bin", "-k", key_file, "--scheme", "pkcs1v15"))
    assert (work / "token.bin").read_bytes() == (work / "file.bin").read_bytes()
    assert parse_image((work / "token.bin").read_bytes()).unprotected[-1].type == TlvType.MPBOOT_RSA_PKCS1V15
    device_verdict(work / "token.bin", KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem")


def _refusals(hsm: SoftHsm, tmp_path: Path) -> list[tuple[str, list[object], dict[str, str | None], str]]:
    hsm.tool_keypair(TOKEN, "EC:prime256v1", "ec-key", "e1")
    hsm.tool_keypair(TOKEN, "rsa:1024", "small", "e2")
    assert_ok(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, "good", pin_file=pin_file(tmp_path))))
    pin = {"MPBOOT_PKCS11_PIN": USER_PIN}
    return [
        ("wrong PIN", ["-k", uri(TOKEN, "good")], {"MPBOOT_PKCS11_PIN": "0000"}, "wrong PIN"),
        ("a pin-value where none belongs", ["-k", f"pkcs11:pin-value={USER_PIN};token={TOKEN};object=good"], {},
         "'pin-value'"),
        ("no PIN", ["-k", uri(TOKEN, "good")], {"MPBOOT_PKCS11_PIN": None}, "needs its user PIN"),
        ("unreadable PIN file", ["-k", uri(TOKEN, "good", pin_file=tmp_path / "absent")], {}, "pin-source"),
        ("missing token", ["-k", uri("other", "good")], pin, "no token 'other'"),
        ("missing object", ["-k", uri(TOKEN, "gone")], pin, "no private key by that name"),
        ("EC key", ["-k", uri(TOKEN, "ec-key")], pin, "is an EC key"),
        ("RSA-1024 key", ["-k", uri(TOKEN, "small")], pin, "RSA-1024"),
        ("no module", ["-k", uri(TOKEN, "good")], {**pin, "MPBOOT_PKCS11_MODULE": None}, "which PKCS#11 module"),
        ("bad module", ["-k", uri(TOKEN, "good"), "--pkcs11-module", tmp_path / "nope.so"], pin, "no such file"),
        ("unknown URI attribute", ["-k", uri(TOKEN, "good", "slot-id=3")], pin, "'slot-id'"),
        ("the same token key twice", ["-k", uri(TOKEN, "good"), "-k", uri(TOKEN, "good")], pin, "given twice"),
    ]


def test_each_unusable_token_is_one_line_exit_2_and_nothing_written(hsm: SoftHsm, work: Path,
                                                                    tmp_path: Path) -> None:
    log = tmp_path / "signing.jsonl"
    for name, args, env, fragment in _refusals(hsm, tmp_path):
        result = sign(hsm, work, "out.bin", *args, "--signing-log", log, env=env)
        assert_error(result, 2, fragment)
        assert files_in(work) == ["fw.bin"], name
        assert not log.exists(), name
        assert USER_PIN not in result.stdout + result.stderr, name  # a PIN never appears in a message


def test_a_token_without_pss_says_so_and_signs_pkcs1v15_when_asked(tmp_path: Path, work: Path) -> None:
    # An older HSM: RSA key generation and PKCS#1 v1.5 only. (Listed as what is allowed:
    # SoftHSM 2.6.1 drops the first name of a "-A,B" deny list.)
    hsm = SoftHsm.create(tmp_path / "nopss",
                         mechanisms="CKM_RSA_PKCS_KEY_PAIR_GEN,CKM_RSA_PKCS,CKM_SHA256_RSA_PKCS,CKM_SHA256")
    hsm.init_token(TOKEN)
    key = uri(TOKEN, "old-hsm", pin_file=pin_file(tmp_path))
    assert_ok(mp(hsm, "keygen", "--pkcs11", key, "-o", tmp_path / "old.pub.pem"))
    assert_error(sign(hsm, work, "app.bin", "-k", key), 2, "does not offer RSA-PSS", "--scheme pkcs1v15")
    assert files_in(work) == ["fw.bin"]
    assert_ok(sign(hsm, work, "app.bin", "-k", key, "--scheme", "pkcs1v15"))
    assert parse_image((work / "app.bin").read_bytes()).unprotected[-1].type == TlvType.MPBOOT_RSA_PKCS1V15
    device_verdict(work / "app.bin", tmp_path / "old.pub.pem")


def test_a_token_with_only_hash_and_sign_mechanisms_is_refused_without_circular_advice(
        tmp_path: Path, work: Path) -> None:
    hsm = SoftHsm.create(tmp_path / "hashonly",
                         mechanisms="CKM_RSA_PKCS_KEY_PAIR_GEN,CKM_SHA256_RSA_PKCS_PSS,CKM_SHA256_RSA_PKCS")
    hsm.init_token(TOKEN)
    key = uri(TOKEN, "kms", pin_file=pin_file(tmp_path))
    assert_ok(mp(hsm, "keygen", "--pkcs11", key))
    for scheme in ("pss", "pkcs1v15"):
        line = assert_error(sign(hsm, work, "app.bin", "-k", key, "--scheme", scheme), 2,
                            "offers neither CKM_RSA_PKCS_PSS nor CKM_RSA_PKCS", "--digest-only")
        assert "--scheme" not in line
    assert files_in(work) == ["fw.bin"]


def test_keygen_never_overwrites_a_key_on_the_token(hsm: SoftHsm, tmp_path: Path) -> None:
    key = uri(TOKEN, "once", "id=%07", pin_file=pin_file(tmp_path))
    assert_ok(mp(hsm, "keygen", "--pkcs11", key))
    before = hsm.objects(TOKEN)
    assert_error(mp(hsm, "keygen", "--pkcs11", key), 2, "already has a key 'once'")
    assert_error(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, "other", "id=%07", pin_file=pin_file(tmp_path))), 2,
                 "or id 07")
    assert_error(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, "x", pin_file=pin_file(tmp_path, "9999"))), 2,
                 "wrong PIN")
    assert hsm.objects(TOKEN) == before


def _device_trust(image: Path, roots: list[Path], threshold: int, image_threshold: int, tmp_path: Path,
                  device_lib: Path) -> str:
    """The device verifier's verdict on `image` under a frozen root set."""
    state = trust_state([load_public_key(r).pkcs1_der() for r in roots], threshold, image_threshold)
    (line,) = device_trust_verdicts([{"name": "case", "image": str(image), "slot_size": 65536, "trust": state}],
                                    device_lib, tmp_path)
    return line


def test_a_file_key_and_a_token_key_meet_two_of_three_on_the_device(  # type: ignore[no-untyped-def]
        hsm: SoftHsm, work: Path, tmp_path: Path, device) -> None:
    token_key = uri(TOKEN, "root-t", pin_file=pin_file(tmp_path))
    assert_ok(mp(hsm, "keygen", "--pkcs11", token_key, "-o", tmp_path / "root-t.pub.pem"))
    roots = [KEYS_DIR / "TEST-ONLY-root-a.pub.pem", tmp_path / "root-t.pub.pem", KEYS_DIR / "TEST-ONLY-root-c.pub.pem"]
    # The release manager signs with the file key; the token holder cosigns in turn.
    assert_ok(sign(hsm, work, "app.bin", "-k", KEYS_DIR / "TEST-ONLY-root-a.pem"))
    assert _device_trust(work / "app.bin", roots, 2, 2, tmp_path, device.lib).startswith("case REJECT 25")
    assert_ok(mp(hsm, "cosign", work / "app.bin", "-k", token_key))
    assert _device_trust(work / "app.bin", roots, 2, 2, tmp_path, device.lib).startswith("case OK")
    host = assert_ok(run("verify", work / "app.bin", *[a for r in roots for a in ("-k", r)], "--image-threshold", "2"))
    assert "host:   OK" in host.stdout
    # Both in one command: the same image, both signatures.
    assert_ok(sign(hsm, work, "both.bin", "-k", KEYS_DIR / "TEST-ONLY-root-a.pem", "-k", token_key))
    assert _device_trust(work / "both.bin", roots, 2, 2, tmp_path, device.lib).startswith("case OK")


def test_trust_records_are_signed_on_the_token(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    """Rotate the roots onto a token: the new set is root a plus the token key, 2 of 2;
    the record is signed by a (the current root) and by the token key (a new root)."""
    token_key = uri(TOKEN, "new-root", pin_file=pin_file(tmp_path))
    assert_ok(mp(hsm, "keygen", "--pkcs11", token_key))
    record = tmp_path / "roots-v2.cbor"
    assert_ok(mp(hsm, "key", "rotate-root", "--version", "2", "--root", KEYS_DIR / "TEST-ONLY-root-a.pub.pem",
                 "--root", uri(TOKEN, "new-root"), "--threshold", "2", "--image-threshold", "2",
                 "-k", KEYS_DIR / "TEST-ONLY-root-a.pem", "-k", token_key, "-o", record))
    assert_ok(sign(hsm, work, "app.bin", "-k", KEYS_DIR / "TEST-ONLY-root-a.pem", "-k", token_key))
    checked = assert_ok(run("verify", work / "app.bin", "-k", KEYS_DIR / "TEST-ONLY-root-a.pub.pem",
                            "--trust-record", record))
    assert "root set version 2" in checked.stdout and "host:   OK" in checked.stdout


def test_air_gapped_signing_with_the_tokens_own_tool(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    """The token lives on another machine with only OpenSC: the digest goes there, the raw
    signature comes back; the image is rebuilt and the signature checked before it is written."""
    hsm.tool_keypair(TOKEN, "rsa:2048", "offline", "0f")
    pub = tmp_path / "offline.pub.pem"
    assert_ok(mp(hsm, "pubkey", f"pkcs11:token={TOKEN};object=offline", "-o", pub))
    assert_ok(sign(hsm, work, "digest.bin", "--digest-only"))
    sig = tmp_path / "offline.sig"
    hsm.tool(TOKEN, "--sign", "--mechanism", "RSA-PKCS-PSS", "--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256",
             "--salt-len", "32", "--id", "0f", "-i", work / "digest.bin", "-o", sig)  # --id: OpenSC 0.23's
    # --sign ignores --label (it takes the token's first private key)
    assert_ok(sign(hsm, work, "app.bin", "--attach-signature", sig, "-k", pub))
    assert parse_image((work / "app.bin").read_bytes()).digest == (work / "digest.bin").read_bytes()
    device_verdict(work / "app.bin", pub)
    imgtool_verify(work / "app.bin", pub)


def test_a_token_signature_is_logged_with_the_token_and_shown_by_info(hsm: SoftHsm, work: Path,
                                                                       tmp_path: Path) -> None:
    key = uri(TOKEN, "logged", pin_file=pin_file(tmp_path))
    assert_ok(mp(hsm, "keygen", "--pkcs11", key))
    log = tmp_path / "log.jsonl"
    assert_ok(sign(hsm, work, "app.bin", "-k", key, "--signing-log", log))
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["signer"]["kind"] == "pkcs11" and entry["signer"]["token"] == TOKEN
    assert entry["signer"]["object"] == "logged" and entry["signer"]["model"] == "SoftHSM v2"
    assert USER_PIN not in log.read_text()
    shown = assert_ok(run("info", work / "app.bin", "--signing-log", log)).stdout
    assert f"pkcs11 token '{TOKEN}' object 'logged'" in shown


def test_a_wrong_key_behind_a_label_is_caught_before_anything_is_written(hsm: SoftHsm, work: Path,
                                                                          tmp_path: Path) -> None:
    """A token whose public object of a name belongs to another key (a botched import): the
    signature does not verify with the public half the image would name, so it is refused."""
    from cryptography.hazmat.primitives import serialization

    hsm.tool_keypair(TOKEN, "rsa:2048", "mixed", "21")
    hsm.tool(TOKEN, "--delete-object", "--type", "pubkey", "--id", "21")
    other = load_public_key(KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem").key
    der = tmp_path / "other.der"
    der.write_bytes(other.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    hsm.tool(TOKEN, "--write-object", der, "--type", "pubkey", "--id", "21", "--label", "mixed")
    result = sign(hsm, work, "app.bin", "-k", f"pkcs11:token={TOKEN};id=%21", env={"MPBOOT_PKCS11_PIN": USER_PIN})
    assert_error(result, 2, "does not verify with its public key")
    assert files_in(work) == ["fw.bin"]


def test_pkcs11_module_from_the_uri(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    key = f"{uri(TOKEN, 'mod', pin_file=pin_file(tmp_path))}&module-path={hsm.module}"
    assert_ok(run("keygen", "--pkcs11", key, env={"SOFTHSM2_CONF": hsm.env["SOFTHSM2_CONF"],
                                                  "MPBOOT_PKCS11_MODULE": None}))
    assert_ok(run("sign", work / "fw.bin", "--pad-header", "--version", "1.0.0", "-k", key, "-o", work / "a.bin",
                  env={"SOFTHSM2_CONF": hsm.env["SOFTHSM2_CONF"], "MPBOOT_PKCS11_MODULE": None}))


def test_a_signing_key_loads_as_before() -> None:
    """Key files keep their path for the log; nothing about them needs a token library."""
    key = load_signing_key(KEYS_DIR / "TEST-ONLY-rsa2048.pem")
    assert key.describe() == {"kind": "file", "path": str((KEYS_DIR / "TEST-ONLY-rsa2048.pem").resolve())}


def test_two_keys_on_one_token_sign_in_one_command(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    """A token login belongs to the process: the second key's session must not log in again."""
    pins = pin_file(tmp_path)
    for name in ("holder-1", "holder-2"):
        assert_ok(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, name, pin_file=pins), "-o", tmp_path / f"{name}.pem"))
    assert_ok(sign(hsm, work, "app.bin", "-k", uri(TOKEN, "holder-1", pin_file=pins),
                   "-k", uri(TOKEN, "holder-2", pin_file=pins)))
    checked = assert_ok(run("verify", work / "app.bin", "-k", tmp_path / "holder-1.pem", "-k", tmp_path / "holder-2.pem",
                            "--image-threshold", "2"))
    assert "host:   OK" in checked.stdout


def test_one_module_named_two_ways_is_one_library(hsm: SoftHsm, work: Path, tmp_path: Path) -> None:
    """A symlink or a doubled slash names the same module: two keys through it sign together
    (python-pkcs11 and C_Initialize would otherwise see two libraries, and the second fails)."""
    pins = pin_file(tmp_path)
    for name in ("k1", "k2"):
        assert_ok(mp(hsm, "keygen", "--pkcs11", uri(TOKEN, name, pin_file=pins)))
    link = tmp_path / "softhsm-link.so"
    link.symlink_to(hsm.module)
    second = f"pkcs11:token={TOKEN};object=k2?pin-source=file:{pins}&module-path={link}"
    assert_ok(sign(hsm, work, "app.bin", "-k", uri(TOKEN, "k1", pin_file=pins), "-k", second))
    assert sum(t.type == TlvType.RSA2048_PSS for t in parse_image((work / "app.bin").read_bytes()).unprotected) == 2


def test_type_public_means_a_public_key_object(hsm: SoftHsm, tmp_path: Path) -> None:
    hsm.import_key(TOKEN, KEYS_DIR / "TEST-ONLY-rsa2048.pem", "imported", "0b")
    hsm.tool(TOKEN, "--delete-object", "--type", "pubkey", "--id", "0b")  # a private object only, as some HSMs keep
    env = {"MPBOOT_PKCS11_PIN": USER_PIN}
    assert_error(mp(hsm, "pubkey", f"pkcs11:token={TOKEN};object=imported;type=public", env=env), 2,
                 "no public key by that name")
    exported = assert_ok(mp(hsm, "pubkey", f"pkcs11:token={TOKEN};object=imported", env=env)).stdout
    assert exported == (KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem").read_text()


def test_keygen_checks_where_the_public_key_goes_before_making_the_key(hsm: SoftHsm, tmp_path: Path) -> None:
    key = uri(TOKEN, "orphan", pin_file=pin_file(tmp_path))
    assert_error(mp(hsm, "keygen", "--pkcs11", key, "-o", tmp_path / "missing" / "k.pub.pem"), 2, "no such folder")
    assert "orphan" not in hsm.objects(TOKEN)
