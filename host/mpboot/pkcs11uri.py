"""RFC 7512 `pkcs11:` URIs: which token, which key object, which PIN and module. Parsing only
(no PKCS#11 library is loaded here), so naming a file key costs nothing; mpboot.hsm opens them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlparse

from mpboot.errors import TokenError, TokenPinError, UsageError

URI_SCHEME = "pkcs11:"
MODULE_ENV = "MPBOOT_PKCS11_MODULE"
PIN_ENV = "MPBOOT_PKCS11_PIN"
MAX_PIN_FILE_BYTES = 1024

# RFC 7512 attributes this tool acts on; any other (a typo, a constraint we would ignore) is
# refused rather than silently widening which key signs.
_PATH_ATTRS = ("token", "manufacturer", "serial", "model", "object", "id", "type")
_QUERY_ATTRS = ("pin-source", "pin-value", "module-path")


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 URI naming a token and one key object on it."""

    text: str = field(repr=False)
    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    module_path: str | None = None

    def __str__(self) -> str:
        """The URI with any pin-value taken out: safe to print or log."""
        return redact(self.text)

    def names_key(self) -> str:
        parts = [f"token {self.token!r}" if self.token else "the token"]
        if self.object is not None:
            parts.append(f"object {self.object!r}")
        if self.id is not None:
            parts.append(f"id {self.id.hex()}")
        return " ".join(parts)


def redact(text: str) -> str:
    """`text` without any pin-value attribute, wherever it was put and however spelt: safe to
    print in an error (which may be about that very URI) or to log."""
    def keep(attr: str) -> bool:
        return attr.partition("=")[0].strip().lower() != "pin-value"

    scheme = text[: len(URI_SCHEME)] if is_uri(text) else ""
    head, sep, query = text[len(scheme):].partition("?")
    path = scheme + ";".join(a for a in head.split(";") if keep(a))
    if not sep:
        return path
    kept = [a for a in query.split("&") if keep(a)]
    return path + ("?" + "&".join(kept) if kept else "")


def is_uri(text: str) -> bool:
    return text[: len(URI_SCHEME)].lower() == URI_SCHEME


def _pct(value: str, what: str, uri: str) -> bytes:
    try:
        return unquote_to_bytes(value)
    except ValueError:  # pragma: no cover - unquote_to_bytes leaves bad escapes as they are
        raise UsageError(f"{redact(uri)}: bad percent-encoding in {what}") from None


def parse_uri(text: str) -> Pkcs11Uri:
    """Parse `pkcs11:token=...;object=...?pin-source=...`; refuse what this tool would not
    honour (an unknown attribute, one given twice, a type other than a private key)."""
    if not is_uri(text):
        raise UsageError(f"{text!r} is not a pkcs11: URI")
    body = text[len(URI_SCHEME):]
    path, _, query = body.partition("?")
    values: dict[str, Any] = {}

    def take(attr: str, raw: str, allowed: tuple[str, ...]) -> None:
        if attr not in allowed:
            raise UsageError(f"{redact(text)}: mpboot does not use the URI attribute {attr!r} "
                             f"(it knows {', '.join(allowed)})")
        key = attr.replace("-", "_")
        if key in values:
            raise UsageError(f"{redact(text)}: {attr} is given twice")
        data = _pct(raw, attr, text)
        if attr == "id":
            values[key] = data
            return
        try:
            values[key] = data.decode()
        except UnicodeDecodeError:
            raise UsageError(f"{redact(text)}: {attr} is not UTF-8") from None

    for part in filter(None, path.split(";")):
        attr, eq, raw = part.partition("=")
        if not eq:
            raise UsageError(f"{redact(text)}: {part!r} is not attribute=value")
        take(attr, raw, _PATH_ATTRS)
    for part in filter(None, query.split("&")):
        attr, eq, raw = part.partition("=")
        if not eq:
            raise UsageError(f"{redact(text)}: {part!r} is not attribute=value")
        take(attr, raw, _QUERY_ATTRS)
    if values.get("type") not in (None, "private", "public"):
        raise UsageError(f"{redact(text)}: type={values['type']} names no key (mpboot uses private "
                         "and public key objects)")
    if values.get("object") is None and values.get("id") is None:
        raise UsageError(f"{redact(text)}: name the key with object=LABEL or id=%XX (or both)")
    return Pkcs11Uri(text=text, **values)


def read_pin(uri: Pkcs11Uri, prompt: Callable[[str], str] | None = None) -> str | None:
    """The token PIN: the URI's pin-value or pin-source (a file, or file: URI), else
    $MPBOOT_PKCS11_PIN, else `prompt` (an interactive user), else None."""
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is not None:
        source = uri.pin_source
        if source.startswith("file:"):
            source = urlparse(source).path if source.startswith("file://") else source[len("file:"):]
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_PIN_FILE_BYTES + 1)
        except OSError as err:
            raise TokenPinError(f"pin-source {source}: cannot read: {err.strerror}") from None
        if len(data) > MAX_PIN_FILE_BYTES:
            raise TokenPinError(f"pin-source {source}: over {MAX_PIN_FILE_BYTES} bytes: not a PIN file")
        return data.decode(errors="replace").rstrip("\r\n")
    env = os.environ.get(PIN_ENV)
    if env is not None:
        return env
    if prompt is not None:
        return prompt(f"PIN for {uri.names_key()}")
    return None


def module_path(uri: Pkcs11Uri | None, given: str | Path | None) -> str:
    """The PKCS#11 module: the URI's module-path, else --pkcs11-module, else $MPBOOT_PKCS11_MODULE."""
    path = (uri.module_path if uri is not None else None) or (str(given) if given else None) \
        or os.environ.get(MODULE_ENV)
    if not path:
        raise TokenError(f"which PKCS#11 module? give --pkcs11-module PATH (or set {MODULE_ENV}, or put "
                         "module-path=... in the URI), e.g. /usr/lib/softhsm/libsofthsm2.so")
    return path
