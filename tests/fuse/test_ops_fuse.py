"""Operation semantics through a real mount: read-only errors, xattrs, statfs, readdir resumption, reads."""

from __future__ import annotations

import ctypes
import errno
import os
import random

import pytest

from tests import corpuslib

from .conftest import FuseMounts, fuse_unavailable_reason


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE tests need a usable FUSE: {reason}")
    img = corpuslib.image("plain-inline-4k")
    mounts = FuseMounts(tmp_path_factory.mktemp("ops"))
    try:
        res = mounts.mount(img.path)
        assert res.returncode == 0, res.stderr
        yield mounts.mountpoints[-1], corpuslib.load_manifest(img.manifest)
    finally:
        mounts.cleanup()


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def _a_file(manifest, pred=lambda p, r: True) -> str:
    for path, rec in manifest["entries"].items():
        if rec.get("type") == "reg" and pred(path, rec):
            return path
    raise AssertionError("no such file in the manifest")


def test_write_access_is_erofs(mounted):
    mnt, manifest = mounted
    path = mnt + _a_file(manifest)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert _errno(os.open, path, flags) == errno.EROFS
    assert _errno(os.mkdir, mnt + "/new-dir") == errno.EROFS
    assert _errno(os.unlink, path) == errno.EROFS
    assert _errno(os.setxattr, path, "user.x", b"1") == errno.EROFS
    assert _errno(os.open, mnt + "/new-file", os.O_WRONLY | os.O_CREAT, 0o644) == errno.EROFS


def test_xattrs_missing_is_enodata_and_values_match(mounted):
    mnt, manifest = mounted
    path, rec = next((p, r) for p, r in manifest["entries"].items() if r.get("xattrs"))
    assert _errno(lambda: os.getxattr(mnt + path, "user.no-such-attribute", follow_symlinks=False)) == errno.ENODATA
    names = os.listxattr(mnt + path, follow_symlinks=False)
    assert sorted(names) == sorted(rec["xattrs"])
    for name, value in rec["xattrs"].items():
        assert os.getxattr(mnt + path, name, follow_symlinks=False).hex() == value


def test_listxattr_and_getxattr_size_probing(mounted):
    mnt, manifest = mounted
    path, rec = max(((p, r) for p, r in manifest["entries"].items() if r.get("xattrs")),
                    key=lambda pr: max(len(v) for v in pr[1]["xattrs"].values()))
    libc = ctypes.CDLL(None, use_errno=True)
    cpath = (mnt + path).encode()
    size = libc.llistxattr(cpath, None, 0)
    assert size == sum(len(n.encode()) + 1 for n in rec["xattrs"])
    small = ctypes.create_string_buffer(max(size - 1, 1))
    assert libc.llistxattr(cpath, small, max(size - 1, 1)) == -1 and ctypes.get_errno() == errno.ERANGE
    name, value = max(rec["xattrs"].items(), key=lambda kv: len(kv[1]))
    vlen = libc.lgetxattr(cpath, name.encode(), None, 0)
    assert vlen == len(value) // 2
    if vlen > 1:
        buf = ctypes.create_string_buffer(vlen - 1)
        assert libc.lgetxattr(cpath, name.encode(), buf, vlen - 1) == -1 and ctypes.get_errno() == errno.ERANGE


def test_statfs_as_the_kernel(mounted):
    mnt, manifest = mounted
    s = os.statvfs(mnt)
    want = manifest["statfs"]
    u = lambda v: v + (1 << 64) if v < 0 else v  # noqa: E731
    assert (s.f_bsize, s.f_blocks, u(s.f_files), u(s.f_ffree), s.f_namemax) == (
        want["f_bsize"], want["f_blocks"], want["f_files"], want["f_ffree"], want["f_namemax"])
    assert want["f_files"] == (1 << 64) - 1


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


def test_readdir_resumes_from_telldir_cookies(mounted):
    """seekdir(telldir) anywhere in a big directory continues exactly there (next_id = byte position)."""
    mnt, manifest = mounted
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(f"{mnt}/bigdir".encode())
    assert d
    try:
        names, cookies = [], []
        for _ in range(100_000):  # bounded
            cookies.append(libc.telldir(d))
            ent = libc.readdir(d)
            if not ent:
                break
            names.append(ent.contents.d_name)
        kernel_children = manifest["entries"]["/bigdir"]["children"]
        assert [n for n in names if n not in (b".", b"..")] == [c.encode("utf-8", "surrogateescape")
                                                                 for c in kernel_children]
        rng = random.Random(4)
        for i in rng.sample(range(len(names)), 20):
            libc.seekdir(d, cookies[i])
            got = []
            for _ in range(5):
                ent = libc.readdir(d)
                if not ent:
                    break
                got.append(ent.contents.d_name)
            assert got == names[i:i + 5]
    finally:
        libc.closedir(d)


def test_dot_entries_and_inode_numbers(mounted):
    mnt, manifest = mounted
    names = sorted(os.listdir(mnt + "/deep"))
    assert names == sorted(manifest["entries"]["/deep"]["children"])
    for path, rec in manifest["entries"].items():
        if path != "/" and rec.get("type") == "dir":
            assert os.lstat(mnt + path).st_ino == rec["ino"]  # the nid, as the kernel reports it
            break
    assert os.lstat(mnt).st_ino == 1  # FUSE's root


def test_hard_links_share_inode_and_nlink(mounted):
    mnt, manifest = mounted
    groups: dict[str, list[str]] = {}
    for path, rec in manifest["entries"].items():
        if "hardlink_group" in rec:
            groups.setdefault(rec["hardlink_group"], []).append(path)
    assert groups
    for paths in groups.values():
        stats = [os.lstat(mnt + p) for p in paths]
        assert len({s.st_ino for s in stats}) == 1
        assert all(s.st_nlink == manifest["entries"][paths[0]]["nlink"] for s in stats)


def test_reads_at_odd_offsets_and_past_eof(mounted):
    mnt, manifest = mounted
    files = corpuslib.source_files()
    rng = random.Random(7)
    candidates = [p for p, r in manifest["entries"].items()
                  if r.get("type") == "reg" and p in files and r["size"] > 0]
    for path in rng.sample(candidates, min(40, len(candidates))):
        size = manifest["entries"][path]["size"]
        fd = os.open(mnt + path, os.O_RDONLY)
        try:
            for _ in range(5):
                off = rng.randrange(0, size)
                n = rng.choice([1, 511, 4096, 4097, 65536, 300000])
                assert os.pread(fd, n, off) == corpuslib.source_bytes(path, off, n)
            assert os.pread(fd, 100, size) == b""
            assert os.pread(fd, 100, size + 12345) == b""
        finally:
            os.close(fd)


def test_missing_names_are_enoent_every_time(mounted):
    mnt, _ = mounted
    for _ in range(3):  # the first miss is cached by the kernel as a negative entry
        assert _errno(os.lstat, mnt + "/no-such-name") == errno.ENOENT
        assert _errno(os.lstat, mnt + "/deep/no-such-name") == errno.ENOENT
    assert _errno(os.lstat, mnt + "/README.txt/below-a-file") == errno.ENOTDIR
