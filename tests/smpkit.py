"""Image header tweaks for SMP tests (house rule 11: their one home).

    new = with_version(Path("app.signed.bin").read_bytes(), "1.2.3")

Built with the host library (mpboot.image.assemble_image), so the SHA256 TLV is recomputed
exactly as `mpboot sign` lays an image out.
"""

from __future__ import annotations

import dataclasses

from mpboot.image import ImageVersion, Tlv, TlvType, assemble_image, parse_image


def with_version(image: bytes, version: str, *, payload_size: int | None = None) -> bytes:
    """`image` (an MCUboot image whose only unprotected TLV is its SHA256, as the Zephyr
    fixtures' images built without signature checks are) with another version in its header
    and, when `payload_size` is given, its payload cut to that many bytes; the SHA256 TLV is
    recomputed, the protected TLVs kept. MCUboot without signature checks takes the result as
    a new image."""
    parsed = parse_image(image)
    kinds = {t.type for t in parsed.unprotected}
    if kinds != {TlvType.SHA256}:
        raise ValueError(f"the image carries more than a SHA256 TLV ({sorted(kinds)}): re-sign it instead")
    h = parsed.header
    size = h.img_size if payload_size is None else payload_size
    if not 0 < size <= h.img_size:
        raise ValueError(f"payload_size {size} is not within the image's 1..{h.img_size} bytes")
    header = dataclasses.replace(h, version=ImageVersion.parse(version), img_size=size)
    body = image[: h.hdr_size + size]
    return assemble_image(header, body, parsed.protected, lambda digest: [Tlv(TlvType.SHA256, digest)])
