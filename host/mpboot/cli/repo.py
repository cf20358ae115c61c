"""`mpboot repo`: a TUF repository of signed images that any static web host serves (README
"mpboot repo"). A thin face over mpboot.repo, which loads tuf only when a command runs."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from mpboot import signing
from mpboot.cli.common import (
    KEY_REF,
    check_input_file,
    password,
    password_env_option,
    pkcs11_module_option,
    read_image,
    signing_log_option,
    token_access,
)
from mpboot.errors import InputFileError, UsageError
from mpboot.keys import PublicKey, SignatureScheme
from mpboot.signing import KeyRef

_TOP_ROLES = ("root", "targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class KeyArgs:
    """The key options of a repo command: -k, --pkcs11-module, --signing-log, --password-env."""

    refs: tuple[KeyRef, ...]
    pkcs11_module: str | None
    signing_log: Path
    password_env: str | None

    @contextlib.contextmanager
    def ring(self, *, required: bool = True) -> Iterator[Any]:
        """A KeyRing of the -k keys (token sessions open for the block)."""
        from mpboot.repo.signer import KeyRing

        if required and not self.refs:
            raise UsageError("give -k KEY: the key (file or pkcs11: URI) that signs")
        with signing.open_signers(self.refs, password(self.password_env), SignatureScheme.PSS,
                                  token_access(self.pkcs11_module)) as signers:
            yield KeyRing.of(signers, self.signing_log)

    def publics(self, refs: tuple[KeyRef, ...]) -> list[PublicKey]:
        """The public halves of keys named by an option other than -k."""
        secret = password(self.password_env)
        access = token_access(self.pkcs11_module)
        return [signing.load_public(ref, secret, access, allow_private=True) for ref in refs]


def _signing(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the key options; the command gets them as one `keys: KeyArgs` argument."""

    @functools.wraps(func)
    def command(*args: Any, key_refs: tuple[KeyRef, ...], pkcs11_module: str | None, signing_log: Path,
                password_env: str | None, **kwargs: Any) -> Any:
        return func(*args, keys=KeyArgs(key_refs, pkcs11_module, signing_log, password_env), **kwargs)

    options = (
        click.option("-k", "--key", "key_refs", multiple=True, type=KEY_REF,
                     help="Private key that signs (PEM or DER file, or a token key: pkcs11:token=...;object=...); "
                          "repeat for several. Each must be a key of a role the command signs."),
        pkcs11_module_option,
        signing_log_option,
        password_env_option,
    )
    for option in reversed(options):
        command = option(command)
    return command


def _echo(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def _expires(values: tuple[str, ...]) -> dict[str, timedelta]:
    from mpboot.repo.layout import parse_period

    out = {}
    for value in values:
        role, sep, period = value.partition("=")
        if not sep or role not in _TOP_ROLES:
            raise UsageError(f"bad --expires {value!r}: expected ROLE=PERIOD, ROLE one of {', '.join(_TOP_ROLES)} "
                             "(like timestamp=1d)")
        out[role] = parse_period(period, f"{role} expiry")
    return out


REPO_ARG = click.argument("repo_dir", metavar="REPO", type=click.Path(file_okay=False, path_type=Path))


@click.group("repo")
def repo_group() -> None:
    """A TUF repository of signed images, as static files any web server, object store or
    CDN serves (REPO/public); sync stations fetch from it (mpboot sync --repo URL).

    Root (offline keys, a threshold of 2 or more) names the keys of top-level targets,
    snapshot and timestamp. Top-level targets delegates each team a role for its vendor and
    class ids (repo delegate); a team lists its signed images there (repo add). Changes are
    staged in REPO/staging, cosigned where a threshold asks for more than one key (repo
    sign), and go live with repo publish (a new snapshot and timestamp; timestamp.json is
    written last)."""


@repo_group.command("init")
@REPO_ARG
@click.option("--root-key", "root_refs", multiple=True, type=KEY_REF, required=True,
              help="A root key (public or private key file, or pkcs11: URI); repeat for each (2 or more).")
@click.option("--root-threshold", type=click.IntRange(2, 16), required=True, metavar="M",
              help="How many root keys must sign root (and each new root): 2 or more, no default.")
@click.option("--targets-key", "targets_refs", multiple=True, type=KEY_REF, required=True,
              help="A key of top-level targets (it signs delegations to teams); repeat for several.")
@click.option("--targets-threshold", type=click.IntRange(1, 16), default=1, show_default=True, metavar="T",
              help="How many targets keys must sign top-level targets.")
@click.option("--snapshot-key", "snapshot_refs", multiple=True, type=KEY_REF, required=True,
              help="The snapshot key (online: repo publish signs with it).")
@click.option("--timestamp-key", "timestamp_refs", multiple=True, type=KEY_REF, required=True,
              help="The timestamp key (online: repo publish --timestamp-only signs with it, from a timer).")
@click.option("--expires", "expires", multiple=True, metavar="ROLE=PERIOD",
              help="Expiry period of a top-level role (root=365d, targets=365d, snapshot=7d, timestamp=1d "
                   "by default); days (d) or hours (h), at most 3653d (10 years).")
@_signing
def init_cmd(repo_dir: Path, root_refs: tuple[KeyRef, ...], root_threshold: int, targets_refs: tuple[KeyRef, ...],
             targets_threshold: int, snapshot_refs: tuple[KeyRef, ...], timestamp_refs: tuple[KeyRef, ...],
             expires: tuple[str, ...], keys: KeyArgs) -> None:
    """Make a new repository in REPO (a new or empty directory): root version 1 and
    top-level targets version 1, staged and signed by the -k keys that are theirs (root keys
    missing from -k sign later with repo sign REPO root). Then: repo publish.

    Exit status: 0 done, 2 a usage, key or repository problem (nothing written)."""
    from mpboot import repo

    periods = _expires(expires)
    publics = {r: keys.publics(refs) for r, refs in (("root", root_refs), ("targets", targets_refs),
                                                              ("snapshot", snapshot_refs),
                                                              ("timestamp", timestamp_refs))}
    with keys.ring(required=False) as ring:
        _echo(repo.init(repo_dir, root_keys=publics["root"], root_threshold=root_threshold,
                        targets_keys=publics["targets"], targets_threshold=targets_threshold,
                        snapshot_keys=publics["snapshot"], timestamp_keys=publics["timestamp"], expires=periods,
                        ring=ring))


@repo_group.command("delegate")
@REPO_ARG
@click.argument("role")
@click.option("--vendor-id", required=True, metavar="UUID|NAME",
              help="The vendor the role publishes for (as mpboot sign --vendor-id: a name is hashed to a UUIDv5).")
@click.option("--class-id", "class_ids", multiple=True, required=True, metavar="UUID|NAME",
              help="A class of that vendor it publishes for; repeat for several.")
@click.option("--role-key", "role_refs", multiple=True, type=KEY_REF, required=True,
              help="A key of the team's role (public or private key file, or pkcs11: URI); repeat for several.")
@click.option("--threshold", type=click.IntRange(1, 16), required=True, metavar="T",
              help="How many of the role's keys must sign it.")
@click.option("--expires", "expires", metavar="PERIOD",
              help="Expiry period of the role's versions (default 90d; at most 3653d).")
@_signing
def delegate_cmd(repo_dir: Path, role: str, vendor_id: str, class_ids: tuple[str, ...],
                 role_refs: tuple[KeyRef, ...], threshold: int, expires: str | None, keys: KeyArgs) -> None:
    """Delegate ROLE (a team, named like acme-thermo) the images of one vendor and its
    classes: top-level targets gets the delegation (signed by the -k targets keys) and the
    role an empty first version (signed by -k keys of the team, if given). Terminating: no
    other role is searched for those paths. Live after repo publish.

    Exit status: 0 done, 2 a usage, key or repository problem (nothing written)."""
    from mpboot import repo
    from mpboot.image import class_uuid, vendor_uuid
    from mpboot.repo.layout import parse_period

    vid = vendor_uuid(vendor_id)
    scopes = [(vid, class_uuid(c, vid)) for c in class_ids]
    publics = keys.publics(role_refs)
    period = parse_period(expires, "--expires") if expires else None
    with keys.ring() as ring:
        _echo(repo.delegate(repo_dir, role, scopes=scopes, keys=publics, threshold=threshold, expires=period,
                            ring=ring))


@repo_group.command("add")
@REPO_ARG
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--role", required=True, help="The team's role that lists the images.")
@click.option("--name", help="Target file name (one IMAGE only; default: the file's name).")
@click.option("--expect-key", "expect_refs", multiple=True, type=KEY_REF,
              help="Also refuse an image that does not verify against these public keys (the devices' keys).")
@_signing
def add_cmd(repo_dir: Path, images: tuple[Path, ...], role: str, name: str | None, expect_refs: tuple[KeyRef, ...],
            keys: KeyArgs) -> None:
    """List signed images in ROLE: each must parse, carry a matching SHA256 TLV, be signed,
    and name a vendor and class id inside the role's scope. The target path is
    VENDOR-UUID/CLASS-UUID/NAME; its custom metadata (version, security counter, vendor,
    class, kind, image hash) is read from the image's signed TLVs. Staged; live after
    repo publish.

    Exit status: 0 done, 1 an image refused (outside the role's scope, unsigned, no vendor or
    class id, malformed), 2 a usage, key or repository problem (nothing written)."""
    from mpboot.repo.edit import add
    from mpboot.repo.images import image_target

    if name is not None and len(images) != 1:
        raise UsageError("--name names one image: give one IMAGE with it")
    expected = keys.publics(expect_refs)
    # An Intel hex input is listed as the binary image it holds.
    targets = [image_target(read_image(p), name or (p.stem + ".bin" if p.suffix.lower() == ".hex" else p.name),
                            str(p), expected) for p in images]
    with keys.ring() as ring:
        _echo(add(repo_dir, role, targets, ring))


@repo_group.command("remove")
@REPO_ARG
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@click.option("--role", required=True, help="The team's role that lists them.")
@_signing
def remove_cmd(repo_dir: Path, targets: tuple[str, ...], role: str, keys: KeyArgs) -> None:
    """Stop listing TARGETs (a target path, or a file name unique in the role) in ROLE. Their
    files stay under public/targets, since clients holding an older snapshot may still fetch
    them. Staged; live after repo publish.

    Exit status: 0 done, 2 a usage, key or repository problem (nothing written)."""
    from mpboot import repo

    with keys.ring() as ring:
        _echo(repo.remove(repo_dir, role, targets, ring))


@repo_group.command("sign")
@REPO_ARG
@click.argument("role")
@click.option("--digest-only", is_flag=True,
              help="Air-gapped signing, step 1: write to -o the 32-byte SHA-256 digest a signature of the staged "
                   "ROLE covers (staging its renewal first if nothing is staged).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="With --digest-only: the digest file.")
@click.option("--attach-signature", "signature_files", multiple=True, type=click.Path(path_type=Path),
              help="Air-gapped signing, step 2: a raw RSA-PSS (salt 32) signature of that digest made elsewhere, "
                   "by the -k public key (repeat both, in order, for several); refused unless it verifies.")
@_signing
def sign_cmd(repo_dir: Path, role: str, digest_only: bool, output: Path | None, signature_files: tuple[Path, ...],
             keys: KeyArgs) -> None:
    """Add your signature (-k) to the staged ROLE (root, targets or a team's role): each key
    holder in turn, until its threshold is met (root: the previous root's threshold and the
    new one's). With nothing staged for ROLE, stage its next version with a new expiry and
    sign it: a renewal. A key on an offline machine: take the digest here (--digest-only),
    sign those 32 bytes there, and add the signature here (--attach-signature).

    Exit status: 0 done, 2 a usage, key or repository problem (nothing written)."""
    from mpboot import repo
    from mpboot.files import write_atomic
    from mpboot.repo.edit import digest_for_signing
    from mpboot.repo.signer import KeyRing

    if digest_only:
        if keys.refs or signature_files:
            raise UsageError("--digest-only writes only the digest: drop -k and --attach-signature")
        if output is None:
            raise UsageError("--digest-only: give -o FILE for the digest")
        digest, lines = digest_for_signing(repo_dir, role)
        write_atomic(output, digest)
        _echo(lines)
        click.echo(f"wrote the SHA-256 digest {digest.hex()} of the staged {role} to {output}: sign these 32 bytes "
                   f"with RSA-PSS (SHA-256, MGF1-SHA-256, salt 32), then: mpboot repo sign REPO {role} "
                   "-k PUBLIC_KEY --attach-signature SIG")
        return
    if output is not None:
        raise UsageError("-o goes with --digest-only")
    if signature_files:
        if len(signature_files) != len(keys.refs):
            raise UsageError("give each --attach-signature its public key with -k, in the same order")
        attached = [signing.AttachedSignature(key, _read_signature(path), str(path.resolve()))
                    for key, path in zip(keys.publics(keys.refs), signature_files)]
        _echo(repo.sign(repo_dir, role, KeyRing.of(attached, keys.signing_log), staged_only=True))
        return
    with keys.ring() as ring:
        _echo(repo.sign(repo_dir, role, ring))


def _read_signature(path: Path) -> bytes:
    """A raw signature file (at most an RSA-3072 signature's 384 bytes)."""
    path = check_input_file(path, "a signature")
    if path.stat().st_size > 384:
        raise InputFileError(f"{path}: {path.stat().st_size} bytes: not a raw RSA signature (256 or 384 bytes)")
    return path.read_bytes()


@repo_group.command("rotate")
@REPO_ARG
@click.argument("role")
@click.option("--add", "add_refs", multiple=True, type=KEY_REF,
              help="A key to add to ROLE (public or private key file, or pkcs11: URI); repeat for several.")
@click.option("--remove", "remove_ids", multiple=True, metavar="KEYID",
              help="A key to remove: its TUF key id or mpboot key hash, hex, 8 digits or more (repo status).")
@click.option("--threshold", type=click.IntRange(1, 16), metavar="T", help="ROLE's new threshold.")
@_signing
def rotate_cmd(repo_dir: Path, role: str, add_refs: tuple[KeyRef, ...], remove_ids: tuple[str, ...],
               threshold: int | None, keys: KeyArgs) -> None:
    """Change ROLE's keys or threshold. root, targets, snapshot and timestamp keys live in
    root: a new root version is staged, which the previous root's threshold of keys and the
    new root's must both sign (-k now, repo sign later). A team's keys live in top-level
    targets (signed by the targets keys). Where the role's live version would no longer
    verify, it is staged again for its new keys to sign. Live after repo publish: a client
    holding the old root walks to the new one.

    Exit status: 0 done, 2 a usage, key or repository problem (nothing written)."""
    from mpboot import repo

    publics = keys.publics(add_refs)
    with keys.ring() as ring:
        _echo(repo.rotate(repo_dir, role, add_keys=publics, remove_keys=remove_ids, threshold=threshold, ring=ring))


@repo_group.command("publish")
@REPO_ARG
@click.option("--timestamp-only", is_flag=True,
              help="Only a new timestamp over the published snapshot, with the timestamp key (from a timer, "
                   "every few hours for a 1d expiry); staged changes wait.")
@_signing
def publish_cmd(repo_dir: Path, timestamp_only: bool, keys: KeyArgs) -> None:
    """Make every staged change that is signed enough live under REPO/public: image files,
    then role metadata, root, a new snapshot (-k snapshot key), and timestamp.json last
    (-k timestamp key), each written whole. A change still short of signatures stays staged.
    Refused, with nothing written, when clients could not verify the result.

    Upload REPO/public in the same order (targets/, then metadata/, timestamp.json last).

    Exit status: 0 done, 2 a usage, key or repository problem (nothing written)."""
    from mpboot import repo

    with keys.ring() as ring:
        _echo(repo.publish(repo_dir, ring, timestamp_only=timestamp_only))


@repo_group.command("status")
@REPO_ARG
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {repository, time, roles: [{role, period, threshold, keys: [{keyid, keyhash}], "
                   "paths, published: {version, expires, expired}, staged: {version, signatures, ready}, "
                   "targets}], staged_files, warnings}.")
@click.option("--verify", is_flag=True,
              help="Also run python-tuf's client over REPO/public as it is on disk, from root version 1, and "
                   "fetch every listed image: what a station would see (before uploading it).")
@click.option("--check", is_flag=True, help="Exit 1 when there is a warning (for monitoring).")
def status_cmd(repo_dir: Path, as_json: bool, verify: bool, check: bool) -> None:
    """Show each role: published version and expiry, staged version and its signatures, keys
    (TUF key id and mpboot key hash), threshold, each team's paths and targets; then
    warnings: a role expired, or expiring soon (timestamp: within half its period; others:
    within a fifth of theirs, or one timestamp period); with --verify, a client's refusal.

    Exit status: 0 (with --check: 0 no warning, 1 a warning), 2 not a repository."""
    from mpboot import repo

    report = repo.status(repo_dir, verify=verify)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if check and report["warnings"]:
        raise click.exceptions.Exit(1)


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _print_status(report: dict[str, Any]) -> None:
    click.echo(f"repository {report['repository']} at {report['time']}")
    for r in report["roles"]:
        pub = r.get("published")
        state = (f"version {pub['version']}, expires {pub['expires']}{' EXPIRED' if pub['expired'] else ''}"
                 if pub else "not published")
        click.echo(f"{r['role']}: {state} (period {r['period']}, threshold {r.get('threshold', '-')})")
        for k in r.get("keys", []):
            click.echo(f"  key {k['keyid'][:16]}  keyhash {k['keyhash'][:16]}")
        for p in r.get("paths", []):
            click.echo(f"  paths {p}")
        for t in r.get("targets", []) or []:
            click.echo(f"  target {t['path']}  {t['version'] or '-'}  counter {_text(t['counter'])}  "
                       f"{t['kind'] or '-'}  {t['length']} bytes")
        staged = r.get("staged")
        if staged:
            click.echo(f"  staged version {staged['version']}: signed by {staged['signatures']}, "
                       f"{'ready to publish' if staged['ready'] else 'waiting for signatures'}")
    for f in report["staged_files"]:
        click.echo(f"staged file {f}")
    client = report.get("client")
    if client is not None and client["error"] is None:
        click.echo(f"client check: root version {client['root_version']}, {client['targets']} listed image(s) "
                   "found and verified")
    for w in report["warnings"]:
        click.echo(f"warning: {w}")


COMMANDS = (repo_group,)

__all__ = ["COMMANDS"]
