"""The directory operations of ``ops.ErofsOperations``: OPENDIR, READDIR, RELEASEDIR.

``readdir`` resumes from the directory byte position handed out as ``next_id``
(``DirEntry.next_pos``), as the kernel's ``fs/erofs/dir.c`` uses ``f_pos``; one call never
rescans earlier blocks.  Entries are prepared ``READDIR_BATCH`` at a time (one reader call, one
worker-thread hop when it cannot run inline) with their attributes (READDIRPLUS); the part of a
batch that does not fit in the kernel's reply page (~25 entries) answers the next READDIR, which
comes from exactly that position, and the empty READDIR at the end of a directory needs no reader
call.  Every entry handed out counts as a lookup (READDIRPLUS instantiates it), except "." and
"..", and regular files are noted in listing order for accel/storeahead.py.
"""

from __future__ import annotations

import errno
import stat

import pyfuse3

from ...errors import CorruptedError, ErofsMountError
from .errmap import fuse_errors

READDIR_BATCH = 64         # entries prepared per reader call / worker-thread hop
DIR_ENDS = 4096            # directories whose end position is remembered
DIR_RESTS = 64             # directories whose unsent entries are kept for the next READDIR
_DOTS = (b".", b"..")
# EROFS_FT_* (erofs_fs.h) -> S_IFMT, for entries whose inode cannot be read
_FT_MODE = {1: stat.S_IFREG, 2: stat.S_IFDIR, 3: stat.S_IFCHR, 4: stat.S_IFBLK, 5: stat.S_IFIFO,
            6: stat.S_IFSOCK, 7: stat.S_IFLNK}


def _put_bounded(d: dict, key, value, limit: int) -> None:
    if len(d) >= limit:
        d.clear()
    d[key] = value


class DirectoryOps:
    """Mixin of ``ErofsOperations`` (which supplies ``image``, ``root_nid``, ``_run``, ``_make_attr``,
    ``getattr``, ``ino_of``/``nid_of``, the lookup counts, ``pages`` and ``ahead``)."""

    def _init_dirs(self) -> None:
        # directory nid -> (parent nid, name) where it was first met; root has no parent
        self._dir_parent: dict[int, tuple[int | None, bytes]] = {self.root_nid: (None, b"")}
        # directory nid -> the position after its last entry: the kernel asks once more from there
        # (an empty reply is its end of directory), which then needs no reader call
        self._dir_end: dict[int, int] = {}
        # directory nid -> (position, entries prepared from there, whether they end the directory):
        # the part of a batch that did not fit in the reply
        self._dir_rest: dict[int, tuple[int, list, bool]] = {}

    def _dir_clash(self, nid: int, parent_nid: int, name: bytes) -> tuple[int | None, bytes] | None:
        """None if directory ``nid`` may be (parent, name): the first place it is met, or that one
        again; else the (parent, name) it was met at first.  A second place is a cycle or a
        hard-linked directory (lookup: ELOOP)."""
        known = self._dir_parent.get(nid)
        if known is None:
            self._dir_parent[nid] = (parent_nid, name)
            return None
        return None if known == (parent_nid, name) else known

    @fuse_errors
    async def opendir(self, inode, ctx):
        attr = self._attrs.get(inode)
        if attr is None:
            attr = await self.getattr(inode, ctx)
        if not stat.S_ISDIR(attr.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _dir_batch(self, dir_nid: int, pos: int) -> list:
        """Up to READDIR_BATCH entries from byte position ``pos``: (name, nid, attr|None, err, next_pos)."""
        out = []
        for ent in self.image.iterdir(dir_nid, pos):
            if ent.next_pos <= pos:  # resume cookies must advance, or a listing could never end
                raise CorruptedError(f"directory nid {dir_nid}: entry position {ent.next_pos} after {pos}")
            pos = ent.next_pos
            if ent.name in _DOTS:
                out.append((ent.name, ent.nid, None, 0, ent.file_type, ent.next_pos))
            else:
                try:
                    attr, err = self._make_attr(ent.nid), 0
                except ErofsMountError as exc:
                    # the kernel's readdir never reads child inodes; the error belongs to lstat
                    attr, err = None, exc.errno
                out.append((ent.name, ent.nid, attr, err, ent.file_type, ent.next_pos))
            if len(out) >= READDIR_BATCH:
                break
        return out

    def _unusable_entry(self, nid: int, file_type: int,
                        attr: pyfuse3.EntryAttributes | None = None) -> pyfuse3.EntryAttributes:
        # An entry whose inode cannot be read, or a second name of a directory: listed (the
        # kernel's readdir never reads child inodes), but with zero timeouts so the next lstat
        # asks lookup() again, which reports the kernel's errno (EUCLEAN, EIO, ELOOP, ...).
        a = pyfuse3.EntryAttributes()
        if attr is not None:
            a.__setstate__(attr.__getstate__())
        else:
            a.st_ino = self.ino_of(nid)
            a.st_mode = _FT_MODE.get(file_type, stat.S_IFREG)
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        dir_nid = self.nid_of(fh)
        pos = start_id
        if self._dir_end.get(dir_nid) == pos:
            return
        ahead, store_max = self.ahead, self.pages.max_size
        if not pos:
            ahead.listing_starts(fh)
        rest = self._dir_rest.pop(dir_nid, None)
        while True:
            if rest is not None and rest[0] == pos:
                _, batch, at_end = rest
            else:
                batch = await self._run(self._dir_batch, dir_nid, pos)
                at_end = len(batch) < READDIR_BATCH  # _dir_batch stops short only at the end
            rest = None
            if not batch:
                self._at_end(dir_nid, pos)
                return
            for i, (name, nid, attr, err, ftype, next_pos) in enumerate(batch):
                if attr is None and not err:  # "." or "..": no lookup count, the kernel ignores attrs
                    dot = pyfuse3.EntryAttributes()
                    dot.st_ino = self.ino_of(nid)
                    dot.st_mode = stat.S_IFDIR
                    if not pyfuse3.readdir_reply(token, name, dot, next_pos):
                        self._keep_rest(dir_nid, pos, batch[i:], at_end)
                        return
                    pos = next_pos
                    continue
                counted = attr is not None
                if counted and stat.S_ISDIR(attr.st_mode) and self._dir_clash(nid, dir_nid, name):
                    counted = False
                    attr = self._unusable_entry(nid, ftype, attr)
                if attr is None:
                    attr = self._unusable_entry(nid, ftype)
                if not pyfuse3.readdir_reply(token, name, attr, next_pos):
                    self._keep_rest(dir_nid, pos, batch[i:], at_end)
                    return
                if counted:
                    self._remember(attr)
                    if stat.S_ISREG(attr.st_mode) and 0 < attr.st_size <= store_max:
                        ahead.listed(fh, attr.st_ino, attr.st_size)
                else:
                    self._lookups[attr.st_ino] = self._lookups.get(attr.st_ino, 0) + 1
                pos = next_pos
            if at_end:
                self._at_end(dir_nid, pos)
                return

    def _keep_rest(self, dir_nid: int, pos: int, rest: list, at_end: bool) -> None:
        # the reply page is full (~25 entries): the rest of the batch answers the next READDIR,
        # which the kernel sends from exactly this position
        _put_bounded(self._dir_rest, dir_nid, (pos, rest, at_end), DIR_RESTS)

    def _at_end(self, dir_nid: int, pos: int) -> None:
        _put_bounded(self._dir_end, dir_nid, pos, DIR_ENDS)

    @fuse_errors
    async def releasedir(self, fh):
        return None
