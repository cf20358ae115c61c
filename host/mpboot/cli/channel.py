"""The `channel` commands: make and show channel records (docs/KEYS.md section 3, type 4), the
signed statement devices pull (`mpboot.pull` on the device, README "Device pull")."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import click

from mpboot.cli.common import (
    KEY_REF,
    check_input_file,
    log_signatures,
    password,
    password_env_option,
    pkcs11_module_option,
    read_trust_file,
    scheme_option,
    signing_log_option,
    token_access,
)
from mpboot.signing import KeyRef

U32_MAX = 0xFFFFFFFF


@click.group("channel")
def channel_group() -> None:
    """Channel records: which image a channel of one vendor and class points at, for devices
    that pull (docs/KEYS.md, docs/FLEET.md)."""


@channel_group.command("sign")
@click.argument("image_path", metavar="IMAGE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default="stable", show_default=True,
              help="Channel name (1..16 characters): a device takes only records of the channel it follows.")
@click.option("--number", type=click.IntRange(1, U32_MAX),
              help="Channel number: above every earlier record of this channel (devices refuse a lower one). "
                   "Default: one more than the record in -o FILE, when it exists (a record of this "
                   "channel name, vendor and class).")
@click.option("--path", "image_url",
              help="The image's URL relative to the record's (default: IMAGE's file name); no '..' or scheme.")
@click.option("--cert", "cert_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Certificate of a delegated signer (mpboot key delegate; its scope must allow the channel "
                   "kind, this vendor, class and counter); repeat for a chain, parent first.")
@click.option("-k", "--key", "key_refs", multiple=True, type=KEY_REF, required=True,
              help="Private key that signs it (file, or a token key's pkcs11: URI): the roots for a threshold, "
                   "or one certified key (with --cert). Repeat for each.")
@scheme_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Channel record file to write (CBOR), e.g. channels/VENDOR/CLASS/stable.cbor.")
@click.option("--repo", "repo_path", type=click.Path(file_okay=False, path_type=Path),
              help="Instead of -o and --path: a repository made by mpboot repo where IMAGE is published; the "
                   "record goes beside it, REPO/public/targets/VID/CID/NAME.cbor, naming its published file.")
@pkcs11_module_option
@signing_log_option
@password_env_option
def sign_cmd(image_path: Path, name: str, number: int | None, image_url: str | None, cert_paths: tuple[Path, ...],
             key_refs: tuple[KeyRef, ...], scheme: str, output: Path | None, repo_path: Path | None,
             pkcs11_module: str | None, signing_log: Path, password_env: str | None) -> None:
    """Write a channel record naming IMAGE (a signed image, published as is): its SHA-256,
    length, version, security counter, vendor and class ids are read from IMAGE.

    With --repo, IMAGE must be published in that repository (mpboot repo add, publish): the
    record is written beside its file, with the path of that file and, without --number, one
    more than the number of the record it replaces (1 for a channel's first). Devices pull
    BASE/targets/VID/CID/NAME.cbor, BASE being where public/ is served; upload the image
    before the record (README "Device pull").

    Exit status: 0 written; 1 IMAGE does not parse; 2 usage or file problem (an image
    without vendor/class ids, no --number and no earlier -o FILE, or an -o FILE that is not
    a record of this channel, vendor and class to count from, a record over 4096 bytes, with
    --repo: an image not published there, a --number not above the record there)."""
    from mpboot import channel
    from mpboot.errors import UsageError

    if (output is None) == (repo_path is None):
        raise UsageError("give -o FILE, or --repo REPO (the record goes beside the published image)")
    if repo_path is not None and image_url is not None:
        raise UsageError("--path is the published file's with --repo: drop --path")
    image = check_input_file(image_path, "an image").read_bytes()
    certs = [read_trust_file(p, "a certificate") for p in cert_paths]
    signing = (key_refs, scheme, pkcs11_module, signing_log, password_env)
    if repo_path is not None:
        with channel.repo_channel(repo_path, image, name=name, number=number) as place:
            _sign_record(image, name, place.number, place.path, certs, signing, place.record_file)
        was = f"replaces number {place.replaces}" if place.replaces is not None else "the channel's first"
        click.echo(f"devices pull BASE/{place.url_path} ({was}; {place.role} lists {place.target})")
        return
    assert output is not None
    if number is None:
        if not output.exists():
            raise UsageError(f"give --number N ({output} does not exist yet to count from)")
        number = channel.next_number(output, image, name)
    _sign_record(image, name, number, image_url if image_url is not None else image_path.name, certs, signing,
                 output)


def _sign_record(image: bytes, name: str, number: int, path: str, certs: list[bytes],
                 signing: tuple[tuple[KeyRef, ...], str, str | None, Path, str | None], output: Path) -> None:
    """Sign the record and write it to `output` (signatures logged first)."""
    from mpboot import channel, trust
    from mpboot.errors import UsageError
    from mpboot.files import write_atomic
    from mpboot.keys import SignatureScheme
    from mpboot.signing import Recorder, open_signers

    key_refs, scheme, pkcs11_module, signing_log, password_env = signing
    body = channel.channel_body(image, name=name, number=number, path=path, certificates=certs)
    sig_scheme = SignatureScheme(scheme)
    with open_signers(key_refs, password(password_env), sig_scheme, token_access(pkcs11_module)) as signers:
        recorders = [Recorder(s) for s in signers]
        data = trust.sign_envelope(body, recorders, sig_scheme)
    if len(data) > trust.MAX_RECORD_SIZE:
        raise UsageError(f"signed, it would be {len(data)} bytes, over the {trust.MAX_RECORD_SIZE} a device takes")
    log_signatures(signing_log, recorders, {"what": "channel record", "channel": name, "number": number}, output)
    write_atomic(output, data)
    click.echo(f"wrote channel record {name} number {number} -> {output} ({len(data)} bytes): {path}, "
               f"{len(image)} bytes, sha256 {body.sha256.hex()[:16]}, counter {body.counter}")


@channel_group.command("show")
@click.argument("record_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {name, number, vendor_id, class_id, version, counter, length, sha256, path, "
                   "certificates, signatures}.")
def show_cmd(record_path: Path, as_json: bool) -> None:
    """Decode a channel record (checks its format, not its signatures: the device checks them
    against its own roots).

    Exit status: 0 shown; 1 not a well-formed channel record; 2 file problem."""
    from mpboot import channel

    info = channel.read_channel(read_trust_file(record_path, "a channel record"))
    r = info.record
    out = {"name": r.name, "number": r.number, "vendor_id": str(uuid.UUID(bytes=r.vendor_id)),
           "class_id": str(uuid.UUID(bytes=r.class_id)), "version": str(info.version), "counter": r.counter,
           "length": r.length, "sha256": r.sha256.hex(), "path": r.path, "certificates": len(r.certificates),
           "signatures": [{"keyhash": s.keyhash.hex(), "alg": s.alg.name} for s in info.envelope.signatures],
           "size": info.size}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for k in ("name", "number", "vendor_id", "class_id", "version", "counter", "length", "sha256", "path",
              "certificates"):
        click.echo(f"{k + ':':<14} {out[k]}")
    for s in out["signatures"]:  # type: ignore[attr-defined]
        click.echo(f"{'signature:':<14} key hash {s['keyhash']} {s['alg']}")


COMMANDS = (channel_group,)

__all__ = ["COMMANDS"]
