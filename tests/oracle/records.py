"""Records of a tree as the kernel shows it and as our Image API reads it, and their differences.

Both sides produce ``tests.corpuslib.scan_tree``-shaped records (same field names)
plus fields only a direct comparison can check:

* ``ino``: the kernel's ``st_ino`` is the nid our lookup returns, mapped by
  ``Image.st_ino`` (the identity but on metabox images);
* ``blocks``: ``st_blocks`` (``erofs_read_inode``: compressed = on-disk block count,
  otherwise i_size rounded up to the block size);
* ``order``: the kernel's readdir order (getdents, "." and ".." left out);
* ``xattr_order``: the kernel's listxattr order;
* ``dirents``: for a directory, every getdents64 record in order, "." and ".." included:
  ``[name, d_ino, d_off, d_type]``; d_off is the position to resume from after that
  entry (the kernel's ``ctx->pos``), which must equal our ``DirEntry.next_pos`` cookie.

Paths are ``/a/b`` strings with undecodable bytes as surrogate escapes.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import ctypes.util
import hashlib
import os
import stat
from pathlib import Path

from erofs_mount.erofs.image import Image
from erofs_mount.errors import ErofsMountError
from tests import corpuslib

MODE_TYPES = corpuslib.TYPE_NAMES


def _p(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class FileReader:
    """A positional reader over a file (what the CLI gives Image, minus the CLI)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_image(path, devices=()) -> tuple[Image, list[FileReader]]:
    readers = [FileReader(path)] + [FileReader(d) for d in devices]
    img = Image(readers[0], size=readers[0].size, devices=readers[1:])
    return img, readers


# ---------------------------------------------------------------------------- kernel side
class _Dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir64.restype = ctypes.POINTER(_Dirent64)
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]

# EROFS_FT_* -> DT_* (fs_ftype_to_dtype)
FT_TO_DT = {0: 0, 1: 8, 2: 4, 3: 2, 4: 6, 5: 1, 6: 12, 7: 10}


def getdents(path: bytes, limit: int = 100_000) -> list[list]:
    """``[name, d_ino, d_off, d_type]`` of every record the kernel's getdents64 returns, in order."""
    d = _libc.opendir(path)
    if not d:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    out = []
    try:
        while len(out) < limit:
            ctypes.set_errno(0)
            ent = _libc.readdir64(d)
            if not ent:
                if ctypes.get_errno():
                    raise OSError(ctypes.get_errno(), "readdir", path)
                break
            e = ent.contents
            out.append([_p(e.d_name), e.d_ino, e.d_off, e.d_type])
    finally:
        _libc.closedir(d)
    return out


def kernel_records(root: str | Path) -> tuple[dict, dict]:
    """(scan_tree records, extras) of a mounted tree; extras: path -> ino, blocks, order, xattr_order."""
    base = corpuslib.scan_tree(root)
    root_b = os.fsencode(str(root))
    extra: dict[str, dict] = {}
    for path in base:
        rel = os.fsencode(path) if path != "/" else b""
        full = root_b + rel
        if "error" in base[path]:
            extra[path] = {}
            continue
        st = os.lstat(full)
        rec = {"ino": st.st_ino, "blocks": st.st_blocks,
               "xattr_order": [_p(os.fsencode(n)) for n in os.listxattr(full, follow_symlinks=False)]}
        if stat.S_ISDIR(st.st_mode):
            rec["order"] = [_p(n) for n in os.listdir(full)]
            rec["dirents"] = getdents(full or b"/")
        extra[path] = rec
    return base, extra


def kernel_statfs(root: str | Path) -> dict:
    s = os.statvfs(root)
    u64 = (1 << 64) - 1   # os.statvfs gives the kernel's u64 counters as signed values
    return {"f_bsize": s.f_bsize, "f_blocks": s.f_blocks & u64, "f_files": s.f_files & u64,
            "f_ffree": s.f_ffree & u64, "f_namemax": s.f_namemax}


# ---------------------------------------------------------------------------- our side
def image_records(img: Image, limit: int = 200_000) -> tuple[dict, dict]:
    """The same records built from Image API calls only (iterdir/inode/read/readlink/xattrs)."""
    entries: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    by_nid: dict[int, list[str]] = {}
    stack = [(b"/", img.root_nid)]
    while stack and len(entries) < limit:
        rel, nid = stack.pop()
        path = _p(rel)
        try:
            ino = img.inode(nid)
        except ErofsMountError as exc:   # the kernel's lstat fails the same way (compared in diff)
            entries[path] = {"error": {"op": "lstat", "errno": errno_mod.errorcode.get(exc.errno, str(exc.errno))}}
            extra[path] = {}
            continue
        fmt = stat.S_IFMT(ino.mode)
        rec: dict = dict(type=MODE_TYPES.get(fmt, "?"), mode=f"{ino.mode:o}", uid=ino.uid, gid=ino.gid,
                         size=ino.size, nlink=ino.nlink, mtime={"sec": ino.mtime, "nsec": ino.mtime_nsec})
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            rec["rdev"] = {"major": os.major(ino.rdev), "minor": os.minor(ino.rdev)}
        if fmt == stat.S_IFLNK:
            rec["target"] = _p(img.readlink(nid))
        items = img.xattr_items(nid)
        rec["xattrs"] = {_p(n): v.hex() for n, v in items}
        ex = {"ino": img.st_ino(nid), "blocks": ino.blocks, "xattr_order": [_p(n) for n, _ in items]}
        if fmt == stat.S_IFREG:
            h = hashlib.sha256()
            pos = 0
            while pos < ino.size:
                chunk = img.read(nid, pos, 1 << 20)
                assert chunk, f"{path}: empty read at {pos} of {ino.size}"
                h.update(chunk)
                pos += len(chunk)
            rec["sha256"] = h.hexdigest()
        if fmt != stat.S_IFDIR and ino.nlink > 1:
            by_nid.setdefault(nid, []).append(path)
        if fmt == stat.S_IFDIR:
            every = list(img.iterdir(nid))
            names = [e for e in every if e.name not in (b".", b"..")]
            ex["dirents"] = [[_p(e.name), img.st_ino(e.nid), e.next_pos, FT_TO_DT.get(e.file_type, 0)]
                             for e in every]
            rec["children"] = sorted(_p(e.name) for e in names)
            ex["order"] = [_p(e.name) for e in names]
            for e in names:
                stack.append(((rel if rel != b"/" else b"") + b"/" + e.name, e.nid))
        entries[path] = rec
        extra[path] = ex
    for paths in by_nid.values():
        group = min(paths, key=lambda s: os.fsencode(s))
        for p in paths:
            entries[p]["hardlink_group"] = group
    return entries, extra


def dirent_checks(img: Image) -> list[str]:
    """Per directory: dirent file types agree with inodes, lookup() finds every entry, resume cookies work."""
    bad: list[str] = []
    stack = [img.root_nid]
    seen = set()
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        entries = list(img.iterdir(nid))
        dots = [e for e in entries if e.name in (b".", b"..")]
        if sorted(e.name for e in dots) != [b".", b".."]:
            bad.append(f"dir {nid}: dot entries {[e.name for e in dots]}")
        for e in dots:
            if e.name == b"." and e.nid != nid:
                bad.append(f"dir {nid}: '.' points at {e.nid}")
        names = [e.name for e in entries]
        on_disk = names[:-1] if img.inode(nid).dot_omitted else names   # the synthetic "." comes last
        if on_disk != sorted(on_disk):
            bad.append(f"dir {nid}: entries not sorted bytewise")
        for i, e in enumerate(entries):
            if e.name in (b".", b".."):
                continue
            child = img.inode(e.nid)
            if e.file_type != child.file_type:
                bad.append(f"dir {nid} {e.name!r}: dirent type {e.file_type}, inode type {child.file_type}")
            if img.lookup(nid, e.name) != e.nid:
                bad.append(f"dir {nid} {e.name!r}: lookup disagrees with iterdir")
            if child.is_dir:
                stack.append(e.nid)
        # resuming from a cookie yields exactly the remaining entries (every cookie of a small
        # directory; for a big one the first, the last and those that cross into a new block)
        bs = img.block_size
        picks = [i for i, e in enumerate(entries[:-1])
                 if len(entries) <= 64 or i < 3 or i > len(entries) - 4
                 or e.next_pos // bs != entries[i + 1].next_pos // bs or e.next_pos % bs == 0]
        for i in picks:
            e = entries[i]
            rest = [x.name for x in img.iterdir(nid, e.next_pos)]
            if rest != names[i + 1:]:
                bad.append(f"dir {nid}: resume after {e.name!r} gives {rest[:3]}...")
                break
    return bad


def diff(kernel: tuple[dict, dict], ours: tuple[dict, dict], *, label: str = "") -> list[str]:
    """Every field of every path that differs (both record kinds)."""
    kb, kx = kernel
    ob, ox = ours
    bad = []
    for path in sorted(set(kb) | set(ob)):
        if path not in ob:
            bad.append(f"{label}{path}: missing from the image walk")
            continue
        if path not in kb:
            bad.append(f"{label}{path}: not in the kernel's view")
            continue
        k, o = {**kb[path], **kx[path]}, {**ob[path], **ox[path]}
        if "error" in k or "error" in o:
            if k.get("error", {}).get("errno") != o.get("error", {}).get("errno"):
                bad.append(f"{label}{path}: kernel error {k.get('error')}, ours {o.get('error')}")
            continue
        for field in sorted(set(k) | set(o)):
            if k.get(field) != o.get(field):
                kv, ov = k.get(field), o.get(field)
                if isinstance(kv, list) and isinstance(ov, list) and len(kv) > 6:
                    kv, ov = [x for x in kv if x not in ov][:4], [x for x in ov if x not in kv][:4] or ov[:6]
                bad.append(f"{label}{path} {field}: kernel {kv!r}, ours {ov!r}")
    return bad
