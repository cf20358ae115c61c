"""What the SMP client hands back and takes: typed replies (image state, device, factory and
trust info, MCUmgr parameters), the policy a station writes, request bookkeeping and the progress
callback type. Plain data: both mpboot.smp.client and mpboot.smp.upload import it, and it
imports neither (client -> messages <- upload)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpboot.smp.header import Header, Op

ProgressCallback = Callable[[int, int], None]
"""progress(bytes the device acknowledged, total bytes)"""


@dataclass(frozen=True)
class McuMgrParams:
    """The device's receive buffer size and how many requests it buffers (pipelining depth)."""

    buf_size: int
    buf_count: int
    reported: bool = True  # False: the device did not say; these are conservative defaults
    # Requests the device takes in flight, when it answered the question (an mpboot device;
    # Zephyr's and MCUboot's UART transports lose what comes while one is processed).
    pipeline: int | None = None
    # The window bits of the compressed upload chunks it takes, when it answered (0: none).
    deflate: int = 0


@dataclass(frozen=True)
class SlotState:
    """One entry of the image state list (docs/PROTOCOL.md, "Image group")."""

    image: int
    slot: int
    version: str
    hash: bytes
    bootable: bool
    pending: bool
    confirmed: bool
    active: bool
    permanent: bool

    @property
    def flags(self) -> list[str]:
        names = ("active", "confirmed", "pending", "permanent", "bootable")
        return [n for n in names if getattr(self, n)]


# What a device's mpboot.pull returned (firmware/mpboot/puller.py CURRENT .. INSTALLED).
PULL_OUTCOMES = {0: "current", 1: "pending", 2: "reverted", 3: "installed"}


@dataclass(frozen=True)
class PullOutcome:
    """The last `mpboot.pull` of the device's current boot (mpboot.puller.last; device info
    key "pull"): `ok` True: `code` is the outcome (PULL_OUTCOMES); False: a PullErrorCode and
    its detail. `number`: the channel record's number (0: none read)."""

    ok: bool
    code: int
    detail: int
    number: int

    @property
    def name(self) -> str:
        """The outcome ("installed") or the PullErrorCode's name ("STALE"); unknown numbers as
        "outcome 9" / "code 99"."""
        if self.ok:
            return PULL_OUTCOMES.get(self.code, f"outcome {self.code}")
        from mpboot.errors import PullErrorCode

        try:
            return PullErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"

    @property
    def words(self) -> str:
        """"installed" / "failed: STALE (detail 7)"."""
        if self.ok:
            return self.name
        return f"failed: {self.name}" + (f" (detail {self.detail})" if self.detail else "")


@dataclass(frozen=True)
class DeviceInfo:
    """Who the device is and what it accepts (mpboot group 64, command 0)."""

    uid: bytes
    vendor_id: bytes | None  # None: the device does not check the vendor id
    class_id: bytes | None
    floor: int  # security-counter floor: images with a lower counter are refused (wire key "ctr")
    no_downgrade: bool  # images older than the confirmed one are refused
    serial: str | None = None  # the serial number provisioned (None: no identity yet)
    # The trust state's root set version and revocation number (docs/KEYS.md); None from a
    # device older than the trust model, which does not report them.
    root_version: int | None = None
    revocation: int | None = None
    # The window bits of the compressed uploads it takes (0: none, or a device older than them).
    deflate: int = 0
    # A device with two stages (docs/BOOT.md): the version of the stage 1 serving ("" when the
    # firmware's rescue serves) and stage 1's security-counter floor; None on other devices.
    stage1: str | None = None
    stage1_floor: int | None = None
    # The highest channel number it has taken (device pull, docs/KEYS.md) and its last pull
    # in this boot; None when it has taken none / pulled nothing in this boot (or is older
    # than device pull).
    channel: int | None = None
    pull: PullOutcome | None = None


@dataclass(frozen=True)
class Policy:
    """A board's production policy (docs/FACTORY.md section 1)."""

    no_downgrade: bool = True  # updates older than the confirmed image are refused
    test_boot: bool = True  # images become confirmed only through their test boot
    no_repl: bool = True  # the board never falls back to the REPL after boot

    def payload(self) -> dict[str, bool]:
        return {"no-downgrade": self.no_downgrade, "test-boot": self.test_boot, "no-repl": self.no_repl}


@dataclass(frozen=True)
class FactoryInfo:
    """Everything a provisioning station reads of a board (mpboot group 64, command 1)."""

    uid: bytes
    firmware: str  # MicroPython version
    bootloader: str  # mpboot version
    key_hashes: tuple[bytes, ...]  # of the embedded keys (MCUboot KEYHASH), in the device's order
    floor: int  # security-counter floor (wire key "ctr")
    vendor_id: bytes | None  # effective (the identity's, else the build's)
    class_id: bytes | None
    serial: str | None
    labels: dict[str, str]
    policy: Policy  # effective
    sealed: bool
    root_version: int | None = None  # as in DeviceInfo
    revocation: int | None = None


@dataclass(frozen=True)
class TrustInfo:
    """The device's trust state (mpboot group 64, command 6 read; docs/KEYS.md)."""

    root_version: int  # 1: the keys frozen into the firmware
    threshold: int  # distinct roots that must sign a certificate or a trust record
    image_threshold: int  # distinct trusted keys that must sign an image
    roots: tuple[bytes, ...]  # the current roots' key hashes (SHA-256 of the PKCS#1 DER)
    revocation: int  # the revocation number taken last (0: none)
    revoked_keys: tuple[bytes, ...]  # key hashes
    revoked_serials: tuple[int, ...]  # certificate serials


@dataclass(frozen=True)
class TrustApplied:
    """The device took a trust record (mpboot group 64, command 6 write): its trust state's
    root set version and revocation number now."""

    root_version: int
    revocation: int


@dataclass
class ClientStats:
    requests: int = 0
    replies: int = 0
    ignored: int = 0  # replies matching no waiting request (late, duplicate, stray)
    undecodable: int = 0  # replies whose header or CBOR could not be decoded


class PendingReply:
    """A request sent and not yet answered. `future` resolves to (header, payload)."""

    __slots__ = ("command", "future", "group", "op", "sent_at", "seq")

    def __init__(self, seq: int, group: int, command: int, op: Op,
                 future: asyncio.Future[tuple[Header, dict[str, Any]]]) -> None:
        self.seq = seq
        self.group = group
        self.command = command
        self.op = op
        self.future = future
        self.sent_at = time.monotonic()


__all__ = ["PULL_OUTCOMES", "PullOutcome", "ClientStats", "DeviceInfo", "FactoryInfo", "McuMgrParams", "PendingReply", "Policy",
           "ProgressCallback", "SlotState", "TrustApplied", "TrustInfo"]
