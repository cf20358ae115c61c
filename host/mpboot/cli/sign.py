"""Signing commands: sign (with key files, token keys, or signatures made elsewhere) and cosign,
each signature appended to the signing log before the signed file is written."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from mpboot import espimg, firmware, pack, signing, trust
from mpboot.cli.common import (
    KEY_REF,
    KIND_NAMES,
    SLOT_SIZE_LIMIT,
    check_input_file,
    log_signatures,
    parse_address,
    parse_size,
    password,
    password_env_option,
    pkcs11_module_option,
    plural,
    read_image,
    read_trust_file,
    scheme_option,
    signing_log_option,
    token_access,
)
from mpboot.errors import InputFileError, TrustRefused, UsageError
from mpboot.files import write_atomic
from mpboot.image import (
    DEFAULT_HEADER_SIZE,
    DEPENDENCY_FIRMWARE,
    DEPENDENCY_STAGE1,
    IMAGE_MAGIC,
    SIGNATURE_TYPES,
    Dependency,
    ImageSigner,
    ImageVersion,
    SignOptions,
    build_image,
    check_dependencies,
    class_uuid,
    cosign,
    parse_image,
    vendor_uuid,
)
from mpboot.keys import SignatureScheme
from mpboot.signing import AttachedSignature, KeyRef, Recorder, Signer


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


# --depends names for image ids (docs/FORMAT.md): stage 1, and the firmware's stage-0 ABI.
DEPENDS_NAMES = {"stage1": DEPENDENCY_STAGE1, "firmware": DEPENDENCY_FIRMWARE}


def _dependencies(values: tuple[str, ...], kind: int) -> tuple[Dependency, ...]:
    """--depends IMAGE:VERSION values, in the order given (checked by check_dependencies for
    an image of `kind`). IMAGE: a number, or stage1 (1) or firmware (255)."""
    deps = []
    for value in values:
        image_text, sep, version_text = value.partition(":")
        name = image_text.strip().lower()
        if not sep or not (name.isdigit() or name in DEPENDS_NAMES):
            raise UsageError(f"bad --depends {value!r}: expected IMAGE:VERSION, e.g. stage1:1.2.0 or "
                             "firmware:1.0 (IMAGE a number, stage1 or firmware)")
        image_id = DEPENDS_NAMES[name] if name in DEPENDS_NAMES else int(name)
        deps.append((image_id, ImageVersion.parse(version_text)))
    check_dependencies(deps, kind)
    return tuple(deps)


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, type=KEY_REF,
              help="Private key (PEM or DER file, or a token key: pkcs11:token=...;object=...); repeat for "
                   "an image signed by several keys (M-of-N), at most 6. With --attach-signature: the "
                   "public key that made each signature.")
@click.option("--cert", "cert_files", multiple=True, type=click.Path(path_type=Path),
              help="Certificate of a delegated -k key (mpboot key delegate), and its issuers' (parent "
                   "first); each is written just before the signature it vouches for.")
@click.option("--no-sign", is_flag=True,
              help="Write the hash and no signature: each key holder then adds theirs (mpboot cosign).")
@click.option("--digest-only", is_flag=True,
              help="Air-gapped signing, step 1: write to -o the 32-byte SHA-256 digest the signatures "
                   "cover (sign it elsewhere with the scheme printed), not the image.")
@click.option("--attach-signature", "signature_files", multiple=True, type=click.Path(path_type=Path),
              help="Air-gapped signing, step 2: a raw signature made elsewhere over the --digest-only "
                   "digest, by the matching -k public key (repeat both, in order, for several); the "
                   "same INPUT and options must be given again, and a signature over other bytes is refused.")
@click.option("--kind", type=click.Choice(list(KIND_NAMES)), default="app", show_default=True,
              help="What the image is: updater and firmware write the protected MPBOOT_KIND TLV (an app image has none); "
                   "firmware: INPUT is an ESP-IDF app image (micropython.bin), checked, with --slot-size its OTA "
                   "partition's size.")
@click.option("--version", "version_text", required=True, metavar="MAJ.MIN.REV[+BUILD]",
              help="Image version.")
@click.option("--depends", "depends", multiple=True, metavar="IMAGE:VERSION",
              help="A protected DEPENDENCY TLV (imgtool's -d \"(IMAGE,VERSION)\"): stage1:VERSION (image 1; "
                   "apps only) needs stage 1 at least VERSION, firmware:MAJ.MIN (image 255) the firmware's "
                   "stage-0 ABI (same major, minor at least MIN). Repeat for several (at most 4, each image "
                   "once); written in the order given. Devices enforce them (docs/BOOT.md).")
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
              help="Signed image (.bin, or Intel hex when it ends in .hex); with --digest-only, the digest.")
@pkcs11_module_option
@signing_log_option
@password_env_option
def sign(input_path: Path, key_files: tuple[KeyRef, ...], cert_files: tuple[Path, ...], no_sign: bool,
         digest_only: bool, signature_files: tuple[Path, ...], kind: str, version_text: str, depends: tuple[str, ...],
         security_counter: str,
         vendor_id: str | None, class_id: str | None, header_size: str, pad_header: bool, entry: str,
         slot_size: str | None, load_addr: str | None, scheme: str, hex_addr: str | None, output: Path,
         pkcs11_module: str | None, signing_log: Path, password_env: str | None) -> None:
    """Sign INPUT (.bin, .hex, .romfs, or an app folder of .py files) into an MCUboot image.

    An app folder is compiled with mpy-cross and packed as ROMFS (as `mpremote romfs build`
    does); it must hold its entry module (--entry, main.py by default). Several -k keys sign
    one after the other; a delegated key comes with its --cert chain (docs/KEYS.md). A -k
    pkcs11: URI signs on a PKCS#11 token. Each signature made is appended to the signing log."""
    if no_sign and (key_files or cert_files or signature_files):
        raise UsageError("--no-sign writes no signature: drop -k/--cert/--attach-signature (add signatures with "
                         "mpboot cosign)")
    if digest_only and (no_sign or signature_files or cert_files or key_files):
        raise UsageError("--digest-only writes only the digest: drop -k/--cert/--no-sign/--attach-signature "
                         "(give them in step 2, with --attach-signature)")
    if signature_files and len(signature_files) != len(key_files):
        raise UsageError(f"{plural(len(signature_files), '--attach-signature')} but {plural(len(key_files), '-k key')}: "
                         "give each signature's public key with -k, in the same order")
    if not no_sign and not digest_only and not key_files:
        raise UsageError("give -k KEY (repeat it for several signatures), or --no-sign to sign later "
                         "with mpboot cosign, or --digest-only to sign on another machine")
    hex_output = output.suffix.lower() == ".hex"
    if hex_addr is not None and (not hex_output or digest_only):
        raise UsageError("--hex-addr sets where a .hex output starts: the output here is raw binary "
                         f"({output.name}); drop --hex-addr or name the output *.hex")
    hex_base = parse_address(hex_addr, "hex address") if hex_addr is not None else None  # before anything signs
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
        dependencies=_dependencies(depends, KIND_NAMES[kind]),
    )
    secret = password(password_env)
    access = token_access(pkcs11_module)
    with contextlib.ExitStack() as stack:
        if signature_files:
            keys_used: list[Signer] = [
                AttachedSignature(signing.load_public(ref, secret, access, allow_private=True), _read_signature(path),
                                  str(path.resolve()))
                for ref, path in zip(key_files, signature_files)]
        else:
            keys_used = stack.enter_context(signing.open_signers(key_files, secret, options.scheme, access))
        recorders = [Recorder(k) for k in keys_used]
        signers = _signers(recorders, cert_files)
        # A stage-1 image (kind updater) is the service's folder, whose entry is mpboot/smp/service.
        source = pack.load_input(input_path, entry=None if kind == "firmware" else
                                 firmware.STAGE1_ENTRY if kind == "updater" else entry)
        if kind == "firmware":
            # The payload is the ESP-IDF app image the device writes at offset 0 of an OTA
            # partition (docs/FORMAT.md "Firmware images (esp32)"): checked here as a device
            # checks it; the header room is always added (the app image starts with 0xe9).
            espimg.check(source.data)
            pad_header = True
        body, base_addr = pack.with_header_room(source, options.header_size, pad_header)
        image = build_image(body, signers, options)
        if kind == "firmware" and options.slot_size is not None:
            espimg.check_fits(len(body) - options.header_size, len(image), options.slot_size)
    if digest_only:
        digest = parse_image(image).digest
        write_atomic(output, digest)
        click.echo(f"wrote the SHA-256 digest {digest.hex()} of {input_path}'s image (version {version}, "
                   f"security counter {options.security_counter}) to {output}: sign these 32 bytes with "
                   f"{_scheme_words(options.scheme)}, then run this command again with --attach-signature SIG -k PUBLIC_KEY "
                   f"instead of --digest-only")
        return
    log_signatures(signing_log, recorders, _image_subject(image, input_path), output)
    if hex_base is not None:
        base_addr = hex_base
    pack.write_output(output, image, base_addr)
    signed = ("unsigned: add signatures with mpboot cosign" if no_sign else
              "" if len(signers) == 1 else f"{len(signers)} signatures")
    click.echo(f"signed {input_path} ({source.kind}, {len(source.data)} bytes) -> {output} "
               f"({len(image)} bytes, version {version}, security counter {options.security_counter}"
               f"{', ' + signed if signed else ''})")


def _read_signature(path: Path) -> bytes:
    """A raw signature file (at most an RSA-3072 signature's 384 bytes)."""
    path = check_input_file(path, "a signature")
    if path.stat().st_size > 384:
        raise InputFileError(f"{path}: {path.stat().st_size} bytes: not a raw RSA signature (256 or 384 bytes; "
                             "convert a base64 or hex one to binary first)")
    return path.read_bytes()


def _image_subject(image: bytes, input_path: Path) -> dict[str, Any]:
    """What the signing log says an image signature was over."""
    parsed = parse_image(image)
    return {"what": "image", "input": str(input_path), "version": str(parsed.header.version),
            "security_counter": parsed.security_counter}


def _signers(signing_keys: list[Recorder], cert_files: tuple[Path, ...]) -> list[ImageSigner]:
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
@click.option("-k", "--key", "key_ref", type=KEY_REF,
              help="Your private key (PEM or DER file, or pkcs11: URI of a token key): adds its one "
                   "signature. With --attach-signature: the public key that made it.")
@click.option("--cert", "cert_files", multiple=True, type=click.Path(path_type=Path),
              help="For an image: the certificate chain of a delegated key (parent first); those the "
                   "image already carries are not written again.")
@click.option("--digest-only", is_flag=True,
              help="Air-gapped signing, step 1: write to -o the 32-byte SHA-256 digest a signature of "
                   "FILE covers, and nothing else.")
@click.option("--attach-signature", "signature_file", type=click.Path(path_type=Path),
              help="Air-gapped signing, step 2: add this raw signature, made elsewhere over FILE's digest "
                   "by the -k public key (refused unless it verifies).")
@scheme_option
@click.option("--slot-size", metavar="SIZE", help="For an image: refuse to grow it past this size.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (default: replace FILE).")
@pkcs11_module_option
@signing_log_option
@password_env_option
def cosign_cmd(input_path: Path, key_ref: KeyRef | None, cert_files: tuple[Path, ...], digest_only: bool,
               signature_file: Path | None, scheme: str, slot_size: str | None, output: Path | None,
               pkcs11_module: str | None, signing_log: Path, password_env: str | None) -> None:
    """Add your signature to FILE: an image (signed or made with sign --no-sign), or a
    certificate or trust record (signed or made with --no-sign).

    Each key holder runs this with their own key (file or token), in turn, so no one holds
    another's key. A key that has already signed FILE is refused."""
    if digest_only:
        if key_ref is not None or signature_file or cert_files or slot_size:
            raise UsageError("--digest-only writes only the digest: drop -k/--cert/--slot-size/--attach-signature")
        if output is None:
            raise UsageError("--digest-only: give -o FILE for the digest")
        if output.exists() and output.resolve() == Path(input_path).resolve():
            raise UsageError(f"--digest-only -o {output}: that is FILE itself; write the digest elsewhere")
    elif key_ref is None:
        raise UsageError("give -k KEY (or --digest-only to sign on another machine)")
    out = output or input_path
    chosen = SignatureScheme(scheme)
    path = check_input_file(input_path, "an image, certificate or trust record")
    with path.open("rb") as f:
        head = f.read(4)
    is_image = path.suffix.lower() == ".hex" or (len(head) == 4 and int.from_bytes(head, "little") == IMAGE_MAGIC)
    if not is_image and (cert_files or slot_size):
        raise UsageError(f"{input_path} is not an image: --cert and --slot-size are for images")
    if digest_only:
        if is_image:
            digest, what = parse_image(read_image(path)).digest, "image"
        else:
            signed = trust.decode_signed(read_trust_file(path), unsigned_ok=True)
            digest, what = signed.envelope.digest, signed.type.words
        write_atomic(output, digest)
        click.echo(f"wrote the SHA-256 digest {digest.hex()} of {input_path} ({what}) to {output}: sign these "
                   f"32 bytes with {_scheme_words(chosen)}, then: mpboot cosign {input_path} -k PUBLIC_KEY "
                   "--attach-signature SIG")
        return
    assert key_ref is not None
    secret = password(password_env)
    access = token_access(pkcs11_module)
    with contextlib.ExitStack() as stack:
        if signature_file is not None:
            signer: Signer = AttachedSignature(signing.load_public(key_ref, secret, access, allow_private=True),
                                               _read_signature(signature_file), str(signature_file.resolve()))
        else:
            signer = stack.enter_context(signing.open_signers([key_ref], secret, chosen, access))[0]
        key = Recorder(signer)
        if is_image:
            base_addr = pack.read_hex(path)[1] if path.suffix.lower() == ".hex" else None
            data = read_image(path)
            chain = _signers([key], cert_files)[0].certificates  # parent first, whatever the order given
            slot = parse_size(slot_size, "slot size", maximum=SLOT_SIZE_LIMIT) if slot_size else None
            image = cosign(data, key, chosen, chain, slot)
            subject = _image_subject(image, input_path)
        else:
            envelope = trust.add_signature(read_trust_file(path), key, chosen)
            signed = trust.decode_signed(envelope)
            subject = {"what": signed.type.words, "input": str(input_path)}
    log_signatures(signing_log, [key], subject, out)
    keyhash = key.public().keyhash().hex()[:16]
    if is_image:
        pack.write_output(out, image, base_addr)
        count = sum(1 for t in parse_image(image).unprotected if t.type in SIGNATURE_TYPES)
        click.echo(f"cosigned {input_path} with key {keyhash} -> {out} "
                   f"({len(image)} bytes, {plural(count, 'signature')})")
        return
    write_atomic(out, envelope)
    click.echo(f"cosigned {input_path} ({signed.type.words}) with key {keyhash} "
               f"-> {out} ({plural(len(signed.envelope.signatures), 'signature')})")


def _scheme_words(scheme: SignatureScheme) -> str:
    return ("RSA-PSS (SHA-256, MGF1-SHA-256, salt 32)" if scheme is SignatureScheme.PSS
            else "RSASSA-PKCS1-v1_5 (SHA-256 DigestInfo)")


COMMANDS = (sign, cosign_cmd)

__all__ = ["COMMANDS"]
