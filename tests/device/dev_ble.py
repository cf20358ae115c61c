# MicroPython: the `bluetooth` shim (host/mpboot/upy_scripts/bluetooth.py) on its own, against
# the scripted radio of tests/test_ble_device.py; and the serving firmware with the shim's
# test knob set.
# Usage:
#   dev_ble shim PORT        checks step by step; prints "STEP name" before each step the radio
#                            acts in, then the observed values; "DONE" at the end
#   dev_ble serve CFG N      sim_serve CFG with the next N notifications refused (ENOMEM)
#   dev_ble link             mpboot.ports.BleLink.wait (the hardware link): "LINK ..."
import sys

import bluetooth

events = []


def irq(event, data):
    # As on hardware the address is a memoryview into the stack's buffer: copy it.
    d = tuple(bytes(x) if isinstance(x, memoryview) else x for x in data)
    events.append((event, d))


def pump_until(n):
    # Until n events were recorded (the radio acts in between).
    bluetooth._pump(5000, lambda: len(events) >= n)
    if len(events) < n:
        print("TIMEOUT", n, events)
        sys.exit(1)


def step(name):
    print("STEP", name)


def shim():
    bluetooth._radio(int(sys.argv[2]))
    b = bluetooth.BLE()
    print("SINGLETON", b is bluetooth.BLE())
    try:
        b.gatts_read(1)
        print("INACTIVE no error")
    except OSError as e:
        print("INACTIVE", e.args[0])
    b.active(True)
    b.irq(irq)
    print("MAC", b.config("mac")[0], b.config("mac")[1].hex())
    b.config(mtu=100, gap_name="shim-test")
    print("CONFIG", b.config("mtu"), b.config("gap_name"))
    U = bluetooth.UUID
    print("UUID", bytes(U(0x180F)).hex(), bytes(U("12345678-9abc-def0-1122-334455667788")).hex(),
          U(0x2A19) == U(0x2A19), U(0x2A19))
    hs = b.gatts_register_services((
        (U(0x180F), ((U(0x2A19), bluetooth.FLAG_READ | bluetooth.FLAG_NOTIFY),
                     (U("12345678-9abc-def0-1122-334455667788"), bluetooth.FLAG_WRITE_NO_RESPONSE))),
        (U("00000001-0000-1000-8000-00805f9b34fb"), ((U(0x2A00), bluetooth.FLAG_WRITE),)),
    ))
    print("HANDLES", hs)
    ((hn, hw), _) = hs
    b.gatts_write(hn, b"value")
    b.gap_advertise(100000, b"\x02\x01\x06")

    step("connect")  # the radio connects (conn 7) and writes 100 bytes to hw
    pump_until(2)
    print("EVENT", events[0][0], events[0][1][0], events[0][1][1], events[0][1][2].hex())
    print("EVENT", events[1][0], events[1][1])
    print("DEFAULT", len(b.gatts_read(hw)))

    b.gatts_set_buffer(hw, 50, True)
    step("append")  # two writes of 30 bytes
    pump_until(4)
    r = b.gatts_read(hw)
    print("APPEND", len(r), r[:30] == bytes(range(30)), r[30:] == bytes(range(100, 120)), len(b.gatts_read(hw)))

    b.gatts_set_buffer(hw, 64)
    step("replace")  # writes of 30 then 10 bytes
    pump_until(6)
    r = b.gatts_read(hw)
    print("REPLACE", len(r), len(b.gatts_read(hw)))

    b.gatts_notify(7, hn, bytes(50))  # MTU 23: 20 bytes go
    b.gatts_notify(7, hn)  # the value written locally
    step("mtu")  # the radio exchanges MTU 100
    pump_until(7)
    print("EVENT", events[6][0], events[6][1])
    b.gatts_notify(7, hn, bytes(200))  # MTU 100: 97 bytes go
    bluetooth._fail_notify = 1
    try:
        b.gatts_notify(7, hn, b"x")
    except OSError as e:
        print("FULL", e.args[0])
    try:
        b.gatts_notify(9, hn, b"x")
    except OSError as e:
        print("NOCONN", e.args[0])
    print("DISCONNECT", b.gap_disconnect(7))
    step("disconnect")
    pump_until(8)
    print("EVENT", events[7][0], events[7][1][0])
    print("AGAIN", b.gap_disconnect(7))
    print("DONE")


def link():
    import time

    from mpboot.ports import BleLink

    w = BleLink(None, "name")
    t = time.ticks_ms()
    w.wait(30)
    slept = time.ticks_diff(time.ticks_ms(), t) >= 30
    n = [0]

    def ready():
        n[0] += 1
        return n[0] >= 3

    t = time.ticks_ms()
    w.wait(5000, ready)
    print("LINK", slept, time.ticks_diff(time.ticks_ms(), t) < 1000, n[0])


if sys.argv[1] == "serve":
    bluetooth._fail_notify = int(sys.argv[3])
    sys.argv[:] = [sys.argv[0], sys.argv[2]]  # sim_serve reads its config from argv[1]
    import sim_serve  # noqa: F401  (runs the device: boot, then serve until a reset)
elif sys.argv[1] == "link":
    link()
else:
    shim()
