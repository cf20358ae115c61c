"""The host's SMP (mcumgr) client: packets, error mapping, requests, pipelined upload. The
error types it raises are mpboot.errors' (re-exported here).

    from mpboot.smp import SMPClient
    from mpboot.transport.serial import SerialTransport

    async with SMPClient(SerialTransport("/dev/ttyACM0", framing="raw")) as client:
        result = await client.upload(image, ptlv=..., progress=...)
"""

from mpboot.errors import (
    CommandNotSupported,
    FactoryRefused,
    ImageRefused,
    ImgMgmtErrorCode,
    MgmtErrorCode,
    SMPError,
    UpdateRefused,
    VerificationFailed,
)
from mpboot.smp.client import DEFAULT_TIMEOUT, SMPClient
from mpboot.smp.error_map import error_from_response
from mpboot.smp.header import (
    Group,
    Header,
    ImageCmd,
    Op,
    OsCmd,
    Version,
    decode_packet,
    encode_packet,
)
from mpboot.smp.messages import (
    ClientStats,
    DeviceInfo,
    FactoryInfo,
    McuMgrParams,
    PendingReply,
    Policy,
    ProgressCallback,
    SlotState,
    TrustApplied,
    TrustInfo,
)
from mpboot.smp.upload import Requester, UploadResult, max_data

__all__ = [
    "DEFAULT_TIMEOUT", "ClientStats", "CommandNotSupported", "DeviceInfo", "FactoryInfo",
    "FactoryRefused", "Group", "Header", "ImageCmd", "ImageRefused", "ImgMgmtErrorCode",
    "McuMgrParams", "MgmtErrorCode", "Op", "OsCmd", "PendingReply", "Policy", "ProgressCallback",
    "Requester", "SMPClient", "SMPError", "SlotState", "TrustApplied", "TrustInfo", "UpdateRefused", "UploadResult",
    "VerificationFailed", "Version", "decode_packet", "encode_packet", "error_from_response",
    "max_data",
]
