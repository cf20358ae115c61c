"""mpboot host library: sign, inspect and verify MCUboot-format images for MicroPython devices.

The click CLI (`mpboot.cli`) is a thin face over these modules:
`mpboot.keys` (RSA keys), `mpboot.signing` (who signs: a key file, a PKCS#11 token key
through `mpboot.hsm`, or a signature made elsewhere), `mpboot.signlog` (the signing log),
`mpboot.image` (the image format), `mpboot.pack` (inputs: .bin,
.hex, .romfs, app directories), `mpboot.device` (the device verifier on the MicroPython unix
port) and `mpboot.firmware` (the device package shipped with this one).
"""

__version__ = "0.1.0"
