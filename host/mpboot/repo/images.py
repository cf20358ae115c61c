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
    custom = custom_of(image)
    if custom is None:
        raise TargetRefused(f"{where}: no vendor and class ids (UUID_VID, UUID_CID): a repository serves each "
                            "vendor and class; sign it with --vendor-id and --class-id")
    name = check_name(name)
    ids = custom["mpboot"]
    return ImageTarget(f"{ids['vendor']}/{ids['class']}/{name}", name, image, custom)


def custom_of(image: PreparedImage) -> dict[str, Any] | None:
    """The custom metadata a target carries for `image`, from its signed TLVs (None: the image
    has no SHA256 TLV or no vendor and class ids, so it cannot be a target). The one writer of
    the format: a client downloading a target compares what it was told with this."""
    parsed = image.parsed
    vendor, klass = parsed.vendor_id, parsed.class_id
    if image.hash is None or vendor is None or klass is None or len(vendor) != 16 or len(klass) != 16:
        return None
    v = parsed.header.version
    return {"mpboot": {
        "version": [v.major, v.minor, v.revision, v.build],
        "counter": parsed.security_counter or 0,
        "vendor": uuid_text(vendor),
        "class": uuid_text(klass),
        "kind": KIND_WORDS.get(parsed.kind, str(parsed.kind)),
        "image_hash": image.hash.hex(),
    }}


def custom_mismatch(custom: object, image: PreparedImage) -> str | None:
    """Why a target's custom metadata does not describe `image` (None: it does, field for
    field). For a client after download: a role key that lies about the counter or ids is
    caught here, before anything reaches a device."""
    expected = custom_of(image)
    if expected is None:
        return "the image has no SHA256 TLV or no vendor and class ids"
    told = custom.get("mpboot") if isinstance(custom, dict) else None
    if not isinstance(told, dict):
        return "no mpboot custom metadata"
    for key, value in expected["mpboot"].items():
        if told.get(key) != value:
            return f"custom {key} {told.get(key)!r}, but the image says {value!r}"
    return None
