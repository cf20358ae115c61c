"""Host side of provisioning without a board: the factory error codes (v1 rsn and v2 group
errors) become FactoryRefused, factory info replies are checked field by field, and
`mpboot provision` refuses bad usage in one line before touching any port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import KEYS_DIR, signing_key
from mpboot.cli import cli
from mpboot.errors import FactoryErrorCode, FactoryRefused, ProtocolError
from mpboot.smp.client import _factory_info
from mpboot.smp.error_map import error_from_response
from mpboot.smp.messages import Policy
from simkit import make_app, sign_app

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
PUBLIC_KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pub.pem"  # what a station holds

GOOD: dict[str, Any] = {
    "fw": "1.28.0", "uid": b"\x01" * 8, "boot": "0.1.0", "ctr": 3, "cid": None, "vid": b"\x11" * 16,
    "keys": [b"\x22" * 32], "labels": {"hw": "rev3"},
    "policy": {"no-repl": True, "test-boot": False, "no-downgrade": True}, "serial": "SN-1", "sealed": True,
}


def test_factory_errors_v1_and_v2() -> None:
    err = error_from_response({"rc": 11, "rsn": "factory:1"}, "identity write")
    assert isinstance(err, FactoryRefused) and err.code is FactoryErrorCode.SEALED
    assert str(err) == ("identity write refused: the board is sealed: identity and policy are read-only "
                        "(factory error 1 SEALED, SMP rc 11 EACCESSDENIED)")
    err = error_from_response({"err": {"group": 64, "rc": 4}}, "identity write")
    assert isinstance(err, FactoryRefused) and err.code is FactoryErrorCode.INVALID
    err = error_from_response({"rc": 11, "rsn": "factory:8"}, "image state write")
    assert isinstance(err, FactoryRefused) and err.code is FactoryErrorCode.TEST_BOOT_REQUIRED
    unknown = error_from_response({"err": {"group": 64, "rc": 99}}, "seal")
    assert isinstance(unknown, FactoryRefused) and unknown.code is None and "factory error 99" in str(unknown)


def test_factory_info_parsed_and_checked() -> None:
    info = _factory_info(GOOD)
    assert info.serial == "SN-1" and info.sealed and info.class_id is None and info.key_hashes == (b"\x22" * 32,)
    assert info.policy == Policy(no_downgrade=True, test_boot=False, no_repl=True)
    for key, bad in (("keys", [1]), ("labels", {"a": 1}), ("policy", {"no-repl": True}), ("serial", 5),
                     ("vid", "x"), ("sealed", 1), ("uid", None)):
        with pytest.raises(ProtocolError):
            _factory_info({**GOOD, key: bad})


def _run(*args: object) -> Any:
    result = CliRunner().invoke(cli, ["provision", *(str(a) for a in args)], prog_name="mpboot")
    assert "Traceback" not in result.output + result.stderr
    return result


def test_provision_usage_errors(tmp_path: Path) -> None:
    img = tmp_path / "app.img"
    key = signing_key(KEY.name)
    img.write_bytes(sign_app(make_app(tmp_path / "app", "1.0.0", confirm=True), key, "1.0.0"))
    other = tmp_path / "other.img"
    other.write_bytes(sign_app(make_app(tmp_path / "o", "1.0.0", confirm=True),
                               signing_key("TEST-ONLY-rsa2048-untrusted.pem"), "1.0.0"))
    db = tmp_path / "f.sqlite"
    base = ["--image", img, "--expect-key", PUBLIC_KEY, "--serial-prefix", "SN-", "--db", db]
    cases = [
        ([*base], "which boards?"),
        (["--port", "/dev/null", "--expect-key", PUBLIC_KEY, "--serial-prefix", "S", "--db", db], "--image"),
        (["--port", "/dev/null", "--image", img, "--serial-prefix", "S", "--db", db], "--expect-key"),
        (["--port", "/dev/null", *base, "--serials", img], "exactly one of"),
        (["--port", "/dev/null", "--port", "/dev/null", *base], "the same port twice"),
        (["--port", "/dev/null", *base, "--label", "novalue"], "KEY=VALUE"),
        (["--ports-glob", str(tmp_path / "nothing*"), *base], "no port matches"),
        (["--port", "/dev/null", *base, *(a for i in range(4) for a in ("--label", f"k{i}={'v' * 60}"))],
         "at most 192"),
        (["--port", "/dev/null", *base, "--floor", "5"], "above the image's security counter (1)"),
        # no private key belongs on a station: refused, not silently reduced to its public half
        (["--port", "/dev/null", "--image", img, "--expect-key", KEY, "--serial-prefix", "S", "--db", db],
         "a private key, where only a public key belongs"),
    ]
    for args, text in cases:
        r = _run(*args)
        assert r.exit_code == 2, (args, r.output, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and text in r.stderr, (args, r.stderr)
    # an image the expected key did not sign is refused before any board is touched
    r = _run("--port", "/dev/null", "--image", other, "--expect-key", PUBLIC_KEY, "--serial-prefix", "S", "--db", db)
    assert r.exit_code != 0 and len(r.stderr.strip().splitlines()) == 1
    assert not db.exists()
    # report of a database that does not exist
    r = _run("report", "--db", tmp_path / "none.sqlite")
    assert r.exit_code == 2 and "no such database" in r.stderr
