# Freeze the mpboot device package into firmware:
#   include("path/to/exported/firmware/manifest.py") in your board manifest.
# Public keys are not part of this package: generate them with
#   mpboot pubkey KEY.pem --format micropython -o mpboot_keys.py
# and freeze that module beside it (module("mpboot_keys.py")).
metadata(description="mpboot secure bootloader: MCUboot image verifier", version="0.1.0")

package("mpboot")
