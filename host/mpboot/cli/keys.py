"""The `key` commands (docs/KEYS.md): delegate a signing key, revoke, rotate the roots, show
a certificate or record. Signing an image with several keys, and `cosign`, are signing
commands (cli/sign.py)."""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mpboot import trust
from mpboot.cli.common import (
    KEY_REF,
    KIND_NAMES,
    log_signatures,
    password,
    password_env_option,
    pkcs11_module_option,
    plural,
    read_trust_file,
    scheme_option,
    signing_log_option,
    token_access,
)
from mpboot.errors import PrivateKeyRefused, UsageError
from mpboot.files import write_atomic
from mpboot.image import IMAGE_MAGIC, class_uuid, vendor_uuid
from mpboot.keys import PublicKey, SignatureScheme
from mpboot.signing import KeyRef, Recorder, TokenAccess, load_public, open_signers
from mpboot.trust import Body, Certificate, RevocationRecord, RootRecord, Signed

U32_MAX = trust.U32_MAX
# What a certificate may sign for (`key delegate --kind`): the image kinds, and channel
# records (docs/KEYS.md section 3, type 4: bit 8, not an image kind).
CERT_KINDS: dict[str, int] = {**{k: int(v) for k, v in KIND_NAMES.items()}, "channel": trust.CHANNEL_KIND}


# --- options the record commands share -------------------------------------------------------


@dataclass(frozen=True)
class SigningArgs:
    """What _signing_options collects: who signs, how, and where it goes."""

    key_refs: tuple[KeyRef, ...]
    no_sign: bool
    scheme: SignatureScheme
    output: Path
    password_env: str | None
    pkcs11_module: str | None
    signing_log: Path

    def access(self) -> TokenAccess:
        return token_access(self.pkcs11_module)

    def signed_words(self) -> str:
        return "unsigned: each signer adds theirs with mpboot cosign" if self.no_sign else \
            f"signed by {plural(len(self.key_refs), 'key')}"


def _signing_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """-k (repeatable), --no-sign, --scheme, -o, --pkcs11-module, --signing-log and
    --password-env, for a command that writes `what` (a certificate or a record) in a signed
    envelope; the command gets them as one `signing: SigningArgs`."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(*args: Any, key_refs: tuple[KeyRef, ...], no_sign: bool, scheme: str, output: Path,
                    password_env: str | None, pkcs11_module: str | None, signing_log: Path, **kwargs: Any) -> Any:
            return func(*args, signing=SigningArgs(key_refs, no_sign, SignatureScheme(scheme), output,
                                                   password_env, pkcs11_module, signing_log), **kwargs)

        options = (
            click.option("-k", "--key", "key_refs", multiple=True, type=KEY_REF,
                         help="Private key that signs it (file, or a token key's pkcs11: URI); repeat for each "
                              "holder present (or give one, then each other holder runs mpboot cosign FILE "
                              "-k THEIR_KEY)."),
            click.option("--no-sign", is_flag=True,
                         help="Write it with no signature, for each holder to add theirs with mpboot cosign."),
            scheme_option,
            click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
                         help=f"{what} file to write (CBOR)."),
            pkcs11_module_option,
            signing_log_option,
            password_env_option,
        )
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _sign_and_write(body: Body, signing: SigningArgs) -> bytes:
    if signing.no_sign and signing.key_refs:
        raise UsageError("--no-sign writes no signature: drop -k (add signatures with mpboot cosign)")
    if not signing.no_sign and not signing.key_refs:
        raise UsageError("give -k KEY (repeat it for several signers), or --no-sign for each holder to "
                         "sign with mpboot cosign")
    with open_signers(signing.key_refs, password(signing.password_env), signing.scheme, signing.access()) as signers:
        recorders = [Recorder(s) for s in signers]
        data = trust.sign_envelope(body, recorders, signing.scheme)
    if len(data) > trust.MAX_RECORD_SIZE:
        raise UsageError(f"signed, it would be {len(data)} bytes, over the {trust.MAX_RECORD_SIZE} a device takes")
    log_signatures(signing.signing_log, recorders, {"what": trust.body_type(body).words}, signing.output)
    write_atomic(signing.output, data)
    return data


def _public_key(ref: KeyRef, option: str, access: TokenAccess) -> PublicKey:
    """A public key named on the command line: a public key file or a token key, never a
    private key file (those stay with their holder; export the public half with mpboot pubkey)."""
    try:
        return load_public(ref, None, access, allow_private=False)
    except PrivateKeyRefused as err:
        raise PrivateKeyRefused(f"{option} {err}") from None


_COUNTER_RE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*:\s*(0x[0-9a-fA-F]+|\d+)\s*$")


def _counter_range(text: str) -> tuple[int, int]:
    m = _COUNTER_RE.match(text)
    if not m:
        raise UsageError(f"bad --counter {text!r}: expected LO:HI, e.g. 0x01000000:0x01ffffff")
    lo, hi = int(m.group(1), 0), int(m.group(2), 0)
    if not 0 <= lo <= hi <= U32_MAX:
        raise UsageError(f"bad --counter {text!r}: need 0 <= LO <= HI <= {U32_MAX}")
    return lo, hi


def _class_ids(class_ids: tuple[str, ...], vendors: list[bytes]) -> list[bytes]:
    """Class ids as `sign --class-id` parses them: a name is hashed in its vendor's namespace,
    so a name needs exactly one --vendor-id."""
    if len(vendors) == 1:
        return [class_uuid(c, vendors[0]) for c in class_ids]
    out = []
    for c in class_ids:
        try:
            out.append(class_uuid(c, None))
        except UsageError:
            raise UsageError(f"class id {c!r} is a name, hashed in one vendor's namespace: give exactly one "
                             "--vendor-id, or give the class ids as UUIDs") from None
    return out


def _keyhash(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        raise UsageError(f"bad --key-hash {text!r}: expected 64 hex digits (mpboot key show, or the key hash "
                         "mpboot keygen printed)")
    return bytes.fromhex(text.strip())


# --- commands ------------------------------------------------------------------------------


@click.group("key")
def key_group() -> None:
    """Certificates and trust records (docs/KEYS.md): delegate, revoke, rotate-root, show."""


@key_group.command("delegate")
@click.option("--to", "subject", required=True, type=KEY_REF,
              help="Public key of the signer to certify (PEM or DER, or a token key's pkcs11: URI; a "
                   "private key file is refused).")
@click.option("--serial", required=True, type=click.IntRange(1, U32_MAX),
              help="Certificate serial (what a revocation record names); unique per issuer.")
@click.option("--vendor-id", "vendor_ids", multiple=True, metavar="UUID|NAME",
              help="A vendor id it may sign for, parsed as sign --vendor-id (repeat, at most 4; none: any).")
@click.option("--class-id", "class_ids", multiple=True, metavar="UUID|NAME",
              help="A class id it may sign for, parsed as sign --class-id (repeat, at most 8; none: any).")
@click.option("--counter", "counter_text", metavar="LO:HI",
              help="Security counters it may sign (its validity period; default: any).")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(list(CERT_KINDS)),
              help="What it may sign (repeat; default: everything): an image kind, or channel records "
                   "(mpboot channel sign).")
@click.option("--depth", default=0, show_default=True, type=click.IntRange(0, trust.MAX_DEPTH),
              help="Certificate levels it may issue below itself (0: it signs images only).")
@_signing_options("Certificate")
def delegate(subject: KeyRef, serial: int, vendor_ids: tuple[str, ...], class_ids: tuple[str, ...],
             counter_text: str | None, kinds: tuple[str, ...], depth: int, signing: SigningArgs) -> None:
    """Certify a signing key for a scope: sign it with a root threshold (-k each root, or
    cosign), or with one delegated key whose certificate has --depth 1 or more.

    An image carries the certificate (mpboot sign --cert) before the signature it vouches
    for; the device counts that signature only for images inside the scope."""
    vendors = [vendor_uuid(v) for v in vendor_ids]
    cert = Certificate(
        serial=serial,
        key=_public_key(subject, "--to", signing.access()),
        vendors=tuple(vendors) or None,
        classes=tuple(_class_ids(class_ids, vendors)) or None,
        counters=_counter_range(counter_text) if counter_text else None,
        kinds=sum(CERT_KINDS[k] for k in set(kinds)) or None,
        depth=depth,
    )
    _sign_and_write(cert, signing)
    click.echo(f"wrote certificate serial {serial} for key {cert.key.keyhash().hex()[:16]} -> {signing.output} "
               f"({signing.signed_words()})")


@key_group.command("revoke")
@click.option("--number", required=True, type=click.IntRange(1, U32_MAX),
              help="Revocation number: above the one devices hold (each record replaces the whole list).")
@click.option("--key-hash", "key_hashes", multiple=True, metavar="HEX",
              help="Key hash to revoke (64 hex digits; repeat).")
@click.option("--pubkey", "pubkeys", multiple=True, type=KEY_REF,
              help="Public key file (or token key's pkcs11: URI) to revoke (repeat).")
@click.option("--serial", "serials", multiple=True, type=click.IntRange(0, U32_MAX),
              help="Certificate serial to revoke (repeat).")
@_signing_options("Revocation record")
def revoke(number: int, key_hashes: tuple[str, ...], pubkeys: tuple[KeyRef, ...], serials: tuple[int, ...],
           signing: SigningArgs) -> None:
    """Write a revocation record, signed by a root threshold: the keys and certificate
    serials it lists count for nothing on a device that takes it (mpboot trust push).

    It replaces the list a device holds: repeat every earlier revocation in it."""
    revoked = [_keyhash(h) for h in key_hashes] + [_public_key(p, "--pubkey", signing.access()).keyhash()
                                                    for p in pubkeys]
    record = RevocationRecord(number, tuple(dict.fromkeys(revoked)), tuple(dict.fromkeys(serials)))
    _sign_and_write(record, signing)
    click.echo(f"wrote revocation record {number} ({plural(len(record.keys), 'key')}, "
               f"{plural(len(record.serials), 'serial')}) -> {signing.output} ({signing.signed_words()})")


@key_group.command("rotate-root")
@click.option("--version", "version", required=True, type=click.IntRange(2, U32_MAX),
              help="The new root set's version: the devices' current version + 1.")
@click.option("--root", "roots", multiple=True, required=True, type=KEY_REF,
              help="Public key of a new root (file, or a token key's pkcs11: URI; repeat, 1..4; keep the "
                   "old ones that stay).")
@click.option("--threshold", required=True, type=click.IntRange(1, trust.MAX_ROOTS),
              help="Distinct new roots that must sign certificates and records.")
@click.option("--image-threshold", required=True, type=click.IntRange(1, trust.MAX_IMAGE_SIGNATURES),
              help="Distinct trusted keys that must sign an image.")
@_signing_options("Root record")
def rotate_root(version: int, roots: tuple[KeyRef, ...], threshold: int, image_threshold: int,
                signing: SigningArgs) -> None:
    """Write a root record: the next root set. A device takes it only when it is signed by
    the current roots' threshold AND the new roots' threshold (-k keys may be old roots, new
    roots or both; typically each holder cosigns in turn: mpboot cosign FILE -k KEY)."""
    record = RootRecord(version, tuple(_public_key(p, "--root", signing.access()) for p in roots), threshold, image_threshold)
    _sign_and_write(record, signing)
    click.echo(f"wrote root record version {version} ({plural(len(roots), 'root')}, threshold {threshold}, "
               f"image threshold {image_threshold}) -> {signing.output} ({signing.signed_words()})")


@key_group.command("show")
@click.argument("path", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(path: Path, as_json: bool) -> None:
    """Decode a certificate or trust record: its type, fields, key hashes and signers
    (checks the format, not the signatures: mpboot verify --trust-record does)."""
    data = read_trust_file(path)
    if int.from_bytes(data[:4], "little") == IMAGE_MAGIC:
        raise UsageError(f"{path} is an image: mpboot info {path} shows it")
    signed = trust.decode_signed(data, unsigned_ok=True)
    if isinstance(signed.body, trust.ChannelRecord):
        raise UsageError(f"{path} is a channel record: mpboot channel show {path} shows it")
    summary = _summary(signed, len(data))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for name, value in _lines(summary):
        click.echo(f"{name + ':':<17} {value}")


def _key(key: PublicKey) -> dict[str, Any]:
    return {"bits": key.bits, "keyhash": key.keyhash().hex()}


def _uuids(values: tuple[bytes, ...] | None) -> list[str] | None:
    return None if values is None else [str(uuid.UUID(bytes=v)) for v in values]


def _summary(signed: Signed, size: int) -> dict[str, Any]:
    body = signed.body
    out: dict[str, Any] = {"type": signed.type.words, "size": size, "body_size": len(signed.envelope.body)}
    if isinstance(body, Certificate):
        out.update(serial=body.serial, key=_key(body.key), vendors=_uuids(body.vendors),
                   classes=_uuids(body.classes), counters=list(body.counters) if body.counters else None,
                   kinds=[name for name, bit in CERT_KINDS.items() if body.kind_mask & bit]
                   if body.kinds is not None else None, kind_mask=body.kind_mask, depth=body.depth)
    elif isinstance(body, RootRecord):
        out.update(version=body.version, roots=[_key(k) for k in body.keys], threshold=body.threshold,
                   image_threshold=body.image_threshold)
    else:
        out.update(number=body.number, revoked_keys=[h.hex() for h in body.keys], revoked_serials=list(body.serials))
    out["signatures"] = [{"keyhash": s.keyhash.hex(), "alg": s.alg.name} for s in signed.envelope.signatures]
    return out


def _lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """One (name, value) line per field; repeated fields (roots, signatures) a line each."""

    def key_text(k: dict[str, Any]) -> str:
        return f"RSA-{k['bits']}, key hash {k['keyhash']}"

    def any_of(values: list[str] | None) -> str:
        return "any" if values is None else ", ".join(values)

    lines = [("type", s["type"]), ("size", f"{s['size']} bytes (body {s['body_size']})")]
    if s["type"] == "certificate":
        lo, hi = s["counters"] or (0, 0)
        counters = "any" if s["counters"] is None else f"{lo}..{hi} ({lo:#010x}..{hi:#010x})"
        kinds = "any" if s["kinds"] is None else any_of(s["kinds"]) or "none known"
        lines += [("serial", str(s["serial"])), ("key", key_text(s["key"])), ("vendors", any_of(s["vendors"])),
                  ("classes", any_of(s["classes"])), ("counters", counters),
                  ("kinds", f"{kinds} (mask {s['kind_mask']:#x})"), ("depth", str(s["depth"]))]
    elif s["type"] == "root record":
        lines += [("version", str(s["version"]))] + [("root", key_text(k)) for k in s["roots"]]
        lines += [("threshold", str(s["threshold"])), ("image threshold", str(s["image_threshold"]))]
    else:
        lines += [("number", str(s["number"]))]
        lines += [("revoked key", h) for h in s["revoked_keys"]] or [("revoked keys", "none")]
        lines += [("revoked serial", str(n)) for n in s["revoked_serials"]] or [("revoked serials", "none")]
    lines += [("signature", f"key hash {sig['keyhash']} {sig['alg']}") for sig in s["signatures"]] or [
        ("signatures", "none (unsigned: each signer adds theirs with mpboot cosign)")]
    return lines


COMMANDS = (key_group,)

__all__ = ["COMMANDS"]
