# The SMP (mcumgr) server: cbor (codec), server (packets, dispatch, errors), os_mgmt (group
# 0) and img_mgmt (group 1). Loaded only when serving; boot and verify never import it.
# Protocol: docs/PROTOCOL.md.
