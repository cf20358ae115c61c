# Transports carry whole SMP packets between a client and mpboot.smp.server.Server:
#   uart.py   SMP over a UART (console and raw COBS framings, docs/PROTOCOL.md)
