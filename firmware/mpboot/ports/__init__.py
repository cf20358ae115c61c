# Port adapters: one small module per MicroPython port, so the rest of the firmware never
# imports a port's native module (esp32, rp2, pyb, machine). Each module gives:
#
#   areas(...)            -> (slot0, slot1, state, factory): mpboot.flash.Area objects
#                            whose block size is the erase unit and whose write_size is the
#                            port's program alignment (state and factory: two erase units
#                            each, docs/FACTORY.md); arguments are the port's way to name
#                            flash regions (partition labels, byte offsets)
#   mapped(area)          -> a read-only memoryview of the area's bytes in memory-mapped
#                            flash (what a ROMFS is mounted from in place), or None when the
#                            port cannot map it (the boot then copies the image to RAM)
#   watchdog(timeout_ms)  -> an object with feed(), armed now; None if the port has none
#   reset()               -> hard reset
#   unique_id()           -> bytes identifying this board
#   uart(...)             -> a link for mpboot.transport.uart.serve (SMP over that UART):
#                            esp32, rp2, stm32: uart(id, baudrate, rxbuf, **pins) over
#                            machine.UART; unix: uart(path) over a pty; qemu: uart() on
#                            the REPL's UART
#   ble(name)             -> a BleLink for mpboot.transport.ble.serve (SMP over BLE, advertised
#                            as name), where the port has the bluetooth module (esp32, rp2 on
#                            Pico W boards, stm32 on boards with a radio); unix: ble(name,
#                            port) over the simulator's radio (the bluetooth shim)
#   udp(port, host, allow) -> a mpboot.transport.udp.UdpLink for its serve (SMP over UDP), where
#                            the port has a network stack (esp32, rp2 on Pico W boards, unix);
#                            the app brings the network up first


class UartLink:
    # A machine.UART opened with timeout=0 as a transport link: readinto() returns None at
    # once when nothing waits, wait(ms) polls, drain() waits for the transmitter (UART.flush).
    def __init__(self, u):
        import select

        self.u = u
        self.p = select.poll()
        self.p.register(u, select.POLLIN)

    def readinto(self, buf):
        return self.u.readinto(buf)

    def write(self, buf):
        mv = memoryview(buf)
        i = 0
        while i < len(mv):
            i += self.u.write(mv[i:]) or 0

    def wait(self, ms):
        for _ in self.p.ipoll(ms):
            break

    def drain(self):
        f = getattr(self.u, "flush", None)
        if f:
            f()


class BleLink:
    # A bluetooth.BLE as a transport link: .ble, .name (advertised), wait(ms, ready) sleeps in
    # 1 ms steps, during which the stack's IRQs run, until ready() is true or ms passed.
    def __init__(self, ble, name):
        self.ble = ble
        self.name = name

    def wait(self, ms, ready=None):
        import time

        t0 = time.ticks_ms()
        while not (ready and ready()) and time.ticks_diff(time.ticks_ms(), t0) < ms:
            time.sleep_ms(1)
