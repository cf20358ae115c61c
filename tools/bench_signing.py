#!/usr/bin/env python3
"""Benchmark release signing (`make bench`): what a PKCS#11 token costs against a key file.

In one run, side by side, best of ROUNDS: `mpboot sign` of a 1 MiB payload as a release
engineer runs it (a fresh process each time) with a key file, with a key on a SoftHSM2 token,
and as the air-gapped round trip (--digest-only, then --attach-signature), against
`imgtool sign` with the same key file; then one signature alone (the RSA operation through
python-cryptography vs through the token). Ratios are to `mpboot sign` with a key file.
Fresh keys every run (a new key file, a new token); timings are reported, never asserted.
Without SoftHSM2 (apt-get install softhsm2) the token rows say so and the rest still runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

from mpboot.keys import SignatureScheme, load_signing_key  # noqa: E402
from mpboot.pkcs11uri import parse_uri  # noqa: E402

MIB = 1024 * 1024
ROUNDS = 5
SIGN_ROUNDS = 50
PIN = "1234"


def best_of(rounds: int, action: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - t0)
    return best


def run(*args: object, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"bench: {args[0]} {args[1]} failed: {(proc.stderr or proc.stdout).strip()}")


def main() -> int:
    mpboot = shutil.which("mpboot")
    imgtool = shutil.which("imgtool")
    if mpboot is None:
        print("bench_signing: mpboot is not on PATH (make bench sets it up)")
        return 1
    import hsmkit

    module = hsmkit.module_path()
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-signing-") as tmp_name:
        tmp = Path(tmp_name)
        payload = tmp / "fw.bin"
        payload.write_bytes(os.urandom(MIB))
        key = tmp / "release.pem"
        log_env = {"MPBOOT_SIGNING_LOG": str(tmp / "signing.jsonl")}
        run(mpboot, "keygen", "-o", key)
        common = ["sign", payload, "--pad-header", "--version", "1.2.3", "-o"]
        rows: list[tuple[str, float | None]] = []
        rows.append(("mpboot sign, key file", best_of(ROUNDS, lambda: run(
            mpboot, *common, tmp / "file.bin", "-k", key, env=log_env)) * 1000))

        token_env: dict[str, str] | None = None
        if module is not None and shutil.which("softhsm2-util"):
            (tmp / "tokens").mkdir()
            (tmp / "softhsm2.conf").write_text(f"directories.tokendir = {tmp / 'tokens'}\n"
                                               "objectstore.backend = file\nlog.level = ERROR\n")
            token_env = {**log_env, "SOFTHSM2_CONF": str(tmp / "softhsm2.conf"), "MPBOOT_PKCS11_MODULE": module,
                         "MPBOOT_PKCS11_PIN": PIN}
            run("softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", "5678", "--pin", PIN,
                env=token_env)
            token_key = "pkcs11:token=bench;object=release"
            run(mpboot, "keygen", "--pkcs11", token_key, "-o", tmp / "token.pub.pem", env=token_env)
            rows.append(("mpboot sign, SoftHSM2 token key", best_of(ROUNDS, lambda: run(
                mpboot, *common, tmp / "token.bin", "-k", token_key, env=token_env)) * 1000))
        else:
            rows.append(("mpboot sign, SoftHSM2 token key (softhsm2 not installed)", None))

        pub = tmp / "release.pub.pem"
        run(mpboot, "pubkey", key, "-o", pub)

        def round_trip() -> None:
            run(mpboot, *common, tmp / "digest.bin", "--digest-only", env=log_env)
            signer = load_signing_key(key)
            (tmp / "sig.bin").write_bytes(signer.sign_digest((tmp / "digest.bin").read_bytes(), SignatureScheme.PSS))
            run(mpboot, *common, tmp / "attached.bin", "--attach-signature", tmp / "sig.bin", "-k", pub, env=log_env)

        rows.append(("air-gapped: --digest-only + sign + --attach-signature", best_of(ROUNDS, round_trip) * 1000))
        if imgtool is not None:
            rows.append(("imgtool sign, key file", best_of(ROUNDS, lambda: run(
                imgtool, "sign", "-k", key, "--version", "1.2.3", "--header-size", "0x200", "--pad-header",
                "--slot-size", "0x200000", payload, tmp / "imgtool.bin")) * 1000))

        digest = hashlib.sha256(b"bench").digest()
        file_signer = load_signing_key(key)
        ops: list[tuple[str, float | None]] = [("one PSS signature, key file (cryptography)", best_of(
            SIGN_ROUNDS, lambda: file_signer.sign_digest(digest, SignatureScheme.PSS)) * 1000)]
        if token_env is not None:
            from mpboot import hsm

            os.environ.update(token_env)
            with hsm.open_signer(parse_uri("pkcs11:token=bench;object=release"), SignatureScheme.PSS) as token_signer:
                ops.append(("one PSS signature, SoftHSM2 token (CKM_RSA_PKCS_PSS, checked)", best_of(
                    SIGN_ROUNDS, lambda: token_signer.sign_digest(digest, SignatureScheme.PSS)) * 1000))

    base = rows[0][1]
    assert base is not None
    print(f"release signing of a 1 MiB payload, best of {ROUNDS} (ratio to mpboot sign with a key file):")
    for name, ms in rows:
        print(f"  {name:<60} " + ("skipped" if ms is None else f"{ms:8.1f} ms  {ms / base:5.2f}x"))
    op_base = ops[0][1]
    assert op_base is not None
    print(f"one signature alone, best of {SIGN_ROUNDS}:")
    for name, ms in ops:
        print(f"  {name:<60} " + ("skipped" if ms is None else f"{ms:8.2f} ms  {ms / op_base:5.2f}x"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
