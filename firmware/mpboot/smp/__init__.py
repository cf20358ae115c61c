# The SMP (mcumgr) server: cbor (codec), server (packets, dispatch, errors), os_mgmt (group
# 0), img_mgmt (group 1), enum_mgmt (group 10, loaded on first use) and mpboot_mgmt (group
# 64, factory_mgmt on first use). Loaded only when serving; boot and verify never import it.
# Protocol: docs/PROTOCOL.md.
