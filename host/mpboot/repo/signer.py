"""mpboot's signers (key files, `pkcs11:` token keys) as TUF metadata signers, and the key
ring a `repo` command signs with.

A TUF signature here is RSA-PSS (MGF1-SHA-256, salt 32) over the SHA-256 of the metadata's
canonical JSON: scheme `rsassa-pss-sha256`, which securesystemslib verifies (PSS.AUTO), so
ngclient accepts it. Only the digest reaches a token. Each signature goes to the signing log
(mpboot.signlog) before the file it belongs to is written, as image signatures do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from securesystemslib.signer import Key, Signature, Signer, SSlibKey

from mpboot import signlog
from mpboot.errors import KeyFileError, MpbootError, RepositoryError
from mpboot.keys import PublicKey, SignatureScheme
from mpboot.signing import Recorder
from mpboot.signing import Signer as MpbootSigner

SCHEME = "rsassa-pss-sha256"  # the TUF scheme name of mpboot's PSS (salt 32 = the digest length)


def tuf_key(public: PublicKey) -> SSlibKey:
    """An mpboot public key as a TUF key: SubjectPublicKeyInfo PEM, rsassa-pss-sha256, and
    securesystemslib's default keyid (the SHA-256 of its canonical JSON; not mpboot's KEYHASH)."""
    return SSlibKey.from_crypto(public.key, scheme=SCHEME)


def mpboot_key(key: Key) -> PublicKey:
    """A TUF key of a repository as an mpboot public key (RepositoryError if it is not RSA)."""
    try:
        loaded = serialization.load_pem_public_key(str(key.keyval["public"]).encode())
    except (KeyError, ValueError, TypeError):
        raise RepositoryError(f"key {key.keyid[:16]}: not a PEM public key") from None
    if not isinstance(loaded, rsa.RSAPublicKey):
        raise RepositoryError(f"key {key.keyid[:16]}: not an RSA key")
    return PublicKey(loaded)


def keyhash_of(key: Key) -> str:
    """mpboot's KEYHASH (SHA-256 of the PKCS#1 DER) of a TUF key, hex ("" if not RSA)."""
    try:
        return mpboot_key(key).keyhash().hex()
    except RepositoryError:
        return ""


class TufSigner(Signer):
    """An mpboot Signer as a securesystemslib Signer. The inner signer is wrapped in a
    signing.Recorder: `recorder.made` holds every signature made, for the signing log."""

    def __init__(self, inner: MpbootSigner) -> None:
        self.recorder = Recorder(inner)
        self._key = tuf_key(inner.public())

    @property
    def public_key(self) -> SSlibKey:
        return self._key

    @property
    def keyid(self) -> str:
        return self._key.keyid

    @property
    def keyhash(self) -> str:
        return self.recorder.public().keyhash().hex()

    @classmethod
    def from_priv_key_uri(cls, priv_key_uri: str, public_key: Key, secrets_handler: Any = None) -> TufSigner:
        raise NotImplementedError("mpboot opens keys itself (mpboot.signing.open_signers)")

    def sign(self, payload: bytes) -> Signature:
        digest = hashlib.sha256(payload).digest()
        return Signature(self._key.keyid, self.recorder.sign_digest(digest, SignatureScheme.PSS).hex())

    def __str__(self) -> str:
        return f"{self.recorder} (key {self.keyid[:16]})"


@dataclass
class KeyRing:
    """The keys a `repo` command was given (-k), and the signing log their signatures go to
    (None: not logged, for tests and library callers that log themselves)."""

    signers: Sequence[TufSigner]
    log: Path | None = None
    used: set[str] = field(default_factory=set)  # keyids that signed something

    @classmethod
    def of(cls, signers: Sequence[MpbootSigner], log: Path | None) -> KeyRing:
        return cls([TufSigner(s) for s in signers], log)

    def for_keys(self, keyids: Sequence[str]) -> list[TufSigner]:
        return [s for s in self.signers if s.keyid in keyids]

    def sign(self, md: Any, role: str, keyids: Sequence[str], output: Path | None) -> list[str]:
        """Append a signature by each of our keys among `keyids` that has not signed `md`
        yet; log them, then return the keyids that signed."""
        from tuf.api.exceptions import UnsignedMetadataError

        signed = []
        for signer in self.for_keys(keyids):
            if signer.keyid in md.signatures:
                continue
            before = len(signer.recorder.made)
            try:
                md.sign(signer, append=True)
            except UnsignedMetadataError as err:  # Metadata.sign wraps what the signer raised
                cause = err.__cause__
                if isinstance(cause, MpbootError):
                    raise cause from None
                raise RepositoryError(f"{signer}: cannot sign {role}: {cause or err}") from None
            self.used.add(signer.keyid)
            signed.append(signer.keyid)
            if self.log is not None:
                made = signer.recorder.made[before:]
                subject = {"what": "tuf metadata", "role": role, "version": md.signed.version}
                signlog.SigningLog(self.log).append(signlog.entries_for(made, subject, output))
        return signed

    def check_belongs(self, allowed: set[str], roles: str) -> None:
        """Every -k key is a key of a role this command signs (`roles`, for the message):
        checked before anything signs, so the wrong key is a mistake said at once."""
        for signer in self.signers:
            if signer.keyid not in allowed:
                raise KeyFileError(f"-k {signer}: not a key of {roles}; nothing written")
