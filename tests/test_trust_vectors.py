"""The trust-model golden vectors (tests/vectors/trust/, docs/KEYS.md) through the device:
the verifier with certificates, thresholds and revocation, and root/revocation records
applied to a trust state, on the MicroPython unix port and frozen into the Cortex-M3 build
under QEMU. Same verdicts as the manifest (which tests/test_trust_host.py holds the host to).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import VECTORS
from trustkit import device_trust_verdicts

from mpboot.errors import ImageErrorCode, TrustErrorCode
from mpboot.keys import load_public_key

TRUST = VECTORS / "trust"
KEYS_DIR = Path(__file__).parent / "keys"


def _entries() -> list[dict[str, Any]]:
    manifest = json.loads((TRUST / "trust.json").read_text())
    if isinstance(manifest, list):
        return manifest
    return [*manifest.get("images", []), *manifest.get("records", [])]


ENTRIES = _entries()


def _is_record(entry: dict[str, Any]) -> bool:
    return "slot_size" not in entry


def _device_trust(t: dict[str, Any]) -> dict[str, Any]:
    """The manifest's trust state as dev_trust takes it: roots as PKCS#1 DER hex."""
    roots = [load_public_key(KEYS_DIR / name).pkcs1_der().hex() for name in t["roots"]]
    return {"roots": roots, "threshold": t.get("threshold", 1), "image_threshold": t.get("image_threshold", 1),
            "root_version": t.get("root_version", 1), "revocation": t.get("revocation", 0),
            "revoked_keys": t.get("revoked_keys", []), "revoked_serials": t.get("revoked_serials", [])}


def _device_case(entry: dict[str, Any]) -> dict[str, Any]:
    case = {"name": entry["name"], "trust": _device_trust(entry["trust"])}
    path = str(TRUST / entry["file"])
    if _is_record(entry):
        case["record"] = path
    else:
        case["image"] = path
        case["slot_size"] = entry["slot_size"]
    return case


def _expected(entry: dict[str, Any]) -> str:
    """The line dev_trust prints for the entry, as the manifest says it must be."""
    name, expect = entry["name"], entry["expect"]
    if _is_record(entry):
        if expect != "ok":
            return f"{name} REFUSE {TrustErrorCode[expect].value}"
        a = entry["after"]
        hexes = lambda items: ",".join(items) or "-"  # noqa: E731
        return (f"{name} OK {a['root_version']} {a['threshold']} {a['image_threshold']} {a['revocation']} "
                f"{hexes(a['roots'])} {hexes(a['revoked_keys'])} {hexes([str(s) for s in a['revoked_serials']])}")
    if expect != "ok":
        return f"{name} REJECT {ImageErrorCode[expect].value}"
    return f"{name} OK"


def _verdicts(lines: list[str]) -> list[str]:
    # An accepted image's line ends with its key index, which the manifest does not hold.
    return [" ".join(line.split()[:2]) if line.split()[1:2] == ["OK"] and len(line.split()) == 3 else line
            for line in lines]


def test_manifest_covers_every_trust_code() -> None:
    """The vectors exercise every image code of the trust model and every record code a
    record alone can cause (NO_TRUST_AREA, FLASH, CHUNK need a device: tests/test_trust_smp.py)."""
    image_codes = {e["expect"] for e in ENTRIES if not _is_record(e)}
    record_codes = {e["expect"] for e in ENTRIES if _is_record(e)}
    assert {"ok", "CERT_INVALID", "CERT_ISSUER", "CERT_WIDER", "OUT_OF_SCOPE", "REVOKED", "THRESHOLD"} <= image_codes
    assert {"ok", "MALFORMED", "SIGNATURES", "NEW_SIGNATURES", "STALE", "REVOKED_ROOT"} <= record_codes
    for e in ENTRIES:
        for name in e["trust"]["roots"]:
            assert name.startswith("TEST-ONLY-"), name  # no key that could ship


def test_device_verdicts_match_the_manifest(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lines = device_trust_verdicts([_device_case(e) for e in ENTRIES], device.lib, tmp_path)
    assert _verdicts(lines) == [_expected(e) for e in ENTRIES]


# The same cases on the frozen Cortex-M3 build: fields per case (name, kind, data, slot size,
# "threshold image_threshold root_version revocation", roots, revoked keys, revoked serials;
# the lists as a count field then the items), verdict lines as dev_trust prints them.
QEMU_CODE = """
from binascii import hexlify
from mpboot import image, reader, records, trust as T
buf = bytearray(image.BUF_SIZE)

def items():
    return [bytes(field()) for _ in range(int(bytes(field())))]

def hexes(xs):
    return ",".join(hexlify(x).decode() for x in xs) or "-"

while True:
    name = field()
    if name is None:
        break
    name = str(bytes(name), "ascii")
    kind, data, slot = bytes(field()), field(), int(bytes(field()))
    thr, ithr, rv, rn = [int(x) for x in bytes(field()).split()]
    s = T.initial([records.der_key(d) for d in items()], thr, ithr)
    s[T.ROOT_VERSION] = rv
    s[T.REVOCATION] = rn
    s[T.REVOKED_KEYS] = items()
    s[T.REVOKED_SERIALS] = [int(x) for x in items()]
    if kind == b"image":
        try:
            info = image.verify(reader.bytes_reader(data), s, slot, buf)
            print(name, "OK", info["key_index"])
        except image.ImageError as e:
            print(name, "REJECT", e.args[0])
        continue
    try:
        n = records.apply(s, bytes(data))
    except records.TrustError as e:
        print(name, "REFUSE", e.args[0])
        continue
    print(name, "OK", n[T.ROOT_VERSION], n[T.THRESHOLD], n[T.IMAGE_THRESHOLD], n[T.REVOCATION],
          hexes(k[0] for k in n[T.ROOTS]), hexes(n[T.REVOKED_KEYS]),
          ",".join(str(x) for x in n[T.REVOKED_SERIALS]) or "-")
"""


def _qemu_fields(entry: dict[str, Any]) -> list[bytes]:
    t = _device_trust(entry["trust"])
    fields = [entry["name"].encode(), b"record" if _is_record(entry) else b"image",
              (TRUST / entry["file"]).read_bytes(), str(entry.get("slot_size", 0)).encode(),
              f"{t['threshold']} {t['image_threshold']} {t['root_version']} {t['revocation']}".encode()]
    for group in (t["roots"], t["revoked_keys"]):
        fields += [str(len(group)).encode(), *(bytes.fromhex(h) for h in group)]
    fields += [str(len(t["revoked_serials"])).encode(), *(str(s).encode() for s in t["revoked_serials"])]
    return fields


@pytest.mark.qemu
def test_cortex_m_verdicts_match_the_manifest(tmp_path: Path) -> None:
    import qemukit
    from conftest import trusted_public_keys
    from qemukit import pack_fields, run_with_data

    qemukit.require()
    firmware = qemukit.build_firmware(trusted_public_keys())
    lines: list[str] = []
    batch: list[dict[str, Any]] = []
    # The data region is bounded: run the cases in batches that fit.
    for entry in [*ENTRIES, None]:
        if entry is not None:
            trial = [*batch, entry]
            try:
                pack_fields(_qemu_fields(e) for e in trial)
                batch = trial
                continue
            except ValueError:
                pass
        if batch:
            data = pack_fields(_qemu_fields(e) for e in batch)
            lines += run_with_data(firmware.elf, tmp_path / "flash.img", data, QEMU_CODE, timeout_s=300).splitlines()
        batch = [entry] if entry is not None else []
    assert _verdicts(lines) == [_expected(e) for e in ENTRIES]
