# MicroPython scripts the host runs on the unix port (not part of the device package).
