"""SMP over BLE GATT (Zephyr's SMP Bluetooth transport), through bleak (docs/BLE.md section 4).

Requests go out as writes without response to the SMP characteristic, split into `mtu - 3`
byte pieces (one ATT payload each); responses come back as notifications and are reassembled
by the SMP header's length field. Flow control is the SMP window (the device buffers
`buf_count` requests of `buf_size` bytes), so `max_packet` makes every request a whole number
of full ATT payloads.

    t = BleTransport("mpboot-1a2b", backend=mpboot.ble.select("bumble:usb:0"))
    async with SMPClient(t) as client: ...

`target` is an address ("AA:BB:CC:DD:EE:FF", or a CoreBluetooth UUID) or an advertised name;
only devices that advertise the SMP service are considered. A disconnect fails the pending
and every later call with LinkLost (a TransportError): reconnect by opening again.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, Final

from bleak import BleakClient, BleakScanner
from bleak.exc import BleakError

from mpboot.ble import SMP_CHARACTERISTIC_UUID, SMP_SERVICE_UUID, Backend, select
from mpboot.errors import LinkLost, PortError, TransportError
from mpboot.transport import Inbox

if TYPE_CHECKING:
    from bleak.backends.characteristic import BleakGATTCharacteristic
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

DEFAULT_SCAN_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 20.0
DEFAULT_WRITE_TIMEOUT: Final = 5.0  # a write that makes no progress this long fails the link
_HEADER_SIZE: Final = 8
_MIN_ATT_PAYLOAD: Final = 20  # ATT_MTU 23 - 3
_ADDRESS_RE: Final = re.compile(r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$|^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")


def is_address(target: str) -> bool:
    """A Bluetooth address (or a CoreBluetooth device UUID) rather than a name."""
    return bool(_ADDRESS_RE.match(target))


class BleTransport:
    """One BLE peripheral serving SMP. See the module docstring."""

    def __init__(self, target: str, *, backend: Backend | str | None = None,
                 scan_timeout: float = DEFAULT_SCAN_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> None:
        if not target:
            raise ValueError("a BLE target (address or name) is required")
        if scan_timeout <= 0 or connect_timeout <= 0 or write_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.target: Final = target
        self.backend: Final = backend if isinstance(backend, Backend) else select(backend)
        self.scan_timeout = scan_timeout
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self._client: BleakClient | None = None
        self._char: BleakGATTCharacteristic | None = None
        self._chunk = _MIN_ATT_PAYLOAD
        self._inbox = Inbox(f"BLE link to {target} is not open")
        self._buf = bytearray()
        self._write_lock = asyncio.Lock()
        self.address: str | None = None  # the device's address once found

    @property
    def name(self) -> str:
        return self.target

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._inbox.error is None

    @property
    def att_payload(self) -> int:
        """Bytes per write without response (`mtu - 3`) on the current connection."""
        return self._chunk

    def max_packet(self, buf_size: int) -> int:
        """The largest multiple of `mtu - 3` within `buf_size` (every ATT payload full); a
        buffer smaller than one payload is the limit itself."""
        unit = self._chunk
        if buf_size < unit:
            return buf_size
        return buf_size // unit * unit

    def packet_limit(self, buf_size: int) -> int:
        """The device reassembles a request of up to `buf_size` bytes, however it is split."""
        return buf_size

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            if self._inbox.error is None:
                return
            await self.close()
        device = await self._find()
        self.address = device.address
        self._buf.clear()
        self._inbox = Inbox(f"BLE link to {self.target} is not open")
        self._write_lock = asyncio.Lock()
        client = BleakClient(device, self._on_disconnected, services=[SMP_SERVICE_UUID],
                             timeout=self.connect_timeout, **self.backend.client_kwargs())
        try:
            await client.connect()
        except (BleakError, TimeoutError, OSError) as err:
            raise PortError(f"cannot connect to BLE device {self.target}: {_why(err, 'timed out')}") from None
        self._client = client
        try:
            char = client.services.get_characteristic(SMP_CHARACTERISTIC_UUID)
            if char is None:
                raise PortError(f"BLE device {self.target} has no SMP characteristic")
            self._char = char
            self._chunk = max(await _write_size(client, char), _MIN_ATT_PAYLOAD)
            await client.start_notify(char, self._on_notify)
        except (BleakError, TimeoutError, OSError) as err:
            await self.close()
            raise PortError(f"cannot subscribe to SMP on BLE device {self.target}: "
                            f"{_why(err, 'timed out')}") from None
        except BaseException:
            await self.close()
            raise
        if self._inbox.error is not None:  # it dropped while subscribing
            error = self._inbox.error
            await self.close()
            raise PortError(f"BLE device {self.target} disconnected while connecting ({error})")

    async def _find(self) -> BLEDevice:
        wanted = self.target.lower()
        by_address = is_address(self.target)

        def match(device: BLEDevice, adv: AdvertisementData) -> bool:
            if SMP_SERVICE_UUID not in adv.service_uuids:
                return False
            if by_address:
                return device.address.lower() == wanted
            return adv.local_name == self.target or device.name == self.target

        try:
            device = await BleakScanner.find_device_by_filter(
                match, timeout=self.scan_timeout, service_uuids=[SMP_SERVICE_UUID],
                **self.backend.scanner_kwargs())
        except (BleakError, OSError) as err:
            raise PortError(f"cannot scan for BLE device {self.target} ({self.backend.name}): {err}") from None
        if device is None:
            raise PortError(f"no BLE device {self.target} advertising SMP "
                            f"(scanned {self.scan_timeout:.3g} s with {self.backend.name})")
        return device

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._fail(TransportError(f"BLE link to {self.target} is closed"))
        try:
            await client.disconnect()
        except (BleakError, TimeoutError, OSError):
            pass

    # --- packets ---------------------------------------------------------------------------

    async def send(self, packet: bytes) -> None:
        data = memoryview(bytes(packet))
        async with self._write_lock:
            client, char = self._client, self._char
            for off in range(0, len(data), self._chunk):
                self._check_open()
                assert client is not None and char is not None
                piece = data[off : off + self._chunk]
                try:
                    async with asyncio.timeout(self.write_timeout):
                        await client.write_gatt_char(char, piece, response=False)
                except TimeoutError:
                    self._fail(TransportError(f"write to BLE device {self.target} stalled for "
                                              f"{self.write_timeout:.3g} s"))
                    raise self._error_or_closed() from None
                except (BleakError, OSError) as err:
                    if self._inbox.error is None:
                        self._fail(LinkLost(f"BLE link to {self.target} lost ({err})"))
                    raise self._error_or_closed() from None

    async def recv(self) -> bytes:
        return await self._inbox.get()

    # --- callbacks -------------------------------------------------------------------------

    def _on_notify(self, _char: Any, data: bytearray) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= _HEADER_SIZE:
            if buf[0] & 7 not in (1, 3) or (buf[0] >> 3) & 3 > 1:
                # Not the start of a response: drop it; the next notification starts afresh.
                buf.clear()
                return
            size = _HEADER_SIZE + int.from_bytes(buf[2:4], "big")
            if len(buf) < size:
                return
            self._inbox.put(bytes(buf[:size]))
            del buf[:size]

    def _on_disconnected(self, _client: BleakClient) -> None:
        self._fail(LinkLost(f"BLE link to {self.target} lost"))

    def _fail(self, error: TransportError) -> None:
        self._inbox.fail(error)
        self._buf.clear()

    def _check_open(self) -> None:
        if self._client is None or self._inbox.error is not None:
            raise self._error_or_closed()

    def _error_or_closed(self) -> TransportError:
        return self._inbox.error_or_closed()


async def _write_size(client: BleakClient, char: BleakGATTCharacteristic) -> int:
    """Bytes per write without response. BlueZ reports the MTU only once acquired (as
    smpclient does)."""
    backend = getattr(client, "_backend", None)
    if type(backend).__name__ == "BleakClientBlueZDBus":
        acquire = getattr(backend, "_acquire_mtu", None)
        if acquire is not None:
            try:
                await acquire()
                return int(client.mtu_size) - 3
            except (BleakError, OSError, AttributeError):
                pass
    return int(char.max_write_without_response_size)


def _why(err: BaseException, default: str) -> str:
    return str(err) or default


__all__ = ["BleTransport", "is_address"]
