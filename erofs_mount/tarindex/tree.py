"""The file tree of one tar layer, built from :class:`~.tarparse.Member` events in stream order.

Rules (what extracting the layer with containerd leaves on disk, minus symlink following):

* a later member wins for a path: a directory replacing a directory keeps its children and
  takes the new attributes; anything else replaces the old entry, and a replaced directory's
  whole subtree goes with it;
* missing parent directories are created implicitly (mode 0755, uid/gid 0, the member's mtime;
  the root, until a ``./`` member says otherwise, takes the first member's mtime);
  a member "through" a non-directory parent (symlink ``a`` -> ``/etc``, then ``a/passwd``)
  replaces that parent with an implicit directory: symlinks are never followed;
* a hard link names an EARLIER non-directory entry of this layer (its normalised target is
  looked up in the tree as it stands) and shares its inode, so ``nlink`` counts the names; a
  link whose target is missing, later or a directory is left out with a warning (erofs-utils
  lib/tar.c refuses the whole tar then: -ENOENT / -EISDIR);
* OCI whiteouts become overlayfs ones when the index is written (:meth:`Tree.overlay_whiteouts`,
  what ``mkfs.erofs --aufs`` and containerd's overlayfs snapshotter do): ``.wh.NAME`` a character
  device 0/0 named NAME, ``.wh..wh..opq`` the xattr ``trusted.overlay.opaque`` = ``y`` on its
  directory; so the kernel's overlayfs (NBD mode, whole images) and erofs-mount's merge read a
  layer the same way.  A whiteout never hides an entry of its own layer (OCI image spec: whiteouts
  apply to lower layers only): a same-layer file or symlink of that name hides the lower one by
  itself, a same-layer directory is made opaque;
* a member for the root itself (``./``) sets the root's attributes if it is a directory and is
  left out with a warning otherwise;
* xattrs EROFS cannot name with a built-in prefix (user., trusted., security., exactly
  system.posix_acl_access / _default) are dropped with a warning: the long-prefix feature would
  need a packed inode, and Linux refuses such names in setxattr(2) anyway; so are names holding
  a NUL byte (no xattr name can: listxattr(2) separates names with NULs), values over 65535
  bytes (e_value_size is a u16) and entries beyond the 16-bit i_xattr_icount;
* a symlink with an empty target is left out with a warning (symlink(2) refuses one: ENOENT).

Refused with :class:`~erofs_mount.errors.UnsupportedError` (EROFS cannot represent them): a name
component over 255 bytes, uid/gid beyond 32 bits, a device number beyond new_encode_dev's 12-bit
major / 20-bit minor, a symlink target over 4095 bytes (the kernel reads at most PAGE_SIZE - 1).

Memory: one :class:`Node` per inode (10 slots, ~120 bytes with its GC header) plus, per name,
a ``bytes`` key (~33 bytes + the name) and its slot in the parent's dict, and ~32-byte ints
for mtime and data offset: ~210 bytes per entry measured with tracemalloc for 20-byte names
(tests/unit/test_tarindex_tree.py checks < 300), so the default bound of 4,000,000 live entries
is ~0.85-1.2 GB.  More than ``max_entries`` raise :class:`~erofs_mount.errors.ImageError`.
What a member may carry besides its name is bounded as a whole: xattrs (up to ~256 KiB per
inode) and symlink targets (up to 4095 bytes) are kept in the tree and copied into every inode
of the index, so a few MB of gzip of PAX records (~60 KB of zeros each) would otherwise become
GBs of tree and index.  More than ``max_meta`` bytes of them in the layer (counted as they are
added, as the index stores them: xattr body + target; 128 MiB by default, ~2.5 million
SELinux labels) raise :class:`~erofs_mount.errors.ImageError` naming the member and offset.
Just below the bound, building the index holds them three times (tree, index being written, the
index as bytes): ~410 MB peak RSS measured, against ~720 MB for a layer of 0.9 MB of gzip before.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ImageError, UnsupportedError
from ..erofs import layout as L
from .tarparse import Member

MAX_ENTRIES = 4_000_000
MAX_META = 128 << 20      # bytes of xattr bodies and symlink targets in one layer
MAX_WARNINGS = 1000
_XATTR_BODY_MAX = L.XATTR_IBODY_HEADER.size + 4 * (0xFFFF - 1)   # i_xattr_icount is a u16
_PREFIXES = sorted(((p, i) for i, p in L.XATTR_PREFIXES.items()), key=lambda t: -len(t[0]))
_EXACT = {L.EROFS_XATTR_INDEX_POSIX_ACL_ACCESS, L.EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT}


def xattr_split(name: bytes) -> tuple[int, bytes] | None:
    """``(e_name_index, suffix)`` for a full xattr name, None if no built-in prefix names it."""
    for prefix, index in _PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if (index in _EXACT) != (not suffix) or len(suffix) > L.EROFS_NAME_LEN:
                return None
            return index, suffix
    return None


def xattr_entry_size(suffix: bytes, value: bytes) -> int:
    return (L.XATTR_ENTRY.size + len(suffix) + len(value) + 3) & ~3


class Node:
    """One inode.  ``extra``: dir -> dict name -> Node; symlink -> target bytes; chr/blk ->
    (major, minor); else None.  ``xattrs``: sorted ``(name, value)`` pairs or None."""

    __slots__ = ("kind", "mode", "uid", "gid", "mtime_ns", "size", "data_offset", "nlink", "extra", "xattrs")

    def __init__(self, kind: str, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
                 data_offset: int = 0, extra=None, xattrs=None) -> None:
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.data_offset = data_offset
        self.nlink = 1
        self.extra = extra
        self.xattrs = xattrs

    @property
    def children(self) -> dict[bytes, Node]:
        return self.extra

    def __repr__(self) -> str:
        return f"Node({self.kind}, mode=0o{self.mode:o}, nlink={self.nlink}, size={self.size})"


def _implicit_dir(mtime_ns: int) -> Node:
    return Node("dir", 0o755, 0, 0, mtime_ns, extra={})


class Tree:
    """The tree; feed members with :meth:`add` (or use :func:`build_tree`)."""

    def __init__(self, *, max_entries: int = MAX_ENTRIES, max_meta: int = MAX_META) -> None:
        self.root = _implicit_dir(0)
        self.max_entries = max_entries
        self.max_meta = max_meta
        self.entries = 1                    # live names, the root included
        self.meta_bytes = 0                 # xattr bodies and symlink targets added so far
        self.warnings: list[str] = []
        self.warnings_dropped = 0
        self.tar_end = 0                    # end of the furthest regular file data (build_index checks it)
        self._root_dated = False

    def warn(self, msg: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)
        else:
            self.warnings_dropped += 1

    # ------------------------------------------------------------------ building
    def add(self, m: Member) -> None:
        if not self._root_dated:
            self.root.mtime_ns = m.mtime_ns
            self._root_dated = True
        where = f"member {m.path or '.'!r} at offset {m.header_offset}"
        if m.kind == "reg" and m.size:
            self.tar_end = max(self.tar_end, m.data_offset + m.size)
        if not m.path:
            if m.kind != "dir":
                self.warn(f"{where}: a {m.kind} cannot replace the root directory; left out")
                return
            self._set_attrs(self.root, self._node(m, where))
            return
        if m.kind == "symlink" and not m.linkname:
            self.warn(f"{where}: symlink with an empty target; left out")
            return
        parts = m.path.encode("utf-8", "surrogateescape").split(b"/")
        for p in parts:
            if len(p) > L.EROFS_NAME_LEN:
                raise UnsupportedError(f"tar: {where}: name component of {len(p)} bytes (EROFS allows "
                                       f"{L.EROFS_NAME_LEN})")
        parent = self._parent(parts[:-1], m.mtime_ns, where)
        name = parts[-1]
        old = parent.extra.get(name)
        if m.kind == "hardlink":
            target = self.lookup(m.linkname)
            if target is None or target.kind == "dir":
                why = "a directory" if target is not None else "missing (not an earlier member)"
                self.warn(f"{where}: hard link target {m.linkname!r} is {why}; link left out")
                return
            if target is old:
                return
            if old is not None:
                self._drop(old)
            self._count(where)
            parent.extra[name] = target
            target.nlink += 1
            return
        node = self._node(m, where)
        if old is not None:
            if old.kind == "dir" and node.kind == "dir":
                self._set_attrs(old, node)
                return
            self._drop(old)
        self._count(where)
        parent.extra[name] = node

    def lookup(self, path: str) -> Node | None:
        """The node at a normalised path, symlinks not followed; None if absent."""
        node = self.root
        if not path:
            return node
        for p in path.encode("utf-8", "surrogateescape").split(b"/"):
            if node.kind != "dir":
                return None
            node = node.extra.get(p)
            if node is None:
                return None
        return node

    # ------------------------------------------------------------------ internals
    def _count(self, where: str) -> None:
        if self.entries >= self.max_entries:
            raise ImageError(f"tar: {where}: more than {self.max_entries} entries (max_entries)")
        self.entries += 1

    def _parent(self, parts: list[bytes], mtime_ns: int, where: str) -> Node:
        d = self.root
        for p in parts:
            c = d.extra.get(p)
            if c is None or c.kind != "dir":
                if c is not None:
                    self.warn(f"{where}: parent {p!r} is a {c.kind}; replaced by a directory")
                    self._drop(c)
                c = _implicit_dir(mtime_ns)
                self._count(where)
                d.extra[p] = c
            d = c
        return d

    def _drop(self, node: Node) -> None:
        """Forget one name of ``node`` (and, for a directory, its whole subtree)."""
        stack = [node]
        while stack:
            n = stack.pop()
            self.entries -= 1
            n.nlink -= 1
            if n.kind == "dir":
                stack.extend(n.extra.values())
                n.extra = {}

    @staticmethod
    def _set_attrs(dst: Node, src: Node) -> None:
        dst.mode, dst.uid, dst.gid, dst.mtime_ns, dst.xattrs = src.mode, src.uid, src.gid, src.mtime_ns, src.xattrs

    def _node(self, m: Member, where: str) -> Node:
        for what, v in (("uid", m.uid), ("gid", m.gid)):
            if v > 0xFFFFFFFF:
                raise UnsupportedError(f"tar: {where}: {what} {v} does not fit EROFS's 32 bits")
        if not -(1 << 63) <= m.mtime_ns // 1_000_000_000 < 1 << 63:
            raise UnsupportedError(f"tar: {where}: mtime {m.mtime_ns} ns out of range")
        extra = None
        size = data_offset = 0
        if m.kind == "dir":
            extra = {}
        elif m.kind == "reg":
            size, data_offset = m.size, m.data_offset
        elif m.kind == "symlink":
            extra = m.linkname.encode("utf-8", "surrogateescape")
            if len(extra) > 4095:
                raise UnsupportedError(f"tar: {where}: symlink target of {len(extra)} bytes (at most 4095)")
            size = len(extra)
            self._meta(size, where)
        elif m.kind in ("chr", "blk"):
            if m.devmajor > 0xFFF or m.devminor > 0xFFFFF or m.devmajor < 0 or m.devminor < 0:
                raise UnsupportedError(f"tar: {where}: device {m.devmajor}:{m.devminor} does not fit "
                                       "new_encode_dev (12-bit major, 20-bit minor)")
            extra = (m.devmajor, m.devminor)
        return Node(m.kind, m.mode, m.uid, m.gid, m.mtime_ns, size, data_offset, extra,
                    self._xattrs(m.xattrs, where))

    def _xattrs(self, xattrs: dict[bytes, bytes], where: str):
        if not xattrs:
            return None
        out = []
        body = L.XATTR_IBODY_HEADER.size
        for name, value in sorted(xattrs.items()):
            if b"\0" in name:
                self.warn(f"{where}: xattr name {name!r} holds a NUL byte; dropped")
                continue
            split = xattr_split(name)
            if split is None:
                self.warn(f"{where}: xattr {name!r} has no EROFS built-in prefix; dropped")
                continue
            if len(value) > 0xFFFF:
                self.warn(f"{where}: xattr {name!r} value of {len(value)} bytes (at most 65535); dropped")
                continue
            size = xattr_entry_size(split[1], value)
            if body + size > _XATTR_BODY_MAX:
                self.warn(f"{where}: xattr {name!r} does not fit the inode's xattr area; dropped")
                continue
            body += size
            out.append((name, value))
        if out:
            self._meta(body, where)
        return tuple(out) or None

    def _meta(self, n: int, where: str) -> None:
        self.meta_bytes += n
        if self.meta_bytes > self.max_meta:
            raise ImageError(f"tar: {where}: more than {self.max_meta} bytes of xattrs and symlink targets "
                             "in the layer (max_meta)")


OPAQUE = (b"trusted.overlay.opaque", b"y")
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


def _with_opaque(node: Node) -> None:
    xattrs = dict(node.xattrs or ())
    xattrs[OPAQUE[0]] = OPAQUE[1]
    node.xattrs = tuple(sorted(xattrs.items()))


def overlay_whiteouts(tree: Tree) -> None:
    """Turn the OCI whiteout entries of ``tree`` into overlayfs whiteouts, in place (module doc)."""
    stack = [tree.root]
    while stack:
        d = stack.pop()
        names = [n for n in d.extra if n.startswith(WHITEOUT_PREFIX)]
        for name in names:
            node = d.extra.pop(name)
            tree._drop(node)
            if name == OPAQUE_MARKER:
                _with_opaque(d)
                continue
            target = name[len(WHITEOUT_PREFIX):]
            if not target or target in (b".", b"..") or target.startswith(WHITEOUT_PREFIX):
                tree.warn(f"whiteout {name!r}: names nothing a layer below can have; left out")
                continue
            same = d.extra.get(target)
            if same is not None:
                if same.kind == "dir":
                    _with_opaque(same)
                continue
            tree.entries += 1
            d.extra[target] = Node("chr", 0, node.uid, node.gid, node.mtime_ns, extra=(0, 0))
        stack.extend(c for c in d.extra.values() if c.kind == "dir")


def build_tree(members: Iterable[Member], *, max_entries: int = MAX_ENTRIES, max_meta: int = MAX_META) -> Tree:
    tree = Tree(max_entries=max_entries, max_meta=max_meta)
    for m in members:
        tree.add(m)
    return tree
