#!/usr/bin/env python3
"""Generate the channel-record golden vectors in tests/vectors/channel/ (docs/KEYS.md section 3,
type 4; docs/THREAT_MODEL.md "Device pull"), read by the host (mpboot.channel.check_channel)
and the device (mpboot.channel.parse + check) in
tests/test_channel.py.

    .venv/bin/python tools/gen_channel_vectors.py   # rewrites tests/vectors/channel/*

PSS signatures are randomised, so a re-run changes those bytes (and nothing else): the
committed files are the reference, and every verdict must stay the same.

channel.json: a list of {"name", "file", "note", "trust": {"roots" (public key files under
tests/keys), "threshold", "revoked_keys" (hex), "revoked_serials"}, "device": {"vendor",
"class" (hex), "channel", "taken", "taken_digest" (hex), "floor"}, "expect": "ok" or a
PullErrorCode name}.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from mpboot.image import class_uuid, vendor_uuid  # noqa: E402
from mpboot.keys import PublicKey, SignatureScheme, SigningKey, load_public_key, load_signing_key  # noqa: E402
from mpboot.trust import (  # noqa: E402
    CHANNEL_KIND,
    Certificate,
    ChannelRecord,
    Envelope,
    ImageKind,
    RootRecord,
    decode_signed,
    sign_envelope,
    trust_digest,
)

KEYS = ROOT / "tests" / "keys"
OUT = ROOT / "tests" / "vectors" / "channel"
PSS = SignatureScheme.PSS
VENDOR = vendor_uuid("example.com")
CLASS = class_uuid("golden-widget", VENDOR)
OTHER_VENDOR = vendor_uuid("other.example")
OTHER_CLASS = class_uuid("other-widget", VENDOR)
CI_SERIAL = 30


@functools.cache
def key(name: str) -> SigningKey:
    return load_signing_key(KEYS / f"TEST-ONLY-{name}.pem")


def pub(name: str) -> PublicKey:
    return load_public_key(KEYS / f"TEST-ONLY-{name}.pub.pem")


@dataclass(frozen=True)
class Trust:
    roots: tuple[str, ...] = ("root-a", "root-b")
    threshold: int = 1
    revoked_keys: tuple[str, ...] = ()
    revoked_serials: tuple[int, ...] = ()

    def manifest(self) -> dict[str, Any]:
        return {"roots": [f"TEST-ONLY-{r}.pub.pem" for r in self.roots], "threshold": self.threshold,
                "revoked_keys": [pub(k).keyhash().hex() for k in self.revoked_keys],
                "revoked_serials": list(self.revoked_serials)}


@dataclass(frozen=True)
class Device:
    vendor: bytes = VENDOR
    klass: bytes = CLASS
    channel: str = "stable"
    taken: int = 0
    taken_digest: bytes = b""
    floor: int = 0

    def manifest(self) -> dict[str, Any]:
        return {"vendor": self.vendor.hex(), "class": self.klass.hex(), "channel": self.channel,
                "taken": self.taken, "taken_digest": self.taken_digest.hex(), "floor": self.floor}


def body(**kw: Any) -> ChannelRecord:
    fields: dict[str, Any] = dict(number=5, name="stable", vendor_id=VENDOR, class_id=CLASS,
                                  sha256=bytes(range(32)), length=61234, version=bytes([1, 2, 3, 0, 4, 0, 0, 0]),
                                  counter=7, path="images/app-1.2.3.bin")
    fields.update(kw)
    return ChannelRecord(**fields)


def signed(b: ChannelRecord, *signers: str) -> bytes:
    return sign_envelope(b, [key(s) for s in signers], PSS)


def raw(body_map: dict[int, Any], *signers: str) -> bytes:
    """An envelope around a body map that breaks a rule on purpose, really signed."""
    data = cbor2.dumps(body_map, canonical=True)
    env = Envelope(data)
    from mpboot.trust import EnvelopeSignature, signature_alg

    sigs = tuple(EnvelopeSignature(key(s).public().keyhash(), signature_alg(key(s).bits, PSS),
                                   key(s).sign_digest(trust_digest(data), PSS)) for s in signers)
    return replace(env, signatures=sigs).encode()


def cert(**kw: Any) -> bytes:
    fields: dict[str, Any] = dict(serial=CI_SERIAL, key=pub("ci"), vendors=(VENDOR,), classes=(CLASS,),
                                  counters=(0, 100), kinds=CHANNEL_KIND)
    fields.update(kw)
    return sign_envelope(Certificate(**fields), [key("root-a")], PSS)


def digest_of(record: bytes) -> bytes:
    return decode_signed(record).envelope.digest


@dataclass
class Case:
    name: str
    data: bytes
    expect: str
    note: str
    trust: Trust = field(default_factory=Trust)
    device: Device = field(default_factory=Device)


def cases() -> list[Case]:
    ok = signed(body(), "root-a")
    other = signed(body(path="images/app-9.bin"), "root-a")
    base = body().encode()
    fields = cbor2.loads(base)
    out = [
        Case("ok-root", ok, "ok", "signed by one root of a threshold-1 root set"),
        Case("ok-threshold", signed(body(), "root-a", "root-b"), "ok", "two roots of a threshold-2 set",
             Trust(threshold=2)),
        Case("below-threshold", signed(body(), "root-a"), "SIGNATURE", "one root of a threshold-2 set",
             Trust(threshold=2)),
        Case("untrusted", signed(body(), "rsa2048-untrusted"), "SIGNATURE", "signed by a key the device does not trust"),
        Case("revoked-root", ok, "SIGNATURE", "its only signer, a root, is revoked", Trust(revoked_keys=("root-a",))),
        Case("ok-certified", signed(body(certificates=(cert(),)), "ci"), "ok",
             "signed by ci, certified by root-a for kind channel, this vendor, class and counters 0..100"),
        Case("ok-certified-any-kind", signed(body(certificates=(cert(kinds=None),)), "ci"), "ok",
             "a certificate without kinds covers every kind, channel records too"),
        Case("cert-kind-app", signed(body(certificates=(cert(kinds=int(ImageKind.APP)),)), "ci"), "SIGNATURE",
             "ci's certificate allows app images only"),
        Case("cert-other-vendor", signed(body(certificates=(cert(vendors=(OTHER_VENDOR,)),)), "ci"), "SIGNATURE",
             "ci's certificate is for another vendor"),
        Case("cert-counter-out", signed(body(counter=200, certificates=(cert(),)), "ci"), "SIGNATURE",
             "the record's counter 200 is outside the certificate's 0..100"),
        Case("cert-revoked", signed(body(certificates=(cert(),)), "ci"), "SIGNATURE",
             "ci's certificate serial is revoked", Trust(revoked_serials=(CI_SERIAL,))),
        Case("cert-by-stranger", signed(body(certificates=(sign_envelope(
            Certificate(serial=31, key=pub("ci"), kinds=CHANNEL_KIND), [key("rsa2048-untrusted")], PSS),)), "ci"),
             "SIGNATURE", "ci's certificate is issued by a key the device does not trust"),
        Case("no-cert", signed(body(), "ci"), "SIGNATURE", "signed by ci without its certificate"),
        Case("other-vendor", signed(body(vendor_id=OTHER_VENDOR), "root-a"), "PRODUCT", "another vendor's record"),
        Case("other-class", signed(body(class_id=OTHER_CLASS), "root-a"), "PRODUCT", "another class's record"),
        Case("other-channel", signed(body(name="beta"), "root-a"), "PRODUCT", "channel beta, the device follows stable"),
        Case("stale", ok, "STALE", "number 5, the device took 6", device=Device(taken=6)),
        Case("equal-same", ok, "ok", "number 5 again, the body the device took",
             device=Device(taken=5, taken_digest=digest_of(ok)[:24])),
        Case("equal-other", other, "STALE", "number 5 again with another body (a rollback or equivocation)",
             device=Device(taken=5, taken_digest=digest_of(ok)[:24])),
        Case("newer", ok, "ok", "number 5, the device took 4", device=Device(taken=4, taken_digest=b"\x01" * 24)),
        Case("counter-below-floor", ok, "IMAGE", "counter 7, the device's floor is 8", device=Device(floor=8)),
        Case("no-path", raw({k: v for k, v in fields.items() if k != 38}, "root-a"), "RECORD", "no path (key 38)"),
        Case("path-parent", raw({**fields, 38: "../secret.bin"}, "root-a"), "RECORD", "a path with '..'"),
        Case("path-absolute", raw({**fields, 38: "http://evil.example/x.bin"}, "root-a"), "RECORD",
             "a path with a scheme"),
        Case("unknown-key", raw({**fields, 40: 1}, "root-a"), "RECORD", "an unknown body key 40"),
        Case("number-zero", raw({**fields, 30: 0}, "root-a"), "RECORD", "number 0"),
        Case("name-long", raw({**fields, 31: "x" * 17}, "root-a"), "RECORD", "a 17-character name"),
        Case("sha-short", raw({**fields, 34: bytes(31)}, "root-a"), "RECORD", "a 31-byte sha256"),
        Case("root-record", sign_envelope(RootRecord(2, (pub("root-a"),), 1, 1), [key("root-a")], PSS), "RECORD",
             "a root record, not a channel record"),
        Case("too-large", bytes(4097), "TOO_LARGE", "4097 bytes"),
    ]
    bad = bytearray(ok)
    bad[-5] ^= 1  # inside root-a's signature
    out.append(Case("bad-signature", bytes(bad), "SIGNATURE", "root-a's signature with one bit flipped"))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.cbor"):
        old.unlink()
    manifest = []
    for c in cases():
        (OUT / f"{c.name}.cbor").write_bytes(c.data)
        manifest.append({"name": c.name, "file": f"{c.name}.cbor", "note": c.note, "trust": c.trust.manifest(),
                         "device": c.device.manifest(), "expect": c.expect})
    (OUT / "channel.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest)} channel vectors to {OUT}")


if __name__ == "__main__":
    main()
