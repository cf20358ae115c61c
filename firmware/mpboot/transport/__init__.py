# Transports carry whole SMP packets between a client and mpboot.smp.server.Server:
#   uart.py   SMP over a UART (console and raw COBS framings, docs/PROTOCOL.md)
#   ble.py    SMP over BLE GATT (docs/BLE.md)
#   udp.py    SMP over UDP, one datagram per request (docs/PROTOCOL.md, "SMP over UDP")
