"""The kernel's generic netlink family "nbd" (``include/uapi/linux/nbd-netlink.h``), via pyroute2.

Every function here is SYNCHRONOUS and opens, uses and closes its own netlink
socket: pyroute2 0.9's sync API runs a private asyncio loop bound to the calling
thread, so trio code calls each one inside ONE ``trio.to_thread.run_sync``.

CONNECT/RECONFIGURE take a socket fd: the kernel takes its own reference, so
callers close their copy of the kernel's end right after the call (a
RECONFIGURE while the old connection is alive "succeeds" but drops the new
socket; see ../shared/docs/testing.md).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import Any, Final

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from ...errors import ErofsMountError
from .proto import NBD_CFLAG_DISCONNECT_ON_CLOSE, NBD_FLAG_READ_ONLY

NBD_GENL_FAMILY_NAME: Final = "nbd"
NBD_GENL_VERSION: Final = 1
NBD_GENL_MCAST_GROUP_NAME: Final = "nbd_mc_group"

# enum of NBD_CMD_* in nbd-netlink.h
NBD_CMD_UNSPEC: Final = 0
NBD_CMD_CONNECT: Final = 1
NBD_CMD_DISCONNECT: Final = 2
NBD_CMD_RECONFIGURE: Final = 3
NBD_CMD_LINK_DEAD: Final = 4
NBD_CMD_STATUS: Final = 5

# erofs-utils lib/liberofs_nbd.h EROFS_NBD_DEAD_CONN_TIMEOUT: 30 days
DEFAULT_DEAD_CONN_TIMEOUT: Final = 30 * 24 * 3600

MISSING_DRIVER: Final = (
    "the kernel's nbd driver is not available (no 'nbd' generic netlink family): "
    "run `modprobe nbd` or use --mode fuse"
)


class nbd_msg(genlmsg):  # noqa: N801 - pyroute2 naming
    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sock_list"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sock_list(nla):  # noqa: N801
        prefix = "NBD_SOCK_"
        nla_flags = 0x8000  # NLA_F_NESTED
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):  # noqa: N801
            prefix = "NBD_SOCK_"
            nla_flags = 0x8000
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):  # noqa: N801
        prefix = "NBD_DEVICE_"
        nla_flags = 0x8000
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):  # noqa: N801
            prefix = "NBD_DEVICE_"
            nla_flags = 0x8000
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


class _NbdSocket(GenericNetlinkSocket):
    pass


def _error(what: str, exc: NetlinkError) -> ErofsMountError:
    code = exc.code or _errno.EIO
    return ErofsMountError(f"nbd netlink {what}: {_errno.errorcode.get(code, code)} ({exc.args[-1] if exc.args else ''})",
                           errno=code)


def _open() -> _NbdSocket:
    sock = _NbdSocket()
    try:
        sock.bind(NBD_GENL_FAMILY_NAME, nbd_msg)
    except NetlinkError as exc:
        sock.close()
        if exc.code in (_errno.ENOENT, _errno.ENOTSUP, _errno.EOPNOTSUPP):
            raise ErofsMountError(MISSING_DRIVER, errno=_errno.ENODEV) from None
        raise _error("family lookup", exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _request(cmd: int, attrs: list, what: str) -> list[Any]:
    sock = _open()
    try:
        msg = nbd_msg()
        msg["cmd"] = cmd
        msg["version"] = NBD_GENL_VERSION
        msg["attrs"] = attrs
        try:
            return list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except NetlinkError as exc:
            raise _error(what, exc) from None
    finally:
        sock.close()


def family_available() -> bool:
    """True when the kernel answers for the "nbd" generic netlink family."""
    try:
        _open().close()
    except ErofsMountError:
        return False
    except OSError:
        return False
    return True


def _sockets(fd: int) -> tuple[str, dict]:
    return ("NBD_ATTR_SOCKETS", {"attrs": [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", fd)]})]})


def connect(
    sock_fd: int,
    *,
    size_bytes: int,
    block_size: int,
    identifier: str | None,
    index: int | None = None,
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
    server_flags: int = NBD_FLAG_READ_ONLY,
) -> int:
    """NBD_CMD_CONNECT with one socket; return the device index the kernel chose."""
    attrs: list = []
    if index is not None:
        attrs.append(("NBD_ATTR_INDEX", index))
    attrs += [
        ("NBD_ATTR_SIZE_BYTES", size_bytes),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
        ("NBD_ATTR_SERVER_FLAGS", server_flags),
        ("NBD_ATTR_TIMEOUT", 0),  # a non-zero timeout declares a slow live server dead
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout),
    ]
    if identifier:
        attrs.append(("NBD_ATTR_BACKEND_IDENTIFIER", identifier))
    attrs.append(_sockets(sock_fd))
    for reply in _request(NBD_CMD_CONNECT, attrs, "CONNECT"):
        got = reply.get_attr("NBD_ATTR_INDEX")
        if got is not None:
            return int(got)
    raise ErofsMountError("nbd netlink CONNECT: the kernel did not return a device index", errno=_errno.EBADMSG)


def reconfigure(
    index: int,
    *,
    identifier: str | None,
    sock_fd: int | None = None,
    client_flags: int | None = None,
    dead_conn_timeout: int | None = None,
) -> None:
    """NBD_CMD_RECONFIGURE: a new socket (reattach) and/or client flags (autoclear)."""
    attrs: list = [("NBD_ATTR_INDEX", index)]
    if identifier:  # required when the device has one, else EINVAL "must specify backend"
        attrs.append(("NBD_ATTR_BACKEND_IDENTIFIER", identifier))
    if client_flags is not None:
        attrs.append(("NBD_ATTR_CLIENT_FLAGS", client_flags))
    if dead_conn_timeout is not None:
        attrs.append(("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout))
    if sock_fd is not None:
        attrs.append(_sockets(sock_fd))
    _request(NBD_CMD_RECONFIGURE, attrs, "RECONFIGURE")


def set_autoclear(index: int, identifier: str | None) -> None:
    """DISCONNECT_ON_CLOSE: the last close (umount) disconnects the device."""
    reconfigure(index, identifier=identifier, client_flags=NBD_CFLAG_DISCONNECT_ON_CLOSE)


def disconnect(index: int) -> None:
    _request(NBD_CMD_DISCONNECT, [("NBD_ATTR_INDEX", index)], "DISCONNECT")


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    index: int
    connected: bool


def status(index: int | None = None) -> list[DeviceStatus]:
    """NBD_CMD_STATUS: every device (or one); "connected" only means configured."""
    attrs = [("NBD_ATTR_INDEX", index)] if index is not None else []
    out = []
    for reply in _request(NBD_CMD_STATUS, attrs, "STATUS"):
        devices = reply.get_attr("NBD_ATTR_DEVICE_LIST")
        if devices is None:
            continue
        for item in devices.get_attrs("NBD_DEVICE_ITEM"):
            out.append(DeviceStatus(int(item.get_attr("NBD_DEVICE_INDEX")),
                                    bool(item.get_attr("NBD_DEVICE_CONNECTED"))))
    return sorted(out, key=lambda d: d.index)


def wait_link_dead(timeout: float) -> list[int]:
    """Block up to ``timeout`` s for NBD_CMD_LINK_DEAD multicasts; return the indexes seen."""
    import select

    sock = _open()
    try:
        sock.add_membership(NBD_GENL_MCAST_GROUP_NAME)
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            return []
        dead = []
        for msg in sock.get():
            if msg.get("cmd") == NBD_CMD_LINK_DEAD:
                idx = msg.get_attr("NBD_ATTR_INDEX")
                if idx is not None:
                    dead.append(int(idx))
        return dead
    finally:
        sock.close()
