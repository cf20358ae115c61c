# Freeze the mpboot device package into firmware:
#   include("path/to/exported/firmware/manifest.py", port="rp2")  in your board manifest
# port: the adapter for your board (esp32, rp2 or stm32; mpboot/ports/; qemu: the emulated
# mps2-an385 board of host/mpboot/qemu, docs/PORTING.md). The unix simulator
# files (unix, nor_sim) are for the MicroPython unix port and are frozen only with port="unix".
# ota=True (esp32 only): also freeze espimg and espota, the MicroPython firmware update
# through ESP-IDF's OTA app partitions (SMP upload image 4; docs/PORTING.md, esp32):
#   include("path/to/exported/firmware/manifest.py", port="esp32", ota=True)
# Public keys are not part of this package: generate them with
#   mpboot pubkey KEY.pem --format micropython -o mpboot_keys.py
# and freeze that module beside it (module("mpboot_keys.py")).
metadata(
    description="mpboot secure bootloader: verified MCUboot images, two slots, power-safe updates",
    version="0.1.0",
    license="Apache-2.0",
)

options.defaults(port="", rescue=True, ota=False, pull=True)

# Stage 0 (docs/BOOT.md "Two stages"): the root of trust. It verifies, decides, boots, and
# writes every state, trust and factory record; nothing here parses what a link carries.
package(
    "mpboot",
    files=(
        "__init__.py",
        "boot.py",
        "cbor.py",
        "channel.py",
        "factory.py",
        "flash.py",
        "image.py",
        "pairs.py",
        "reader.py",
        "records.py",
        "rsa.py",
        "slots.py",
        "stages.py",
        "state.py",
        "trust.py",
        "update.py",
        "ports/__init__.py",
    ),
)
# Stage 1: the update service. On a board with stage-1 slots it runs from a signed image
# (mpboot firmware export --stage1, signed --kind updater) and this frozen copy is only the
# last resort, when neither stage-1 slot can run; on a board without them it is the service.
# rescue=False leaves it out: such a board with no runnable stage 1 serves nothing (recovery
# then needs a cable).
if options.rescue:
    package(
        "mpboot",
        files=(
            "smp/__init__.py",
            "smp/server.py",
            "smp/service.py",
            "smp/os_mgmt.py",
            "smp/img_mgmt.py",
            "smp/enum_mgmt.py",
            "smp/identity.py",
            "smp/mpboot_mgmt.py",
            "smp/factory_mgmt.py",
            "smp/trust_mgmt.py",
            "smp/zupload.py",
            "smp/stage1.py",
            "smp/probe.py",
            "smp/fw_mgmt.py",
            "transport/__init__.py",
            "transport/uart.py",
            "transport/ble.py",
            "transport/udp.py",
        ),
    )
# Device pull (mpboot.pull, README "Device pull"): not stage 0 (it parses HTTP, network
# input); every check that decides and every flash write in it is stage 0's (channel,
# records, update).
# pull=False leaves it out.
if options.pull:
    package("mpboot", files=("http.py", "puller.py"))
if options.port == "unix":
    package("mpboot", files=("ports/unix.py", "ports/nor_sim.py"))
elif options.port:
    package("mpboot", files=("ports/%s.py" % options.port,))
if options.ota:
    if options.port != "esp32":
        raise ValueError("ota=True is the esp32 firmware update: port must be esp32")
    package("mpboot", files=("espimg.py", "espota.py"))
