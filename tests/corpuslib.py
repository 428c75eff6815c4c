"""The EROFS conformance corpus for tests: images, their kernel manifests, and our own tree comparison.

Images come from ``../shared/corpus`` when it exists (the authoritative set, which
may grow) and otherwise from the gzipped copies in ``tests/data/corpus``; both are
materialised once per machine in a cache directory, checked against the sha256
in ``index.json``.  ``compare_tree`` is the project's own field-by-field check
(the same fields as the corpus' ``check_tree.py``), used by every backend's tests.
"""

from __future__ import annotations

import errno as errno_mod
import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "corpus"
SHARED = HERE.parent.parent / "shared" / "corpus"
CACHE = Path(tempfile.gettempdir()) / f"erofs-mount-corpus-{os.getuid()}"

COMPRESSED_FEATURES = {"lz4", "lz4hc", "lzma", "deflate", "zstd", "compressed"}


@dataclass(frozen=True)
class CorpusImage:
    name: str
    path: Path
    devices: tuple[Path, ...]
    manifest: Path | None
    expect: str           # "ok" or "refuse"
    compressed: bool
    kernel_6_1: bool      # the 6.1 UML kernel mounts it
    info: dict

    def __str__(self) -> str:
        return self.name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@cache
def index() -> dict:
    src = SHARED / "index.json" if (SHARED / "index.json").exists() else DATA / "index.json"
    return json.loads(src.read_text())


def _materialise(rel: str, sha: str | None = None) -> Path:
    """A plain file for ``images/X`` (from shared/ or our gzipped copy), cached by name."""
    target = CACHE / rel
    if target.exists() and (sha is None or _sha256(target) == sha):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    if (SHARED / rel).exists():
        shutil.copyfile(SHARED / rel, tmp)
    elif (DATA / (rel + ".gz")).exists():
        with gzip.open(DATA / (rel + ".gz")) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        raise FileNotFoundError(f"corpus file {rel} is neither in {SHARED} nor in {DATA}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


@cache
def tree_tar() -> Path:
    """The uncompressed ``tree.tar`` (the tar-index image's device 1, and a byte oracle)."""
    target = CACHE / "images" / "tree.tar"
    want = index()["inputs"]["tar"]["sha256"]
    if target.exists() and _sha256(target) == want:
        return target
    gz = SHARED / "images" / "tree.tar.gz"
    if not gz.exists():
        gz = DATA / "images" / "tree.tar.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"tree.tar.tmp{os.getpid()}")
    with gzip.open(gz) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, target)
    return target


def _manifest_rel(info: dict) -> str | None:
    return info.get("manifest")


@cache
def images() -> tuple[CorpusImage, ...]:
    out = []
    for info in index()["images"]:
        name = info["name"]
        feats = set(info.get("features", []))
        # the corrupt-* images derive from a compressed base image
        compressed = bool(feats & COMPRESSED_FEATURES) or name.startswith("corrupt-")
        out.append(CorpusImage(
            name=name, path=CACHE / info["file"], devices=(), manifest=None, expect=info.get("expect", "ok"),
            compressed=compressed, kernel_6_1=bool(info.get("kernel_6_1_mounts")), info=info))
    return tuple(out)


def image(name: str) -> CorpusImage:
    """Materialise one image (and its extra devices) and return it."""
    for img in images():
        if img.name == name:
            break
    else:
        raise KeyError(name)
    info = img.info
    path = _materialise(info["file"], info.get("sha256"))
    devices = []
    for dev in info.get("devices", []):
        rel = dev if isinstance(dev, str) else dev.get("file")
        if rel and "/" not in rel:
            rel = "images/" + rel
        if rel and rel.endswith("tree.tar"):
            devices.append(tree_tar())
        elif rel:
            devices.append(_materialise(rel))
    manifest = None
    rel = _manifest_rel(info)
    if rel:
        manifest = SHARED / rel if (SHARED / rel).exists() else DATA / rel
    return CorpusImage(name=img.name, path=path, devices=tuple(devices), manifest=manifest, expect=img.expect,
                       compressed=img.compressed, kernel_6_1=img.kernel_6_1, info=info)


def names(*, expect: str | None = None, compressed: bool | None = None) -> list[str]:
    return [i.name for i in images()
            if (expect is None or i.expect == expect) and (compressed is None or i.compressed == compressed)]


@cache
def load_manifest(path: Path) -> dict:
    with gzip.open(path) if str(path).endswith(".gz") else open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------- the byte oracle
@cache
def source_files() -> dict[str, tuple[int, int]]:
    """Regular files of the source tree: path -> (offset in tree.tar, size)."""
    out = {}
    with tarfile.open(tree_tar()) as tf:
        for m in tf.getmembers():
            if m.isreg():
                out["/" + m.name.removeprefix("./")] = (m.offset_data, m.size)
    return out


def source_bytes(path: str, offset: int, length: int) -> bytes:
    off, size = source_files()[path]
    length = max(0, min(length, size - offset))
    with open(tree_tar(), "rb") as f:
        return os.pread(f.fileno(), length, off + offset)


# ---------------------------------------------------------------------- tree comparison
TYPE_NAMES = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr",
              stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}


def _p(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def scan_tree(root: str | Path, *, content: bool = True, xattrs: bool = True, limit: int = 200_000) -> dict:
    """Records of every path under ``root`` (manifest field names), plus errors met."""
    root_b = os.fsencode(str(root))
    entries: dict[str, dict] = {}
    inode_paths: dict[tuple[int, int], list[str]] = {}
    stack = [b"/"]
    while stack and len(entries) < limit:
        rel = stack.pop()
        full = root_b + (rel if rel != b"/" else b"")
        path = _p(rel)
        rec: dict = {}
        entries[path] = rec
        try:
            st = os.lstat(full)
        except OSError as e:
            rec["error"] = {"op": "lstat", "errno": errno_mod.errorcode.get(e.errno, str(e.errno))}
            continue
        fmt = stat.S_IFMT(st.st_mode)
        rec.update(type=TYPE_NAMES.get(fmt, "?"), mode=f"{st.st_mode:o}", uid=st.st_uid, gid=st.st_gid,
                   size=st.st_size, nlink=st.st_nlink,
                   mtime={"sec": st.st_mtime_ns // 1_000_000_000, "nsec": st.st_mtime_ns % 1_000_000_000})
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            rec["rdev"] = {"major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)}
        if fmt == stat.S_IFLNK:
            rec["target"] = _p(os.readlink(full))
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            inode_paths.setdefault((st.st_dev, st.st_ino), []).append(path)
        if xattrs:
            try:
                rec["xattrs"] = {_p(os.fsencode(n)): os.getxattr(full, n, follow_symlinks=False).hex()
                                 for n in os.listxattr(full, follow_symlinks=False)}
            except OSError as e:
                rec["error"] = {"op": "xattr", "errno": errno_mod.errorcode.get(e.errno, str(e.errno))}
        if fmt == stat.S_IFREG and content:
            try:
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                rec["sha256"] = h.hexdigest()
            except OSError as e:
                rec["error"] = {"op": "read", "errno": errno_mod.errorcode.get(e.errno, str(e.errno))}
        if fmt == stat.S_IFDIR:
            try:
                names = os.listdir(full)
            except OSError as e:
                rec["error"] = {"op": "readdir", "errno": errno_mod.errorcode.get(e.errno, str(e.errno))}
                continue
            rec["children"] = sorted(_p(n) for n in names)
            for n in names:
                stack.append((rel if rel != b"/" else b"") + b"/" + n)
    for paths in inode_paths.values():
        group = min(paths, key=lambda s: os.fsencode(s))
        for p in paths:
            entries[p]["hardlink_group"] = group
    return entries


FIELDS = ("type", "mode", "uid", "gid", "size", "nlink", "mtime", "rdev", "target", "sha256", "xattrs",
          "hardlink_group")


def compare_tree(manifest: dict, root: str | Path, *, dir_size: bool = True, dir_nlink: bool = True,
                 skip: tuple[str, ...] = ()) -> list[str]:
    """Mismatches between the kernel's manifest and the tree at ``root`` (empty: identical).

    For corrupt images, a manifest path with an ``error`` must fail in the tree too (same
    operation class is not required, the errno must match), and paths below a directory the
    kernel could not list may be absent.
    """
    want = manifest["entries"]
    got = scan_tree(root)
    bad: list[str] = []
    failed_dirs = [p for p, r in want.items() if r.get("error", {}).get("op") == "readdir"]

    def under_failed(p: str) -> bool:
        return any(p.startswith(d.rstrip("/") + "/") for d in failed_dirs)

    for path, w in want.items():
        g = got.get(path)
        if "error" in w:
            if g is not None and "error" not in g and w["error"]["op"] != "readdir":
                bad.append(f"{path} error: expected {w['error']}, got none")
            continue
        if g is None:
            if not under_failed(path):
                bad.append(f"{path} presence: expected present, got absent")
            continue
        if "error" in g:
            bad.append(f"{path} error: unexpected {g['error']}")
            continue
        for field in FIELDS:
            if field in skip:
                continue
            if w.get("type") == "dir" and ((field == "size" and not dir_size) or (field == "nlink" and not dir_nlink)):
                continue
            if w.get(field) != g.get(field):
                bad.append(f"{path} {field}: expected {w.get(field)!r}, got {g.get(field)!r}")
        if w.get("type") == "dir" and "children" in w:
            base = path.rstrip("/") + "/"
            broken = {c for c in w["children"] if "error" in want.get(base + c, {})}
            wc = set(w["children"]) - broken   # an extraction cannot create what the kernel could not stat
            gc = set(g.get("children", [])) - broken
            if wc != gc:
                bad.append(f"{path} children: missing {sorted(wc - gc)[:5]}, unexpected {sorted(gc - wc)[:5]}")
    for path in got:
        if path not in want and not under_failed(path):
            bad.append(f"{path} presence: expected absent, got present")
    return bad


def error_paths(manifest: dict) -> dict[str, str]:
    """Paths the kernel failed on -> errno name."""
    return {p: r["error"]["errno"] for p, r in manifest["entries"].items() if "error" in r}


def read_errno(path) -> int:
    """Read the whole file: 0, or the errno the first failing read gave (EIO for a damaged block)."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as exc:
        return exc.errno
    return 0
