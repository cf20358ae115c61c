# mpboot: secure bootloader for MicroPython (device side).
# Modules: rsa (signature primitives), image (MCUboot image verifier), reader (media).
__version__ = "0.1.0"
