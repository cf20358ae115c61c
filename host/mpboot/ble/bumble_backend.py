"""bleak 3.x backends on a Bumble host stack (docs/BLE.md, section 4).

bleak talks to the operating system's Bluetooth stack; these backends run Bumble's own host
stack instead, on any Bumble HCI transport spec: a USB dongle (`usb:0`), the simulator's
virtual radio (`tcp-client:127.0.0.1:PORT`, mpboot.sim.air), a serial HCI controller, ...

    Scanner, Client = backends("tcp-client:127.0.0.1:9000")
    device = await BleakScanner.find_device_by_name("mpboot-1", backend=Scanner)
    async with BleakClient(device, backend=Client) as client: ...
    await close_all()

One Bumble `Device` (central, random static address) per transport spec and event loop is
opened on first use and shared by every scanner and client of that spec; `close_all()` closes
them. `install_default(spec)` makes `BleakScanner()` / `BleakClient()` without `backend=` use
these classes, for tools that do not take a backend (smpclient).

What Bumble needs around it, so bleak's contract holds:
- `connect()` exchanges the ATT MTU (247) and discovers services, characteristics and
  descriptors into `self.services` (bleak 3.x has no `get_services()`). Characteristic handles
  are value handles (what ATT uses); max_write_without_response_size is `mtu - 3`.
- A write without response never yields in Bumble (it queues HCI packets and returns): the
  client yields to the loop after each one, and waits for the controller when more than a
  few ACL packets are queued, so a long stream neither starves the loop nor queues unbounded.
- A link that drops cancels Bumble's pending GATT request, which reaches the caller as a bare
  `CancelledError`; it, and every Bumble error, surfaces as `BleakError` (ATT errors as
  `BleakGATTProtocolError`). A cancellation of the caller's own task stays a cancellation.
- Losing the HCI transport itself (the dongle unplugged, the virtual radio gone) ends every
  connection of that Device as a disconnection and the next use opens the spec again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Literal, cast

import bleak
from bleak.assigned_numbers import CHARACTERISTIC_PROPERTIES, CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import (
    AdvertisementData,
    AdvertisementDataCallback,
    BaseBleakScanner,
)
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bumble import att, core, hci
from bumble.core import AdvertisingData
from bumble.device import Advertisement, Connection, Device
from bumble.gatt import GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR
from bumble.gatt_client import CharacteristicProxy, ServiceProxy
from bumble.transport import open_transport
from bumble.transport.common import Transport

from mpboot.errors import reason

logger = logging.getLogger(__name__)

PREFERRED_MTU: Final = 247  # one LL packet with data length extension (docs/BLE.md)
DEFAULT_ATT_MTU: Final = 23
OPEN_TIMEOUT: Final = 10.0  # seconds to open the HCI transport and reset the controller
DEVICE_NAME: Final = "mpboot"
# ACL packets a connection may have queued in the host before a write without response
# waits for the controller to complete some (Bumble's queue is otherwise unbounded).
_MAX_QUEUED_ACL: Final = 32
# HCI reason given to clients when the HCI transport itself is lost.
_REASON_TRANSPORT_LOST: Final = hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR


# --- conversions ------------------------------------------------------------------------


def uuid_str(u: core.UUID) -> str:
    """A Bumble UUID (little-endian bytes, 16/32/128 bits) as bleak spells it: 128-bit,
    lower case, with dashes."""
    return str(uuid.UUID(bytes=bytes(reversed(u.uuid_128_bytes))))


def address_str(address: hci.Address) -> str:
    """"AA:BB:CC:DD:EE:FF" (most significant byte first, upper case, no type suffix)."""
    return address.to_string(with_type_qualifier=False)


def _properties(flags: int) -> list[CharacteristicPropertyName]:
    return [name for bit, name in CHARACTERISTIC_PROPERTIES.items() if flags & bit]


def _signed8(value: int) -> int:
    return value - 256 if value > 127 else value


def advertisement_data(adv: Advertisement) -> AdvertisementData:
    """bleak's view of one Bumble advertisement (scan response merged, when there was one)."""
    data = adv.data
    name = data.get(AdvertisingData.Type.COMPLETE_LOCAL_NAME)
    if name is None:
        name = data.get(AdvertisingData.Type.SHORTENED_LOCAL_NAME)
    service_uuids: list[str] = []
    for kind in (AdvertisingData.Type.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
                 AdvertisingData.Type.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
                 AdvertisingData.Type.COMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS,
                 AdvertisingData.Type.INCOMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS,
                 AdvertisingData.Type.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                 AdvertisingData.Type.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS):
        for uuids in data.get_all(kind):
            for u in uuids:
                text = uuid_str(u)
                if text not in service_uuids:
                    service_uuids.append(text)
    service_data: dict[str, bytes] = {}
    for kind in (AdvertisingData.Type.SERVICE_DATA_16_BIT_UUID,
                 AdvertisingData.Type.SERVICE_DATA_32_BIT_UUID,
                 AdvertisingData.Type.SERVICE_DATA_128_BIT_UUID):
        for entry in data.get_all(kind):
            su, value = cast("tuple[core.UUID, bytes]", entry)
            service_data[uuid_str(su)] = bytes(value)
    manufacturer_data: dict[int, bytes] = {}
    for company, value in data.get_all(AdvertisingData.Type.MANUFACTURER_SPECIFIC_DATA):
        manufacturer_data[int(company)] = bytes(value)
    tx = data.get(AdvertisingData.Type.TX_POWER_LEVEL)
    tx_power = _signed8(tx) if isinstance(tx, int) else None
    return AdvertisementData(
        local_name=name if isinstance(name, str) else None,
        manufacturer_data=manufacturer_data,
        service_data=service_data,
        service_uuids=service_uuids,
        tx_power=tx_power,
        rssi=adv.rssi,
        platform_data=(adv,),
    )


async def _cancel_connecting(device: Device) -> None:
    """Best effort: tell the controller to stop initiating (the connect was given up)."""
    try:
        async with asyncio.timeout(2.0):
            await device.send_command(hci.HCI_LE_Create_Connection_Cancel_Command())
    except (TimeoutError, core.BaseBumbleError, OSError) as err:
        logger.debug("LE Create Connection Cancel: %s", err)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Bumble's errors as bleak's. A `CancelledError` that is not a cancellation of the
    current task (Bumble cancels the pending GATT request when the link drops) is a
    disconnection."""
    try:
        yield
    except BleakError:
        raise
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise BleakError(f"{what}: disconnected") from None
    except att.ATT_Error as err:
        raise BleakGATTProtocolError(err.error_code) from err
    except (core.BaseBumbleError, OSError, ConnectionError, RuntimeError, ValueError) as err:
        raise BleakError(f"{what}: {err}") from err


# --- one Bumble Device per transport spec and event loop ------------------------------------


class _Stack:
    """A Bumble Device (central) on one HCI transport, shared by scanners and clients."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.transport: Transport | None = None
        self.device: Device | None = None
        self.dead = False
        self.scanners: dict[BumbleScanner, bool] = {}  # scanner -> active
        self.scan_active = False
        self.scan_lock = asyncio.Lock()
        self.connect_lock = asyncio.Lock()  # Bumble allows one pending LE connection
        self.clients: set[BumbleClient] = set()
        self.addresses: dict[str, hci.Address] = {}  # "AA:..." -> typed address last seen

    async def open(self) -> None:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                self.transport = await open_transport(self.spec)
                self.device = Device.with_hci(DEVICE_NAME, hci.Address.generate_static_address(),
                                              self.transport.source, self.transport.sink)
                self.device.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
                self.device.on(Device.EVENT_FLUSH, self._on_transport_lost)
                await self.device.power_on()
        except TimeoutError:
            await self.close()
            raise BleakError(f"Bumble HCI transport {self.spec}: no controller answered in "
                             f"{OPEN_TIMEOUT:.0f} s") from None
        except Exception as err:  # noqa: BLE001 - any transport's failure to open (USB, TCP, ...)
            await self.close()
            raise BleakError(f"cannot open Bumble HCI transport {self.spec}: {reason(err)}") from None
        source = self.transport.source
        terminated = getattr(source, "terminated", None)
        if isinstance(terminated, asyncio.Future):
            terminated.add_done_callback(lambda _f: self._on_transport_lost())

    @property
    def ready(self) -> Device:
        if self.device is None or self.dead:
            raise BleakError(f"Bumble HCI transport {self.spec} is closed")
        return self.device

    async def close(self) -> None:
        self.dead = True
        _forget(self)
        for client in list(self.clients):
            client._on_link_gone(hci.HCI_ErrorCode.CONNECTION_TERMINATED_BY_LOCAL_HOST_ERROR)
        transport, self.transport = self.transport, None
        if transport is not None:
            try:
                await transport.close()
            except (OSError, core.BaseBumbleError, RuntimeError) as err:
                logger.debug("closing %s: %s", self.spec, err)

    def _on_transport_lost(self, *_args: Any) -> None:
        if self.dead:
            return
        logger.warning("Bumble HCI transport %s lost", self.spec)
        self.dead = True
        _forget(self)
        for client in list(self.clients):
            client._on_link_gone(_REASON_TRANSPORT_LOST)

    # --- scanning -----------------------------------------------------------------------

    async def add_scanner(self, scanner: BumbleScanner, active: bool) -> None:
        async with self.scan_lock:
            self.scanners[scanner] = active
            await self._apply_scan()

    async def remove_scanner(self, scanner: BumbleScanner) -> None:
        async with self.scan_lock:
            if self.scanners.pop(scanner, None) is None:
                return
            if not self.dead:
                await self._apply_scan()

    async def _apply_scan(self) -> None:
        device = self.ready
        want = bool(self.scanners)
        active = any(self.scanners.values())
        with _mapped("scan"):
            if device.is_scanning and (not want or active != self.scan_active):
                await device.stop_scanning()
            if want and not device.is_scanning:
                await device.start_scanning(active=active, filter_duplicates=False)
                self.scan_active = active

    def _on_advertisement(self, adv: Advertisement) -> None:
        self.addresses[address_str(adv.address)] = adv.address
        if not self.scanners:
            return
        data = advertisement_data(adv)
        for scanner in list(self.scanners):
            scanner._on_advertisement(adv, data)


_stacks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Stack]] = weakref.WeakKeyDictionary()
_opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _forget(stack: _Stack) -> None:
    for stacks in _stacks.values():
        if stacks.get(stack.spec) is stack:
            del stacks[stack.spec]


async def _get_stack(spec: str) -> _Stack:
    loop = asyncio.get_running_loop()
    lock = _opening.setdefault(loop, asyncio.Lock())
    async with lock:
        stacks = _stacks.setdefault(loop, {})
        stack = stacks.get(spec)
        if stack is not None and not stack.dead:
            return stack
        stack = _Stack(spec)
        await stack.open()
        stacks[spec] = stack
        return stack


async def close_all() -> None:
    """Close every Bumble Device this event loop opened (their connections end)."""
    stacks = _stacks.pop(asyncio.get_running_loop(), {})
    for stack in list(stacks.values()):
        await stack.close()


# --- scanner -------------------------------------------------------------------------------


class BumbleScanner(BaseBleakScanner):
    """bleak scanner backend on a Bumble Device. Subclasses bound to a spec: `backends()`."""

    spec: ClassVar[str] = ""

    def __init__(self, detection_callback: AdvertisementDataCallback | None,
                 service_uuids: list[str] | None,
                 scanning_mode: Literal["active", "passive"] = "active", **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)
        if not self.spec:
            raise BleakError("BumbleScanner is not bound to a transport spec: use backends(spec)")
        if scanning_mode not in ("active", "passive"):
            raise BleakError(f"scanning_mode {scanning_mode!r}: expected 'active' or 'passive'")
        self._active = scanning_mode == "active"
        self._stack: _Stack | None = None

    async def start(self) -> None:
        self.seen_devices = {}
        stack = await _get_stack(self.spec)
        await stack.add_scanner(self, self._active)
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.remove_scanner(self)

    def _on_advertisement(self, adv: Advertisement, data: AdvertisementData) -> None:
        if not self.is_allowed_uuid(data.service_uuids):
            return
        address = address_str(adv.address)
        name = data.local_name
        if name is None and address in self.seen_devices:
            name = self.seen_devices[address][0].name  # keep a name heard before
        device = self.create_or_update_device(address, address, name, adv.address, data)
        self.call_detection_callbacks(device, data)


# --- client --------------------------------------------------------------------------------


class BumbleClient(BaseBleakClient):
    """bleak client backend on a Bumble Device. Subclasses bound to a spec: `backends()`."""

    spec: ClassVar[str] = ""

    def __init__(self, address_or_ble_device: BLEDevice | str, *,
                 disconnected_callback: Callable[[], None] | None = None, timeout: float = 10.0,
                 services: set[str] | None = None, mtu: int = PREFERRED_MTU, **kwargs: Any) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback,
                         timeout=timeout)
        if not self.spec:
            raise BleakError("BumbleClient is not bound to a transport spec: use backends(spec)")
        self._typed_address: hci.Address | None = None
        self._device_name: str | None = None
        if isinstance(address_or_ble_device, BLEDevice):
            if isinstance(address_or_ble_device.details, hci.Address):
                self._typed_address = address_or_ble_device.details
            self._device_name = address_or_ble_device.name
        self._wanted_services = None if services is None else set(services)
        self._wanted_mtu = mtu
        self._mtu = DEFAULT_ATT_MTU
        self._stack: _Stack | None = None
        self._connection: Connection | None = None
        self._disconnecting = False
        self._subscribers: dict[int, Callable[[bytes], None]] = {}

    # --- properties -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._device_name or self.address.replace(":", "-")

    @property
    def mtu_size(self) -> int:
        return self._mtu

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    # --- connection -------------------------------------------------------------------

    def _peer_address(self, stack: _Stack) -> hci.Address:
        if self._typed_address is not None:
            return self._typed_address
        text = self.address.upper()
        known = stack.addresses.get(text)
        if known is not None:
            return known
        try:  # never seen: LE devices mostly use random (static) addresses
            return hci.Address(text, hci.Address.RANDOM_DEVICE_ADDRESS)
        except (ValueError, core.BaseBumbleError) as err:
            raise BleakError(f"bad Bluetooth address {self.address!r}: {err}") from None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if self._connection is not None:
            return
        if pair:
            logger.warning("the Bumble backend does not pair: connecting without pairing")
        stack = await _get_stack(self.spec)
        device = stack.ready
        peer = self._peer_address(stack)
        self._disconnecting = False
        try:
            async with asyncio.timeout(self._timeout):
                async with stack.connect_lock:
                    with _mapped(f"connect to {self.address}"):
                        try:
                            # No Bumble timeout: after its own, it waits for the controller to
                            # confirm the cancel, which a LocalLink controller never does.
                            connection = await device.connect(peer, timeout=None)
                        except asyncio.CancelledError:
                            await _cancel_connecting(device)
                            raise
                self._attach(stack, connection)
                with _mapped(f"discover services of {self.address}"):
                    self._mtu = await connection.gatt_client.request_mtu(self._wanted_mtu)
                    self.services = await self._discover(connection)
        except BaseException:
            await self._abandon()
            raise

    def _attach(self, stack: _Stack, connection: Connection) -> None:
        self._stack = stack
        self._connection = connection
        self._mtu = connection.att_mtu
        stack.clients.add(self)
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        connection.on(Connection.EVENT_CONNECTION_ATT_MTU_UPDATE, self._on_mtu_update)

    async def _abandon(self) -> None:
        """After a failed connect: drop the connection, if any, quietly."""
        connection = self._connection
        if connection is None:
            return
        self._disconnecting = True
        try:
            with _mapped("disconnect"):
                await connection.disconnect()
        except BleakError:
            pass
        self._detach()

    async def _discover(self, connection: Connection) -> BleakGATTServiceCollection:
        client = connection.gatt_client
        wanted = [core.UUID(u) for u in self._wanted_services] if self._wanted_services else []
        collection = BleakGATTServiceCollection()
        services: list[ServiceProxy] = await client.discover_services(wanted)
        for service in services:
            bleak_service = BleakGATTService(service, service.handle, uuid_str(service.uuid))
            collection.add_service(bleak_service)
            characteristics: list[CharacteristicProxy[bytes]] = await client.discover_characteristics((), service)
            for ch in characteristics:
                descriptors = await client.discover_descriptors(ch)
                ch.descriptors_discovered = True
                bleak_char = BleakGATTCharacteristic(ch, ch.handle, uuid_str(ch.uuid),
                                                     _properties(int(ch.properties)),
                                                     self._max_write_without_response, bleak_service)
                collection.add_characteristic(bleak_char)
                for d in descriptors:
                    collection.add_descriptor(BleakGATTDescriptor(d, d.handle, uuid_str(d.type), bleak_char))
        return collection

    def _max_write_without_response(self) -> int:
        return self._mtu - 3

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            return
        self._disconnecting = True
        try:
            with _mapped(f"disconnect from {self.address}"):
                await connection.disconnect()
        except BleakError:
            if self._connection is not None and not (self._stack is None or self._stack.dead):
                raise
        self._detach()

    def _on_disconnection(self, reason: int) -> None:
        logger.debug("%s disconnected (reason %#04x)", self.address, reason)
        solicited = self._disconnecting
        self._detach()
        if not solicited and self._disconnected_callback is not None:
            try:
                self._disconnected_callback()
            except Exception:  # a callback's bug must not break Bumble's event dispatch
                logger.exception("disconnected callback failed")

    def _on_mtu_update(self) -> None:
        if self._connection is not None:
            self._mtu = self._connection.att_mtu

    def _on_link_gone(self, reason: int) -> None:
        """The HCI transport closed or was lost: no disconnection event will come from it."""
        connection = self._connection
        if connection is not None:
            # Also wakes Bumble's pending GATT request on this connection (it cancels it).
            connection.emit(Connection.EVENT_DISCONNECTION, reason)
            self._detach()

    def _detach(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.remove_listener(Connection.EVENT_DISCONNECTION, self._on_disconnection)
            connection.remove_listener(Connection.EVENT_CONNECTION_ATT_MTU_UPDATE, self._on_mtu_update)
        if self._stack is not None:
            self._stack.clients.discard(self)
        self._subscribers.clear()

    def _require(self) -> Connection:
        if self._connection is None:
            raise BleakError("Not connected")
        return self._connection

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the Bumble backend does not pair")

    async def unpair(self) -> None:
        raise NotImplementedError("the Bumble backend does not pair")

    # --- GATT -------------------------------------------------------------------------

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, *,
                             use_cached: bool = False, **kwargs: Any) -> bytearray:
        return await self._read(characteristic.handle, use_cached, f"read {characteristic.uuid}")

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, *,
                                   use_cached: bool = False, **kwargs: Any) -> bytearray:
        return await self._read(descriptor.handle, use_cached, f"read descriptor {descriptor.handle}")

    async def _read(self, handle: int, use_cached: bool, what: str) -> bytearray:
        connection = self._require()
        client = connection.gatt_client
        if use_cached and handle in client.cached_values:
            return bytearray(client.cached_values[handle][1])
        with _mapped(what):
            return bytearray(await client.read_value(handle))

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any,
                              response: bool) -> None:
        connection = self._require()
        value = bytes(data)
        if not response and len(value) > self._mtu - 3:
            raise BleakError(f"write without response of {len(value)} bytes: at most "
                             f"{self._mtu - 3} (MTU {self._mtu})")
        with _mapped(f"write {characteristic.uuid}"):
            await connection.gatt_client.write_value(characteristic.handle, value, with_response=response)
            if not response:
                await asyncio.sleep(0)  # Bumble queued it without yielding
                await self._throttle(connection)

    async def _throttle(self, connection: Connection) -> None:
        queue = connection.data_packet_queue
        if queue is not None and queue.pending > max(_MAX_QUEUED_ACL, queue.max_in_flight):
            await connection.drain()
        if self._connection is not connection:
            raise BleakError("write: disconnected")

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        connection = self._require()
        with _mapped(f"write descriptor {descriptor.handle}"):
            await connection.gatt_client.write_value(descriptor.handle, bytes(data), with_response=True)

    async def start_notify(self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback,
                           **kwargs: Any) -> None:
        connection = self._require()
        proxy = characteristic.obj
        if not isinstance(proxy, CharacteristicProxy):
            raise BleakError(f"{characteristic.uuid} is not from this connection")
        if proxy.get_descriptor(GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR) is None:
            raise BleakError(f"{characteristic.uuid} has no CCCD: it cannot notify")

        def on_value(value: bytes) -> None:
            callback(bytearray(value))

        old = self._subscribers.pop(characteristic.handle, None)
        with _mapped(f"subscribe to {characteristic.uuid}"):
            if old is not None:
                await connection.gatt_client.unsubscribe(proxy, old)
            self._subscribers[characteristic.handle] = on_value
            await connection.gatt_client.subscribe(proxy, on_value, prefer_notify=True)

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        connection = self._require()
        proxy = characteristic.obj
        subscriber = self._subscribers.pop(characteristic.handle, None)
        if not isinstance(proxy, CharacteristicProxy) or subscriber is None:
            return
        with _mapped(f"unsubscribe from {characteristic.uuid}"):
            await connection.gatt_client.unsubscribe(proxy, subscriber)


# --- binding to a spec -------------------------------------------------------------------


_bound: dict[str, tuple[type[BumbleScanner], type[BumbleClient]]] = {}


def backends(spec: str) -> tuple[type[BumbleScanner], type[BumbleClient]]:
    """(ScannerCls, ClientCls) bound to Bumble transport `spec`, for bleak's `backend=`."""
    if not spec:
        raise ValueError("empty Bumble transport spec")
    pair = _bound.get(spec)
    if pair is None:
        scanner = type("BumbleScanner", (BumbleScanner,), {"spec": spec, "__module__": __name__})
        client = type("BumbleClient", (BumbleClient,), {"spec": spec, "__module__": __name__})
        pair = _bound[spec] = (scanner, client)
    return pair


# The names bleak/__init__.py resolves when BleakScanner/BleakClient get no backend=.
_CHOOSERS: Final = ("get_platform_scanner_backend_type", "get_platform_client_backend_type")
_platform: dict[str, Any] | None = None


def install_default(spec: str) -> None:
    """Make `BleakScanner(...)` / `BleakClient(...)` without `backend=` use Bumble on `spec`
    (bleak picks its platform backend through two module-level functions: they are replaced)."""
    global _platform
    scanner, client = backends(spec)
    names = vars(bleak)
    if _platform is None:
        _platform = {name: names[name] for name in _CHOOSERS}
    names[_CHOOSERS[0]] = lambda: (scanner, scanner.__name__)
    names[_CHOOSERS[1]] = lambda: (client, client.__name__)


def uninstall_default() -> None:
    """Undo install_default: bleak chooses its platform backend again."""
    global _platform
    if _platform is not None:
        vars(bleak).update(_platform)
        _platform = None


__all__ = [
    "PREFERRED_MTU",
    "BumbleClient",
    "BumbleScanner",
    "advertisement_data",
    "backends",
    "close_all",
    "install_default",
    "uninstall_default",
    "uuid_str",
]
