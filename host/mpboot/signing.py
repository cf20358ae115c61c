"""Who signs: the Signer interface every signing command goes through, and the keys behind it.

A signer is a key file (mpboot.keys.SigningKey), a key on a PKCS#11 token named by a
`pkcs11:` URI (mpboot.hsm.TokenSigner; the binding loads only then), or a signature made elsewhere and attached
(AttachedSignature: the air-gapped flow). Image and envelope code (mpboot.image,
mpboot.trust) only ever call `sign_digest(digest, scheme)`: which kind of key answers is
decided here, once, from what the user named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mpboot import keys, pkcs11uri
from mpboot.errors import ImageRejected, SignatureMismatch, UsageError
from mpboot.pkcs11uri import Pkcs11Uri
from mpboot.keys import PublicKey, SignatureScheme

KeyRef = Path | Pkcs11Uri
"""What a -k option names: a key file, or a key object on a token."""


class Signer(Protocol):
    """Anything that signs a SHA-256 digest with an RSA-2048/3072 key."""

    @property
    def bits(self) -> int: ...

    def public(self) -> PublicKey: ...

    def sign_digest(self, digest: bytes, scheme: SignatureScheme) -> bytes: ...

    def describe(self) -> dict[str, str]:
        """Who signs, for the signing log: {"kind": "file"|"pkcs11"|"detached", ...}."""
        ...


def parse_key_ref(text: str) -> KeyRef:
    """A -k value: `pkcs11:...` names a token key, anything else a file."""
    return pkcs11uri.parse_uri(text) if pkcs11uri.is_uri(text) else Path(text)


@dataclass
class TokenAccess:
    """How to reach tokens: the PKCS#11 module (--pkcs11-module / $MPBOOT_PKCS11_MODULE) and
    how to ask for a PIN the URI and $MPBOOT_PKCS11_PIN do not give (None: never ask)."""

    module: str | None = None
    prompt: Callable[[str], str] | None = None


@contextmanager
def open_signers(refs: Sequence[KeyRef], password: bytes | None, scheme: SignatureScheme,
                 tokens: TokenAccess | None = None) -> Iterator[list[Signer]]:
    """Load the key files and open the token keys `refs` name, in order; token sessions stay
    open for the `with` block. Every key is checked before any signs (wrong PIN, missing
    object, wrong key type, a token without the mechanism `scheme` needs)."""
    access = tokens or TokenAccess()
    with ExitStack() as stack:
        signers: list[Signer] = []
        for ref in refs:
            if isinstance(ref, Pkcs11Uri):
                from mpboot import hsm  # loads the PKCS#11 binding only when a token is named

                signers.append(stack.enter_context(hsm.open_signer(ref, scheme, access.module, access.prompt)))
            else:
                signers.append(keys.load_signing_key(ref, password))
        if len({s.public().modulus for s in signers}) != len(signers):
            raise UsageError("the same key is given twice with -k: each key signs once")
        yield signers


def load_public(ref: KeyRef, password: bytes | None, tokens: TokenAccess | None, *,
                allow_private: bool) -> PublicKey:
    """The public half of a key file (public or, unless `allow_private` is False, private) or
    of a token key."""
    if isinstance(ref, Pkcs11Uri):
        from mpboot import hsm

        access = tokens or TokenAccess()
        return hsm.public_key(ref, access.module, access.prompt)
    return keys.load_public_key(ref, password, allow_private=allow_private)


@dataclass
class AttachedSignature:
    """A signature made elsewhere (a token on an air-gapped machine, openssl) by the key
    `key`: as a Signer it hands back that signature, but only for the digest it verifies over
    and in the scheme asked for; any other digest is SignatureMismatch."""

    key: PublicKey
    signature: bytes
    source: str

    @property
    def bits(self) -> int:
        return self.key.bits

    def public(self) -> PublicKey:
        return self.key

    def describe(self) -> dict[str, str]:
        return {"kind": "detached", "signature_file": self.source}

    def __str__(self) -> str:
        return f"signature {self.source}"

    def sign_digest(self, digest: bytes, scheme: SignatureScheme) -> bytes:
        expected = self.bits // 8
        if len(self.signature) != expected:
            raise SignatureMismatch(f"{self.source}: {len(self.signature)} bytes, but an RSA-{self.bits} "
                                    f"signature is {expected}: not a raw signature by this key")
        try:
            self.key.verify_digest(self.signature, digest, scheme)
            return self.signature
        except ImageRejected:
            pass
        other = SignatureScheme.PKCS1V15 if scheme is SignatureScheme.PSS else SignatureScheme.PSS
        try:
            self.key.verify_digest(self.signature, digest, other)
        except ImageRejected:
            raise SignatureMismatch(f"{self.source}: not a signature of digest {digest.hex()} by key "
                                    f"{self.key.keyhash().hex()[:16]}: it was made over other bytes or "
                                    "with another key; nothing written") from None
        raise SignatureMismatch(f"{self.source}: a {other.value} signature, but the image is being made "
                                f"for {scheme.value}: give --scheme {other.value}")


@dataclass(frozen=True)
class MadeSignature:
    """One signature a signer made: what the signing log records."""

    digest: bytes
    scheme: SignatureScheme
    signature: bytes
    keyhash: bytes
    bits: int
    signer: dict[str, str]


@dataclass
class Recorder:
    """Wraps a Signer and remembers each signature it makes, so the caller can log them
    before writing what they sign."""

    inner: Signer
    made: list[MadeSignature] = field(default_factory=list)

    @property
    def bits(self) -> int:
        return self.inner.bits

    def public(self) -> PublicKey:
        return self.inner.public()

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    def __str__(self) -> str:
        return str(self.inner)

    def sign_digest(self, digest: bytes, scheme: SignatureScheme) -> bytes:
        signature = self.inner.sign_digest(digest, scheme)
        self.made.append(MadeSignature(digest, scheme, signature, self.public().keyhash(), self.bits,
                                       self.describe()))
        return signature
