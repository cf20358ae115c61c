# The update service: SMP (docs/PROTOCOL.md) over a UART or BLE (docs/BLE.md), for as long as
# the device runs. A board's boot.py calls it after boot.start() returns: the app's main
# returned, or nothing could boot (recovery: the service is how a new image gets in):
#
#   from mpboot import boot
#   from mpboot.ports import rp2 as port
#   import mpboot_keys
#
#   try:
#       boot.start(port, port.areas(0x100000, 0x80000, 0x200000), mpboot_keys.KEYS)
#   except Exception as e:          # the app failed: still take updates
#       import sys
#       sys.print_exception(e)
#   from mpboot.smp import service      # only now: on a board with stage-1 slots, boot.start()
#   from mpboot.transport.uart import frame_bytes   # loaded both from stage 1's image
#   service.run(port, port.uart(0, 115200, 4 * frame_bytes(2048), tx=0, rx=1))
#
# or, on a board with a radio (esp32, Pico W, ...), over BLE instead of the last line:
#
#   service.run_ble(port, port.ble("my-board"))   # advertises the SMP service as my-board
#
# or over UDP (docs/PROTOCOL.md "SMP over UDP") once the app has brought the network up:
#
#   service.run_udp(port, port.udp(1337))         # every interface; allow=(...) filters peers
#
# run(), run_ble() and run_udp() never return: a reset request (OS group, command 5) is answered, drained
# (BLE: the central disconnected), then port.reset(). Under the factory no-repl policy
# (docs/FACTORY.md) an exception out of the service loop resets the board too. While it
# serves it feeds the watchdog a test boot armed (mpboot.boot.feed) once the image is
# confirmed; an unconfirmed test image is left to the watchdog, which reverts it (a client
# can still confirm it, or reset, within the watchdog's timeout).
import sys
from micropython import const

import mpboot
from mpboot import boot
from mpboot.boot import (BOOTED_DEADLINE, BOOTED_INFO, BOOTED_S1, BOOTED_S1_HOW, BOOTED_S1_INFO, BOOTED_S1_SLOT,
                         BOOTED_SLOT, BOOTED_SLOTS, HOW_TEST)
from mpboot.smp.server import Server
from mpboot.state import TRIAL

_FLAGS = const(4)  # mpboot.state.FLAGS: the pair bits on a board with two stages (mpboot.pairs)
_PAIR_APP_OK = const(2)  # mpboot.pairs.PAIR_APP_OK: in a pair trial, the app confirmed its half
_UART = const(0)  # _run's transports
_BLE = const(1)
_UDP = const(2)


def _server(port, buf_size, buf_count):
    # The SMP server for what boot.start() booted, and the watchdog tick to serve it with.
    b = mpboot._booted
    if b is None:
        raise OSError(19)  # ENODEV: boot.start() (or boot.recovery()) did not run
    slots = b[BOOTED_SLOTS]
    run_slot = b[BOOTED_SLOT]
    server = Server(slots, run_slot, port, buf_size, buf_count, info=b[BOOTED_INFO], s1=b[BOOTED_S1],
                    s1_slot=b[BOOTED_S1_SLOT], s1_info=b[BOOTED_S1_INFO], deadline=b[BOOTED_DEADLINE])

    def tick():
        # Feed the watchdog a test boot armed, but not while that test image is unconfirmed:
        # an app that returned (or crashed) without confirming is then reverted by the
        # watchdog, as it would be had it hung. Once confirmed (by the app, or a client's
        # state write), the service keeps it fed.
        st = slots.state
        if run_slot < 0 or st[TRIAL] != run_slot or st[_FLAGS] & _PAIR_APP_OK:
            boot.feed()  # (in a pair trial, once the app confirmed its half: stage 1's proof is bounded by feed())
        # Stage 1 on its test boot, unproven at its deadline (docs/BOOT.md, "Stage 1's
        # proof"): reset; the next boot reverts it.
        if server.s1_trial:
            from mpboot.smp import stage1

            if stage1.late(server):
                port.reset()

    return server, tick


PROVE_MS = 300000  # a stage-1 test boot's time to prove itself (docs/BOOT.md "Stage 1's proof")


def run(port, link, buf_size=2048, buf_count=4, prove_ms=PROVE_MS):
    # port: the port module (reset, unique_id); link: port.uart(...). buf_size/buf_count:
    # the MCUmgr parameters clients size their requests by (the link's receive buffer should
    # hold buf_count frames: mpboot.transport.uart.frame_bytes). prove_ms: a stage-1 test
    # boot's deadline, from here.
    _run(port, link, buf_size, buf_count, _UART, prove_ms)


def run_ble(port, link, buf_size=2048, buf_count=4, prove_ms=PROVE_MS):
    # run() over BLE: link is port.ble(...). The characteristic's buffer holds buf_count
    # requests of buf_size bytes (the SMP window), buf_size * buf_count bytes of the heap.
    _run(port, link, buf_size, buf_count, _BLE, prove_ms)


UDP_MAX = 1472  # the largest SMP packet in one unfragmented datagram: a 1500-byte MTU - 28


def run_udp(port, link, buf_size=UDP_MAX, buf_count=4, prove_ms=PROVE_MS):
    # run() over UDP: link is port.udp(...). buf_size is clamped to UDP_MAX, so a client
    # sizing its requests by it sends single unfragmented datagrams (and each response fits
    # one too); buf_count is the datagrams the network stack queues while one is handled (4
    # on lwIP ports: modlwip's queue; esp32 holds 6).
    _run(port, link, min(buf_size, UDP_MAX), buf_count, _UDP, prove_ms)


def _leave_app(mount="/app"):
    # The app has returned: its modules are dropped and its ROMFS leaves sys.path, so what
    # the service imports from here comes from stage 0, stage 1 or the firmware, never from
    # the app (its ROMFS stays mounted: an interrupt handler it left may still run its code).
    for k in list(sys.modules):
        if getattr(sys.modules[k], "__file__", "").startswith(mount + "/"):
            del sys.modules[k]
    while mount in sys.path:
        sys.path.remove(mount)


def _run(port, link, buf_size, buf_count, kind, prove_ms):
    # Serves until a reset is asked for, then resets. Under the no-repl policy anything that
    # goes wrong on the way (the transport's import, the server's buffers, the loop) resets
    # the board instead of ending in the REPL.
    _leave_app()
    b = mpboot._booted
    if b is not None and b[BOOTED_S1_SLOT] >= 0 and b[BOOTED_S1_HOW] == HOW_TEST and b[BOOTED_DEADLINE] is None:
        # (mpboot.stages sets it at the boot; a board that loaded stage 1 otherwise: from here)
        import time

        b[BOOTED_DEADLINE] = time.ticks_add(time.ticks_ms(), prove_ms)
    no_repl = b is not None and b[BOOTED_SLOTS].no_repl
    try:
        if kind == _BLE:
            from mpboot.transport.ble import serve
        elif kind == _UDP:
            from mpboot.transport.udp import serve
        else:
            from mpboot.transport.uart import serve  # here: a BLE-only board never loads it
        server, tick = _server(port, buf_size, buf_count)
        serve(link, server, tick)
    except BaseException as e:
        if not no_repl:
            raise
        if type(e) is not SystemExit:
            import sys

            sys.print_exception(e)
    port.reset()
