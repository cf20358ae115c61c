"""BLE for mpboot: which bleak backend to use, and scanning for SMP devices (docs/BLE.md).

    backend = select("bumble:tcp-client:127.0.0.1:9000")   # or select(None): $MPBOOT_BLE_BACKEND,
                                                            # else bleak's platform backend
    for found in await scan(3.0, backend):
        print(found.name, found.address, found.rssi)
    await backend.close()

`mpboot.transport.ble.BleTransport` carries SMP over the backend chosen here. The Bumble
backends themselves are in `mpboot.ble.bumble_backend` (imported only when selected, so
bleak's platform backend works without Bumble installed).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from mpboot.errors import PortError, UsageError

if TYPE_CHECKING:
    from bleak.backends.client import BaseBleakClient
    from bleak.backends.scanner import BaseBleakScanner

# Zephyr's SMP Bluetooth transport (and the Device Manager apps): one service, one
# characteristic (write without response for requests, notify for responses).
SMP_SERVICE_UUID: Final = "8d53dc1d-1db7-4cd3-868b-8a527460aa84"
SMP_CHARACTERISTIC_UUID: Final = "da2e7828-fbce-4e01-ae9e-261174997c48"

BACKEND_ENV: Final = "MPBOOT_BLE_BACKEND"
BUMBLE_PREFIX: Final = "bumble:"


@dataclass(frozen=True)
class Backend:
    """A bleak backend choice: `scanner`/`client` classes for bleak's `backend=` (None: bleak's
    platform backend)."""

    name: str  # "bleak" or "bumble:SPEC", for messages
    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None
    spec: str | None = field(default=None)  # the Bumble transport spec

    def scanner_kwargs(self) -> dict[str, Any]:
        return {} if self.scanner is None else {"backend": self.scanner}

    def client_kwargs(self) -> dict[str, Any]:
        return {} if self.client is None else {"backend": self.client}

    async def close(self) -> None:
        """Release what the backend opened in this event loop (Bumble: its HCI transports)."""
        if self.spec is not None:
            from mpboot.ble.bumble_backend import close_all

            await close_all()


PLATFORM: Final = Backend("bleak")


async def close() -> None:
    """Release every Bumble HCI transport opened in this event loop (no-op otherwise); call
    before the loop ends."""
    module = sys.modules.get("mpboot.ble.bumble_backend")
    if module is not None:
        await module.close_all()


def select(spec: str | None = None) -> Backend:
    """`None`: $MPBOOT_BLE_BACKEND, or bleak's platform backend when that is unset or empty;
    "bumble:SPEC": Bumble's host stack on HCI transport SPEC (`usb:0`,
    `tcp-client:127.0.0.1:PORT`, ...); "bleak": the platform backend. Anything else:
    UsageError."""
    if spec is None:
        spec = os.environ.get(BACKEND_ENV, "")
    spec = spec.strip()
    if spec in ("", "bleak"):
        return PLATFORM
    if spec.startswith(BUMBLE_PREFIX) and spec[len(BUMBLE_PREFIX):].strip():
        hci = spec[len(BUMBLE_PREFIX):].strip()
        try:
            from mpboot.ble.bumble_backend import backends
        except ImportError as err:
            raise UsageError(f"BLE backend {spec!r} needs Bumble ({err}): "
                             "pip install 'mpboot[bumble]'") from None
        scanner, client = backends(hci)
        return Backend(f"{BUMBLE_PREFIX}{hci}", scanner, client, hci)
    raise UsageError(f"bad BLE backend {spec!r}: expected bumble:SPEC (a Bumble transport, "
                     "e.g. bumble:usb:0 or bumble:tcp-client:127.0.0.1:PORT), or bleak")


@dataclass(frozen=True)
class Found:
    """A device advertising the SMP service."""

    name: str | None
    address: str
    rssi: int


async def scan(seconds: float, backend: Backend | None = None) -> list[Found]:
    """Scan for `seconds` and return the devices advertising the SMP service, strongest
    first. PortError when the backend cannot scan (no adapter, radio unreachable)."""
    from bleak import BleakScanner
    from bleak.exc import BleakError

    chosen = select(None) if backend is None else backend
    found: dict[str, Found] = {}

    def seen(device: Any, adv: Any) -> None:
        if SMP_SERVICE_UUID in adv.service_uuids:
            old = found.get(device.address)
            name = adv.local_name or device.name or (old.name if old else None)
            found[device.address] = Found(name, device.address, adv.rssi)

    try:
        async with BleakScanner(seen, [SMP_SERVICE_UUID], **chosen.scanner_kwargs()):
            await asyncio.sleep(seconds)
    except (BleakError, OSError) as err:
        raise PortError(f"cannot scan for BLE devices ({chosen.name}): {err}") from None
    return sorted(found.values(), key=lambda f: (-f.rssi, f.name or "", f.address))


__all__ = [
    "BACKEND_ENV",
    "PLATFORM",
    "SMP_CHARACTERISTIC_UUID",
    "SMP_SERVICE_UUID",
    "Backend",
    "Found",
    "close",
    "scan",
    "select",
]
