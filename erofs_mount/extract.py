"""``erofs-mount extract``: restore an image's tree (or a subtree) into a directory.

Like ``fsck.erofs --extract`` but complete: regular files, directories,
symlinks, hard links as hard links, device nodes, FIFOs and sockets (when
root), modes, owners (when root), mtimes with nanoseconds and xattrs where the
destination filesystem allows.

Safety: every file is created relative to its parent's directory fd with
``O_NOFOLLOW``/``O_EXCL``, and every name is checked first (``/``, NUL, ``.``
or ``..`` inside an image name is corruption), so nothing is ever written
outside DEST whatever the image holds.  Damage is reported per path (the
kernel's errno: EUCLEAN, ELOOP, EIO, ...) and the rest is still extracted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .erofs.image import Image
from .erofs.inode import Inode
from .errors import CorruptedError, ErofsMountError, LoopError, ShortReadError, errno_of

CHUNK = 1 << 20
OPEN_LEVELS = 64       # directory fds kept open along the path being extracted


@dataclass
class ExtractReport:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)   # (path, "message (ERRNO)")
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Frame:
    """A directory being filled: its open fd, its inode (None: the starting one), its path in the
    image, its path relative to DEST (for hard links) and its entries still to make."""
    fd: int
    inode: Inode | None
    path: str
    rel: bytes
    entries: Iterator
    dev_ino: tuple[int, int]
    failed: bool = False


def _dev_ino(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _errtext(exc: BaseException) -> str:
    code = errno_of(exc)
    return f"{exc} ({errno.errorcode.get(code, code)})"


class Extractor:
    def __init__(self, image: Image, dest: str, *, progress: Callable[[ExtractReport, str], None] | None = None,
                 as_root: bool | None = None) -> None:
        self.img = image
        self.dest = dest
        self.report = ExtractReport()
        self.progress = progress
        self.root = os.geteuid() == 0 if as_root is None else as_root
        self._links: dict[int, bytes] = {}   # nid -> path of its first copy, relative to DEST
        self._rootfd = -1
        self._dirs_seen: set[int] = set()
        self._fds: list[int] = []
        self._xattr_warned: set[str] = set()

    # ------------------------------------------------------------------ entry
    def run(self, path: str = "/") -> ExtractReport:
        os.makedirs(self.dest, exist_ok=True)
        rootfd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY)
        self._fds.append(rootfd)
        self._rootfd = rootfd
        try:
            nid = self.img.resolve(path)
            inode = self.img.inode(nid)
            if inode.is_dir:
                self._dirs_seen.add(nid)
                self._walk(rootfd, nid, "/" if path.strip("/") == "" else "/" + path.strip("/"))
                self._finish(rootfd, None, inode, "/")
            else:
                name = path.rstrip("/").rsplit("/", 1)[-1]
                self._entry(rootfd, name.encode("utf-8", "surrogateescape"), nid, "/" + path.strip("/"), b"")
        finally:
            for fd in self._fds:
                os.close(fd)
        return self.report

    # ------------------------------------------------------------------ walking
    def _walk(self, rootfd: int, nid: int, path: str) -> None:
        """The tree under directory ``nid`` into ``rootfd``, depth first with an explicit stack: an
        image may nest directories thousands deep (a 4096-byte tar path holds 2048), deeper than
        Python's recursion limit.  At most ``OPEN_LEVELS`` directory fds stay open: a deeper
        ancestor's is closed and, when the walk climbs back to it, opened again as ``..`` of its
        child (O_NOFOLLOW; it must be the same directory, by device and inode).  A directory gets
        its attributes once its entries are done (mode last, so a read-only one still fills)."""
        stack = [_Frame(rootfd, None, path, b"", self._entries(nid, path), _dev_ino(rootfd))]
        try:
            while stack:
                top = stack[-1]
                e = next(top.entries, None)
                if e is None:
                    stack.pop()
                    if top.inode is None:          # the starting directory: run() finishes it
                        continue
                    if stack and stack[-1].fd < 0:
                        self._reopen(stack[-1], top)
                    self._close_dir(top)
                    continue
                child = top.path.rstrip("/") + "/" + e.name.decode("utf-8", "surrogateescape")
                frame = self._entry(top.fd, e.name, e.nid, child, top.rel)
                if frame is not None:
                    stack.append(frame)
                    if len(stack) > OPEN_LEVELS:
                        far = stack[-1 - OPEN_LEVELS]
                        if far.inode is not None and far.fd >= 0:
                            os.close(far.fd)
                            far.fd = -1
        finally:
            for frame in stack:                    # only when an exception escapes
                if frame.inode is not None and frame.fd >= 0:
                    os.close(frame.fd)

    def _reopen(self, parent: _Frame, child: _Frame) -> None:
        """Open ``parent`` again as ``..`` of ``child`` (before the child's mode is set: it may
        deny search); if that is not the directory opened before, make nothing more in it."""
        err: OSError | None = None
        if child.fd < 0:
            err = OSError(errno.EBADF, f"{child.path} could not be opened again")
        else:
            try:
                fd = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=child.fd)
            except OSError as exc:
                err = exc
            else:
                if _dev_ino(fd) == parent.dev_ino:
                    parent.fd = fd
                    return
                os.close(fd)
                err = OSError(errno.ESTALE, "the directory was replaced during the extraction")
        self._error(parent.path, err)
        parent.entries = iter(())
        parent.failed = True

    def _close_dir(self, frame: _Frame) -> None:
        if frame.failed:            # reported already; its fd could not be opened again
            return
        try:
            self._finish(frame.fd, None, frame.inode, frame.path)
            self.report.dirs += 1
        except (ErofsMountError, OSError) as exc:
            self._error(frame.path, exc)
        finally:
            os.close(frame.fd)

    def _entries(self, nid: int, path: str):
        entries = []
        try:
            dots: set[bytes] = set()
            for e in self.img.iterdir(nid):
                if e.name in (b".", b".."):
                    if e.name in dots:
                        self._error(path.rstrip("/") + "/" + e.name.decode(), CorruptedError(
                            f"directory nid {nid}: invalid file name {e.name!r} (a second one)"))
                    dots.add(e.name)
                    continue
                entries.append(e)
        except ErofsMountError as exc:
            self._error(path, exc)
            # the kernel lists what it can before the damaged block: keep what was read
        return iter(entries)

    def _entry(self, dirfd: int, name: bytes, nid: int, path: str, parent_rel: bytes) -> _Frame | None:
        """Make one entry; a directory is created and opened and returned as a frame for ``_walk``
        to fill (None otherwise, or when it failed: the error is reported for its path)."""
        try:
            if b"/" in name or b"\0" in name or name in (b".", b"..") or not name:
                raise CorruptedError(f"invalid file name {name!r} in the image")
            inode = self.img.inode(nid)
            if inode.is_dir:
                if nid in self._dirs_seen:
                    raise LoopError(f"directory nid {nid} appears twice (directory cycle)")
                self._dirs_seen.add(nid)
                childfd = self._mkdir(dirfd, name)
                try:
                    return _Frame(childfd, inode, path, parent_rel + name + b"/", self._entries(nid, path),
                                  _dev_ino(childfd))
                except BaseException:
                    os.close(childfd)
                    raise
            if inode.nlink > 1 and nid in self._links:
                self._unlink_existing(dirfd, name)
                os.link(self._links[nid], name, src_dir_fd=self._rootfd, dst_dir_fd=dirfd, follow_symlinks=False)
                return None
            self._make_leaf(dirfd, name, nid, inode, path)
            if inode.nlink > 1:
                self._links[nid] = parent_rel + name
        except ErofsMountError as exc:
            self._error(path, exc)
        except OSError as exc:
            self._error(path, exc)
        return None

    # ------------------------------------------------------------------ creating
    def _mkdir(self, dirfd: int, name: bytes) -> int:
        try:
            os.mkdir(name, 0o700, dir_fd=dirfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dirfd)
                os.mkdir(name, 0o700, dir_fd=dirfd)
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)

    @staticmethod
    def _unlink_existing(dirfd: int, name: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise FileExistsError(errno.EEXIST, "a directory is in the way")
        os.unlink(name, dir_fd=dirfd)

    def _make_leaf(self, dirfd: int, name: bytes, nid: int, inode: Inode, path: str) -> None:
        fmt = stat.S_IFMT(inode.mode)
        if fmt == stat.S_IFREG:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            try:
                fd = os.open(name, flags, 0o600, dir_fd=dirfd)
            except FileExistsError:  # extracting over an earlier extraction
                self._unlink_existing(dirfd, name)
                fd = os.open(name, flags, 0o600, dir_fd=dirfd)
            try:
                self._copy(fd, nid, inode, path)
                self._finish(fd, None, inode, path)
            finally:
                os.close(fd)
            self.report.files += 1
            return
        self._unlink_existing(dirfd, name)
        if fmt == stat.S_IFLNK:
            target = self.img.readlink(nid)
            if not target or b"\0" in target:
                raise CorruptedError(f"inode {nid}: invalid symlink target {target[:64]!r}")
            os.symlink(target, name, dir_fd=dirfd)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            if not self.root:
                self.report.warnings.append(f"{path}: device node/socket skipped (needs root)")
                return
            os.mknod(name, fmt | 0o600, inode.rdev, dir_fd=dirfd)
        elif fmt == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=dirfd)
        else:  # pragma: no cover - parse_inode rejects other types
            raise CorruptedError(f"inode {nid}: unknown file type")
        self._finish(dirfd, name, inode, path)
        self.report.files += 1

    def _copy(self, fd: int, nid: int, inode: Inode, path: str) -> None:
        """File data into ``fd``: sendfile(2) straight from a local image where the bytes lie as they
        are, the reader (decompression, inline tails, holes, remote sources) for the rest."""
        for off, n, source, where in self.img.data_pieces(nid):
            src_fd = _fileno(source)
            if src_fd is not None:
                self._sendfile(fd, src_fd, where, n, nid, off)
            else:
                end = off + n
                while off < end:
                    data = self.img.read(nid, off, min(CHUNK, end - off))
                    if not data:
                        raise CorruptedError(f"inode {nid}: data ends at {off} of {inode.size} bytes")
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    off += len(data)
                    self.report.bytes += len(data)
            if self.progress:
                self.progress(self.report, path)

    def _sendfile(self, fd: int, src_fd: int, where: int, n: int, nid: int, off: int) -> None:
        while n > 0:
            sent = os.sendfile(fd, src_fd, where, min(n, 1 << 30))
            if sent <= 0:
                raise ShortReadError(f"inode {nid}: short read at offset {off} (image ends)")
            where += sent
            off += sent
            n -= sent
            self.report.bytes += sent

    def _finish(self, fd: int, name: bytes | None, inode: Inode, path: str) -> None:
        """xattrs, owner, mode, mtime: on an open fd (name None) or on ``name`` in dir ``fd``."""
        target = fd if name is None else name
        kw = {} if name is None else {"dir_fd": fd, "follow_symlinks": False}
        is_link = stat.S_ISLNK(inode.mode)
        try:
            items = self.img.xattr_items(inode.nid)
        except ErofsMountError as exc:
            self._error(path, exc)
            items = []
        if self.root:  # before the xattrs: chown drops security.capability and setuid bits
            os.chown(target, inode.uid, inode.gid, **kw)
        for key, value in items:
            self._setxattr(fd, name, key, value, path)
        if not is_link:
            os.chmod(target, stat.S_IMODE(inode.mode), **({} if name is None else {"dir_fd": fd}))
        os.utime(target, ns=(inode.mtime * 1_000_000_000 + inode.mtime_nsec,) * 2, **kw)

    def _setxattr(self, fd: int, name: bytes | None, key: bytes, value: bytes, path: str) -> None:
        if not key or b"\0" in key:   # no xattr name holds a NUL (listxattr separates names with them)
            self._error(path, CorruptedError(f"invalid xattr name {key!r}"))
            return
        try:
            if name is None:
                os.setxattr(fd, key, value)
            else:
                # xattrs on a non-fd path: go through /proc/self/fd to stay relative to the dir fd
                os.setxattr(f"/proc/self/fd/{fd}/".encode() + name, key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EOPNOTSUPP):
                k = key.split(b".", 1)[0].decode("latin-1")
                if k not in self._xattr_warned:
                    self._xattr_warned.add(k)
                    self.report.warnings.append(f"{k}.* xattrs not restored here ({os.strerror(exc.errno)})")
                return
            raise

    def _error(self, path: str, exc: BaseException) -> None:
        self.report.errors.append((path, _errtext(exc)))


def _fileno(source) -> int | None:
    fileno = getattr(source, "fileno", None)
    if fileno is None:
        return None
    try:
        return fileno()
    except (OSError, ValueError, ErofsMountError):
        return None


class TtyProgress:
    """A one-line progress indicator on stderr, refreshed at most 5 times a second."""

    def __init__(self, total_bytes: int, stream=sys.stderr) -> None:
        self.total = max(total_bytes, 1)
        self.stream = stream
        self.last = 0.0

    def __call__(self, report: ExtractReport, path: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = min(100, report.bytes * 100 // self.total)
        bar = "#" * (pct // 4)
        self.stream.write(f"\r[{bar:<25}] {pct:3d}% {report.files} files {report.bytes >> 20} MiB")
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("\r" + " " * 70 + "\r")
        self.stream.flush()
