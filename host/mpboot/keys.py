"""RSA keys: generate, load, sign image digests, export public keys.

Only RSA-2048 and RSA-3072 with e = 65537: the sizes MCUboot and the device verifier accept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from mpboot.errors import (
    ImageErrorCode,
    ImageRejected,
    KeyFileError,
    KeyPasswordRequired,
    PrivateKeyRefused,
    UsageError,
)
from mpboot.files import write_atomic

KEY_TYPES = {"rsa-2048": 2048, "rsa-3072": 3072}
PUBLIC_EXPONENT = 65537
PSS_SALT_LENGTH = 32


class SignatureScheme(StrEnum):
    PSS = "pss"
    PKCS1V15 = "pkcs1v15"


def _padding(scheme: SignatureScheme) -> padding.AsymmetricPadding:
    if scheme is SignatureScheme.PSS:
        return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
    return padding.PKCS1v15()


def _check_rsa(key: object, path: Path | str) -> None:
    if not isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        raise KeyFileError(f"{path}: not an RSA key (mpboot signs with rsa-2048 or rsa-3072)")
    if key.key_size not in KEY_TYPES.values():
        raise KeyFileError(f"{path}: RSA-{key.key_size} key; mpboot supports rsa-2048 and rsa-3072")
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    e = public.public_numbers().e
    if e != PUBLIC_EXPONENT:
        raise KeyFileError(f"{path}: public exponent {e}; the device verifier needs 65537")


@dataclass(frozen=True)
class PublicKey:
    """An RSA public key as the image format and the device see it."""

    key: rsa.RSAPublicKey

    @property
    def bits(self) -> int:
        return self.key.key_size

    @property
    def modulus(self) -> bytes:
        return self.key.public_numbers().n.to_bytes(self.bits // 8, "big")

    def pkcs1_der(self) -> bytes:
        """PKCS#1 RSAPublicKey DER: what MCUboot embeds and what KEYHASH hashes."""
        return self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)

    def keyhash(self) -> bytes:
        return hashlib.sha256(self.pkcs1_der()).digest()

    def verify_digest(self, signature: bytes, digest: bytes, scheme: SignatureScheme) -> None:
        """Check `signature` over an image's SHA-256 `digest`; ImageRejected (BAD_SIGNATURE)
        when it does not verify, like any other reason an image fails verification."""
        try:
            self.key.verify(signature, digest, _padding(scheme), utils.Prehashed(hashes.SHA256()))
        except InvalidSignature:
            raise ImageRejected(ImageErrorCode.BAD_SIGNATURE) from None


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key that signs image digests: a Signer (mpboot.signing) held in memory,
    loaded from `path` (None for a key made here)."""

    key: rsa.RSAPrivateKey
    path: Path | None = None

    def describe(self) -> dict[str, str]:
        """Who signs, for the signing log."""
        return {"kind": "file", "path": str(self.path.resolve()) if self.path else "(in memory)"}

    def __str__(self) -> str:
        return f"key file {self.path}" if self.path else "in-memory key"

    @property
    def bits(self) -> int:
        return self.key.key_size

    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    def sign_digest(self, digest: bytes, scheme: SignatureScheme) -> bytes:
        return self.key.sign(digest, _padding(scheme), utils.Prehashed(hashes.SHA256()))

    def private_pem(self, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def generate(key_type: str) -> SigningKey:
    if key_type not in KEY_TYPES:
        raise UsageError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    return SigningKey(rsa.generate_private_key(PUBLIC_EXPONENT, KEY_TYPES[key_type]))


def write_new_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write a file that must not exist yet (keys are never overwritten), whole or not at
    all; a private key gets mode 0600."""
    write_atomic(path, data, mode=0o600 if private else 0o644, exclusive=True)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read: {err.strerror}") from None


def load_signing_key(path: Path, password: bytes | None = None) -> SigningKey:
    data = _read(path)
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password)
        else:
            key = serialization.load_der_private_key(data, password)
    except TypeError as err:
        # cryptography: "Password was not given but private key is encrypted" and the reverse.
        if password is None:
            raise KeyPasswordRequired(f"{path}: the private key is encrypted: give its passphrase "
                                      "(mpboot: --password-env VAR)") from None
        raise KeyFileError(f"{path}: {err}") from None
    except (ValueError, UnsupportedAlgorithm):
        if password is not None:
            raise KeyFileError(f"{path}: not a private key, or the password is wrong") from None
        raise KeyFileError(f"{path}: not a private key (PEM or DER)") from None
    _check_rsa(key, path)
    assert isinstance(key, rsa.RSAPrivateKey)
    return SigningKey(key, Path(path))


def _looks_like_der_private_key(data: bytes) -> bool:
    # A DER SEQUENCE: let the private key loader say precisely what is wrong with it.
    return data[:1] == b"\x30"


def load_public_key(path: Path, password: bytes | None = None, *, allow_private: bool = True) -> PublicKey:
    """Load a public key from a public key file (PEM/DER, SPKI or PKCS#1) or, unless
    `allow_private` is False (where no private key belongs), from a private key."""
    data = _read(path)
    key: object = None
    loaders = (
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
    )
    for loader in loaders:
        try:
            key = loader(data)
            break
        except (ValueError, UnsupportedAlgorithm):
            continue
    if key is None:
        if b"PRIVATE KEY" not in data and not _looks_like_der_private_key(data):
            raise KeyFileError(f"{path}: not a public or private key (PEM or DER)")
        if not allow_private:
            raise PrivateKeyRefused(f"{path}: a private key, where only a public key belongs: export "
                                    f"its public half (mpboot pubkey {path} -o public.pem) and keep the "
                                    "private key off this machine")
        return load_signing_key(path, password).public()
    _check_rsa(key, path)
    assert isinstance(key, rsa.RSAPublicKey)
    return PublicKey(key)
