"""The flashing workflow: upload an image (resuming where the device is), mark it for a test
boot or make it permanent, reset. Transport-agnostic: the CLI runs it over serial; tests and
the BLE transport reuse it as it is."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from enum import StrEnum

from mpboot.errors import (
    CommandNotSupported,
    ImageErrorCode,
    ImageRejected,
    LinkLost,
    PortError,
    ProtocolError,
    TransportError,
    UpdateErrorCode,
    UpdateRefused,
)
from mpboot.image import ParsedImage, TlvType, parse_image
from mpboot.smp.client import SMPClient
from mpboot.smp.messages import ProgressCallback, SlotState
from mpboot.smp.upload import UploadResult

logger = logging.getLogger(__name__)


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
    upload: UploadResult | None  # None: the device held the image already, nothing was sent
    mark: Mark
    slot: SlotState | None  # the device's entry for the image after upload (and marking)
    reset: bool
    reconnects: int = 0  # links opened again after one was lost (flash_with_retries)
    running: bool = False  # the image already ran: nothing was uploaded, marked or reset
    confirmed_now: bool = False  # running on its test boot, it was confirmed (Mark.CONFIRM)
    recovery: bool = False  # the device listed its images and ran none: it was in recovery


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
                window: int | None = None, timeout: float | None = None,
                compress: bool | None = None, image_number: int = 0) -> FlashResult:
    """Upload `image`, then mark it (Mark.TEST: one test boot; Mark.CONFIRM: permanent) and
    reset the device if asked. compress: as mpboot.smp.upload.upload's (None: where the
    device offers it and it pays). image_number: the upload's `image` (STAGE1: stage 1's free
    slot; docs/PROTOCOL.md, "Stage 1"). Errors: the SMPError family (refused, verification failed),
    DeviceSilent, TransportError, ImageRejected (malformed or unmarkable image, found before
    anything is sent)."""
    prepared = image if isinstance(image, PreparedImage) else prepare(image)
    mark = Mark(mark)
    if mark is not Mark.NONE and prepared.hash is None:
        raise ImageRejected(ImageErrorCode.NO_HASH, "the device names images by it: cannot mark this one")
    slots = await _listing(client, prepared)
    held = _held(slots, prepared)
    if held is not None and held.active:
        return await _already_running(client, prepared, mark, held, slots or [])
    result = None
    if held is None:
        result = await client.upload(prepared.data, window=window, progress=progress, sha=True,
                                     ptlv=prepared.ptlv, timeout=timeout, compress=compress,
                                     image_number=image_number)
    if image_number == FIRMWARE:
        # The firmware (esp32) is not in the image list: the state write's answer is the check.
        if mark is not Mark.NONE:
            assert prepared.hash is not None
            await client.state_write(prepared.hash, confirm=mark is Mark.CONFIRM)
        if reset:
            await client.reset()
        return FlashResult(prepared, result, mark, None, reset, recovery=_in_recovery(slots))
    slot = await _mark(client, prepared, mark)
    if reset:
        await client.reset()
    return FlashResult(prepared, result, mark, slot, reset, recovery=_in_recovery(slots))


async def held_entry(client: SMPClient, prepared: PreparedImage) -> SlotState | None:
    """The device's state entry for this image when a slot holds it already (the running
    slot's entry first): a re-run of a flash that got further than its user saw needs no
    upload. None when no slot holds it, or the device cannot list its images."""
    return _held(await _listing(client, prepared), prepared)


async def _listing(client: SMPClient, prepared: PreparedImage) -> list[SlotState] | None:
    """The device's image list (None: the image has no hash to look for, or the device
    cannot list its images)."""
    if prepared.hash is None:
        return None
    try:
        return await client.state()
    except CommandNotSupported:
        return None


def _held(slots: list[SlotState] | None, prepared: PreparedImage) -> SlotState | None:
    same = [s for s in slots or () if s.hash == prepared.hash]
    return next((s for s in same if s.active), same[0] if same else None)


def _in_recovery(slots: list[SlotState] | None) -> bool:
    """The device listed its images and runs none of them."""
    return slots is not None and not any(s.active for s in slots)


async def _already_running(client: SMPClient, prepared: PreparedImage, mark: Mark,
                           running: SlotState, slots: list[SlotState]) -> FlashResult:
    """The image runs on the device already: nothing to upload, mark or reset, but for
    --confirm of an image on its test boot, which confirms it. The running image's
    `confirmed` says it is not on its test boot (Zephyr's flags); another slot pending and
    permanent boots at the next reset instead, and --confirm of the running image cannot
    keep it (the device keeps a permanent install)."""
    slot = running
    if mark is Mark.CONFIRM:
        check_no_permanent_waiting(slots, "the image runs", "then flash again", prepared.hash)
    if mark is Mark.CONFIRM and not running.confirmed:
        slots = await client.state_write(prepared.hash, confirm=True)
        slot = next((s for s in slots if s.hash == prepared.hash and s.active), None)
        if slot is None or not slot.confirmed:
            raise ProtocolError("the device accepted the confirm but does not list the running image as confirmed")
    return FlashResult(prepared, None, mark, slot, False, running=True, confirmed_now=slot is not running)


def check_no_permanent_waiting(slots: list[SlotState], what: str, then: str, image: bytes | None = None) -> None:
    """UpdateRefused (BUSY) when another image than `image` was made permanent and boots at the
    next reset (pending and permanent, not running): confirming the running image cannot keep
    it then. `what` and `then` frame the message ("the image runs", "then flash again")."""
    waiting = next((s for s in slots if s.pending and s.permanent and not s.active and s.hash != image), None)
    if waiting is not None:
        raise UpdateRefused(f"{what}, but the image in slot {waiting.slot} (version {waiting.version}) was made "
                            f"permanent and boots at the next reset: reset first, {then}", code=UpdateErrorCode.BUSY)


async def _mark(client: SMPClient, prepared: PreparedImage, mark: Mark) -> SlotState | None:
    """Mark the uploaded image as asked; its state entry afterwards."""
    if mark is Mark.NONE:
        slots = await client.state()
    else:
        try:
            slots = await client.state_write(prepared.hash, confirm=mark is Mark.CONFIRM)
        except CommandNotSupported as err:
            # MCUboot's serial recovery: it takes uploads into slot 0 and has no state write.
            raise CommandNotSupported(
                f"the image is on the device, but the device cannot mark it ({err}): a serial "
                "recovery bootloader such as MCUboot's boots the image in slot 0 at its next reset, "
                "without a mark", rc=err.rc, err_group=err.err_group, err_rc=err.err_rc, rsn=err.rsn) from None
    same = [s for s in slots if prepared.hash is not None and s.hash == prepared.hash]
    # Both slots may hold the image: the entry the mark acted on is the one that shows it.
    slot = next((s for s in same if s.pending), same[0] if same else None)
    if mark is not Mark.NONE and (slot is None or not slot.pending
                                  or (mark is Mark.CONFIRM and not slot.permanent)):
        want = "permanent" if mark is Mark.CONFIRM else "pending"
        raise ProtocolError(f"the device accepted the state write but does not list the image as {want}")
    return slot


STAGE1 = 2  # the upload `image` of stage 1's free slot (docs/PROTOCOL.md, "Stage 1")
FIRMWARE = 4  # the upload `image` of the MicroPython firmware itself (esp32)


def running_stage1(slots: list[SlotState]) -> SlotState | None:
    """The running stage 1's entry (image 1, active), or None."""
    return next((s for s in slots if s.image == 1 and s.active), None)


async def flash_pair(client: SMPClient, app: PreparedImage, stage1: PreparedImage, *, reset: bool = False,
                     progress: ProgressCallback | None = None, window: int | None = None,
                     timeout: float | None = None, compress: bool | None = None) -> tuple[FlashResult, FlashResult]:
    """A combined update of an mpboot device with two stages (docs/BOOT.md "Two image pairs"):
    stage 1 into its free slot and the app into its own (each resumed, or skipped when the
    device holds it already), then both marked for one test boot together (one state record:
    they start, confirm and revert as a pair), and a reset if asked. Returns the app's result
    and stage 1's. UpdateRefused when either already runs (flash the other alone)."""
    results = []
    for prepared, number in ((stage1, STAGE1), (app, 0)):
        if prepared.hash is None:
            raise ImageRejected(ImageErrorCode.NO_HASH, "the device names images by it: cannot mark this one")
        done = await flash(client, prepared, mark=Mark.NONE, progress=progress, window=window, timeout=timeout,
                           compress=compress, image_number=number)
        if done.running:
            which = "stage 1" if number else "the app"
            raise UpdateRefused(f"{which} (version {prepared.version}) runs on the device already: flash the "
                                "other image alone", code=UpdateErrorCode.BUSY)
        results.append(done)
    assert app.hash is not None and stage1.hash is not None
    slots = await client.state_write(app.hash, confirm=False, with_stage1=stage1.hash)
    marked = {s.hash: s for s in slots if s.pending}
    if app.hash not in marked or stage1.hash not in marked:
        raise ProtocolError("the device accepted the pair mark but does not list both images as pending")
    if reset:
        await client.reset()
    s1, a = results
    return (FlashResult(app, a.upload, Mark.TEST, marked[app.hash], reset),
            FlashResult(stage1, s1.upload, Mark.TEST, marked[stage1.hash], reset))


async def prove_stage1(client: SMPClient, image_hash: bytes | None = None) -> tuple[SlotState, bool]:
    """Stage 1's proof (docs/BOOT.md, "Stage 1's proof"): the running stage 1 (the image with
    `image_hash`, if given), on its test boot, gets a probe and then the confirm by its hash.
    Returns its entry afterwards and whether this confirmed it (False: it was confirmed
    already). UpdateRefused when stage 1 does not run (or another image runs as stage 1: the
    test image reverted), the SMPError family for the device's refusals."""
    slots = await client.state()
    entry = running_stage1(slots)
    if entry is None:
        raise UpdateRefused("the device runs no stage 1 (a device without stage-1 slots, or none verifies)")
    if image_hash is not None and entry.hash != image_hash:
        raise UpdateRefused(f"stage 1 {entry.hash.hex()[:16]} (version {entry.version}) runs, not image "
                            f"{image_hash.hex()[:16]}: its test boot did not start, or it was reverted")
    if entry.confirmed:
        return entry, False
    await client.probe()
    slots = await client.state_write(entry.hash, confirm=True)
    done = running_stage1(slots)
    if done is None or done.hash != entry.hash:
        raise ProtocolError("the device accepted stage 1's confirm but does not list it as running")
    if not done.confirmed and not any(s.image == 0 and s.active and not s.confirmed for s in slots):
        # (In a pair trial whose app has not confirmed yet, stage 1's half waits for it.)
        raise ProtocolError("the device accepted stage 1's confirm but does not list it as confirmed")
    return done, True


OpenClient = Callable[[], AbstractAsyncContextManager[SMPClient]]
"""Makes a new client on a new transport (opened and closed by `async with`): e.g.
`lambda: SMPClient(BleTransport(name, backend=b))`."""

RetryCallback = Callable[[int, TransportError], None]
"""on_retry(attempt number from 1, the error that ended the previous connection)"""


async def flash_with_retries(open_client: OpenClient, image: bytes | PreparedImage, *,
                             retries: int = 5, mark: Mark = Mark.NONE, reset: bool = False,
                             progress: ProgressCallback | None = None, window: int | None = None,
                             timeout: float | None = None, compress: bool | None = None,
                             on_retry: RetryCallback | None = None, image_number: int = 0) -> FlashResult:
    """flash() over a link that may drop (BLE): when the connection is lost (TransportError,
    LinkLost) the link is opened again, up to `retries` times, and the upload resumes where
    the device is (an off-0 request with the same sha and len answers the session's offset;
    a finished upload answers its end). A failure to reopen (PortError: the device not back
    yet) uses up a retry too; the first open's failure is raised at once. `progress` keeps
    going across connections: the total stays the image size and the count never goes
    backwards. A link lost while the device resets (it disconnects as it resets) is the
    reset done. Other errors (refusals, DeviceSilent) are raised as they are."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    prepared = image if isinstance(image, PreparedImage) else prepare(image)
    mark = Mark(mark)
    if mark is not Mark.NONE and prepared.hash is None:
        raise ImageRejected(ImageErrorCode.NO_HASH, "the device names images by it: cannot mark this one")
    best = 0

    def forward(done: int, total: int) -> None:
        nonlocal best
        best = max(best, done)
        if progress is not None:
            progress(best, total)

    attempt = 0
    opened = False
    uploaded: UploadResult | None = None  # of the connection that finished the upload
    delivered = False  # the device holds the image (uploaded now, or held already)
    recovery = False  # as the first connection found the device
    while True:
        try:
            async with open_client() as client:
                opened = True
                if not delivered:
                    slots = await _listing(client, prepared)
                    if attempt == 0:
                        recovery = _in_recovery(slots)
                    held = _held(slots, prepared)
                    if held is not None and held.active:
                        done = await _already_running(client, prepared, mark, held, slots or [])
                        return replace(done, reconnects=attempt)
                    if held is None:
                        uploaded = await client.upload(prepared.data, window=window, progress=forward,
                                                       sha=True, ptlv=prepared.ptlv, timeout=timeout,
                                                       compress=compress, resuming=attempt > 0,
                                                       image_number=image_number)
                    delivered = True
                slot = await _mark(client, prepared, mark)
                if reset:
                    if client.failure is not None:
                        raise client.failure  # lost before the reset could be sent: retry it
                    try:
                        await client.reset()
                    except LinkLost as err:
                        # sent on a live link: the device disconnects as it resets
                        logger.info("link lost while the device resets (%s): taken as reset", err)
                break
        except TransportError as err:
            error: TransportError = err
        except PortError as err:
            if not opened:
                raise
            error = TransportError(str(err))
        attempt += 1
        if attempt > retries:
            raise error
        if on_retry is not None:
            on_retry(attempt, error)
    return FlashResult(prepared, uploaded, mark, slot, reset, reconnects=attempt, recovery=recovery)
