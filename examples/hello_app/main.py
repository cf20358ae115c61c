# A sample MicroPython app: `mpboot sign examples/hello_app ...` compiles it with mpy-cross
# and packs it as a ROMFS image that the device mounts and runs after verifying it.
from hello import greet

greet("mpboot")
