# Port adapters: one small module per MicroPython port, so the rest of the firmware never
# imports a port's native module (esp32, rp2, pyb, machine). Each module gives:
#
#   areas(...)            -> (slot0, slot1, state): mpboot.flash.Area objects whose block
#                            size is the erase unit and whose write_size is the port's
#                            program alignment; arguments are the port's way to name flash
#                            regions (partition labels, byte offsets)
#   mapped(area)          -> a read-only memoryview of the area's bytes in memory-mapped
#                            flash (what a ROMFS is mounted from in place), or None when the
#                            port cannot map it (the boot then copies the image to RAM)
#   watchdog(timeout_ms)  -> an object with feed(), armed now; None if the port has none
#   reset()               -> hard reset
#   unique_id()           -> bytes identifying this board
