"""Keys on a PKCS#11 token (an HSM, a YubiHSM or Nitrokey, SoftHSM2 in tests): named by an
RFC 7512 `pkcs11:` URI, they sign image and envelope digests without the private key ever
leaving the token.

The binding is python-pkcs11 (typed exceptions, one Python object per token object); every
error it raises is turned into one line of ours here (TokenError and its kinds).

Signing is RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) through CKM_RSA_PKCS_PSS over the digest
the caller computed, or PKCS#1 v1.5 through CKM_RSA_PKCS over the DigestInfo of that digest:
the token never sees the image, only the 32 bytes its signature covers.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from mpboot.errors import (
    TokenError,
    TokenKeyError,
    TokenMechanismMissing,
    TokenPinError,
    TokenSignatureInvalid,
    UsageError,
)
from mpboot.keys import KEY_TYPES, PSS_SALT_LENGTH, PUBLIC_EXPONENT, PublicKey, SignatureScheme
from mpboot.pkcs11uri import PIN_ENV, Pkcs11Uri, module_path, read_pin

# DigestInfo for SHA-256 (RFC 8017 section 9.2, note 1): CKM_RSA_PKCS pads what it is given,
# so a PKCS#1 v1.5 signature of a digest needs this prefix in front of it.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# What each scheme asks of the token: mechanisms that sign a digest the caller computed.
_MECHANISMS = {SignatureScheme.PSS: (Mechanism.RSA_PKCS_PSS, "RSA-PSS (CKM_RSA_PKCS_PSS)"),
               SignatureScheme.PKCS1V15: (Mechanism.RSA_PKCS, "PKCS#1 v1.5 (CKM_RSA_PKCS)")}


# --- the module, refcounted: C_Finalize when the last user is done, so the next use re-reads
# the token list (a token made meanwhile by softhsm2-util or another process is seen).

_open_count: dict[str, int] = {}


@contextmanager
def _module(given: str) -> Iterator[Any]:
    if not Path(given).is_file():
        raise TokenError(f"PKCS#11 module {given}: no such file")
    # One module named two ways (a symlink, a doubled slash) is one library: python-pkcs11
    # and C_Initialize know it by path, so the path is made canonical first.
    path = os.path.realpath(given)
    try:
        lib = pkcs11.lib(path)
    except p11.PKCS11Error as err:
        raise TokenError(f"PKCS#11 module {path}: cannot load it: {_why(err)}") from None
    _open_count[path] = _open_count.get(path, 0) + 1
    try:
        yield lib
    finally:
        _open_count[path] -= 1
        if not _open_count[path]:
            del _open_count[path]
            try:
                lib.finalize()
            except p11.PKCS11Error:
                pass


def _why(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}" + (f" ({text})" if text and text != type(err).__name__ else "")


def _find_token(lib: Any, uri: Pkcs11Uri, module: str) -> Any:
    try:
        tokens = [
            t for t in lib.get_tokens(token_label=uri.token)
            if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED
            and (uri.serial is None or t.serial.decode(errors="replace").strip() == uri.serial)
            and (uri.manufacturer is None or t.manufacturer_id.strip() == uri.manufacturer)
            and (uri.model is None or t.model.strip() == uri.model)
        ]
    except p11.PKCS11Error as err:
        raise TokenError(f"{module}: cannot list its tokens: {_why(err)}") from None
    if not tokens:
        try:
            labels = sorted(t.label for t in lib.get_tokens()
                            if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED)
        except p11.PKCS11Error:
            labels = []
        have = f"its tokens: {', '.join(repr(x) for x in labels)}" if labels else "it has no initialised token"
        wanted = f"no token {uri.token!r}" if uri.token else "no token matching the URI"
        raise TokenError(f"{wanted} in PKCS#11 module {module} ({have})")
    if len(tokens) > 1:
        raise TokenError(f"{len(tokens)} tokens match {uri}: add token=, serial= or model= to the URI")
    return tokens[0]


# A token login belongs to the whole process (PKCS#11: C_Login on one session logs in every
# session of this application): a second key on a token already logged in opens its session
# without logging in again, which the token would refuse (CKR_USER_ALREADY_LOGGED_IN).
_logged_in: dict[tuple[str, int], int] = {}


@contextmanager
def _session(token: Any, module: str, pin: Callable[[], str | None], *, rw: bool = False) -> Iterator[Any]:
    """A session on `token`, logged in as its user when the token wants a login."""
    needs_pin = bool(token.flags & pkcs11.TokenFlag.LOGIN_REQUIRED)
    who = (os.path.realpath(module), token.slot.slot_id)
    user_pin = None
    if needs_pin and not _logged_in.get(who):
        user_pin = pin()
        if user_pin is None:
            raise TokenPinError(f"token {token.label!r} needs its user PIN: put pin-source=FILE in the URI "
                                f"or set {PIN_ENV}")
    try:
        session = token.open(rw=rw, user_pin=user_pin)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
        raise TokenPinError(f"token {token.label!r}: wrong PIN") from None
    except p11.PinLocked:
        raise TokenPinError(f"token {token.label!r}: the PIN is locked (too many wrong tries): the token's "
                            "security officer must reset it") from None
    except p11.PinExpired:
        raise TokenPinError(f"token {token.label!r}: the PIN has expired: set a new one first") from None
    except p11.UserPinNotInitialized:
        raise TokenPinError(f"token {token.label!r} has no user PIN set yet") from None
    except p11.PKCS11Error as err:
        raise TokenError(f"token {token.label!r}: cannot open a session: {_why(err)}") from None
    if needs_pin:
        _logged_in[who] = _logged_in.get(who, 0) + 1
    try:
        yield session
    finally:
        if needs_pin:
            _logged_in[who] -= 1
            if not _logged_in[who]:
                del _logged_in[who]
        try:
            session.close()
        except p11.PKCS11Error:
            pass


@contextmanager
def _public_session(token: Any) -> Iterator[Any]:
    """A session without a login: enough to read public objects."""
    try:
        session = token.open()
    except p11.PKCS11Error as err:
        raise TokenError(f"token {token.label!r}: cannot open a session: {_why(err)}") from None
    try:
        yield session
    finally:
        try:
            session.close()
        except p11.PKCS11Error:
            pass


def _template(uri: Pkcs11Uri, object_class: ObjectClass) -> dict[Attribute, Any]:
    attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if uri.object is not None:
        attrs[Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[Attribute.ID] = uri.id
    return attrs


def _objects(session: Any, uri: Pkcs11Uri, object_class: ObjectClass) -> list[Any]:
    try:
        return list(session.get_objects(_template(uri, object_class)))
    except p11.PKCS11Error as err:
        raise TokenError(f"{uri.names_key()}: cannot search the token: {_why(err)}") from None


def _one(found: list[Any], uri: Pkcs11Uri, what: str) -> Any:
    if not found:
        raise TokenKeyError(f"{uri.names_key()}: no {what} by that name on the token")
    if len(found) > 1:
        raise TokenKeyError(f"{uri.names_key()}: {len(found)} {what}s match: add id= or object= to the URI")
    return found[0]


def _rsa_numbers(obj: Any, uri: Pkcs11Uri) -> tuple[int, int]:
    """(n, e) of an RSA key object, refusing another type or a size the device cannot check."""
    try:
        key_type = obj[Attribute.KEY_TYPE]
    except p11.PKCS11Error as err:
        raise TokenKeyError(f"{uri.names_key()}: cannot read its key type: {_why(err)}") from None
    if key_type != KeyType.RSA:
        name = getattr(key_type, "name", str(key_type))
        raise TokenKeyError(f"{uri.names_key()} is an {name} key: mpboot signs with RSA-2048 or RSA-3072")
    try:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
    except p11.PKCS11Error as err:
        raise TokenKeyError(f"{uri.names_key()}: cannot read its public half: {_why(err)}") from None
    if n.bit_length() not in KEY_TYPES.values():
        raise TokenKeyError(f"{uri.names_key()} is an RSA-{n.bit_length()} key: mpboot signs with "
                            "RSA-2048 or RSA-3072")
    if e != PUBLIC_EXPONENT:
        raise TokenKeyError(f"{uri.names_key()}: public exponent {e}; the device verifier needs 65537")
    return n, e


def _public_of(session: Any, uri: Pkcs11Uri, private: Any | None) -> PublicKey:
    """The public half: the matching public key object, else the private key's own
    CKA_MODULUS / CKA_PUBLIC_EXPONENT (readable even when the key is sensitive)."""
    publics = [] if uri.type == "private" else _objects(session, uri, ObjectClass.PUBLIC_KEY)
    if len(publics) == 1:
        n, e = _rsa_numbers(publics[0], uri)
    elif private is not None:
        n, e = _rsa_numbers(private, uri)
    else:
        obj = _one(_objects(session, uri, ObjectClass.PRIVATE_KEY) if not publics else publics, uri, "key")
        n, e = _rsa_numbers(obj, uri)
    return PublicKey(rsa.RSAPublicNumbers(e, n).public_key())


@dataclass(frozen=True)
class TokenKeyInfo:
    """Where a token key lives, for people and for the signing log."""

    token: str
    serial: str
    manufacturer: str
    model: str
    object: str | None
    id: str | None
    module: str

    def describe(self) -> dict[str, str]:
        out = {"kind": "pkcs11", "token": self.token, "serial": self.serial, "manufacturer": self.manufacturer,
               "model": self.model, "module": self.module}
        if self.object is not None:
            out["object"] = self.object
        if self.id is not None:
            out["id"] = self.id
        return out

    def __str__(self) -> str:
        parts = [f"token {self.token!r}"]
        if self.object is not None:
            parts.append(f"object {self.object!r}")
        if self.id is not None:
            parts.append(f"id {self.id}")
        return " ".join(parts)


def _info(token: Any, key: Any, module: str) -> TokenKeyInfo:
    def attr(a: Attribute) -> Any:
        try:
            return key[a]
        except p11.PKCS11Error:
            return None

    label = attr(Attribute.LABEL)
    key_id = attr(Attribute.ID)
    return TokenKeyInfo(token.label, token.serial.decode(errors="replace").strip(), token.manufacturer_id.strip(),
                        token.model.strip(), label or None, key_id.hex() if key_id else None, module)


class TokenSigner:
    """A private key on a token, with its session open: a Signer (mpboot.signing)."""

    def __init__(self, token: Any, session: Any, key: Any, public: PublicKey, info: TokenKeyInfo):
        self._token = token
        self._session = session
        self._key = key
        self._public = public
        self.info = info

    @property
    def bits(self) -> int:
        return self._public.bits

    def public(self) -> PublicKey:
        return self._public

    def describe(self) -> dict[str, str]:
        return self.info.describe()

    def __str__(self) -> str:
        return str(self.info)

    def check_scheme(self, scheme: SignatureScheme) -> None:
        """TokenMechanismMissing unless the token offers the mechanism `scheme` signs with:
        checked when the key is opened, before any key of the command signs."""
        mechanism, name = _MECHANISMS[scheme]
        try:
            offered = self._token.slot.get_mechanisms()
        except p11.PKCS11Error as err:
            raise TokenError(f"{self.info}: cannot list its mechanisms: {_why(err)}") from None
        if mechanism not in offered:
            other, other_mechanism = (("pkcs1v15", Mechanism.RSA_PKCS) if scheme is SignatureScheme.PSS
                                      else ("pss", Mechanism.RSA_PKCS_PSS))
            if other_mechanism in offered:
                raise TokenMechanismMissing(f"{self.info}: the token does not offer {name}: sign with --scheme "
                                            f"{other} (the image records which scheme it carries)")
            raise TokenMechanismMissing(f"{self.info}: the token offers neither CKM_RSA_PKCS_PSS nor CKM_RSA_PKCS, "
                                        "the mechanisms that sign a digest: mpboot cannot sign with it (if its own "
                                        "tool can sign a SHA-256 digest, use sign --digest-only and "
                                        "--attach-signature)")

    def sign_digest(self, digest: bytes, scheme: SignatureScheme) -> bytes:
        if len(digest) != 32:
            raise UsageError(f"a SHA-256 digest is 32 bytes, not {len(digest)}")
        self.check_scheme(scheme)
        mechanism, name = _MECHANISMS[scheme]
        data = digest if scheme is SignatureScheme.PSS else SHA256_DIGEST_INFO + digest
        param: Any = (Mechanism.SHA256, pkcs11.MGF.SHA256, PSS_SALT_LENGTH) if scheme is SignatureScheme.PSS else None
        try:
            signature = bytes(self._key.sign(data, mechanism=mechanism, mechanism_param=param))
        except (p11.MechanismInvalid, p11.MechanismParamInvalid):
            raise TokenMechanismMissing(f"{self.info}: the token refuses {name} for this key") from None
        except p11.KeyTypeInconsistent:
            raise TokenKeyError(f"{self.info}: the token refuses {name} with this key") from None
        except p11.UserNotLoggedIn:
            raise TokenPinError(f"{self.info}: the token wants a login to sign: give its PIN") from None
        except p11.PKCS11Error as err:
            raise TokenError(f"{self.info}: signing failed: {_why(err)}") from None
        # A token that returns garbage (a wrong key behind the label, a fault) is caught here,
        # not on a device in the field.
        try:
            self._public.verify_digest(signature, digest, scheme)
        except Exception:
            raise TokenSignatureInvalid(f"{self.info}: the token's signature does not verify with its public key; "
                                        "nothing written") from None
        return signature


@contextmanager
def open_signer(uri: Pkcs11Uri, scheme: SignatureScheme, module: str | Path | None = None,
                prompt: Callable[[str], str] | None = None) -> Iterator[TokenSigner]:
    """Open the token key `uri` names, logged in, for the `with` block, checking that the
    token can sign with `scheme` before anything is signed."""
    path = module_path(uri, module)
    with _module(path) as lib:
        token = _find_token(lib, uri, path)
        if uri.type == "public":
            raise UsageError(f"{uri}: type=public names a public key: signing needs the private key")
        with _session(token, path, lambda: read_pin(uri, prompt)) as session:
            key = _one(_objects(session, uri, ObjectClass.PRIVATE_KEY), uri, "private key")
            public = _public_of(session, uri, key)
            signer = TokenSigner(token, session, key, public, _info(token, key, path))
            signer.check_scheme(scheme)
            yield signer


def public_key(uri: Pkcs11Uri, module: str | Path | None = None,
               prompt: Callable[[str], str] | None = None) -> PublicKey:
    """The public half of a token key (no PIN needed when the token holds a public key object)."""
    path = module_path(uri, module)
    with _module(path) as lib:
        token = _find_token(lib, uri, path)
        if uri.type != "private":
            with _public_session(token) as session:
                if _objects(session, uri, ObjectClass.PUBLIC_KEY):
                    return _public_of(session, uri, None)
            if uri.type == "public":
                raise TokenKeyError(f"{uri.names_key()}: no public key by that name on the token (type=public)")
        # Only a private key object: its public attributes need a login on most tokens.
        with _session(token, path, lambda: read_pin(uri, prompt)) as session:
            return _public_of(session, uri, _one(_objects(session, uri, ObjectClass.PRIVATE_KEY), uri, "key"))


def generate(uri: Pkcs11Uri, key_type: str, module: str | Path | None = None,
             prompt: Callable[[str], str] | None = None) -> tuple[PublicKey, TokenKeyInfo]:
    """Make an RSA key pair on the token: private half sensitive and never extractable. Refuses
    a label or id the token already has (keys are never overwritten)."""
    if key_type not in KEY_TYPES:
        raise UsageError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    if uri.object is None:
        raise UsageError(f"{uri}: name the new key with object=LABEL")
    path = module_path(uri, module)
    with _module(path) as lib:
        token = _find_token(lib, uri, path)
        with _session(token, path, lambda: read_pin(uri, prompt), rw=True) as session:
            clash = [o for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                     for by in ({Attribute.LABEL: uri.object}, {Attribute.ID: uri.id} if uri.id else None)
                     if by is not None
                     for o in session.get_objects({Attribute.CLASS: cls, **by})]
            if clash:
                raise TokenKeyError(f"token {token.label!r} already has a key {uri.object!r}"
                                    f"{' or id ' + uri.id.hex() if uri.id else ''}: keys are never overwritten; "
                                    "pick another object= (and id=)")
            key_id = uri.id if uri.id is not None else secrets.token_bytes(8)
            try:
                pub, priv = session.generate_keypair(
                    KeyType.RSA, KEY_TYPES[key_type], store=True, label=uri.object, id=key_id,
                    public_template={Attribute.PUBLIC_EXPONENT: PUBLIC_EXPONENT.to_bytes(3, "big"),
                                     Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False},
                    private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                      Attribute.PRIVATE: True, Attribute.SIGN: True, Attribute.DECRYPT: False,
                                      Attribute.UNWRAP: False})
            except p11.PKCS11Error as err:
                raise TokenError(f"token {token.label!r}: cannot make an {key_type} key: {_why(err)}") from None
            return _public_of(session, Pkcs11Uri(text=uri.text, object=uri.object, id=key_id), priv), \
                _info(token, priv, path)

