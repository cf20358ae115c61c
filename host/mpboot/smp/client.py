"""An asyncio SMP client over any mpboot.transport.Transport.

Requests carry SMP v1 headers (so mpboot devices explain refusals in `rsn`), sequence numbers
that increase mod 256, and are matched to replies by sequence number, group and command: a
reply nobody waits for (late, duplicated, or to a request given up on) is counted and ignored,
so it never shifts the stream. The pipelined, resumable image upload is in mpboot.smp.upload.

On a lossy transport (one with `lossy = True`: UDP) a request may be lost on the way or its
reply on the way back. `request` then sends an idempotent request again, the same packet
with the same sequence number, after a short resend timeout that doubles (reads, echo, image
state writes, erase: see `resendable`), all within the request's `timeout`; any copy's reply
settles it. Others are sent once. A reset is never sent again blindly: see `reset`.

    async with SMPClient(SerialTransport("/dev/ttyACM0")) as client:
        print(await client.echo("hello"))
        result = await client.upload(image_bytes, progress=lambda done, total: ...)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from mpboot.errors import (
    CommandNotSupported,
    DeviceSilent,
    ProtocolError,
    RequestTooLarge,
    SMPError,
    TransportError,
)
from mpboot.smp.error_map import error_from_response
from mpboot.smp.header import (
    Group,
    Header,
    ImageCmd,
    MpbootCmd,
    Op,
    OsCmd,
    Version,
    decode_packet,
    encode_packet,
)
from mpboot.smp.messages import (
    ClientStats,
    DeviceInfo,
    FactoryInfo,
    McuMgrParams,
    PendingReply,
    Policy,
    ProgressCallback,
    PullOutcome,
    SlotState,
    TrustApplied,
    TrustInfo,
)
from mpboot.smp.upload import PARAMS_TIMEOUT, UploadResult, max_data, upload
from mpboot.transport import Transport

DEFAULT_TIMEOUT: Final = 5.0
# Until the device tells its MCUmgr parameters: Zephyr's smallest common buffer, no pipelining.
DEFAULT_BUF_SIZE: Final = 256
DEFAULT_BUF_COUNT: Final = 1

_T = TypeVar("_T")

_WHAT: Final[dict[tuple[int, int, Op], str]] = {
    (Group.OS, OsCmd.ECHO, Op.WRITE): "echo",
    (Group.MPBOOT, MpbootCmd.DEVICE, Op.READ): "device info",
    (Group.MPBOOT, MpbootCmd.FACTORY, Op.READ): "factory info",
    (Group.MPBOOT, MpbootCmd.IDENTITY, Op.WRITE): "identity write",
    (Group.MPBOOT, MpbootCmd.FLOOR, Op.WRITE): "floor write",
    (Group.MPBOOT, MpbootCmd.POLICY, Op.WRITE): "policy write",
    (Group.MPBOOT, MpbootCmd.SEAL, Op.WRITE): "seal",
    (Group.MPBOOT, MpbootCmd.TRUST, Op.READ): "trust state read",
    (Group.MPBOOT, MpbootCmd.TRUST, Op.WRITE): "trust record write",
    (Group.OS, OsCmd.RESET, Op.WRITE): "reset",
    (Group.OS, OsCmd.MCUMGR_PARAMS, Op.READ): "MCUmgr parameters",
    (Group.OS, OsCmd.OS_INFO, Op.READ): "OS info",
    (Group.OS, OsCmd.BOOTLOADER_INFO, Op.READ): "bootloader info",
    (Group.IMAGE, ImageCmd.STATE, Op.READ): "image state read",
    (Group.IMAGE, ImageCmd.STATE, Op.WRITE): "image state write",
    (Group.IMAGE, ImageCmd.UPLOAD, Op.WRITE): "image upload",
    (Group.IMAGE, ImageCmd.ERASE, Op.WRITE): "image erase",
    (Group.IMAGE, ImageCmd.SLOT_INFO, Op.READ): "slot info",
}


def describe(group: int, command: int, op: Op) -> str:
    """A request's name for messages ("image state write")."""
    return _WHAT.get((group, command, op), f"SMP group {group} command {command}")


# An erase reply comes after the whole slot is erased: 45 ms per 4 KiB sector is 11.5 s per
# MiB at typical NOR speed, and datasheets allow several times that.
ERASE_TIMEOUT = 120.0
PROBE_MIN = 8192  # a probe's least size (the device's rule: max(8 KiB, 2 * buf_size))

# Lossy transports (docs/PROTOCOL.md, "SMP over UDP"): the first resend of an idempotent
# request after this long without a reply, doubling after each; all within the request's
# timeout. A device answers these within milliseconds on a LAN.
LOSSY_RTO = 0.25
RESET_ATTEMPTS = 3  # resets sent in all, each only once the one before provably did nothing

# Requests that do the same when they arrive twice: safe to resend on a lossy transport.
# Every read, plus these writes (a repeated state write marks or confirms what is already
# marked or confirmed; a repeated erase erases an erased slot). Never reset (a second one
# could hit the new boot and revert its test image), upload (it resends by offset itself),
# or the factory, trust and probe writes (their effect, or their answer, differs the second
# time).
_RESENDABLE_WRITES: Final = frozenset({
    (Group.OS, OsCmd.ECHO),
    (Group.IMAGE, ImageCmd.STATE),
    (Group.IMAGE, ImageCmd.ERASE),
})


def resendable(group: int, command: int, op: Op) -> bool:
    """Whether a request may be sent again, unchanged, when no reply came (lossy links)."""
    if group == Group.OS and command == OsCmd.RESET:
        return False
    return op == Op.READ or (group, command) in _RESENDABLE_WRITES


class SMPClient:
    """SMP requests over one transport. Use as an async context manager (opens and closes the
    transport), or call open()/close()."""

    def __init__(self, transport: Transport, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.transport: Final = transport
        self.timeout = timeout
        self.stats = ClientStats()
        self._seq = random.randrange(256)
        self._pending: dict[int, PendingReply] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failure: TransportError | None = None
        self._params: McuMgrParams | None = None
        self.resends = 0  # requests sent again on a lossy transport (same packet, same seq)

    @property
    def lossy(self) -> bool:
        """The transport may lose, duplicate or reorder packets (UDP)."""
        return bool(getattr(self.transport, "lossy", False))

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await self.transport.open()
        self._failure = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass
        await self.transport.close()
        self._fail_all(TransportError(f"{self.transport.name} is closed"))

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- requests --------------------------------------------------------------------------

    @property
    def failure(self) -> TransportError | None:
        """The error that ended the link, once it has failed (requests then fail at once)."""
        return self._failure

    async def send_request(self, group: int, command: int, op: Op,
                           payload: dict[str, Any]) -> PendingReply:
        """Send one request and return without waiting for the reply (for pipelining). Await
        `pending.future`, or give up on it with forget(pending)."""
        return (await self._submit(group, command, op, payload))[0]

    async def _submit(self, group: int, command: int, op: Op,
                      payload: dict[str, Any]) -> tuple[PendingReply, bytes]:
        """send_request, also returning the packet as sent (to send it again)."""
        if op not in (Op.READ, Op.WRITE):
            raise ValueError(f"requests are READ or WRITE, not {op!r}")
        if self._failure is not None:
            raise self._failure
        if self._reader is None:
            raise TransportError(f"{self.transport.name} is not open")
        seq = self._next_seq()
        packet = encode_packet(op, group, command, seq, payload, Version.V1)
        params = self._params
        if params is not None and params.reported:
            limit = self.transport.packet_limit(params.buf_size)
            if len(packet) > limit:  # the device would drop it unanswered: say why, do not wait
                raise RequestTooLarge(f"the {describe(group, command, op)} request takes {len(packet)} bytes, "
                                      f"more than the device's buffer holds ({limit} of buf_size "
                                      f"{params.buf_size} over {self.transport.name})")
        future: asyncio.Future[tuple[Header, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        pending = PendingReply(seq, group, command, op, future)
        self._pending[seq] = pending
        try:
            await self.transport.send(packet)
        except BaseException:
            self.forget(pending)
            raise
        self.stats.requests += 1
        return pending, packet

    def forget(self, pending: PendingReply) -> None:
        """Stop waiting for a reply: if it comes later, it is ignored."""
        if self._pending.get(pending.seq) is pending:
            del self._pending[pending.seq]
        if not pending.future.done():
            pending.future.cancel()

    async def request(self, group: int, command: int, op: Op, payload: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        """Send a request and return the reply's payload; raises an SMPError subclass when the
        device answers with an error, DeviceSilent when it does not answer in `timeout`."""
        wait = self.timeout if timeout is None else timeout
        pending, packet = await self._submit(group, command, op, payload)
        try:
            async with asyncio.timeout(wait):
                if self.lossy and resendable(group, command, op):
                    await self._resending(pending, packet, wait, slow=(group, command) == (Group.IMAGE, ImageCmd.ERASE))
                _, rsp = await pending.future
        except TimeoutError:
            self.forget(pending)
            raise self.silent(wait) from None
        err = error_from_response(rsp, describe(group, command, op))
        if err is not None:
            raise err
        return rsp

    async def _resending(self, pending: PendingReply, packet: bytes, wait: float, slow: bool) -> None:
        """Until `pending` is answered (the caller bounds it by `wait`): sends `packet` again
        after LOSSY_RTO, then after twice that, and so on. A slow request (erase: the reply
        comes when the whole slot is erased, and a copy queued behind it would erase it
        again) is sent again once, after half of `wait`."""
        rto = wait / 2 if slow else min(LOSSY_RTO, wait / 2)
        while True:
            done, _ = await asyncio.wait([pending.future], timeout=rto)
            if done:
                return
            if self._failure is not None:
                raise self._failure
            await self.transport.send(packet)
            self.resends += 1
            if slow:
                await asyncio.shield(pending.future)
                return
            rto *= 2

    def silent(self, waited: float, where: str = "") -> DeviceSilent:
        """The DeviceSilent error for `waited` seconds without a reply."""
        name = self.transport.name
        if self.stats.replies == 0:
            # The transport's guess at why (serial: port, baud, framing; UDP: address, firewall)
            hint = getattr(self.transport, "silent_hint", None)
            return DeviceSilent(f"no SMP reply from {name} in {waited:.3g} s" + (f" ({hint})" if hint else ""))
        return DeviceSilent(f"device stopped answering: no SMP reply from {name} in {waited:.3g} s{where}")

    # --- OS group --------------------------------------------------------------------------

    async def echo(self, text: str) -> str:
        """The device's echo of `text` (RequestTooLarge when it exceeds the device's buffer)."""
        # So a text too long for the device is refused here; a device that does not answer
        # the params gets PARAMS_TIMEOUT, as for an upload (docs/PROTOCOL.md, "Sizes").
        await self.params_or_default(min(self.timeout, PARAMS_TIMEOUT))
        rsp = await self.request(Group.OS, OsCmd.ECHO, Op.WRITE, {"d": text})
        return _field(rsp, "r", str, "echo")

    async def reset(self) -> None:
        """Ask the device to reset; it answers first, then resets.

        On a lossy transport the reset request is never sent again as it is: if it did reach
        the device and only its reply was lost, a second copy would reset the new boot too
        (and revert an image on its test boot). So when no reply comes, the image state read
        before the reset is compared with the one the device answers once back: changed, it
        reset; unchanged while an image was pending (marked for the next boot), the request
        was lost and another reset goes (at most RESET_ATTEMPTS in all); unchanged with
        nothing pending, it cannot be told, and DeviceSilent says so."""
        if not self.lossy:
            await self.request(Group.OS, OsCmd.RESET, Op.WRITE, {})
            return
        from mpboot.errors import CommandNotSupported

        try:
            before: list[SlotState] | None = await self.state()
        except CommandNotSupported:  # no image group (a Zephyr app): nothing to compare
            before = None
        for _ in range(RESET_ATTEMPTS):
            try:
                await self.request(Group.OS, OsCmd.RESET, Op.WRITE, {})
                return
            except DeviceSilent:
                pass
            if before is None:
                break
            after = await self._state_once_back()
            if after != before:
                return  # it reset (its reply was lost)
            if not any(s.pending for s in before):
                break
        raise DeviceSilent(f"no reply from {self.transport.name} to the reset request; the device answers and "
                           "its image state shows no change, so whether it reset cannot be told: "
                           "reset it again if it must")

    async def _state_once_back(self) -> list[SlotState]:
        """The image state, from a device that may be rebooting: asked again for up to
        RESET_ATTEMPTS timeouts."""
        for attempt in range(RESET_ATTEMPTS):
            try:
                return await self.state()
            except DeviceSilent:
                if attempt == RESET_ATTEMPTS - 1:
                    raise
        raise AssertionError

    async def params(self, timeout: float | None = None) -> McuMgrParams:
        """The device's MCUmgr parameters (buf_size, buf_count)."""
        # `pipeline: true` asks an mpboot device how many requests it takes in flight, and
        # `deflate: true` the window of the compressed chunks it takes (others ignore the
        # questions; docs/PROTOCOL.md, "Pipelining", "Compressed upload").
        rsp = await self.request(Group.OS, OsCmd.MCUMGR_PARAMS, Op.READ, {"pipeline": True, "deflate": True},
                                 timeout)
        size, count = _field(rsp, "buf_size", int, "params"), _field(rsp, "buf_count", int, "params")
        if size < 32 or count < 1:
            raise ProtocolError(f"device reports unusable MCUmgr parameters buf_size {size}, buf_count {count}")
        pipe, z = rsp.get("pipeline"), rsp.get("deflate")
        self._params = McuMgrParams(size, count, pipeline=pipe if _is_uint(pipe) and pipe >= 1 else None,
                                    deflate=z if _is_uint(z) else 0)
        return self._params

    async def params_or_default(self, timeout: float | None = None) -> McuMgrParams:
        """params(), or conservative defaults when the device does not support or answer it
        (a late answer is then ignored)."""
        if self._params is not None:
            return self._params
        try:
            return await self.params(timeout)
        except (CommandNotSupported, DeviceSilent):
            self._params = McuMgrParams(DEFAULT_BUF_SIZE, DEFAULT_BUF_COUNT, reported=False)
            return self._params

    async def os_info(self, fmt: str = "s") -> str:
        rsp = await self.request(Group.OS, OsCmd.OS_INFO, Op.READ, {"format": fmt})
        return _field(rsp, "output", str, "OS info")

    async def bootloader_info(self, query: str | None = None) -> dict[str, Any]:
        payload = {"query": query} if query is not None else {}
        rsp = await self.request(Group.OS, OsCmd.BOOTLOADER_INFO, Op.READ, payload)
        rsp.pop("rc", None)
        return rsp

    # --- image group -----------------------------------------------------------------------

    async def state(self) -> list[SlotState]:
        rsp = await self.request(Group.IMAGE, ImageCmd.STATE, Op.READ, {})
        return _slot_states(rsp)

    async def state_write(self, hash: bytes | None, confirm: bool, with_stage1: bytes | None = None) -> list[SlotState]:
        """confirm=False + hash: test-boot that image once; confirm=True + hash: make it
        permanent; confirm=True without hash: confirm the running image. with_stage1 (an
        mpboot device with two stages): test-boot the app `hash` and that stage 1 together, as
        a pair (docs/PROTOCOL.md, "Stage 1")."""
        if hash is None and not confirm:
            raise ValueError("marking for a test boot needs the image's hash")
        for h in (hash, with_stage1):
            if h is not None and len(h) != 32:
                raise ValueError(f"an image hash is 32 bytes, not {len(h)}")
        if with_stage1 is not None and (hash is None or confirm):
            raise ValueError("a pair is marked for a test boot: the app's hash, confirm=False")
        payload: dict[str, Any] = {"confirm": confirm}
        if hash is not None:
            payload["hash"] = bytes(hash)
        if with_stage1 is not None:
            payload["with"] = bytes(with_stage1)
        rsp = await self.request(Group.IMAGE, ImageCmd.STATE, Op.WRITE, payload)
        return _slot_states(rsp)

    async def erase(self, slot: int | None = None, timeout: float | None = None) -> None:
        """Erase `slot` (default: the slot not running). The device answers when the whole
        slot is erased (seconds per MiB on NOR flash): the wait is at least ERASE_TIMEOUT."""
        payload = {"slot": slot} if slot is not None else {}
        wait = max(self.timeout if timeout is None else timeout, ERASE_TIMEOUT)
        await self.request(Group.IMAGE, ImageCmd.ERASE, Op.WRITE, payload, timeout=wait)

    async def slot_info(self) -> dict[str, Any]:
        rsp = await self.request(Group.IMAGE, ImageCmd.SLOT_INFO, Op.READ, {})
        rsp.pop("rc", None)
        return rsp

    # --- mpboot group ----------------------------------------------------------------------

    async def device_info(self) -> DeviceInfo:
        """The device's identity and update policy (CommandNotSupported on a device that is
        not mpboot)."""
        what = "device info"
        rsp = await self.request(Group.MPBOOT, MpbootCmd.DEVICE, Op.READ, {})
        uid = _field(rsp, "uid", bytes, what)
        ids = _ids(rsp, what)
        serial = rsp.get("serial")
        deflate = rsp.get("deflate", 0)
        s1, ctr1 = rsp.get("s1", False), rsp.get("ctr1")
        two = s1 is not False and _is_uint(ctr1)
        return DeviceInfo(uid, ids[0], ids[1], _field(rsp, "ctr", int, what),
                          bool(rsp.get("no-downgrade", False)), serial if isinstance(serial, str) else None,
                          *_trust_numbers(rsp, what), deflate=deflate if _is_uint(deflate) else 0,
                          stage1=(s1 if isinstance(s1, str) else "") if two else None,
                          stage1_floor=ctr1 if two else None, **_pull_fields(rsp, what))

    async def factory_info(self) -> FactoryInfo:
        """The board's factory state: ids, versions, key hashes, identity, policy, sealed."""
        return _factory_info(await self.request(Group.MPBOOT, MpbootCmd.FACTORY, Op.READ, {}))

    async def set_identity(self, serial: str, *, vendor_id: bytes | None = None, class_id: bytes | None = None,
                           labels: dict[str, str] | None = None) -> FactoryInfo:
        """Write the board's identity (replacing any earlier, unsealed one)."""
        payload: dict[str, Any] = {"serial": serial}
        if vendor_id is not None:
            payload["vid"] = bytes(vendor_id)
        if class_id is not None:
            payload["cid"] = bytes(class_id)
        if labels:
            payload["labels"] = dict(labels)
        return _factory_info(await self.request(Group.MPBOOT, MpbootCmd.IDENTITY, Op.WRITE, payload))

    async def raise_floor(self, floor: int) -> FactoryInfo:
        """Raise the security-counter floor to at least `floor` (it never goes down)."""
        if not 0 <= floor < 1 << 32:
            raise ValueError(f"a security-counter floor is 0..2^32-1, not {floor}")
        return _factory_info(await self.request(Group.MPBOOT, MpbootCmd.FLOOR, Op.WRITE, {"ctr": floor}))

    async def set_policy(self, policy: Policy) -> FactoryInfo:
        return _factory_info(await self.request(Group.MPBOOT, MpbootCmd.POLICY, Op.WRITE, policy.payload()))

    async def seal(self, serial: str) -> FactoryInfo:
        """Seal the board: identity and policy become read-only. `serial` must be the board's."""
        return _factory_info(await self.request(Group.MPBOOT, MpbootCmd.SEAL, Op.WRITE, {"serial": serial}))

    async def trust_show(self) -> TrustInfo:
        """The device's trust state: root set version, thresholds, roots, what is revoked."""
        what = "trust state"
        rsp = await self.request(Group.MPBOOT, MpbootCmd.TRUST, Op.READ, {})
        roots, keys, serials = (_field(rsp, k, list, what) for k in ("roots", "revoked-keys", "revoked-serials"))
        if not all(isinstance(h, bytes) for h in roots + keys) or not all(_is_uint(n) for n in serials):
            raise ProtocolError(f"{what} reply has no valid key hashes or serials: {rsp!r}")
        return TrustInfo(
            root_version=_field(rsp, "root-version", int, what), threshold=_field(rsp, "threshold", int, what),
            image_threshold=_field(rsp, "image-threshold", int, what), roots=tuple(roots),
            revocation=_field(rsp, "revocation", int, what), revoked_keys=tuple(keys),
            revoked_serials=tuple(serials))

    async def trust_push(self, record: bytes) -> TrustApplied:
        """Send one trust record (a root or revocation record envelope, docs/KEYS.md) in
        chunks as large as the device's buffer takes; the device applies it when the last
        byte arrives. The device's refusal is TrustRefused (its code says why; the trust state
        is then as it was)."""
        record = bytes(record)
        total = len(record)
        # Chunks sized as an upload's (docs/PROTOCOL.md, "Sizes"): the largest data that keeps
        # the packet within the device's buffer, for the largest off.
        params = await self.params_or_default(min(self.timeout, PARAMS_TIMEOUT))
        budget = self.transport.packet_limit(params.buf_size)
        size = max_data(budget, {"off": total, "len": total})
        if size == 0:
            raise RequestTooLarge(f"the device's buffer (buf_size {params.buf_size}) holds no trust record chunk")
        what = "trust record write"
        off = 0
        while True:
            end = min(off + size, total)
            payload: dict[str, Any] = {"off": off, "data": record[off:end]}
            if off == 0:
                payload["len"] = total
            rsp = await self.request(Group.MPBOOT, MpbootCmd.TRUST, Op.WRITE, payload)
            if _field(rsp, "off", int, what) != end:
                raise ProtocolError(f"{what}: the device answered offset {rsp['off']} to the chunk "
                                    f"ending at {end} of {total}")
            if end >= total:
                version, revocation = _trust_numbers(rsp, what)
                if version is None or revocation is None:
                    raise ProtocolError(f"{what} reply has no valid 'root-version' and 'revocation': {rsp!r}")
                return TrustApplied(version, revocation)
            off = end

    async def identity(self) -> tuple[list[SlotState], bytes | None, str | None]:
        """Image state read asking for the board's identity too (an mpboot extension that other
        servers ignore): (slots, unique id or None, serial or None)."""
        rsp = await self.request(Group.IMAGE, ImageCmd.STATE, Op.READ, {"identity": True})
        uid, serial = rsp.get("uid"), rsp.get("serial")
        if (uid is not None and not isinstance(uid, bytes)) or (serial is not None and not isinstance(serial, str)):
            raise ProtocolError(f"image state reply has no valid 'uid' or 'serial': {rsp!r}")
        return _slot_states(rsp), uid, serial

    async def upload(self, image: bytes, *, window: int | None = None, chunk: int | None = None,
                     progress: ProgressCallback | None = None, sha: bool = True,
                     ptlv: bytes | None = None, upgrade: bool = False,
                     timeout: float | None = None, final_timeout: float | None = None,
                     retries: int = 4, compress: bool | None = None, resuming: bool = False,
                     image_number: int = 0) -> UploadResult:
        """Upload `image` (the whole file) pipelined, resuming where the device is, compressed
        where the device offers it; see mpboot.smp.upload.upload for the arguments."""
        return await upload(self, image, window=window, chunk=chunk, progress=progress, sha=sha,
                            ptlv=ptlv, upgrade=upgrade, timeout=timeout,
                            final_timeout=final_timeout, retries=retries, compress=compress,
                            resuming=resuming, image_number=image_number)

    async def probe(self, size: int | None = None) -> int:
        """The probe (group 64 command 8, docs/PROTOCOL.md "Stage 1"): `size` random bytes
        (default, and at least: max(8 KiB, 2 * buf_size)) sent as upload-shaped requests at the
        device's buffer size, one at a time; the device hashes them and answers `match` at the
        end. On stage 1's test boot this is the first half of its proof. Returns the bytes
        sent; raises the SMPError family (CommandNotSupported: a device without stage-1 slots)."""
        params = await self.params_or_default(min(self.timeout, PARAMS_TIMEOUT))
        n = max(PROBE_MIN, 2 * params.buf_size, size or 0)
        data = os.urandom(n)
        first: dict[str, Any] = {"off": 0, "len": n, "sha": hashlib.sha256(data).digest()}
        budget = self.transport.max_packet(params.buf_size)
        room = max_data(budget, {"off": n})
        off = stalls = 0
        while off < n:
            fields = dict(first) if off == 0 else {"off": off}
            k = min(max_data(budget, first) if off == 0 else room, n - off)
            fields["data"] = data[off : off + k]
            rsp = await self.request(Group.MPBOOT, MpbootCmd.PROBE, Op.WRITE, fields)
            nxt = rsp.get("off")
            if not _is_uint(nxt) or nxt > n or (nxt == n) != (off + k == n):
                raise ProtocolError(f"probe reply has an unexpected offset: {rsp!r}")
            if nxt == n and rsp.get("match") is not True:
                raise ProtocolError(f"the device took the probe but did not say it matched: {rsp!r}")
            stalls = stalls + 1 if nxt <= off else 0
            if stalls > 3:
                raise ProtocolError(f"the probe does not advance: the device keeps answering offset {nxt}")
            off = nxt
        return n

    # --- internals -------------------------------------------------------------------------

    def _next_seq(self) -> int:
        for _ in range(256):
            self._seq = (self._seq + 1) & 0xFF
            if self._seq not in self._pending:
                return self._seq
        raise RuntimeError("256 SMP requests in flight")

    async def _read_loop(self) -> None:
        try:
            while True:
                self._on_packet(await self.transport.recv())
        except TransportError as err:
            self._fail_all(err)

    def _on_packet(self, packet: bytes) -> None:
        try:
            header = Header.unpack(packet)
        except ProtocolError:
            self.stats.undecodable += 1
            return
        pending = self._pending.get(header.seq)
        if (pending is None or header.op != pending.op + 1 or header.group != pending.group
                or header.command != pending.command):
            self.stats.ignored += 1
            return
        del self._pending[header.seq]
        self.stats.replies += 1
        if pending.future.done():
            return
        try:
            pending.future.set_result(decode_packet(packet))
        except ProtocolError as err:
            self.stats.undecodable += 1
            pending.future.set_exception(err)

    def _fail_all(self, err: TransportError) -> None:
        if self._failure is None:
            self._failure = err
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
                # Requests given up with the link may never be awaited (a pipelined upload
                # raises at the first): retrieved here so asyncio does not log them as lost.
                p.future.exception()


def _field(rsp: dict[str, Any], key: str, kind: type[_T], what: str) -> _T:
    value = rsp.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what} reply has no valid {key!r}: {rsp!r}")
    return value


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pull_fields(rsp: dict[str, Any], what: str) -> dict[str, Any]:
    """Device info's "chan" (the highest channel number taken) and "pull" ([ok, code,
    detail, number]: the last mpboot.pull of this boot), each only when the device sends it."""
    out: dict[str, Any] = {}
    chan, pull = rsp.get("chan"), rsp.get("pull")
    if chan is not None:
        if not _is_uint(chan):
            raise ProtocolError(f"{what} reply has no valid 'chan': {rsp!r}")
        out["channel"] = chan
    if pull is not None:
        if not (isinstance(pull, list) and len(pull) == 4 and isinstance(pull[0], bool)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in pull[1:]) and _is_uint(pull[3])):
            raise ProtocolError(f"{what} reply has no valid 'pull': {rsp!r}")
        out["pull"] = PullOutcome(*pull)
    return out


def _trust_numbers(rsp: dict[str, Any], what: str) -> tuple[int | None, int | None]:
    """The reply's root set version and revocation number (None each when absent: a device
    older than the trust model)."""
    out: list[int | None] = []
    for key in ("root-version", "revocation"):
        v = rsp.get(key)
        if v is not None and not _is_uint(v):
            raise ProtocolError(f"{what} reply has no valid {key!r}: {rsp!r}")
        out.append(v)
    return out[0], out[1]


def _ids(rsp: dict[str, Any], what: str) -> tuple[bytes | None, bytes | None]:
    """The reply's vendor and class id (each bytes, or None: not checked / not set)."""
    ids: list[bytes | None] = []
    for key in ("vid", "cid"):
        v = rsp.get(key)
        if v is not None and not isinstance(v, bytes):
            raise ProtocolError(f"{what} reply has no valid {key!r}: {rsp!r}")
        ids.append(v)
    return ids[0], ids[1]


def _factory_info(rsp: dict[str, Any]) -> FactoryInfo:
    what = "factory info"
    keys = _field(rsp, "keys", list, what)
    if not all(isinstance(k, bytes) for k in keys):
        raise ProtocolError(f"{what} reply has no valid 'keys': {rsp!r}")
    ids = _ids(rsp, what)
    serial = rsp.get("serial")
    if serial is not None and not isinstance(serial, str):
        raise ProtocolError(f"{what} reply has no valid 'serial': {rsp!r}")
    labels = _field(rsp, "labels", dict, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ProtocolError(f"{what} reply has no valid 'labels': {rsp!r}")
    pol = _field(rsp, "policy", dict, what)
    flags = [pol.get(k) for k in ("no-downgrade", "test-boot", "no-repl")]
    if not all(isinstance(f, bool) for f in flags):
        raise ProtocolError(f"{what} reply has no valid 'policy': {rsp!r}")
    version, revocation = _trust_numbers(rsp, what)
    return FactoryInfo(
        uid=_field(rsp, "uid", bytes, what), firmware=_field(rsp, "fw", str, what),
        bootloader=_field(rsp, "boot", str, what), key_hashes=tuple(keys),
        floor=_field(rsp, "ctr", int, what), vendor_id=ids[0], class_id=ids[1], serial=serial,
        labels=dict(labels), policy=Policy(*(bool(f) for f in flags)),
        sealed=_field(rsp, "sealed", bool, what), root_version=version, revocation=revocation)


def _slot_states(rsp: dict[str, Any]) -> list[SlotState]:
    images = rsp.get("images")
    if not isinstance(images, list):
        raise ProtocolError(f"image state reply has no 'images' list: {rsp!r}")
    out = []
    for entry in images:
        if not isinstance(entry, dict):
            raise ProtocolError(f"image state entry is not a map: {entry!r}")
        slot, h, version = entry.get("slot"), entry.get("hash"), entry.get("version", "")
        if not isinstance(slot, int) or not isinstance(h, bytes) or not isinstance(version, str):
            raise ProtocolError(f"image state entry lacks slot, hash or version: {entry!r}")
        image = entry.get("image", 0)
        out.append(SlotState(
            image=image if isinstance(image, int) else 0, slot=slot, version=version, hash=h,
            bootable=bool(entry.get("bootable", False)), pending=bool(entry.get("pending", False)),
            confirmed=bool(entry.get("confirmed", False)), active=bool(entry.get("active", False)),
            permanent=bool(entry.get("permanent", False)),
        ))
    return out

