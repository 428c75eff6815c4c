"""Tar index images end to end: tarfile -> index -> (index + tar) read back by our reader, the kernel and fsck.

The generated tree has regular files of 0, 1, 511, 512, 513 bytes, 100 KB and 3 MB; a directory of
260 entries over many 512-byte blocks (names below and above "." in byte order) and one whose
dirents fill exactly one block; short and long symlinks (inline, inline with a full block, plain);
hard links; a fifo; character and block devices; user./trusted./security. xattrs (one 1000-byte
value, so an inode record crosses a block); mtimes with nanoseconds and before 1970; ids above
65535 and 2^21; long and deeply nested names; an implicit parent; a whiteout.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import struct
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from erofs_mount.erofs import layout as L
from erofs_mount.erofs.image import Image
from erofs_mount.errors import NotFoundError
from erofs_mount.tarindex import TarParser, build_index, build_tree, index_tar, members_of

T0 = 1_700_000_000_000_000_000
CAP = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)   # VFS_CAP_REVISION_2, effective, cap_net_bind_service


@dataclass
class Ent:
    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0
    data: bytes = b""
    target: str = ""          # symlink target / hard link source
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def spec() -> list[Ent]:
    rng = random.Random(20240611)
    out = [Ent("", "dir", 0o755, mtime_ns=T0 + 1)]
    d = lambda p, **kw: out.append(Ent(p, "dir", kw.pop("mode", 0o755), **kw))  # noqa: E731
    f = lambda p, n, **kw: out.append(Ent(p, "reg", kw.pop("mode", 0o644), data=rng.randbytes(n), **kw))  # noqa: E731
    d("files", mtime_ns=T0 + 123_456_789, xattrs={b"user.dir": b"on a dir", b"trusted.t": b"T"})
    for n in (0, 1, 511, 512, 513, 100_000, 3_000_000):
        f(f"files/f{n}", n, mtime_ns=T0 + n * 7 + 1, uid=n % 3 * 50000, gid=n % 5 * 70000)
    f("files/xattrs", 10, xattrs={b"user.a": b"1", b"user.empty": b"", b"trusted.overlay.opaque": b"y",
                                  b"security.capability": CAP, b"user.big": rng.randbytes(1000)})
    f("files/suid", 3, mode=0o4755), f("files/sgid", 3, mode=0o2750)
    f("files/old", 4, mtime_ns=-1_500_000_000), f("files/bigids", 4, uid=3_000_000, gid=4_000_000_000)
    d("files/sticky", mode=0o1777)
    d("big", mode=0o750, uid=1234, gid=5678)
    charset = "abcdefghijklmnopqrstuvwxyz0123456789-_+!,=@~"
    names = {"-dash", "!bang", "+plus", ",comma", ".hidden", "..double", ".a", "A", "z" * 255}
    while len(names) < 260:
        names.add("".join(rng.choice(charset) for _ in range(rng.randint(1, 60))))
    for i, name in enumerate(sorted(names)):
        if i % 10 == 0:
            d(f"big/{name}", mtime_ns=T0 + i)
        else:
            f(f"big/{name}", i % 7, mtime_ns=T0 + i * 1_000_000_001)
    d("exact")
    f("exact/" + "a" * 230, 1), f("exact/" + "b" * 231, 2)   # "."+".."+these = exactly 512 bytes of dirents
    d("links")
    out.append(Ent("links/short", "symlink", 0o777, target="../files/f1"))
    out.append(Ent("links/inline_block", "symlink", 0o777, target="m/" * 300))    # 600: 1 block + inline tail
    out.append(Ent("links/plain", "symlink", 0o777, target="p" * 1000, xattrs={b"trusted.sym": b"s"}))
    out.append(Ent("links/max", "symlink", 0o777, target="/".join(["q" * 200] * 20)[:4095]))
    out.append(Ent("links/hard1", "hardlink", target="files/f100000"))
    deep = "/".join(f"level{i:02d}" for i in range(30))
    d("deep")
    for i in range(30):
        d("deep/" + "/".join(f"level{j:02d}" for j in range(i + 1)))
    f(f"deep/{deep}/" + "L" * 200, 77)
    out.append(Ent(f"deep/{deep}/hard2", "hardlink", target="files/f100000"))
    d("dev")
    out.append(Ent("dev/null", "chr", 0o666, dev=(1, 3)))
    out.append(Ent("dev/bigminor", "chr", 0o600, dev=(254, 70000)))
    out.append(Ent("dev/sda", "blk", 0o660, gid=6, dev=(8, 0)))
    out.append(Ent("dev/fifo", "fifo", 0o600))
    f("implicit/child", 5, mtime_ns=T0 + 99_000_000_000)   # no member for implicit/
    return out


def make_tar(entries: list[Ent], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            ti = tarfile.TarInfo("./" + e.path if e.path else "./")
            ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
            ti.mtime = e.mtime_ns // 10 ** 9
            ti.uname = ti.gname = ""
            ti.type = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                       "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                       "fifo": tarfile.FIFOTYPE}[e.kind]
            ti.linkname = e.target
            ti.devmajor, ti.devminor = e.dev
            if fmt == tarfile.PAX_FORMAT:
                sec, ns = divmod(e.mtime_ns, 10 ** 9)
                ti.pax_headers = {"mtime": f"{sec}.{ns:09d}" if sec >= 0 else f"-{-e.mtime_ns / 1e9}"}
                for k, v in e.xattrs.items():
                    ti.pax_headers["SCHILY.xattr." + k.decode()] = v.decode("utf-8", "surrogateescape")
            ti.size = len(e.data)
            tf.addfile(ti, io.BytesIO(e.data) if e.kind == "reg" else None)
    return buf.getvalue()


def expected(entries: list[Ent], pax: bool) -> dict[str, Ent]:
    """What the image must hold: hard links resolved, the implicit directory added, GNU's losses applied."""
    want: dict[str, Ent] = {}
    for e in entries:
        e = Ent(**{**e.__dict__})
        if not pax:
            e.xattrs, e.mtime_ns = {}, e.mtime_ns // 10 ** 9 * 10 ** 9
        if e.kind == "hardlink":
            src = want[e.target]
            e = Ent(**{**src.__dict__, "path": e.path})
        want[e.path] = e
    child = want["implicit/child"]
    want["implicit"] = Ent("implicit", "dir", 0o755, mtime_ns=child.mtime_ns)
    return want


def hard_groups(entries: list[Ent]) -> dict[str, str]:
    return {e.path: e.target for e in entries if e.kind == "hardlink"}


IFMT = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "chr": stat.S_IFCHR,
        "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@dataclass
class Built:
    fmt: str
    entries: list[Ent]
    want: dict[str, Ent]
    tar: bytes
    index: bytes
    path: Path
    offsets: dict[str, int]


@pytest.fixture(scope="module", params=["pax", "gnu"])
def built(request, tmp_path_factory) -> Built:
    entries = spec()
    pax = request.param == "pax"
    tar = make_tar(entries, tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT)
    members = members_of(tar)
    tree = build_tree(members)
    assert tree.warnings == []
    index = build_index(tree, len(tar))
    path = tmp_path_factory.mktemp("tarindex") / f"{request.param}.erofs"
    path.write_bytes(index + tar)
    offsets = {m.path: m.data_offset for m in members if m.kind == "reg"}
    offsets.update({e.path: offsets[e.target] for e in entries if e.kind == "hardlink"})
    return Built(request.param, entries, expected(entries, pax), tar, index, path, offsets)


def children_of(want: dict[str, Ent], path: str) -> set[str]:
    pre = path + "/" if path else ""
    return {p[len(pre):] for p in want if p and p.startswith(pre) and "/" not in p[len(pre):]}


def test_reader_sees_everything(built):
    fd = os.open(built.path, os.O_RDONLY)
    try:
        img = Image(lambda pos, n: os.pread(fd, n, pos), size=os.fstat(fd).st_size)
        sb = img.sb
        assert len(built.index) % 512 == 0 and sb.block_size == 512 and sb.checksum_ok is True
        assert sb.blocks * 512 == len(built.index) + len(built.tar) and sb.feature_incompat == 0
        nids = {p: img.resolve("/" + p) for p in built.want}
        assert sb.inos == len(set(nids.values()))
        for path, e in built.want.items():
            nid = nids[path]
            ino = img.inode(nid)
            assert ino.mode == IFMT[e.kind] | e.mode, path
            assert (ino.uid, ino.gid) == (e.uid, e.gid), path
            assert ino.mtime * 10 ** 9 + ino.mtime_nsec == e.mtime_ns, path
            assert img.xattrs(nid) == e.xattrs, path
            if e.kind == "reg":
                assert ino.size == len(e.data) and img.read(nid, 0, ino.size + 10) == e.data, path
                assert ino.datalayout == L.EROFS_INODE_FLAT_PLAIN
                if e.data:   # the data is the tar's own bytes: block (index size + tar data offset) / 512
                    assert ino.startblk * 512 == len(built.index) + built.offsets[e.path], path
                else:
                    assert ino.raw_u == 0xFFFFFFFF and ino.raw_nb == 0   # NULL, as non-48-bit mkfs.erofs writes it
            elif e.kind == "symlink":
                assert img.readlink(nid) == e.target.encode() and ino.size == len(e.target)
            elif e.kind in ("chr", "blk"):
                assert ino.rdev == os.makedev(*e.dev) and ino.size == 0
            elif e.kind == "dir":
                kids = children_of(built.want, path)
                listed = {d.name.decode(): d.nid for d in img.iterdir(nid)}
                assert set(listed) - {".", ".."} == kids, path
                assert listed["."] == nid
                assert listed[".."] == nids[path.rpartition("/")[0]] if path else nid
                subdirs = sum(built.want[(path + "/" if path else "") + k].kind == "dir" for k in kids)
                assert ino.nlink == 2 + subdirs, path
                for k in kids:   # the kernel's binary search across blocks, then within one
                    assert img.lookup(nid, k.encode()) == listed[k]
                    with pytest.raises(NotFoundError):
                        img.lookup(nid, k.encode() + b"\x01")
        for link, src in hard_groups(built.entries).items():
            assert nids[link] == nids[src]
        assert img.inode(nids["files/f100000"]).nlink == 3
        big = img.inode(nids["big"])
        assert big.size > 20 * 512
        assert img.inode(nids["exact"]).size == 512 and img.inode(nids["exact"]).datalayout == 0
        layouts = {p: img.inode(nids[p]).datalayout for p in ("links/short", "links/inline_block", "links/plain")}
        assert layouts == {"links/short": 2, "links/inline_block": 2, "links/plain": 0}
        crossing = 0
        for nid in set(nids.values()):   # a record that fits a block stays in it; 32-byte slots
            ino = img.inode(nid)
            inline = ino.size % 512 if ino.datalayout == L.EROFS_INODE_FLAT_INLINE else 0
            end = ino.iloc + ino.inode_isize + ino.xattr_isize + inline
            assert ino.iloc % 32 == 0 and ino.inode_isize == 64
            if end - ino.iloc <= 512:
                assert ino.iloc // 512 == (end - 1) // 512, nid
            else:
                crossing += 1
        assert crossing >= (1 if built.fmt == "pax" else 0)   # the 1000-byte xattr
    finally:
        os.close(fd)


def test_deterministic_and_chunking_independent(built):
    rng = random.Random(7)
    parser = TarParser()
    tree_members = []
    pos = 0
    while pos < len(built.tar):
        n = rng.choice([1, 3, 100, 511, 4096, 65536])
        parser.feed(built.tar[pos:pos + n])
        pos += n
        tree_members.extend(parser.events())
    parser.close()
    assert build_index(build_tree(tree_members), len(built.tar)) == built.index
    index, _tree = index_tar([built.tar])
    assert index == built.index
    other = build_index(build_tree(members_of(built.tar)), len(built.tar), uuid=bytes(range(16)), build_time_ns=5)
    assert len(other) == len(built.index) and other != built.index and other[1024 + 48:1024 + 64] == bytes(range(16))


def _kernel_ok() -> str | None:
    if os.geteuid() != 0:
        return "not root: cannot loop-mount"
    try:
        if "erofs" not in Path("/proc/filesystems").read_text():
            subprocess.run(["modprobe", "erofs"], capture_output=True, timeout=30)
            if "erofs" not in Path("/proc/filesystems").read_text():
                return "no erofs driver in this kernel"
    except OSError as exc:
        return f"cannot check for the erofs driver: {exc}"
    return None


def test_kernel_loop_mount(built, tmp_path):
    why = _kernel_ok()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(built.path), str(mnt)], capture_output=True,
                       text=True, timeout=60)
    if r.returncode:
        pytest.fail(f"mount failed: {r.stderr.strip()}")
    try:
        for path, e in built.want.items():
            full = mnt / path if path else mnt
            st = os.lstat(full)
            assert st.st_mode == IFMT[e.kind] | e.mode, path
            assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (e.uid, e.gid, e.mtime_ns), path
            names = os.listxattr(full, follow_symlinks=False)
            assert sorted(names) == sorted(k.decode() for k in e.xattrs), path
            for k, v in e.xattrs.items():
                assert os.getxattr(full, k.decode(), follow_symlinks=False) == v, (path, k)
            if e.kind == "reg":
                assert st.st_size == len(e.data) and full.read_bytes() == e.data, path
            elif e.kind == "symlink":
                assert os.readlink(full) == e.target
            elif e.kind in ("chr", "blk"):
                assert st.st_rdev == os.makedev(*e.dev)
            elif e.kind == "dir":
                assert set(os.listdir(full)) == children_of(built.want, path), path
        for link, src in hard_groups(built.entries).items():
            assert os.lstat(mnt / link).st_ino == os.lstat(mnt / src).st_ino
            assert os.lstat(mnt / link).st_nlink == 3
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)


def _fsck(binary: str, built: Built) -> subprocess.CompletedProcess:
    return subprocess.run([binary, str(built.path)], capture_output=True, text=True, timeout=60)


def test_fsck_new(built, tmp_path):
    binary = os.environ.get("EROFS_FSCK_NEW", "")
    if not os.access(binary, os.X_OK):
        pytest.skip("EROFS_FSCK_NEW does not name a fsck.erofs >= 1.6 (1.5 rejects 512-byte blocks)")
    r = _fsck(binary, built)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "x"
    r = subprocess.run([binary, f"--extract={out}", str(built.path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for path, e in built.want.items():
        if e.kind == "reg":
            assert (out / path).read_bytes() == e.data, path
    shutil.rmtree(out, ignore_errors=True)


def test_fsck_debian(built):
    binary = "/usr/bin/fsck.erofs"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} absent")
    r = _fsck(binary, built)
    if r.returncode and "blksize 512 isn't supported" in r.stderr:
        pytest.skip("this fsck.erofs (1.5) supports only page-sized (4096-byte) blocks: "
                    f"{r.stderr.strip().splitlines()[0]}")
    assert r.returncode == 0, r.stderr


def _image(data: bytes) -> Image:
    return Image(lambda pos, n: data[pos:pos + n], size=len(data))


def test_hostile_tar_image():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, type_=tarfile.REGTYPE, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.mtime = type_, len(data), 1000
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data))
        add("../../etc/passwd", data=b"root:x:0:0")
        add("/abs//x/./y", data=b"y")
        add("a", tarfile.SYMTYPE, linkname="/etc")
        add("a/passwd", data=b"through")           # replaces the symlink with a directory
        add("d", tarfile.DIRTYPE, mode=0o700)
        add("d/keep", data=b"k")
        add("d", tarfile.DIRTYPE, mode=0o711)        # keeps d/keep
        add("link", tarfile.LNKTYPE, linkname="../etc/passwd")
        add("bad", tarfile.LNKTYPE, linkname="nothing")
        add("etc/passwd", data=b"replaced")         # the link keeps the old inode
    tar = buf.getvalue()
    index, tree = index_tar([tar])
    assert len(tree.warnings) == 2
    img = _image(index + tar)
    read = lambda p: img.read(img.resolve(p), 0, 100)  # noqa: E731
    assert read("/etc/passwd") == b"replaced" and read("/link") == b"root:x:0:0"
    assert img.inode(img.resolve("/link")).nlink == 1
    assert read("/abs/x/y") == b"y" and read("/a/passwd") == b"through" and read("/d/keep") == b"k"
    assert img.inode(img.resolve("/d")).mode & 0o7777 == 0o711
    with pytest.raises(NotFoundError):
        img.resolve("/bad")


def test_empty_tar_image():
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    tar = buf.getvalue()
    index, tree = index_tar([tar])
    img = _image(index + tar)
    assert [d.name for d in img.iterdir(img.root_nid)] == [b".", b".."]
    assert img.sb.inos == 1 and len(index) == 1536
