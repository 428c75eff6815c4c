"""Damaged images, the kernel as oracle: what each path gives (value or errno), ours vs the kernel's.

A *scan* maps every path reachable by name to its operations: ``lstat`` (mode, uid, gid,
size, nlink, mtime ns, rdev, st_ino), ``xattrs`` (listxattr names), ``x:<name>``
(getxattr), ``readlink``, ``data`` (sha256 of the first 16 MiB) and ``names``
(readdir), each a value or ``"E:<ERRNO>"``.  The kernel side runs in a child process
(``kscan.py``) with a timeout; our side calls the Image API the way the VFS calls the
kernel: paths are resolved with ``lookup`` (not the nids readdir shows), a directory
found inside itself is ELOOP (the dcache keeps one alias per directory), and names
are C strings (a name with a NUL shows up cut, a listxattr name with a NUL splits).

``mutations`` replays a seeded byte mutator, so a (seed, index) pair names a mutant.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import json
import random
import stat
import subprocess
import sys
from pathlib import Path

from erofs_mount.erofs.image import Image
from erofs_mount.errors import ErofsMountError
from tests.oracle import kmount

KSCAN = Path(__file__).with_name("kscan.py")
LIMIT = 5000
DATA_MAX = 1 << 24


def _en(exc: BaseException) -> str:
    return "E:" + errno_mod.errorcode.get(exc.errno, str(exc.errno))


def mutations(orig: bytes, seed: int, count: int, lo: int = 1152, hi: int | None = None):
    """``(index, patches)`` for ``count`` mutants: 1-4 bytes set to 0, 0xff, random or a flipped bit."""
    rng = random.Random(seed)
    hi = len(orig) if hi is None else min(hi, len(orig))
    for i in range(count):
        buf = bytearray(orig)
        patches = []
        for _ in range(rng.choice((1, 1, 2, 4))):
            pos = rng.randrange(lo, hi)
            buf[pos] = rng.choice((0, 0xFF, rng.randrange(256), buf[pos] ^ (1 << rng.randrange(8))))
            patches.append((pos, buf[pos]))
        yield i, patches


def apply(orig: bytes, patches) -> bytes:
    buf = bytearray(orig)
    for pos, value in patches:
        buf[pos] = value
    return bytes(buf)


def our_scan(data: bytes) -> dict | str:
    try:
        img = Image(lambda o, n: data[o:o + n], size=len(data))
    except ErofsMountError as exc:
        return "MOUNT " + _en(exc)
    out: dict[str, dict] = {}
    stack: list[tuple[bytes, int, int | None, tuple[int, ...]]] = [(b"/", img.root_nid, None, ())]
    while stack and len(out) < LIMIT:
        rel, nid, parent, ancestors = stack.pop()
        r = out.setdefault(rel.decode("utf-8", "surrogateescape"), {})
        try:
            if parent is not None:
                nid = img.lookup(parent, rel.rsplit(b"/", 1)[1])
            ino = img.inode(nid)
            if stat.S_ISDIR(ino.mode) and nid in ancestors:
                # d_splice_alias moves a directory's one dentry to where it is found now, unless
                # that would put it inside itself: ELOOP
                r["lstat"] = "E:ELOOP"
                continue
        except ErofsMountError as exc:
            r["lstat"] = _en(exc)
            continue
        r["lstat"] = [ino.mode, ino.uid, ino.gid, ino.size, ino.nlink, ino.mtime * 10**9 + ino.mtime_nsec,
                      ino.rdev, img.st_ino(nid)]
        try:
            names = img.listxattr(nid)
            r["xattrs"] = [p.hex() for n in names for p in n.split(b"\0")]
            for n in names:
                if b"\0" in n:
                    continue
                try:
                    r["x:" + n.hex()] = img.getxattr(nid, n).hex()
                except ErofsMountError as exc:
                    r["x:" + n.hex()] = _en(exc)
        except ErofsMountError as exc:
            r["xattrs"] = _en(exc)
        if stat.S_ISLNK(ino.mode):
            try:
                r["readlink"] = img.readlink(nid).hex()
            except ErofsMountError as exc:
                r["readlink"] = _en(exc)
        if stat.S_ISREG(ino.mode):
            try:
                r["data"] = hashlib.sha256(img.read(nid, 0, DATA_MAX)).hexdigest()
            except ErofsMountError as exc:
                r["data"] = _en(exc)
        if stat.S_ISDIR(ino.mode):
            try:
                cut = [e.name.split(b"\0")[0] for e in img.iterdir(nid) if e.name not in (b".", b"..")]
                r["names"] = [c.hex() for c in cut]
                for c in cut:
                    if c:   # a name starting with NUL reads as "": nothing to lstat
                        stack.append(((rel if rel != b"/" else b"") + b"/" + c, 0, nid, ancestors + (nid,)))
            except ErofsMountError as exc:
                r["names"] = _en(exc)
    return out


def kernel_scan(image: Path, mountpoint: Path, timeout: float = 60) -> dict | str:
    try:
        with kmount.kernel_mount(image, mountpoint) as mnt:
            r = subprocess.run([sys.executable, str(KSCAN), mnt, str(LIMIT), str(DATA_MAX)], capture_output=True,
                               text=True, timeout=timeout)
            if r.returncode:
                return "SCAN FAILED " + r.stderr[-300:]
            return json.loads(r.stdout)
    except RuntimeError as exc:
        return "MOUNT refused: " + str(exc)[:200]


def compare(k: dict | str, o: dict | str) -> list[str]:
    if isinstance(k, str) or isinstance(o, str):
        if isinstance(k, str) and isinstance(o, str) and k.startswith("MOUNT") and o.startswith("MOUNT"):
            return []
        return [f"mount: kernel {str(k)[:150]}, ours {str(o)[:150]}"]
    bad = []
    for p in sorted(set(k) | set(o)):
        if p not in k or p not in o:
            bad.append(f"{p}: only in {'the kernel' if p in k else 'ours'}")
            continue
        for op in sorted(set(k[p]) | set(o[p])):
            kv, ov = k[p].get(op), o[p].get(op)
            if op.startswith("x:") and ov is None and str(kv).startswith("E:"):
                continue   # the kernel asked for a piece of a NUL-split name
            if kv != ov:
                bad.append(f"{p} {op}: kernel {str(kv)[:120]}, ours {str(ov)[:120]}")
    return bad


def delta(base: dict, scan: dict | str) -> dict:
    """What a mutant's scan changes relative to the base scan (for compact storage)."""
    if isinstance(scan, str):
        return {"whole": scan}
    return {"changed": {p: r for p, r in scan.items() if base.get(p) != r},
            "removed": sorted(p for p in base if p not in scan)}


def undelta(base: dict, d: dict) -> dict | str:
    if "whole" in d:
        return d["whole"]
    out = {p: r for p, r in base.items() if p not in set(d["removed"])}
    out.update(d["changed"])
    return out
