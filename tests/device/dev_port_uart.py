# MicroPython: a port adapter's uart() over the fake machine.UART (tests/device/fakes), then
# mpboot.transport.uart.serve() with the stand-in server (smp_stub) over that link.
# Usage: dev_port_uart PORT IN OUT BUFSIZE BUFCOUNT
#   PORT: esp32 | rp2 | stm32. The bytes of IN arrive at once (a burst of pipelined requests)
#   before serving starts; the answers go to OUT. Prints OPEN (how machine.UART was opened),
#   RXBUF (the size asked), LOST (bytes the fake UART dropped) and SERVED lines.
import sys

import machine  # the fake

from mpboot.transport.uart import frame_bytes, serve
from smp_stub import Stub

NAME = sys.argv[1]
machine.setup(NAME)
if NAME == "esp32":
    from mpboot.ports import esp32 as port

    UID = 1
elif NAME == "rp2":
    from mpboot.ports import rp2 as port

    UID = 0
else:
    from mpboot.ports import stm32 as port

    UID = 3

buf_size = int(sys.argv[4])
buf_count = int(sys.argv[5])
rxbuf = buf_count * frame_bytes(buf_size)
link = port.uart(UID, 115200, rxbuf)
u = machine.UART.last
print("OPEN id=%d baudrate=%d timeout=%d rxbuf=%d" % (u.id, u.baudrate, u.timeout, u.rxbuf))
print("RXBUF %d" % rxbuf)
with open(sys.argv[2], "rb") as f:
    u.feed(f.read())
print("LOST %d" % u.lost)
server = Stub(buf_size, buf_count)
serve(link, server)
print("SERVED handled=%d drains=%d" % (server.count, u.flushes))
with open(sys.argv[3], "wb") as f:
    f.write(u.sent)
# The default receive buffer holds the default service's pipeline (buf_count 4, buf_size 2048).
d = port.uart(UID)
print("DEFAULT_RXBUF %d %d" % (d.u.rxbuf, 4 * frame_bytes(2048)))
