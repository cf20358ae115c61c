"""Signed mpboot images as TUF targets: the target path, the checks an image must pass, and
the custom metadata, always taken from the image's own signed TLVs.

    path    "<vendor uuid>/<class uuid>/<name>"  (dashed lower-case UUIDs)
    custom  {"mpboot": {"version": [maj, min, rev, build], "counter": SEC_CNT (0: none),
             "vendor": uuid, "class": uuid, "kind": "app"|"updater"|"firmware",
             "image_hash": SHA256 TLV hex}}

The role's key says "this team publishes this file for this product now"; the image's
signature is still what a device trusts (TUF never replaces the device's check).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from mpboot.errors import ImageRejected, TargetRefused
from mpboot.flashing import PreparedImage, prepare
from mpboot.image import SIGNATURE_TYPES, verify_image
from mpboot.keys import PublicKey
from mpboot.trust import ImageKind

KIND_WORDS: Final = {int(ImageKind.APP): "app", int(ImageKind.UPDATER): "updater", int(ImageKind.FIRMWARE): "firmware"}
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$")


def uuid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))


def scope_pattern(vendor_id: bytes, class_id: bytes) -> str:
    """A delegated role's path pattern for one vendor and class: `*` never crosses a '/'."""
    return f"{uuid_text(vendor_id)}/{uuid_text(class_id)}/*"


def check_name(name: str) -> str:
    """A target's file name: letters, digits, '.', '_', '+', '-', at most 128, not starting with '.'."""
    if not _NAME_RE.match(name):
        raise TargetRefused(f"bad target name {name!r}: letters, digits, '.', '_', '+' and '-', at most 128, "
                            "not starting with '.' (give --name)")
    return name


@dataclass(frozen=True)
class ImageTarget:
    """An image checked for a repository: its target path, custom metadata and bytes."""

    path: str
    name: str
    image: PreparedImage
    custom: dict[str, Any]

    @property
    def data(self) -> bytes:
        return self.image.data


def image_target(data: bytes, name: str, where: str, expect_keys: Sequence[PublicKey] = ()) -> ImageTarget:
    """Check an image for a repository (TargetRefused, nothing written): it parses, carries a
    SHA256 TLV that matches, is signed (and verifies against `expect_keys` when given), and
    names its vendor and class ids; then its target path and custom metadata."""
    try:
        image = prepare(data)
        if expect_keys:
            verify_image(data, list(expect_keys))
    except ImageRejected as err:
        raise TargetRefused(f"{where}: {err}") from None
    parsed = image.parsed
    if image.hash is None:
        raise TargetRefused(f"{where}: no SHA256 TLV: devices name images by it")
    if not any(t.type in SIGNATURE_TYPES for t in parsed.unprotected):
        raise TargetRefused(f"{where}: unsigned: sign it first (mpboot sign, mpboot cosign)")
    vendor, klass = parsed.vendor_id, parsed.class_id
    if vendor is None or klass is None or len(vendor) != 16 or len(klass) != 16:
        raise TargetRefused(f"{where}: no vendor and class ids (UUID_VID, UUID_CID): a repository serves each "
                            "vendor and class; sign it with --vendor-id and --class-id")
    v = parsed.header.version
    custom = {"mpboot": {
        "version": [v.major, v.minor, v.revision, v.build],
        "counter": parsed.security_counter or 0,
        "vendor": uuid_text(vendor),
        "class": uuid_text(klass),
        "kind": KIND_WORDS.get(parsed.kind, str(parsed.kind)),
        "image_hash": image.hash.hex(),
    }}
    name = check_name(name)
    return ImageTarget(f"{uuid_text(vendor)}/{uuid_text(klass)}/{name}", name, image, custom)
