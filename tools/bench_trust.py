#!/usr/bin/env python3
"""Benchmark what the trust model (docs/KEYS.md) costs the device verifier (`make bench`).

On the MicroPython unix port, in one run, side by side: the verify time of a 1 MiB image
signed once by a root (the plain MCUboot case), by 2 of 3 roots, and by a root plus a key
delegated through a two-certificate chain (root a + b -> team -> ci), with RSA-2048 and with
an RSA-3072 team key; each as a ratio to the plain image. Then the time to apply a root
rotation and a revocation record. Fresh keys every run (never shipped or test keys);
timings are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from mpboot import upy  # noqa: E402
from mpboot.image import ImageSigner, ImageVersion, SignOptions, build_image  # noqa: E402
from mpboot.keys import SignatureScheme, SigningKey, generate  # noqa: E402
from mpboot.trust import Certificate, RevocationRecord, RootRecord, sign_envelope  # noqa: E402
from mpboot.upy import compile_tree  # noqa: E402

MIB = 1024 * 1024
ROUNDS = 5
PSS = SignatureScheme.PSS

# Runs on MicroPython: CASES (a JSON file) -> one line per case, "name microseconds".
DEVICE_SCRIPT = """
import json, sys, time
from binascii import unhexlify
from mpboot import image, reader, records, trust as T
with open(sys.argv[1]) as f:
    cases = json.load(f)
buf = bytearray(image.BUF_SIZE)
for c in cases:
    s = T.initial([records.der_key(unhexlify(d)) for d in c["roots"]], c["threshold"], c["image_threshold"])
    best = None
    for _ in range(c["rounds"]):
        t0 = time.ticks_us()
        if "image" in c:
            with open(c["image"], "rb") as f:
                image.verify(reader.file_reader(f), s, c["slot"], buf)
        else:
            with open(c["record"], "rb") as f:
                records.apply(s, f.read())
        dt = time.ticks_diff(time.ticks_us(), t0)
        best = dt if best is None or dt < best else best
    print(c["name"], best)
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-trust-") as tmp_name:
        tmp = Path(tmp_name)
        lib = tmp / "lib"
        compile_tree(ROOT / "firmware" / "mpboot", lib / "mpboot")
        script = tmp / "bench_trust_device.py"
        script.write_text(DEVICE_SCRIPT)
        upy.mpy_cross_compile(script, lib / "bench_trust_device.mpy")

        k: dict[str, SigningKey] = {n: generate("rsa-2048") for n in ("a", "b", "c", "team", "ci", "d")}
        k["team3072"] = generate("rsa-3072")
        roots = [k["a"], k["b"], k["c"]]
        der = [r.public().pkcs1_der().hex() for r in roots]
        body = b"\xff" * 0x200 + os.urandom(MIB)
        opts = SignOptions(ImageVersion(1, 0, 0), security_counter=1)

        def chain(team: SigningKey) -> list[ImageSigner]:
            t = sign_envelope(Certificate(1, team.public(), depth=1), [k["a"], k["b"]], PSS)
            c = sign_envelope(Certificate(2, k["ci"].public(), counters=(1, 10)), [team], PSS)
            return [ImageSigner(k["a"]), ImageSigner(k["ci"], (t, c))]

        images = {
            "plain (1 root)": ([ImageSigner(k["a"])], 1, 1),
            "2 of 3 roots": ([ImageSigner(k["a"]), ImageSigner(k["b"])], 2, 2),
            "root + delegated, RSA-2048 chain": (chain(k["team"]), 2, 2),
            "root + delegated, RSA-3072 team": (chain(k["team3072"]), 2, 2),
        }
        cases = []
        for name, (signers, threshold, image_threshold) in images.items():
            data = build_image(body, signers, opts)
            path = tmp / f"{len(cases)}.bin"
            path.write_bytes(data)
            cases.append({"name": name, "image": str(path), "slot": len(data), "roots": der,
                          "threshold": threshold, "image_threshold": image_threshold, "rounds": ROUNDS})
        records = {
            "rotation to version 2 (2 old + 2 new signatures)":
                sign_envelope(RootRecord(2, (k["b"].public(), k["c"].public(), k["d"].public()), 2, 1),
                              [k["a"], k["b"], k["c"], k["d"]], PSS),
            "revocation (2 signatures, 16 keys)":
                sign_envelope(RevocationRecord(1, tuple(os.urandom(32) for _ in range(16))), [k["a"], k["b"]], PSS),
        }
        for name, rec in records.items():
            path = tmp / f"{len(cases)}.cbor"
            path.write_bytes(rec)
            cases.append({"name": name, "record": str(path), "roots": der, "threshold": 2, "image_threshold": 1,
                          "rounds": ROUNDS})
        listing = tmp / "cases.json"
        listing.write_text(json.dumps(cases))
        proc = upy.run(["-m", "bench_trust_device", listing], path=[lib], timeout=900)
        if proc.returncode != 0:
            print(proc.stderr.strip().splitlines()[-1], file=sys.stderr)
            return 1
        times = {}
        for line in proc.stdout.splitlines():
            name, _, us = line.rpartition(" ")
            times[name] = int(us)
        plain = times["plain (1 root)"]
        print(f"mpboot trust-model benchmark: MicroPython unix port, best of {ROUNDS}")
        print(f"  {'1 MiB image verify':48} {'ms':>8} {'vs plain':>9}")
        for name in images:
            print(f"  {name:48} {times[name] / 1000:8.1f} {times[name] / plain:8.2f}x")
        print(f"  {'record apply':48} {'ms':>8}")
        for name in records:
            print(f"  {name:48} {times[name] / 1000:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
