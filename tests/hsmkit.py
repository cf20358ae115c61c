"""SoftHSM2 tokens for the signing tests: a token store in a temp folder (its own
SOFTHSM2_CONF), tokens made with softhsm2-util, keys made or imported with pkcs11-tool and
softhsm2-util, as a release engineer would with a real HSM's tools; PIN files, openssl as the
air-gapped signer, and imgtool as the other verifier.

Skips where SoftHSM2 or OpenSC's pkcs11-tool is missing, and fails instead when
MPBOOT_SOFTHSM_REQUIRED is set (.ci/run installs both and sets it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRED_ENV = "MPBOOT_SOFTHSM_REQUIRED"
MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so", "/usr/local/lib/softhsm/libsofthsm2.so")
USER_PIN = "Zq7-pin-4821"  # distinctive: a test can show it never appears in output
SO_PIN = "5678"


def module_path() -> str | None:
    return next((p for p in MODULE_CANDIDATES if Path(p).is_file()), None)


def require() -> str:
    """The SoftHSM2 module path, or skip (fail under MPBOOT_SOFTHSM_REQUIRED) naming what to install."""
    missing = [name for name in ("softhsm2-util", "pkcs11-tool") if shutil.which(name) is None]
    module = module_path()
    if module is None:
        missing.append("libsofthsm2.so")
    if missing:
        reason = f"SoftHSM2 tests need {', '.join(missing)}: apt-get install softhsm2 opensc"
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{reason} ({REQUIRED_ENV} is set)")
        pytest.skip(reason)
    assert module is not None
    return module


@dataclass
class SoftHsm:
    """A private SoftHSM2 token store; `env` is what a process needs to see it."""

    root: Path
    module: str

    @classmethod
    def create(cls, root: Path, *, mechanisms: str = "ALL") -> SoftHsm:
        module = require()
        (root / "tokens").mkdir(parents=True)
        (root / "softhsm2.conf").write_text(
            f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
            f"slots.removable = false\nslots.mechanisms = {mechanisms}\n")
        return cls(root, module)

    @property
    def env(self) -> dict[str, str]:
        """SOFTHSM2_CONF and the module, for mpboot (CliRunner env or a subprocess)."""
        return {"SOFTHSM2_CONF": str(self.root / "softhsm2.conf"), "MPBOOT_PKCS11_MODULE": self.module}

    def run(self, *args: object) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(a) for a in args], env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        self.run("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", pin)

    def tool(self, label: str, *args: object, pin: str = USER_PIN) -> subprocess.CompletedProcess[str]:
        """pkcs11-tool on token `label`, logged in."""
        return self.run("pkcs11-tool", "--module", self.module, "--token-label", label, "--login",
                        "--pin", pin, *args)

    def tool_keypair(self, label: str, key_type: str, object_label: str, key_id: str) -> None:
        """A key pair made by OpenSC's pkcs11-tool (key_type: rsa:2048, rsa:1024, EC:prime256v1)."""
        self.tool(label, "--keypairgen", "--key-type", key_type, "--label", object_label, "--id", key_id)

    def import_key(self, label: str, pem_pkcs8: Path, object_label: str, key_id: str, pin: str = USER_PIN) -> None:
        """A private key file put on the token with softhsm2-util (a migration off key files)."""
        self.run("softhsm2-util", "--import", pem_pkcs8, "--token", label, "--label", object_label,
                 "--id", key_id, "--pin", pin)

    def objects(self, label: str) -> str:
        return self.tool(label, "--list-objects").stdout


def uri(token: str, obj: str, *extra: str, pin_file: Path | None = None) -> str:
    """A pkcs11: URI for object `obj` on `token` (pin-source when `pin_file` is given)."""
    text = f"pkcs11:token={token};object={obj}" + "".join(f";{e}" for e in extra)
    return text + (f"?pin-source=file:{pin_file}" if pin_file is not None else "")


def files_in(folder: Path) -> Sequence[str]:
    return sorted(p.name for p in folder.iterdir())


def pin_file(folder: Path, pin: str = USER_PIN) -> Path:
    """A PIN file as a pin-source names it (mode 0600, a trailing newline as echo writes)."""
    path = folder / f"pin-{pin}.txt"
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


def openssl_sign(key: Path, digest: Path, out: Path, scheme: str = "pss") -> None:
    """What an air-gapped machine with a key file runs: sign a 32-byte digest, nothing else."""
    if shutil.which("openssl") is None:
        reason = "openssl is not installed (apt-get install openssl)"
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{reason} ({REQUIRED_ENV} is set)")
        pytest.skip(reason)
    pad = ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32"] if scheme == "pss" else \
        ["-pkeyopt", "rsa_padding_mode:pkcs1"]
    proc = subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-pkeyopt", "digest:sha256", *pad,
                           "-in", str(digest), "-out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def imgtool_verify(image: Path, pubkey: Path) -> None:
    """imgtool (from this venv, whatever PATH says) accepts `image` signed by `pubkey`."""
    imgtool = Path(sys.executable).parent / "imgtool"
    proc = subprocess.run([str(imgtool if imgtool.exists() else "imgtool"), "verify", "-k", str(pubkey), str(image)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Image was correctly validated" in proc.stdout, proc.stdout + proc.stderr
