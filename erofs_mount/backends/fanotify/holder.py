"""The holder of fanotify mode: the process that owns the pre-content group, so that a daemon may
die and be replaced without a reader seeing zeros or an error.

When a fanotify group's last fd closes the kernel ALLOWS every pending access and drops the marks
(fs/notify/fanotify/fanotify_user.c fanotify_release): holes then read as zeros.  Linux 6.18 has no
way to hand pending permission events to a new reader.  So the group lives here, in a small
synchronous process that does no network I/O and parses nothing but the kernel's events:

    * it opens the sparse file O_RDWR BEFORE marking it (I/O through an fd opened before the mark
      raises no events) and hands that fd to each daemon (SCM_RIGHTS) for its writes;
    * it reads the events; a range already local (no hole: lseek SEEK_HOLE) or past the end, and a
      truncate (count 0), is allowed at once; any other range is remembered and sent to the daemon
      (link.py FILL); the daemon's DONE makes it answer the kernel (allow, or deny with EIO);
    * a daemon that dies leaves its FILLs pending here: the readers wait; the next daemon
      (``erofs-mount --reattach MNT``) connects and gets them all again;
    * a POSIX lock on ``lock`` says it is alive (guard.py: the lock goes when this process's files
      are closed, before the group is released);
    * once the file has no hole it removes its mark (reads no longer wait for anybody), and it exits
      when the mount is gone, or on SIGTERM after denying (EIO) whatever is still pending.

    python -m erofs_mount.backends.fanotify.holder DATA SOCKET LOCK MOUNTPOINT
"""

from __future__ import annotations

import errno as _errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import sys
import time

from . import kernel, link, record, wire

log = logging.getLogger("erofs_mount.fanotify.holder")
MOUNT_WAIT = 300.0      # give up when the mount never appears


class Keeper:
    """What the holder and the guard share: a group with a mark on the sparse file, an fd of that
    file for lseek (opened before the mark: its I/O raises no events), a select loop that checks
    once a second whether the mount is gone (or never came), and the mark removed once the file
    has no hole.  Subclasses add ``on_<key>`` handlers to ``sel``, ``may_unmark`` and ``close``."""

    def __init__(self, data: str, mountpoint: str, group: int, mask: int, fd_flags: int) -> None:
        self.data, self.mountpoint, self.mask = data, mountpoint, mask
        self.fd = os.open(data, fd_flags | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.group = group
        kernel.mark(group, data, mask)
        self.marked = True
        self.sel = selectors.DefaultSelector()
        self.sel.register(group, selectors.EVENT_READ, "group")
        self.stop = False

    def complete(self) -> bool:
        return kernel.first_hole(self.fd, 0, self.size) >= self.size

    def may_unmark(self) -> bool:
        return True

    def run(self) -> None:
        seen, started, last = False, time.monotonic(), 0.0
        while not self.stop:
            for key, _ in self.sel.select(timeout=1.0):
                getattr(self, "on_" + key.data)()
            now = time.monotonic()
            if now - last < 1.0:
                continue
            last = now
            mounted = record.mounted(self.mountpoint, self.data)
            if (seen and not mounted) or (not seen and now - started > MOUNT_WAIT):
                log.log(logging.INFO if seen else logging.ERROR, "%s is %s mounted", self.mountpoint,
                        "no longer" if seen else "never")
                break
            seen = seen or mounted
            if self.marked and self.may_unmark() and self.complete():
                kernel.mark(self.group, self.data, self.mask, remove=True)
                self.marked = False
                log.info("%s has no hole left: mark removed", self.data)
        self.close()

    def close(self) -> None:
        os.close(self.group)


class Holder(Keeper):
    def __init__(self, data: str, sock_path: str, lock_path: str, mountpoint: str) -> None:
        self.lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.lockf(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # self.fd (O_RDWR, opened before the mark) is what each daemon writes through
        super().__init__(data, mountpoint, kernel.pre_content_group(), wire.FAN_PRE_ACCESS, os.O_RDWR)
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(sock_path)
        self.sock_path = sock_path
        os.chmod(sock_path, 0o600)
        self._sock_ino = os.stat(sock_path).st_ino
        self.listener.listen(2)
        self.conn: socket.socket | None = None
        self.decoder = link.Decoder()
        self.pending: dict[int, tuple[int, int]] = {}     # event fd -> (offset, count)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.counts = {"events": 0, "allowed_local": 0, "forwarded": 0, "denied": 0, "daemons": 0}

    # -- the kernel's side ------------------------------------------------------------------
    def _answer(self, fd: int, err: int) -> None:
        try:
            os.write(self.group, wire.deny(fd, err) if err else wire.allow(fd))
        except OSError as exc:
            log.error("answering event %d: %s", fd, exc)
        if err:
            self.counts["denied"] += 1
        os.close(fd)

    def _local(self, offset: int, count: int) -> bool:
        end = min(offset + count, self.size)
        return offset >= end or kernel.first_hole(self.fd, offset, end) >= end

    def on_group(self) -> None:
        events = kernel.read_events(self.group)
        for ev in events:
            if ev.is_overflow:
                log.error("fanotify queue overflow (the kernel allowed an access unasked)")
                continue
            if ev.pidfd is not None and ev.pidfd >= 0:
                os.close(ev.pidfd)
            if not ev.needs_response:
                if ev.fd >= 0:
                    os.close(ev.fd)
                continue
            self.counts["events"] += 1
            if not ev.has_range or ev.count == 0 or self._local(ev.offset, ev.count):
                self.counts["allowed_local"] += 1
                self._answer(ev.fd, 0)
                continue
            self.pending[ev.fd] = (ev.offset, ev.count)
            self.counts["forwarded"] += 1
            self._send(link.fill(ev.fd, ev.offset, ev.count))

    # -- the daemon's side ------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.conn is None:
            return               # kept in pending: the next daemon gets it
        try:
            self.conn.sendall(data)
        except OSError as exc:
            log.error("daemon link: %s", exc)
            self._drop_daemon()

    def _drop_daemon(self) -> None:
        if self.conn is not None:
            self.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
            self.decoder = link.Decoder()
            log.log(logging.WARNING if self.pending else logging.INFO,
                    "the daemon is gone; %d fill(s) wait for the next one", len(self.pending))

    def on_listen(self) -> None:
        conn, _ = self.listener.accept()
        if self.conn is not None:
            log.warning("a second daemon connected while one is attached: refused")
            conn.close()
            return
        conn.setblocking(True)
        socket.send_fds(conn, [b"F"], [self.fd])
        self.conn = conn
        self.counts["daemons"] += 1
        self.sel.register(conn, selectors.EVENT_READ, "conn")
        log.info("daemon attached; %d pending fill(s) sent again", len(self.pending))
        for fd, (offset, count) in list(self.pending.items()):
            self._send(link.fill(fd, offset, count))

    def on_conn(self) -> None:
        try:
            data = self.conn.recv(64 * 1024)
        except OSError:
            data = b""
        if not data:
            self._drop_daemon()
            return
        try:
            records = self.decoder.feed(data)
        except Exception as exc:  # noqa: BLE001
            log.error("%s", exc)
            self._drop_daemon()
            return
        for r in records:
            if isinstance(r, link.Done) and r.id in self.pending:
                del self.pending[r.id]
                err = r.errno if r.errno in wire.DENY_ERRNOS else (_errno.EIO if r.errno else 0)
                self._answer(r.id, err)

    def may_unmark(self) -> bool:
        return not self.pending

    def close(self) -> None:
        for fd in list(self.pending):
            self._answer(fd, _errno.EIO)       # never let the group's release allow them: zeros
        self.pending.clear()
        super().close()
        self.listener.close()
        try:
            if os.stat(self.sock_path).st_ino == self._sock_ino:   # not a newer holder's socket
                os.unlink(self.sock_path)
        except OSError:
            pass
        log.info("holder exits: %s", self.counts)


def serve_process(name: str, make) -> int:
    """The life of the holder and the guard: one line to the parent ("ready", or "error MESSAGE"),
    then ``run()`` until the mount goes or SIGTERM/SIGINT sets ``stop``."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
    try:
        proc = make()
    except Exception as exc:  # noqa: BLE001 - one line to the parent, which reports it
        print(f"error {exc}", flush=True)
        return 1

    def on_term(_sig, _frame):
        proc.stop = True
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("ready", flush=True)
    proc.run()
    return 0


def main(argv: list[str]) -> int:
    data, sock_path, lock_path, mountpoint = argv
    return serve_process("holder", lambda: Holder(data, sock_path, lock_path, mountpoint))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
