"""Channel records (docs/KEYS.md section 3, type 4): the small signed statement a device pulls
(`mpboot.pull` on the device, firmware/mpboot/puller.py) to learn which image its channel ("stable", "beta") points at.

`channel_record` makes one from a signed image: the image's SHA-256, length, version, security
counter, vendor and class ids are read from the image itself, so the record cannot name an
image other than the file it was made from. The device takes a record only with a number not
below the highest it has taken (equal only with the same body), signed by a root threshold or
by a key certified for kind channel (trust.CHANNEL_KIND) and this vendor, class and counter.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpboot import trust
from mpboot.errors import ChannelRefused, ImageRejected, PullErrorCode, TrustErrorCode, TrustRefused, UsageError
from mpboot.image import ImageVersion, parse_image
from mpboot.keys import SignatureScheme
from mpboot.signing import Signer

DEFAULT_NAME = "stable"


@dataclass(frozen=True)
class ChannelInfo:
    """A channel record file read back: its body and envelope (signatures not checked here:
    the device checks them against its own roots)."""

    record: trust.ChannelRecord
    envelope: trust.Envelope
    size: int

    @property
    def version(self) -> ImageVersion:
        major, minor, revision, build = struct.unpack("<BBHI", self.record.version)
        return ImageVersion(major, minor, revision, build)


def channel_body(image: bytes, *, name: str, number: int, path: str,
                 certificates: Sequence[bytes] = ()) -> trust.ChannelRecord:
    """The channel record body for the signed image `image` (its bytes, as devices will fetch
    them from `path`, relative to the record's URL). UsageError for an image without vendor or
    class id (a device checks both against its own), ImageRejected for one that does not parse."""
    parsed = parse_image(image)
    if parsed.total_size != len(image):
        raise UsageError(f"the image file has {len(image) - parsed.total_size} bytes after its TLV area: "
                         "publish the image exactly as signed")
    if parsed.vendor_id is None or parsed.class_id is None:
        raise UsageError("the image has no vendor or class id (sign it with --vendor-id and --class-id): a device "
                         "takes a channel record only for its own vendor and class")
    for data in certificates:
        signed = trust.decode_signed(data)
        if not isinstance(signed.body, trust.Certificate):
            raise UsageError(f"a {signed.type.words} is not a certificate")
    h = parsed.header.version
    return trust.ChannelRecord(
        number=number, name=name, vendor_id=parsed.vendor_id, class_id=parsed.class_id,
        sha256=hashlib.sha256(image).digest(), length=len(image),
        version=struct.pack("<BBHI", h.major, h.minor, h.revision, h.build),
        counter=parsed.security_counter or 0, path=path, certificates=tuple(certificates))


def channel_record(image: bytes, signers: Sequence[Signer], scheme: SignatureScheme, *, name: str, number: int,
                   path: str, certificates: Sequence[bytes] = ()) -> bytes:
    """A signed channel record (envelope bytes) naming `image`: see channel_body. Each of
    `signers` signs (roots for a threshold, or one certified key whose certificate chain is
    `certificates`, parent first)."""
    if not signers:
        raise UsageError("a channel record needs at least one signature")
    data = trust.sign_envelope(channel_body(image, name=name, number=number, path=path,
                                            certificates=certificates), signers, scheme)
    if len(data) > trust.MAX_RECORD_SIZE:
        raise UsageError(f"signed, the channel record would be {len(data)} bytes, over the "
                         f"{trust.MAX_RECORD_SIZE} a device takes")
    return data


def read_channel(data: bytes) -> ChannelInfo:
    """A channel record's bytes decoded and checked by the format rules (TrustRefused
    MALFORMED or TOO_LARGE otherwise; also for another kind of record)."""
    if len(data) > trust.MAX_RECORD_SIZE:
        raise TrustRefused(TrustErrorCode.TOO_LARGE, f"{len(data)} bytes")
    signed = trust.decode_signed(data)
    if not isinstance(signed.body, trust.ChannelRecord):
        raise TrustRefused(TrustErrorCode.MALFORMED, f"a {signed.type.words}, not a channel record")
    return ChannelInfo(signed.body, signed.envelope, len(data))


def next_number(previous: Path, image: bytes, name: str) -> int:
    """One more than the number of the channel record in `previous` (the file being replaced
    by a record of channel `name` naming `image`). UsageError, naming the file, when it is not
    a channel record, or one of another channel name, vendor or class (its number says nothing
    about this channel's)."""
    try:
        old = read_channel(previous.read_bytes()).record
    except TrustRefused as err:
        raise UsageError(f"{previous}: not a channel record ({err.detail}); nothing written") from None
    parsed = parse_image(image)
    ids = (parsed.vendor_id, parsed.class_id)
    if None not in ids and (old.name, old.vendor_id, old.class_id) != (name, *ids):  # (no ids: channel_body says so)
        raise UsageError(f"{previous}: a record of channel {old.name!r} of another product, not this image's "
                         f"channel {name!r}: give --number, or -o that channel's file; nothing written")
    if old.number >= trust.U32_MAX:
        raise UsageError(f"{previous} has the highest channel number there is")
    return old.number + 1


# The bytes of a record's signed digest a device keeps beside the highest number it took
# (firmware/mpboot/trust.py, TrustStore.channel): an equal number with another body is refused.
TAKEN_DIGEST_SIZE = 24


def check_channel(data: bytes, state: trust.TrustState, *, vendor_id: bytes, class_id: bytes, name: str,
                  taken: int = 0, taken_digest: bytes = b"", floor: int = 0) -> trust.ChannelRecord:
    """The record in `data` as a device with this trust state, vendor, class, channel name,
    highest number taken (and its record's digest prefix) and counter floor takes it, by the
    device's checks in the device's order (firmware/mpboot/channel.py parse, check): TOO_LARGE,
    RECORD, PRODUCT, STALE, SIGNATURE, IMAGE (counter below the floor). ChannelRefused
    otherwise."""
    from mpboot.image import SignerWalk  # the image walk's certificate rules, shared (KEYS.md 4)

    if len(data) > trust.MAX_RECORD_SIZE:
        raise ChannelRefused(PullErrorCode.TOO_LARGE, f"{len(data)} bytes")
    try:
        info = read_channel(data)
    except TrustRefused as err:
        raise ChannelRefused(PullErrorCode.RECORD, err.detail) from None
    r = info.record
    if r.name != name or r.vendor_id != vendor_id or r.class_id != class_id:
        raise ChannelRefused(PullErrorCode.PRODUCT, f"channel {r.name!r} of vendor {r.vendor_id.hex()} class "
                                                    f"{r.class_id.hex()}")
    env = info.envelope
    if r.number < taken or r.number == taken and env.digest[:len(taken_digest)] != taken_digest:
        raise ChannelRefused(PullErrorCode.STALE, f"number {r.number}, the device has taken {taken}")

    def bad(detail: str) -> ChannelRefused:
        return ChannelRefused(PullErrorCode.SIGNATURE, detail)

    if len(env.verified_signers(state.trusted_roots(), bad)) < state.threshold:
        walk = SignerWalk(state, None)  # type: ignore[arg-type]  # (certificates use only the state)
        try:
            for data_cert in r.certificates:
                walk.certificate(data_cert)
        except ImageRejected as err:
            raise bad(f"a certificate: {err}") from None
        for sig in env.signatures:
            signer = walk.certified.get(sig.keyhash)
            if signer is None:
                continue
            cert = signer.certificate
            assert cert is not None
            if not cert.covers(r.vendor_id, r.class_id, r.counter, trust.CHANNEL_KIND):
                raise bad(f"certificate serial {cert.serial} does not cover this channel record")
            env.check_signature(sig, signer.key, bad)
            break
        else:
            raise bad(f"not signed by {state.threshold} root(s) or a key certified for channel records")
    if r.counter < floor:
        raise ChannelRefused(PullErrorCode.IMAGE, f"security counter {r.counter} below the floor {floor}")
    return r


# --- beside a TUF repository made by `mpboot repo` ---------------------------------------------

# A channel's record file in a repository: REPO/public/targets/<vid>/<cid>/<channel>.cbor. Its
# name cannot be a target file's (<64 hex digits>.<name>), nor leave the folder.
_CHANNEL_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}\Z")


@dataclass(frozen=True)
class RepoChannel:
    """Where a channel record of a published image goes in a repository made by `mpboot repo`
    (README "Device pull"): beside the image, in its vendor's and class's targets folder."""

    record_file: Path  # REPO/public/targets/<vid>/<cid>/<channel>.cbor
    image_file: Path  # REPO/public/targets/<vid>/<cid>/<sha256>.<name> (consistent snapshots)
    path: str  # the image's path relative to the record: "<sha256>.<name>"
    target: str  # its TUF target path "<vid>/<cid>/<name>"
    role: str  # the team role listing it
    number: int  # the number the new record takes
    replaces: int | None  # the number of the record it replaces (None: the channel's first)

    @property
    def url_path(self) -> str:
        """The record's path under the served public/ folder: <base>/<this> is what devices pull."""
        return f"targets/{self.target.rsplit('/', 1)[0]}/{self.record_file.name}"


def _published_targets(repo: Any) -> list[tuple[str, str, Any]]:
    """(role, target path, TargetFile) of every target the published repository lists: the
    roles and versions of the snapshot that timestamp.json names, as a client sees them."""
    found = repo.read_published("timestamp")
    if found is None:
        raise UsageError(f"{repo.path}: nothing published yet (mpboot repo publish)")
    snapshot = repo.read_published("snapshot", found[0].signed.snapshot_meta.version)
    if snapshot is None:
        raise UsageError(f"{repo.path}: the snapshot timestamp.json names is missing from public/metadata")
    out = []
    for file_name, meta in sorted(snapshot[0].signed.meta.items()):
        role = file_name.removesuffix(".json")
        md = repo.read_published(role, meta.version)
        if md is None:
            raise UsageError(f"{repo.path}: {meta.version}.{file_name} (in the snapshot) is missing from public/metadata")
        out += [(role, path, tf) for path, tf in sorted(md[0].signed.targets.items())]
    return out


@contextlib.contextmanager
def repo_channel(repo_path: Path, image: bytes, *, name: str, number: int | None = None) -> Iterator[RepoChannel]:
    """Where the record of channel `name` naming `image` goes in the repository at
    `repo_path`, with the repository's write lock held (so no publish, and no other channel
    record, runs meanwhile). `image` must be listed by the published metadata (a target whose
    SHA-256 and length are the image's, under its vendor's and class's folder) and its file
    published with exactly these bytes; UsageError (RepositoryError: not a repository, or
    locked) otherwise. The number: one more than the record there, or `number` (above it)."""
    from mpboot.repo.images import uuid_text
    from mpboot.repo.layout import RepoDir

    if not _CHANNEL_FILE_RE.match(name):
        raise UsageError(f"channel name {name!r}: in a repository it names a file, so 1..16 letters, digits, "
                         "'_' and '-', starting with a letter or digit")
    parsed = parse_image(image)
    if parsed.vendor_id is None or parsed.class_id is None:
        raise UsageError("the image has no vendor or class id: it cannot be a repository target")
    digest = hashlib.sha256(image).hexdigest()
    folder = f"{uuid_text(parsed.vendor_id)}/{uuid_text(parsed.class_id)}"
    repo = RepoDir(repo_path)
    with repo.locked():
        listed = [(role, path) for role, path, tf in _published_targets(repo)
                  if path.startswith(folder + "/") and tf.length == len(image) and tf.hashes.get("sha256") == digest]
        if not listed:
            raise UsageError(f"the image (sha256 {digest[:16]}, vendor/class {folder}) is not published in "
                             f"{repo_path}: mpboot repo add, then mpboot repo publish, before its channel record")
        role, target = listed[0]
        rel = f"{digest}.{target.rsplit('/', 1)[1]}"
        if len(rel) > trust.MAX_CHANNEL_PATH:
            raise UsageError(f"the published file name {rel} is over the {trust.MAX_CHANNEL_PATH} characters a "
                             "channel record's path may have: publish the image under a shorter name")
        image_file = repo.targets / folder / rel
        if not image_file.is_file() or image_file.read_bytes() != image:
            raise UsageError(f"{image_file}: missing or not the image the metadata lists (upload public/ as "
                             "mpboot repo publish wrote it)")
        record_file = repo.targets / folder / f"{name}.cbor"
        replaces = None
        if record_file.exists():
            try:
                old = read_channel(record_file.read_bytes()).record
            except TrustRefused as err:
                raise UsageError(f"{record_file}: not a channel record ({err.detail}); nothing written") from None
            if (old.name, old.vendor_id, old.class_id) != (name, parsed.vendor_id, parsed.class_id):
                raise UsageError(f"{record_file}: a record of channel {old.name!r} of another product; "
                                 "nothing written")
            replaces = old.number
            if old.number >= trust.U32_MAX:
                raise UsageError(f"{record_file} has the highest channel number there is")
        if number is None:
            number = 1 if replaces is None else replaces + 1
        elif replaces is not None and number <= replaces:
            raise UsageError(f"--number {number}: the record it replaces has number {replaces}, and devices that "
                             "took it refuse a lower or equal one")
        yield RepoChannel(record_file, image_file, rel, target, role, number, replaces)


__all__ = ["RepoChannel", "repo_channel", "check_channel", "TAKEN_DIGEST_SIZE", "DEFAULT_NAME", "ChannelInfo", "channel_body", "channel_record", "next_number", "read_channel"]
