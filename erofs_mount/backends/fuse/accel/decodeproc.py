"""The decoder process's side (decoder.py starts it): decode READs into shared memory, one at a time.

Messages travel over a ``SOCK_SEQPACKET`` socket pair, one struct per packet (native byte order: both
ends are the same program on the same machine).  The daemon asks ``REQUEST`` (request id, inode,
offset, size, slot); the process answers ``ANSWER`` (request id, length), the bytes being
``Image.read(inode, offset, size)`` at ``slot * slot_size`` of the shared mapping, or length -1
when the read failed (the daemon then reads it itself and reports the error as it always does).
The first answer, request id 0, says the process is ready.  End of file on the socket (the daemon
closed it, or died) ends the process.
"""

from __future__ import annotations

import struct

REQUEST = struct.Struct("=IQQII")
ANSWER = struct.Struct("=Iq")
READY = 0


def serve(image, sock, mem, slot_size: int) -> None:
    """Answer requests until the daemon goes away (runs in the forked process)."""
    sock.setblocking(True)
    view = memoryview(mem)
    sock.send(ANSWER.pack(READY, 0))
    while True:
        msg = sock.recv(REQUEST.size)
        if len(msg) != REQUEST.size:
            return      # end of file (or a torn message, which cannot happen): the daemon is gone
        rid, nid, off, size, slot = REQUEST.unpack(msg)
        try:
            if size > slot_size:
                raise ValueError(f"{size} bytes for a {slot_size}-byte slot")
            base = slot * slot_size
            n = image.read_into(nid, off, size, view[base:base + size])   # decoded in place
        except Exception:  # noqa: BLE001 - the daemon redoes this read and reports its error itself
            n = -1
        sock.send(ANSWER.pack(rid, n))
