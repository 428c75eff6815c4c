"""Layers as real images, and the oracle: the same layers unpacked in order into a directory.

A layer is a list of :class:`Ent` (every directory explicit, the root ``""`` first, parents
before children, a hard link after its target in the same directory).  ``build_erofs`` writes it
into a directory and runs Debian's ``mkfs.erofs`` (1.5) on it; ``build_tar`` writes a tar and
indexes it with ``erofs_mount.tarindex.index_tar`` (the image is index + tar, in memory).

``unpack`` is the oracle, written from the OCI image spec ("Applying Changesets") and overlayfs
independently of erofs_mount.merge: per directory of the layer (parents first), an opaque marker
(``.wh..wh..opq`` or an ``overlay.opaque`` = y xattr) empties what the lower layers left there,
whiteouts (``.wh.NAME``, or a character device 0/0 NAME) remove NAME, then the layer's other
entries replace what is there (a directory over a directory is kept and merged); at the end of the
layer its directories take their attributes (deepest first; xattrs replaced).  ``walk_tree`` and
``walk_merged`` describe a real tree and a merged image the same way, for comparison.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from erofs_mount.erofs.image import Image
from erofs_mount.tarindex import index_tar

MKFS = "/usr/bin/mkfs.erofs"
OVERLAY = (b"trusted.overlay.", b"user.overlay.")
IFMT = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chr": stat.S_IFCHR,
        "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@dataclass
class Ent:
    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_600_000_000 * 10 ** 9
    data: bytes = b""
    target: str = ""          # symlink target / hard link source (a path in the same layer)
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def D(path, mode=0o755, **kw):
    return Ent(path, "dir", mode, **kw)


def F(path, data=b"", mode=0o644, **kw):
    return Ent(path, "reg", mode, data=data, **kw)


def S(path, target, **kw):
    return Ent(path, "symlink", 0o777, target=target, **kw)


def H(path, target):
    return Ent(path, "hardlink", target=target)


def C(path, major=0, minor=0, mode=0o644, **kw):
    return Ent(path, "chr", mode, dev=(major, minor), **kw)


# ---------------------------------------------------------------------------- building layers
def _mem_image(data: bytes, counter: list | None = None) -> Image:
    def read_at(pos: int, n: int) -> bytes:
        if counter is not None:
            counter.append((pos, n))
        return data[pos:pos + n]
    return Image(read_at, size=len(data))


def make_tar(layer: list[Ent]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in layer:
            ti = tarfile.TarInfo("./" + e.path if e.path else "./")
            ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = e.mode, e.uid, e.gid, "", ""
            assert e.mtime_ns % 10 ** 9 == 0, "tar layers: whole seconds"
            ti.mtime = e.mtime_ns // 10 ** 9
            ti.type = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                       "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                       "fifo": tarfile.FIFOTYPE}[e.kind]
            ti.linkname = ("./" + e.target) if e.kind == "hardlink" else e.target
            ti.devmajor, ti.devminor = e.dev
            ti.pax_headers = {"SCHILY.xattr." + k.decode(): v.decode("utf-8", "surrogateescape")
                              for k, v in e.xattrs.items()}
            ti.size = len(e.data)
            tf.addfile(ti, io.BytesIO(e.data) if e.kind == "reg" else None)
    return buf.getvalue()


def build_tar(layer: list[Ent], counter: list | None = None) -> Image:
    tar = make_tar(layer)
    index, tree = index_tar([tar])
    assert [w for w in tree.warnings if "names nothing a layer below" not in w] == [], tree.warnings
    return _mem_image(index + tar, counter)


def materialize(layer: list[Ent], root: Path) -> None:
    """Write a layer as a directory tree (for mkfs.erofs); needs root for devices, owners, trusted.*."""
    root.mkdir(parents=True, exist_ok=True)
    for e in layer:
        p = root / e.path if e.path else root
        if e.kind == "dir":
            p.mkdir(exist_ok=True)
        else:
            _make(e, p, root)
    for e in sorted(layer, key=lambda e: -e.path.count("/") - bool(e.path)):
        if e.kind != "hardlink":
            _attrs(e, root / e.path if e.path else root)


def build_erofs(layer: list[Ent], work: Path, counter: list | None = None, options: tuple[str, ...] = ()) -> Image:
    src, img = work / "src", work / "layer.erofs"
    materialize(layer, src)
    r = subprocess.run([MKFS, "--quiet", *options, str(img), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return _mem_image(img.read_bytes(), counter)


# ---------------------------------------------------------------------------- the oracle
def _make(e: Ent, p: Path, root: Path) -> None:
    if e.kind == "reg":
        p.write_bytes(e.data)
    elif e.kind == "symlink":
        os.symlink(e.target, p)
    elif e.kind == "hardlink":
        os.link(root / e.target, p, follow_symlinks=False)
    elif e.kind in ("chr", "blk"):
        os.mknod(p, IFMT[e.kind] | e.mode, os.makedev(*e.dev))
    elif e.kind == "fifo":
        os.mkfifo(p, e.mode)
    else:
        raise AssertionError(e.kind)


def _attrs(e: Ent, p: Path) -> None:
    os.chown(p, e.uid, e.gid, follow_symlinks=False)
    for k in os.listxattr(p, follow_symlinks=False):
        os.removexattr(p, k, follow_symlinks=False)
    for k, v in e.xattrs.items():
        os.setxattr(p, k, v, follow_symlinks=False)
    if e.kind != "symlink":
        os.chmod(p, e.mode)
    os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif os.path.lexists(p):
        p.unlink()


def _base(path: str) -> str:
    return path.rpartition("/")[2]


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def unpack(layer: list[Ent], root: Path) -> None:
    """Apply one layer onto ``root`` (the lower layers unpacked already), OCI/overlayfs rules."""
    dirs = [e for e in layer if e.kind == "dir"]
    kids: dict[str, list[Ent]] = {}
    for e in layer:
        if e.path:
            kids.setdefault(_parent(e.path), []).append(e)
    for d in sorted(dirs, key=lambda e: e.path.count("/") + bool(e.path)):
        p = root / d.path if d.path else root
        if os.path.lexists(p) and not (p.is_dir() and not p.is_symlink()):
            p.unlink()
        p.mkdir(exist_ok=True)
        cs = kids.get(d.path, [])
        opaque = any(_base(c.path) == ".wh..wh..opq" for c in cs) or any(
            d.xattrs.get(k) == b"y" for k in (b"trusted.overlay.opaque", b"user.overlay.opaque"))
        if opaque:
            for name in os.listdir(p):
                _remove(p / name)
        for c in cs:
            name = _base(c.path)
            if name.startswith(".wh."):
                target = name[4:]
                if name != ".wh..wh..opq" and target not in ("", ".", "..") and "/" not in target:
                    _remove(p / target)
            elif c.kind == "chr" and c.dev == (0, 0):
                _remove(p / name)
        for c in cs:
            name = _base(c.path)
            if name.startswith(".wh.") or c.kind == "dir" or (c.kind == "chr" and c.dev == (0, 0)):
                continue
            _remove(p / name)
            _make(c, p / name, root)
            if c.kind != "hardlink":
                _attrs(Ent(**{**c.__dict__, "xattrs": _public(c.xattrs)}), p / name)
    for d in sorted(dirs, key=lambda e: -(e.path.count("/") + bool(e.path))):
        _attrs(Ent(**{**d.__dict__, "xattrs": _public(d.xattrs)}), root / d.path if d.path else root)


def _public(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY)}


# ---------------------------------------------------------------------------- describing trees
def walk_tree(root: Path) -> tuple[dict[str, dict], set[frozenset[str]]]:
    """path -> fields of a real tree, and its hard-link groups (non-directories sharing an inode)."""
    out: dict[str, dict] = {}
    inos: dict[int, set[str]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        p = root / rel if rel else root
        st = os.lstat(p)
        info = {"fmt": stat.S_IFMT(st.st_mode), "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
                "xattrs": {k.encode(): os.getxattr(p, k, follow_symlinks=False)
                           for k in os.listxattr(p, follow_symlinks=False)}}
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(p))
            info["names"] = names
            info["nlink"] = 2 + sum(stat.S_ISDIR(os.lstat(p / n).st_mode) for n in names)
            stack.extend(f"{rel}/{n}" if rel else n for n in names)
        else:
            info["nlink"], info["size"] = st.st_nlink, st.st_size
            inos.setdefault(st.st_ino, set()).add(rel)
            if stat.S_ISREG(st.st_mode):
                info["data"] = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(p).encode()
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = st.st_rdev
        out[rel] = info
    return out, {frozenset(g) for g in inos.values() if len(g) > 1}


def walk_merged(m) -> tuple[dict[str, dict], set[frozenset[str]]]:
    """The same description of a merged image, through lookup/iterdir/inode/read/readlink/xattrs."""
    out: dict[str, dict] = {}
    nids: dict[int, set[str]] = {}
    stack = [("", m.root_nid, m.root_nid)]
    while stack:
        rel, nid, parent = stack.pop()
        ino = m.inode(nid)
        assert ino.nid == nid and m.st_ino(nid) == nid
        info = {"fmt": stat.S_IFMT(ino.mode), "mode": ino.mode, "uid": ino.uid, "gid": ino.gid,
                "mtime_ns": ino.mtime * 10 ** 9 + ino.mtime_nsec, "xattrs": m.xattrs(nid), "nlink": ino.nlink}
        assert m.listxattr(nid) == list(info["xattrs"])
        for k, v in info["xattrs"].items():
            assert m.getxattr(nid, k) == v
        if ino.is_dir:
            ents = list(m.iterdir(nid))
            assert [(e.name, e.nid) for e in ents[:2]] == [(b".", nid), (b"..", parent)], rel
            assert [e.next_pos for e in ents] == list(range(1, len(ents) + 1))
            names = [e.name for e in ents[2:]]
            assert names == sorted(names) and len(set(names)) == len(names)
            info["names"] = sorted(n.decode() for n in names)
            for e in ents[2:]:
                assert m.lookup(nid, e.name) == e.nid
                child = f"{rel}/{e.name.decode()}" if rel else e.name.decode()
                assert e.file_type == {stat.S_IFDIR: 2, stat.S_IFREG: 1, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
                                       stat.S_IFIFO: 5, stat.S_IFLNK: 7}[stat.S_IFMT(m.inode(e.nid).mode)], child
                stack.append((child, e.nid, nid))
        else:
            info["size"] = ino.size
            nids.setdefault(nid, set()).add(rel)
            if ino.is_reg:
                info["data"] = m.read(nid, 0, ino.size + 10)
            elif ino.is_lnk:
                info["target"] = m.readlink(nid)
            elif stat.S_ISCHR(ino.mode) or stat.S_ISBLK(ino.mode):
                info["rdev"] = ino.rdev
        assert m.resolve("/" + rel) == nid
        out[rel] = info
    return out, {frozenset(g) for g in nids.values() if len(g) > 1}
