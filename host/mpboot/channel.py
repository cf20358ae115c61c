"""Channel records (docs/KEYS.md section 3, type 4): the small signed statement a device pulls
(`mpboot.pull` on the device, firmware/mpboot/puller.py) to learn which image its channel ("stable", "beta") points at.

`channel_record` makes one from a signed image: the image's SHA-256, length, version, security
counter, vendor and class ids are read from the image itself, so the record cannot name an
image other than the file it was made from. The device takes a record only with a number not
below the highest it has taken (equal only with the same body), signed by a root threshold or
by a key certified for kind channel (trust.CHANNEL_KIND) and this vendor, class and counter.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def next_number(previous: Path) -> int:
    """One more than the number of the channel record in `previous` (the file being replaced)."""
    info = read_channel(previous.read_bytes())
    if info.record.number >= trust.U32_MAX:
        raise UsageError(f"{previous} has the highest channel number there is")
    return info.record.number + 1


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
            for cert in r.certificates:
                walk.certificate(cert)
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


__all__ = ["check_channel", "TAKEN_DIGEST_SIZE", "DEFAULT_NAME", "ChannelInfo", "channel_body", "channel_record", "next_number", "read_channel"]
