"""The flashing workflow: upload an image (resuming where the device is), mark it for a test
boot or make it permanent, reset. Transport-agnostic: the CLI runs it over serial; tests and
the BLE transport reuse it as it is."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mpboot.errors import ImageErrorCode, ImageRejected, ProtocolError
from mpboot.image import ParsedImage, TlvType, parse_image
from mpboot.smp.client import ProgressCallback, SlotState, SMPClient
from mpboot.smp.upload import UploadResult


class Mark(StrEnum):
    """What to do with the image once it is on the device."""

    NONE = "none"  # leave it: it does not boot until marked
    TEST = "test"  # boot it once at the next reset; it reverts unless the app confirms it
    CONFIRM = "confirm"  # boot it from the next reset on, without a test boot


@dataclass(frozen=True)
class PreparedImage:
    """What the host reads from an image before sending it."""

    data: bytes
    parsed: ParsedImage
    hash: bytes | None  # the SHA256 TLV: how the device names the image in state requests
    ptlv: bytes | None  # the protected TLV area, sent with the first upload request

    @property
    def version(self) -> str:
        return str(self.parsed.header.version)


@dataclass(frozen=True)
class FlashResult:
    image: PreparedImage
    upload: UploadResult
    mark: Mark
    slot: SlotState | None  # the device's entry for the image after upload (and marking)
    reset: bool


def prepare(data: bytes) -> PreparedImage:
    """Parse the image (ImageRejected if malformed) and take its hash and protected TLVs.
    A SHA256 TLV that does not match the image is refused here, before any transfer."""
    parsed = parse_image(data)
    h = parsed.header
    hashes = [t.value for t in parsed.unprotected if t.type == TlvType.SHA256]
    digest = hashes[0] if len(hashes) == 1 and len(hashes[0]) == 32 else None
    if digest is not None and digest != parsed.digest:
        raise ImageRejected(ImageErrorCode.HASH_MISMATCH)
    start = h.hdr_size + h.img_size
    ptlv = data[start : start + h.protect_tlv_size] if h.protect_tlv_size else None
    return PreparedImage(bytes(data), parsed, digest, ptlv)


async def flash(client: SMPClient, image: bytes | PreparedImage, *, mark: Mark = Mark.NONE,
                reset: bool = False, progress: ProgressCallback | None = None,
                window: int | None = None, timeout: float | None = None) -> FlashResult:
    """Upload `image`, then mark it (Mark.TEST: one test boot; Mark.CONFIRM: permanent) and
    reset the device if asked. Errors: the SMPError family (refused, verification failed),
    DeviceSilent, TransportError, ImageRejected (malformed or unmarkable image, found before
    anything is sent)."""
    prepared = image if isinstance(image, PreparedImage) else prepare(image)
    mark = Mark(mark)
    if mark is not Mark.NONE and prepared.hash is None:
        raise ImageRejected(ImageErrorCode.NO_HASH, "the device names images by it: cannot mark this one")
    result = await client.upload(prepared.data, window=window, progress=progress, sha=True,
                                 ptlv=prepared.ptlv, timeout=timeout)
    if mark is Mark.NONE:
        slots = await client.state()
    else:
        slots = await client.state_write(prepared.hash, confirm=mark is Mark.CONFIRM)
    slot = next((s for s in slots if prepared.hash is not None and s.hash == prepared.hash), None)
    if mark is not Mark.NONE and (slot is None or not slot.pending
                                  or (mark is Mark.CONFIRM and not slot.permanent)):
        want = "permanent" if mark is Mark.CONFIRM else "pending"
        raise ProtocolError(f"the device accepted the state write but does not list the image as {want}")
    if reset:
        await client.reset()
    return FlashResult(prepared, result, mark, slot, reset)
