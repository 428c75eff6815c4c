"""Inspection tools over the pure reader: inspect, ls, cat, stat, getfattr (text formatting only)."""

from __future__ import annotations

import datetime as _dt
import os
import stat
from collections.abc import Iterator

from .erofs import layout as L
from .erofs.image import Image
from .erofs.inode import Inode


def fmt_time(sec: int, nsec: int) -> str:
    try:
        t = _dt.datetime.fromtimestamp(sec, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        t = f"@{sec}"
    return f"{t}.{nsec:09d}"


def inspect_lines(img: Image) -> Iterator[str]:
    sb = img.sb
    yield f"volume name:      {sb.volume_name or '(none)'}"
    yield f"uuid:             {sb.uuid_str}"
    yield f"block size:       {sb.block_size}"
    yield f"blocks:           {sb.blocks}" + (f" (+{sum(d.blocks for d in sb.devices)} on extra devices)"
                                                if sb.devices else "")
    yield f"inodes:           {sb.inos}"
    yield f"root nid:         {sb.root_nid}"
    yield f"meta blkaddr:     {sb.meta_blkaddr}"
    yield f"xattr blkaddr:    {sb.xattr_blkaddr}"
    yield f"build time:       {fmt_time(sb.epoch + sb.build_time, sb.fixed_nsec)} UTC"
    yield f"compat features:  {' '.join(sb.compat_names) or '(none)'}"
    yield f"incompat features:{' ' if sb.incompat_names else ''}{' '.join(sb.incompat_names) or ' (none)'}"
    yield f"sb checksum:      {'ok' if sb.checksum_ok else 'absent' if sb.checksum_ok is None else 'BAD'}"
    if sb.packed_nid:
        yield f"packed nid:       {sb.packed_nid}"
    if sb.has_metabox:
        yield f"metabox nid:      {sb.metabox_nid}"
    if sb.xattr_prefix_count:
        yield f"xattr prefixes:   {sb.xattr_prefix_count}"
    if sb.has_incompat(L.EROFS_FEATURE_INCOMPAT_COMPR_CFGS):
        names = img.zreader.cfgs.names()
        yield f"compr algorithms: {' '.join(names)} (0x{sb.available_compr_algs:x})"
    elif sb.lz4_max_distance:
        yield f"lz4 max distance: {sb.lz4_max_distance}"
    for i, dev in enumerate(sb.devices, 1):
        yield f"device {i}:         tag={dev.tag.decode('latin-1') or '-'} blocks={dev.blocks} uniaddr={dev.uniaddr}"


def long_line(img: Image, inode: Inode, name: str) -> str:
    mode = stat.filemode(inode.mode)
    if stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
        size = f"{os.major(inode.rdev)}, {os.minor(inode.rdev)}"
    else:
        size = str(inode.size)
    line = f"{mode} {inode.nlink:>3} {inode.uid:>5} {inode.gid:>5} {size:>10} " \
           f"{fmt_time(inode.mtime, inode.mtime_nsec)} {name}"
    if inode.is_lnk:
        line += " -> " + img.readlink(inode.nid).decode("utf-8", "surrogateescape")
    return line


def ls_lines(img: Image, path: str, long: bool) -> Iterator[str]:
    nid = img.resolve(path)
    inode = img.inode(nid)
    if not inode.is_dir:
        name = path.rstrip("/").rsplit("/", 1)[-1] or "/"
        yield long_line(img, inode, name) if long else name
        return
    for e in img.iterdir(nid):
        if e.name in (b".", b".."):
            continue
        name = e.name.decode("utf-8", "surrogateescape")
        yield long_line(img, img.inode(e.nid), name) if long else name


def stat_lines(img: Image, path: str) -> Iterator[str]:
    nid = img.resolve(path)
    ino = img.inode(nid)
    yield f"path:    {path}"
    yield f"nid:     {nid}"
    yield f"type:    {stat.filemode(ino.mode)[0]} ({_type_name(ino.mode)})"
    yield f"mode:    {stat.S_IMODE(ino.mode):04o}"
    yield f"nlink:   {ino.nlink}"
    yield f"uid:     {ino.uid}"
    yield f"gid:     {ino.gid}"
    yield f"size:    {ino.size}"
    yield f"blocks:  {ino.blocks}"
    yield f"mtime:   {ino.mtime}.{ino.mtime_nsec:09d} ({fmt_time(ino.mtime, ino.mtime_nsec)} UTC)"
    if stat.S_ISCHR(ino.mode) or stat.S_ISBLK(ino.mode):
        yield f"rdev:    {os.major(ino.rdev)}:{os.minor(ino.rdev)}"
    yield f"layout:  {L.DATALAYOUT_NAMES.get(ino.datalayout, ino.datalayout)} " \
          f"({'extended' if ino.version else 'compact'} inode)"
    yield f"xattrs:  {len(img.xattr_items(nid))}"
    if ino.is_lnk:
        yield f"target:  {img.readlink(nid).decode('utf-8', 'surrogateescape')}"


def _type_name(mode: int) -> str:
    return {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link",
            stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "unknown")


def xattr_value_text(value: bytes) -> str:
    """getfattr -d style: quoted text when printable, else 0x hex."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()
    if text and all(c.isprintable() for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "0x" + value.hex() if value else '""'


def getfattr_lines(img: Image, path: str) -> Iterator[str]:
    nid = img.resolve(path)
    yield f"# file: {path}"
    for name, value in img.xattr_items(nid):
        yield f"{name.decode('utf-8', 'surrogateescape')}={xattr_value_text(value)}"
