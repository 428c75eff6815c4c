"""A seeded source-tree generator for the kernel-oracle tests (must run as root).

``build_tree(root, seed, profile)`` creates every file type (regular, directory,
short and long symlinks, char/block devices with large major/minor, FIFOs,
sockets), hard links (to files, a FIFO and a symlink), awkward names (255 bytes,
non-UTF-8 bytes, names sorting around "." and ".."), a directory spanning several
blocks, regular files around block boundaries (0, 1, bs-1, bs, bs+1, multi-MiB,
sparse with holes), setuid/setgid/sticky modes, owners above 65535, mtimes with
nanoseconds, negative and above 2^32, and xattrs (user/trusted/security, a valid
``security.capability``, POSIX ACLs through setfacl), some repeated on many files
so mkfs shares them.

``apply_spec(root, spec)`` builds a tree from a plain description (the hypothesis
strategy in test_random.py produces those); ``build_tree`` is a fixed spec plus
seeded randomness.  Everything is deterministic for a given seed.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass, field

BS = 4096

# a valid VFS_CAP_REVISION_2 security.capability (magic|effective, permitted/inheritable x 2)
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 12 | 1 << 10, 0, 0, 0)


@dataclass
class Node:
    """One path of a spec.  ``kind``: reg, dir, symlink, chr, blk, fifo, sock, link (hard link to ``target``)."""
    path: bytes
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes | None = None           # reg: content (with ``size`` > len: a sparse tail)
    size: int = 0                       # reg: final size (truncate)
    pieces: tuple = ()                  # reg: (offset, bytes) writes into a sparse file
    target: bytes = b""                 # symlink target / hard-link source path
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict = field(default_factory=dict)   # name bytes -> value bytes
    acl: str = ""                       # setfacl -m spec
    default_acl: str = ""               # setfacl -d -m spec (dirs)


def _content(rng: random.Random, n: int) -> bytes:
    """Mixed content: some runs compress well, some not (so pclusters of both kinds appear)."""
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(4)
        m = min(n - len(out), rng.choice((17, 300, 4096, 20000, 70000)))
        if kind == 0:
            out += rng.randbytes(m)
        elif kind == 1:
            out += bytes([rng.randrange(256)]) * m
        elif kind == 2:
            word = rng.randbytes(rng.randrange(1, 40))
            out += (word * (m // len(word) + 1))[:m]
        else:
            out += bytes(rng.choice(b"abcdefgh \n") for _ in range(min(m, 3000)))
    return bytes(out[:n])


def fixed_spec(seed: int, profile: str = "full", max_name: int = 254) -> list[Node]:
    """The deterministic everything-tree.  ``profile="small"`` keeps file data tiny (committed images).

    ``max_name``: the longest names made; Debian's mkfs.erofs 1.5 fails on any 255-byte
    name ("Could not format the device: ENOENT"), so its trees use 254.
    """
    L = max_name
    rng = random.Random(seed)
    small = profile == "small"
    T0 = 1_600_000_000_123_456_789
    nodes: list[Node] = []

    def t() -> int:
        return T0 + rng.randrange(10**9) * 1000 + rng.randrange(10**9)

    def add(path: bytes, kind: str, **kw) -> Node:
        kw.setdefault("mtime_ns", t())
        if kind == "dir":
            kw.setdefault("mode", 0o755)
        n = Node(path, kind, **kw)
        nodes.append(n)
        return n

    add(b"files", "dir", mode=0o755)
    sizes = [0, 1, 17, BS - 1, BS, BS + 1, 2 * BS - 1, 3 * BS + 100]
    if not small:
        sizes += [64 * 1024 + 3, (2 << 20) + 4097]
    for sz in sizes:
        add(b"files/size-%d" % sz, "reg", data=_content(rng, sz))
    if not small:
        add(b"files/zeros-1m", "reg", data=bytes(1 << 20))
    big_sparse = (3 << 20) + 5 if not small else 5 * BS + 7
    add(b"files/sparse", "reg", size=big_sparse,
        pieces=((0, b"head"), (BS * 3 + 5, _content(rng, 100)), (big_sparse - 10, b"tail")))
    add(b"files/sparse-hole-only", "reg", size=2 * BS + 1)
    # modes and owners
    add(b"modes", "dir", mode=0o1777, uid=70000, gid=70001)
    for mode in (0o4755, 0o2711, 0o1644, 0o7777, 0o0000, 0o0400, 0o6555):
        add(b"modes/m%04o" % mode, "reg", mode=mode, data=b"m" * (mode % 50))
    for uid, gid in ((65535, 65535), (65536, 0), (4_000_000_000, 123456), (1, 70000)):
        add(b"modes/owner-%d-%d" % (uid, gid), "reg", uid=uid, gid=gid, data=b"o")
    add(b"modes/owned-dir", "dir", mode=0o2750, uid=100000, gid=65536)
    add(b"modes/owned-link", "symlink", target=b"../files/size-1", uid=200000, gid=300000)
    # mtimes
    add(b"times", "dir")
    for i, ns in enumerate((0, 1, -1, -1_234_567_890_123_456_789, (1 << 32) * 10**9 + 999_999_999,
                            5_000_000_000 * 10**9 + 1, 1_000_000_000 * 10**9 - 1, (1 << 31) * 10**9)):
        add(b"times/t%d" % i, "reg", data=b"t%d" % i, mtime_ns=ns)
    add(b"times/neg-link", "symlink", target=b"t0", mtime_ns=-5 * 10**9 - 7)
    add(b"times/neg-dir", "dir", mtime_ns=-86400 * 10**9 + 42)
    # special files
    add(b"special", "dir")
    for maj, mino in ((0, 0), (1, 3), (259, 70000), (4095, 1048575), (255, 255), (256, 256), (8, 1 << 19)):
        add(b"special/chr-%d-%d" % (maj, mino), "chr", rdev=(maj, mino), mode=0o620)
        add(b"special/blk-%d-%d" % (maj, mino), "blk", rdev=(maj, mino), mode=0o660)
    add(b"special/fifo", "fifo", mode=0o600)
    add(b"special/sock", "sock", mode=0o755)
    # symlinks
    add(b"links", "dir")
    add(b"links/short", "symlink", target=b"a")
    add(b"links/medium", "symlink", target=b"../files/" + b"x" * 200)
    add(b"links/long-4095", "symlink", target=(b"d/" * 2048)[:4095])
    add(b"links/block-sized-ish", "symlink", target=b"y" * (BS - 200))
    add(b"links/dangling", "symlink", target=b"/nonexistent/\xff\xfe")
    # hard links
    add(b"hard", "dir")
    add(b"hard/file", "reg", data=_content(rng, 5000))
    add(b"hard/link1", "link", target=b"hard/file")
    add(b"files/link2", "link", target=b"hard/file")
    add(b"hard/fifo", "fifo")
    add(b"hard/fifo-link", "link", target=b"hard/fifo")
    add(b"hard/sym", "symlink", target=b"file")
    add(b"hard/sym-link", "link", target=b"hard/sym")
    add(b"hard/chr", "chr", rdev=(10, 200))
    add(b"hard/chr-link", "link", target=b"hard/chr")
    # names
    add(b"names", "dir")
    for name in (b"!", b"#", b"+", b",", b"-", b"-.", b".-", b".a", b"..a", b"...", b". ", b".. ",
                 b"\x01", b"\x7f", b"\xff\xfe\xfd", b"caf\xc3\xa9", b"caf\xe9", b"sp ace", b"new\nline",
                 b"n" * L, b"\xff" * L, b"z", b"0", b"~", b"\\"):
        add(b"names/" + name, "reg", data=name[:8])
    add(b"names/" + b"d" * L, "dir")
    add(b"names/" + b"d" * L + b"/" + b"e" * L, "symlink", target=b"f" * 255)
    # a directory spanning several blocks
    add(b"bigdir", "dir")
    n_big = 90 if small else 420
    for i in range(n_big):
        ln = rng.randrange(1, 80)
        name = (b"%04d-" % i + bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_.-") for _ in range(ln)))
        kind = rng.choice(("reg", "reg", "reg", "symlink", "dir", "fifo"))
        if kind == "reg":
            add(b"bigdir/" + name, "reg", data=_content(rng, rng.choice((0, 3, 100) if small else (0, 3, 100, 2000))))
        elif kind == "symlink":
            add(b"bigdir/" + name, "symlink", target=name[:20])
        else:
            add(b"bigdir/" + name, kind)
    if not small:
        # a directory of ~40 blocks, and one inode with 1000+ links
        add(b"manydir", "dir")
        add(b"manydir/target", "reg", data=b"linked")
        for i in range(1500):
            name = b"e%05d" % i + b"-" * (i % 7)
            if i % 3:
                add(b"manydir/" + name, "reg", data=b"", mode=0o600 + i % 64)
            else:
                add(b"manydir/" + name, "link", target=b"manydir/target")
    # deep nesting
    p = b"deep"
    for i in range(12):
        add(p, "dir", mode=0o700 + i % 8 * 0o10)
        p += b"/l%d" % i
    add(p, "reg", data=b"bottom")
    # xattrs
    add(b"xattrs", "dir", xattrs={b"user.dir": b"d"}, default_acl="u::rwx,g::r-x,o::---,u:1234:rwx,m::rwx")
    shared = {b"user.shared": b"s" * 30, b"trusted.shared": b"T" * 10}
    for i in range(8):
        add(b"xattrs/shared-%d" % i, "reg", data=b"x", xattrs=dict(shared))
    add(b"xattrs/many", "reg", data=b"y",
        xattrs={b"user.k%03d" % i: rng.randbytes(rng.randrange(0, 40)) for i in range(40)})
    add(b"xattrs/big-value", "reg", data=b"", xattrs={b"user.big": rng.randbytes(1900),
                                                      b"user.empty": b""})
    add(b"xattrs/long-name", "reg", data=b"", xattrs={b"user." + b"N" * (L - 5): b"v"})
    add(b"xattrs/security", "reg", data=b"s", xattrs={b"security.capability": CAPABILITY,
                                                      b"security.ima": b"\x03\x02" + rng.randbytes(20),
                                                      b"security.selinux": b"system_u:object_r:bin_t:s0\0"})
    add(b"xattrs/trusted", "reg", data=b"t", xattrs={b"trusted.overlay.opaque": b"y",
                                                     b"trusted.overlay.redirect": b"/x/y"})
    add(b"xattrs/acl", "reg", data=b"a", acl="u:1234:rwx,g:5678:r--,u:4000000000:r-x,m::rwx")
    add(b"xattrs/acl-dir", "dir", acl="u:70000:r-x", default_acl="g:70001:rwx")
    add(b"xattrs/symlink", "symlink", target=b"acl", xattrs={b"trusted.sym": b"on a symlink"})
    add(b"xattrs/fifo", "fifo", xattrs={b"trusted.f": b"fifo"})
    add(b"xattrs/non-utf8", "reg", data=b"", xattrs={b"user.\xff\xfe": b"\x00\x01"})
    return nodes


def _lchown(path: bytes, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)


def apply_spec(root: str | bytes, nodes: list[Node]) -> None:
    """Create ``nodes`` under ``root`` (which must exist and be empty)."""
    root = os.fsencode(root)
    dirs = []
    for n in nodes:
        full = os.path.join(root, n.path)
        if n.kind == "dir":
            os.mkdir(full)
            dirs.append(n)
            continue
        if n.kind == "reg":
            with open(full, "wb") as f:
                if n.data:
                    f.write(n.data)
                for off, piece in n.pieces:
                    f.seek(off)
                    f.write(piece)
                if n.size > (len(n.data) if n.data else 0):
                    f.truncate(n.size)
        elif n.kind == "symlink":
            os.symlink(n.target, full)
        elif n.kind in ("chr", "blk", "fifo", "sock"):
            fmt = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK}[n.kind]
            os.mknod(full, fmt | 0o600, os.makedev(*n.rdev) if n.kind in ("chr", "blk") else 0)
        elif n.kind == "link":
            os.link(os.path.join(root, n.target), full, follow_symlinks=False)
            continue
        else:
            raise ValueError(n.kind)
        _finish(full, n)
    for n in reversed(dirs):   # children first changed the parents' mtimes: set dirs last, deepest first
        _finish(os.path.join(root, n.path), n)


def _finish(full: bytes, n: Node) -> None:
    # order matters: chown clears setuid/setgid and security.capability, setfacl rewrites the group
    # mode bits (the ACL mask), so: owner, mode, xattrs, ACLs, and the mtime last
    _lchown(full, n.uid, n.gid)
    if n.kind != "symlink":
        os.chmod(full, n.mode)
    for name, value in n.xattrs.items():
        os.setxattr(full, name, value, follow_symlinks=False)
    for flag, acl in (("-m", n.acl), ("-d", n.default_acl)):
        if acl:
            args = ["setfacl", "-m", acl] if flag == "-m" else ["setfacl", "-d", "-m", acl]
            subprocess.run([*args, os.fsdecode(full)], check=True, timeout=30, capture_output=True)
    os.utime(full, ns=(n.mtime_ns, n.mtime_ns), follow_symlinks=False)


def build_tree(root: str, seed: int = 1, profile: str = "full", max_name: int = 254) -> None:
    apply_spec(root, fixed_spec(seed, profile, max_name))
    # the root itself: fixed mode/owner/time so images differ only by configuration
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)
    os.utime(root, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))


def have_tools() -> str | None:
    for tool in ("setfacl",):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package acl)"
    return None
