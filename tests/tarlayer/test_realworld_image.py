"""Real-world shape: a three-layer image whose base is a Debian rootfs slice of this machine.

The layers are made by GNU tar, as image builders make them, from real trees:

- layer 0, tar+gzip (``gzip`` the command), POSIX/PAX format with ns mtimes: ``usr/lib/python3.X``
  and ``usr/share/doc`` of the live system (and ``usr``, ``usr/lib``, ``usr/share`` themselves),
  at least 100 MB of tar;
- layer 1, plain tar, POSIX/PAX: an ``etc/`` made here (odd owners and modes, setuid, sticky,
  relative/absolute/dangling symlinks, a hard-link pair and triple, a FIFO, a character device,
  user xattrs through ``SCHILY.xattr``, a path over 100 bytes, a UTF-8 name, a mtime after 2038);
- layer 2, tar+zstd (``zstd`` the command), GNU format (whole-second mtimes, ``././@LongLink``
  names and link targets, a base-256 uid): an ``opt/`` made here.

They are written as an OCI image layout by hand and pushed by ``skopeo copy`` into a real
docker-registry.  Each layer is then mounted with FUSE through the real CLI and every entry is
compared with the tree it was made from (type, mode, owner, mtime, size + sha256, symlink target,
device number, hard-link count, xattrs, directory listing).  Paths that changed on this machine
while the test ran (or that tar reported it could not read) are left out, never failed.

Figures (layer sizes, first-open time, walk + hash time) are printed: ``pytest -s`` shows them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from erofs_mount import daemon
from tests.conftest import run_cli
from tests.fuse.conftest import FuseMounts, fuse_unavailable_reason
from tests.oci._servers import REGISTRY_BIN, start_registry

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REPO = "real/rootfs"
TAG = "v1"
BASE_MIN_TAR = 100 * 10**6        # the base layer's tar must be at least this big
CHUNK = 1 << 20                   # streamed hashing
TIMEOUT = 300                     # any one subprocess (a bound, not an expectation)
NS = 10**9
ROOT = Path(__file__).resolve().parents[2]


# -- the layers ---------------------------------------------------------------------------
@dataclass
class Layer:
    index: int
    media_type: str
    fmt: str                    # tar --format
    root: Path                  # tar -C root
    parents: list[str]          # packed alone (--no-recursion)
    members: list[str]          # packed with everything under them
    tar: Path = None
    blob: Path = None
    before: dict = field(default_factory=dict)   # relative path → lstat before tar ran
    unstable: set = field(default_factory=set)   # changed while the test ran, or unreadable to tar

    @property
    def tar_size(self) -> int:
        return self.tar.stat().st_size

    @property
    def blob_size(self) -> int:
        return self.blob.stat().st_size

    def source(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def mtime_ns(self, st: os.stat_result) -> int:
        """The mtime this layer's tar holds: ns in PAX, whole seconds in GNU format."""
        return st.st_mtime_ns if self.fmt == "posix" else st.st_mtime_ns // NS * NS


def _stable_key(st: os.stat_result) -> tuple:
    return (st.st_mode, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid, st.st_gid,
            st.st_nlink, st.st_rdev)


def snapshot(layer: Layer) -> dict[str, os.stat_result]:
    """Every path the layer packs (relative, as in the tar), with its lstat; symlinks never followed."""
    snap = {}
    for p in layer.parents:
        snap[p] = os.lstat(layer.source(p))
    for m in layer.members:
        snap[m] = os.lstat(layer.source(m))
        for dirpath, dirnames, filenames in os.walk(layer.source(m)):   # followlinks=False
            rel = os.path.relpath(dirpath, layer.root)
            for name in dirnames + filenames:
                try:
                    snap[f"{rel}/{name}"] = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    pass
    return snap


def changed_since(layer: Layer) -> set[str]:
    """Paths added, removed or changed since ``layer.before`` was taken."""
    now = snapshot(layer)
    out = set(now) ^ set(layer.before)
    out |= {p for p in now.keys() & layer.before.keys() if _stable_key(now[p]) != _stable_key(layer.before[p])}
    return out


_TAR_PER_FILE = re.compile(r"^tar: (.+?): (file changed as we read it|File removed before we read it|"
                           r"File shrank by .*|Cannot .*|socket ignored)$")


def tar_has_xattrs() -> bool:
    out = subprocess.run(["tar", "--help"], capture_output=True, text=True, timeout=30).stdout
    return "--xattrs" in out


def make_tar(layer: Layer, out: Path) -> None:
    cmd = ["tar", "--create", "--file", str(out), f"--format={layer.fmt}", "--numeric-owner", "--sort=name",
           "-C", str(layer.root)]
    if layer.fmt == "posix":
        cmd += ["--pax-option=delete=atime,delete=ctime"]     # as image builders do: deterministic headers
        if tar_has_xattrs():
            cmd += ["--xattrs", "--xattrs-include=*"]
    assert not any(p.startswith("-") for p in layer.parents + layer.members)
    cmd += ["--no-recursion", *layer.parents, "--recursion", *layer.members]    # positional options
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    unread = set()
    for line in res.stderr.splitlines():
        m = _TAR_PER_FILE.match(line)
        if m:
            unread.add(m.group(1))
        elif line.strip() != "tar: Exiting with failure status due to previous errors":
            pytest.fail(f"tar: {line}  ({cmd})")
    if res.returncode not in (0, 1) and not unread:
        pytest.fail(f"tar exited {res.returncode}: {res.stderr}")
    layer.tar = out
    layer.unstable |= unread


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- layer 1 and 2: trees made here --------------------------------------------------------
T0 = 1_700_000_000_123_456_789      # ns


def _set(path: Path, *, mode=None, owner=None, mtime_ns=None, link=False) -> None:
    if owner is not None:
        os.chown(path, *owner, follow_symlinks=not link)
    if mode is not None and not link:
        os.chmod(path, mode)            # after chown, which clears set-id bits
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=not link)


def make_etc(root: Path, xattrs: bool) -> None:
    """etc/ as a configuration layer holds it, every kind of entry a tar can carry."""
    etc = root / "etc"
    (etc / "app" / "conf.d").mkdir(parents=True)
    (etc / "sticky").mkdir()
    (etc / "hardlinks").mkdir()
    (etc / "alternatives").mkdir()
    deep = etc / "deep" / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    files = {
        "hostname": (b"realworld\n", 0o644, (0, 0)),
        "app/config.json": (json.dumps({"name": "app", "workers": 4}).encode(), 0o640, (1234, 5678)),
        "app/secret": (b"s3cret\n" * 100, 0o600, (4242, 4242)),
        "app/suid-tool": (b"#!/bin/sh\necho tool\n", 0o4755, (0, 0)),
        "app/sgid-tool": (b"#!/bin/sh\necho sgid\n", 0o2711, (0, 50)),
        "app/conf.d/empty": (b"", 0o644, (0, 0)),
        "app/conf.d/10-big.conf": (b"".join(b"option%06d = %d\n" % (i, i * 7) for i in range(40000)), 0o644,
                                   (0, 0)),
        "hardlinks/a": (b"three names, one inode\n", 0o444, (7, 8)),
        "na\u00efve caf\u00e9 \u65e5\u672c.txt": ("unicode name\n".encode(), 0o644, (0, 0)),
        f"deep/{'d' * 60}/{'e' * 60}/{'f' * 40}.conf": (b"a path over 100 bytes\n", 0o644, (0, 0)),
    }
    for i, (rel, (data, mode, owner)) in enumerate(sorted(files.items())):
        p = etc / rel
        p.write_bytes(data)
        _set(p, owner=owner, mode=mode, mtime_ns=T0 + i * 1_000_003_001)
    _set(etc / "hostname", mtime_ns=(1 << 32) * NS + 987_654_321)     # after 2038: a 64-bit mtime
    os.link(etc / "app/config.json", etc / "app/config.json.link")
    os.link(etc / "hardlinks/a", etc / "hardlinks/b")
    os.link(etc / "hardlinks/a", etc / "hardlinks/c")
    symlinks = {
        "localtime": "../usr/share/zoneinfo/Etc/UTC",          # relative, dangling in this layer
        "alternatives/editor": "/usr/bin/vim.basic",           # absolute, outside the layer
        "app/current": "conf.d",                               # to a directory
        "app/loop": "loop",                                    # to itself
    }
    for i, (rel, target) in enumerate(sorted(symlinks.items())):
        os.symlink(target, etc / rel)
        _set(etc / rel, owner=(0, 0), mtime_ns=T0 - i * 777_777_777, link=True)
    os.mkfifo(etc / "initctl", 0o600)
    _set(etc / "initctl", mode=0o600, mtime_ns=T0 + 5)
    os.mknod(etc / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _set(etc / "null", mode=0o666, mtime_ns=T0 + 6)
    if xattrs:
        os.setxattr(etc / "app/config.json", "user.origin", b"realworld-test")
        os.setxattr(etc / "app/config.json", "user.binary", bytes(range(256)))
        os.setxattr(etc / "app", "user.dir", b"a directory's xattr")
    _set(etc / "sticky", mode=0o1777, mtime_ns=T0 + 7)
    for d in sorted((p for p in etc.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        if d.name != "sticky":
            _set(d, mode=0o755, mtime_ns=T0 + 11 * len(d.parts))
    _set(etc / "app", owner=(1234, 5678), mode=0o750)
    _set(etc, mode=0o755, mtime_ns=T0 + 999)


def make_opt(root: Path) -> None:
    """opt/ in GNU format: long names and link targets (././@LongLink), a base-256 uid, whole seconds."""
    rng = random.Random(20240601)
    tool = root / "opt" / "tool"
    (tool / "bin").mkdir(parents=True)
    (tool / "share" / "data").mkdir(parents=True)
    big = tool / "bin" / "tool"
    big.write_bytes(rng.randbytes(3 << 20) + b"\0" * (1 << 20) + rng.randbytes(12345))
    _set(big, mode=0o755, mtime_ns=T0 + 123_456)
    for i in range(300):
        p = tool / "share" / "data" / f"item-{i:04d}.txt"
        p.write_bytes(b"item %d\n" % i * (i % 17))
        _set(p, owner=(1000 + i % 3, 1000), mode=0o644, mtime_ns=T0 + i * NS + 500_000_000)
    longdir = tool / "share" / ("long-directory-name-" * 4)
    longdir.mkdir()
    longfile = longdir / ("and-a-long-file-name-" * 5 + ".txt")
    longfile.write_bytes(b"GNU long name\n")
    _set(longfile, owner=(3_000_000, 3_000_000), mode=0o640, mtime_ns=T0)     # uid > 2097151: base-256
    os.symlink(os.path.relpath(longfile, tool / "bin"), tool / "bin" / "long-target")
    _set(tool / "bin" / "long-target", mtime_ns=T0, link=True)
    os.link(big, tool / "bin" / "tool-alias")
    for d in (longdir, tool / "share" / "data", tool / "share", tool / "bin", tool, root / "opt"):
        _set(d, mode=0o755, mtime_ns=T0 + 42 * NS)


# -- the OCI layout, skopeo, the registry -------------------------------------------------
def _digest_file(path: Path) -> str:
    return "sha256:" + sha256_file(str(path))


def write_layout(layout: Path, layers: list[Layer]) -> dict:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return "sha256:" + d, len(data)

    descs = []
    for ly in layers:
        d = _digest_file(ly.blob)
        os.link(ly.blob, blobs / d.split(":")[1])
        descs.append({"mediaType": ly.media_type, "digest": d, "size": ly.blob_size})
    config = {
        "created": "2024-06-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest_file(ly.tar) for ly in layers]},
        "history": [{"created": "2024-06-01T00:00:00Z", "created_by": f"tar --format={ly.fmt} {' '.join(ly.members)}"}
                    for ly in layers],
    }
    cd, cs = put(json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": cs}, "layers": descs}
    md, ms = put(json.dumps(manifest, sort_keys=True).encode())
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": ms,
                       "annotations": {"org.opencontainers.image.ref.name": TAG}}]}))
    return manifest


@dataclass
class Image:
    ref: str
    layers: list[Layer]
    manifest: dict
    reg: object


def _python_lib() -> str:
    """usr/lib/python3.X of this machine: the running interpreter's version, else the biggest."""
    want = f"usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.isdir("/" + want):
        return want
    cands = sorted(p for p in os.listdir("/usr/lib") if re.fullmatch(r"python3\.\d+", p))
    if not cands:
        pytest.skip("no /usr/lib/python3.X on this machine")
    return f"usr/lib/{cands[-1]}"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    for tool in ("skopeo", "tar", "gzip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (the image is built with GNU tar and gzip and pushed by skopeo)")
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE is needed: {reason}")
    if os.geteuid() != 0:
        pytest.skip("root is needed to make the layers' owners and device node")
    work = tmp_path_factory.mktemp("realworld")
    t0 = time.monotonic()

    # layer 0: the live rootfs slice; more of /usr/share if it is too small
    base = Layer(0, OCI_LAYER + "+gzip", "posix", Path("/"), ["usr", "usr/lib", "usr/share"],
                 [_python_lib(), "usr/share/doc"])
    base.before = snapshot(base)
    extra = iter(["usr/share/man", "usr/share/locale", "usr/share/perl", "usr/share/vim"])
    while sum(st.st_size for st in base.before.values() if stat.S_ISREG(st.st_mode)) < BASE_MIN_TAR * 1.05:
        more = next(extra, None)
        if more is None:
            pytest.skip("this machine's /usr/share is too small for a 100 MB base layer")
        if os.path.isdir("/" + more):
            base.members.append(more)
            base.before = snapshot(base)
    # layer 1: etc/ made here; layer 2: opt/ made here
    xattrs = tar_has_xattrs()
    gen1, gen2 = work / "gen1", work / "gen2"
    gen1.mkdir()
    gen2.mkdir()
    make_etc(gen1, xattrs)
    make_opt(gen2)
    conf = Layer(1, OCI_LAYER, "posix", gen1, [], ["etc"])
    opt = Layer(2, OCI_LAYER + "+zstd", "gnu", gen2, [], ["opt"])
    layers = [base, conf, opt]
    for ly in (conf, opt):
        ly.before = snapshot(ly)

    for ly in layers:
        make_tar(ly, work / f"layer{ly.index}.tar")
    assert base.tar_size >= BASE_MIN_TAR, base.tar_size
    base.blob = work / "layer0.tar.gz"
    with open(base.blob, "wb") as f:
        subprocess.run(["gzip", "-6", "-n", "-c", str(base.tar)], stdout=f, check=True, timeout=TIMEOUT)
    conf.blob = conf.tar
    opt.blob = work / "layer2.tar.zst"
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", "-3", "-f", "-o", str(opt.blob), str(opt.tar)], check=True, timeout=TIMEOUT)
    else:
        import zstandard

        opt.blob.write_bytes(zstandard.ZstdCompressor(level=3).compress(opt.tar.read_bytes()))
    manifest = write_layout(work / "layout", layers)
    built = time.monotonic() - t0

    reg = start_registry(work / "reg", work / "storage")
    try:
        policy = work / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        home = work / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")}
        env["HOME"] = str(home)
        ref = f"{reg.host}/{REPO}:{TAG}"
        t1 = time.monotonic()
        res = subprocess.run(["skopeo", "--policy", str(policy), "copy", "--retry-times", "2", "--preserve-digests",
                              "--dest-tls-verify=false", "--dest-no-creds",
                              f"oci:{work / 'layout'}:{TAG}", f"docker://{ref}"],
                             capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert res.returncode == 0, res.stderr
        pushed = time.monotonic() - t1
        # the registry serves our manifest: the same layers, in order, with their media types
        with httpx.Client(timeout=30) as c:
            r = c.get(f"{reg.url}/v2/{REPO}/manifests/{TAG}", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200, r.text
        assert r.json()["layers"] == manifest["layers"], r.text
        for ly in layers:
            print(f"\n[realworld] layer {ly.index}: {ly.media_type.rsplit('.', 1)[-1]:>10} {ly.fmt:>5}: "
                  f"{len(ly.before):6d} entries, tar {ly.tar_size / 1e6:7.1f} MB, blob {ly.blob_size / 1e6:6.1f} MB "
                  f"({' '.join(ly.members)})", end="")
        print(f"\n[realworld] built the layers and the layout in {built:.1f} s; skopeo copy in {pushed:.1f} s")
        yield Image(ref, layers, manifest, reg)
    finally:
        reg.stop()


# -- the comparison ------------------------------------------------------------------------
def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


ST_FIELDS = ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_nlink", "st_rdev", "st_ino", "st_dev")
St = collections.namedtuple("St", ST_FIELDS)


def _st(st: os.stat_result) -> St:
    return St(*(getattr(st, f) for f in ST_FIELDS))


@dataclass
class Walk:
    stats: dict            # relative path → St
    listing: dict          # relative dir → set of names
    sha: dict              # relative path → sha256 (regular files)
    xattrs: dict
    targets: dict
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"stats": self.stats, "listing": {k: sorted(v) for k, v in self.listing.items()},
                           "sha": self.sha, "targets": self.targets, "bytes": self.bytes, "seconds": self.seconds,
                           "xattrs": {p: {n: v.hex() for n, v in x.items()} for p, x in self.xattrs.items()}})

    @classmethod
    def from_json(cls, text: str) -> "Walk":
        d = json.loads(text)
        return cls({p: St(*v) for p, v in d["stats"].items()}, {k: set(v) for k, v in d["listing"].items()},
                   d["sha"], {p: {n: bytes.fromhex(v) for n, v in x.items()} for p, x in d["xattrs"].items()},
                   d["targets"], d["bytes"], d["seconds"])


def walk_tree(top: str) -> Walk:
    """os.walk (no symlink followed) with every regular file hashed as a stream."""
    start = time.monotonic()
    w = Walk({}, {}, {}, {}, {})
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        names = set(dirnames) | set(filenames)
        w.listing[rel_dir] = names
        for name in sorted(names):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            w.stats[rel] = _st(st)
            if stat.S_ISREG(st.st_mode):
                w.sha[rel] = sha256_file(path)
                w.bytes += st.st_size
            elif stat.S_ISLNK(st.st_mode):
                w.targets[rel] = os.readlink(path)
            if not stat.S_ISLNK(st.st_mode):
                w.xattrs[rel] = _xattrs(path)
    w.seconds = time.monotonic() - start
    return w


def _walk_main() -> None:
    """``python -c 'from …test_realworld_image import _walk_main; _walk_main()' TOP OUT``."""
    top, out = sys.argv[1:3]
    Path(out).write_text(walk_tree(top).to_json())


def walk_mount(mnt: str, out: Path) -> Walk:
    """walk_tree in a child process, so a hung mount fails the test after TIMEOUT instead of hanging it."""
    code = "from tests.tarlayer.test_realworld_image import _walk_main; _walk_main()"
    res = subprocess.run([sys.executable, "-c", code, mnt, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return Walk.from_json(out.read_text())


def source_view(layer: Layer) -> Walk:
    """The layer's source, as it was when tar read it (``layer.before``), hashed now."""
    w = Walk({}, {}, {}, {}, {})
    for rel, st in layer.before.items():
        path = layer.source(rel)
        w.stats[rel] = _st(st)
        if stat.S_ISREG(st.st_mode):
            try:
                w.sha[rel] = sha256_file(path)
            except OSError:
                layer.unstable.add(rel)
        elif stat.S_ISLNK(st.st_mode):
            w.targets[rel] = os.readlink(path)
        if not stat.S_ISLNK(st.st_mode):
            w.xattrs[rel] = _xattrs(path)
    # directory listings: what the layer holds of each directory (ancestors hold only the packed part)
    w.listing["."] = set()
    for rel in layer.before:
        parent, _, name = rel.rpartition("/")
        w.listing.setdefault(parent or ".", set()).add(name)
    for rel, st in layer.before.items():
        if stat.S_ISDIR(st.st_mode):
            w.listing.setdefault(rel, set())
    return w


def compare(layer: Layer, src: Walk, mnt: Walk) -> list[str]:
    bad = []
    skip = layer.unstable
    links: dict[tuple, int] = {}
    for rel, st in src.stats.items():
        if stat.S_ISREG(st.st_mode) and rel not in skip:
            links[(st.st_dev, st.st_ino)] = links.get((st.st_dev, st.st_ino), 0) + 1
    missing = set(src.stats) - set(mnt.stats) - skip
    extra = set(mnt.stats) - set(src.stats) - skip
    bad += [f"{p}: missing from the mount" for p in sorted(missing)]
    bad += [f"{p}: in the mount, not in the source" for p in sorted(extra)]
    for rel in sorted(set(src.stats) & set(mnt.stats) - skip):
        s, m = src.stats[rel], mnt.stats[rel]

        def check(what, want, got):
            if want != got:
                bad.append(f"{rel}: {what} {got!r}, source {want!r}")

        check("mode", stat.filemode(s.st_mode) + f" {s.st_mode:o}", stat.filemode(m.st_mode) + f" {m.st_mode:o}")
        check("uid/gid", (s.st_uid, s.st_gid), (m.st_uid, m.st_gid))
        check("mtime_ns", layer.mtime_ns(s), m.st_mtime_ns)
        if stat.S_IFMT(s.st_mode) != stat.S_IFMT(m.st_mode):
            continue
        if stat.S_ISREG(s.st_mode):
            check("size", s.st_size, m.st_size)
            check("sha256", src.sha.get(rel), mnt.sha.get(rel))
            check("nlink", links[(s.st_dev, s.st_ino)], m.st_nlink)
        elif stat.S_ISLNK(s.st_mode):
            check("symlink target", src.targets[rel], mnt.targets[rel])
            check("size", len(os.fsencode(src.targets[rel])), m.st_size)
        elif stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
            check("rdev", (os.major(s.st_rdev), os.minor(s.st_rdev)), (os.major(m.st_rdev), os.minor(m.st_rdev)))
        elif stat.S_ISDIR(s.st_mode):
            check("names", sorted(src.listing.get(rel, set()) - skip_names(skip, rel)),
                  sorted(mnt.listing.get(rel, set()) - skip_names(skip, rel)))
            subdirs = sum(stat.S_ISDIR(mnt.stats[f"{rel}/{n}"].st_mode) for n in mnt.listing.get(rel, ())
                          if f"{rel}/{n}" in mnt.stats)
            check("nlink (2 + subdirectories)", 2 + subdirs, m.st_nlink)
        if not stat.S_ISLNK(s.st_mode):
            check("xattrs", src.xattrs.get(rel, {}), mnt.xattrs.get(rel, {}))
    top = sorted(src.listing["."] - skip_names(skip, "."))
    if sorted(mnt.listing.get(".", set()) - skip_names(skip, ".")) != top:
        bad.append(f"/: names {sorted(mnt.listing.get('.', ()))}, source {top}")
    return bad


def skip_names(skip: set, rel_dir: str) -> set:
    prefix = "" if rel_dir == "." else rel_dir + "/"
    return {p[len(prefix):] for p in skip if p.startswith(prefix) and "/" not in p[len(prefix):]}


def _env(cache: Path) -> dict:
    return {**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)}


def _opts(index: int, cache: Path) -> str:
    return f"oci.layer={index},oci.insecure,oci.cache={cache}"


def _indexing_seconds(digest: str) -> str:
    """The daemon's own figure for its first pass, from its log (when this machine keeps one)."""
    try:
        text = Path(daemon.log_path("fuse")).read_text(errors="replace")
    except OSError:
        return "n/a"
    hits = re.findall(re.escape(digest) + r"\): indexed (\d+) members, (\d+) bytes of tar, index (\d+) bytes, in "
                      r"([\d.]+) s", text)
    if not hits:
        return "n/a"
    members, tar, index, secs = hits[-1]
    return f"{secs} s ({members} members, index {int(index) / 1e6:.1f} MB)"


# -- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 2])
def test_layer_mounts_and_every_file_matches(image, index, tmp_path):
    layer = image.layers[index]
    cache = tmp_path / "cache"
    mounts = FuseMounts(tmp_path)
    mnt = mounts.mountpoint()
    try:
        t0 = time.monotonic()
        res = run_cli("--mode", "fuse", "-o", _opts(index, cache), image.ref, mnt, env=_env(cache), timeout=TIMEOUT)
        first_open = time.monotonic() - t0
        assert res.returncode == 0, res.stderr.decode()
        ours = walk_mount(mnt, tmp_path / "walk.json")
        walked = ours.seconds
        t2 = time.monotonic()
        src = source_view(layer)
        hashed_src = time.monotonic() - t2
        layer.unstable |= changed_since(layer)       # changed on this machine meanwhile: not compared
        bad = compare(layer, src, ours)
        res = run_cli("-u", mnt, timeout=60)
        assert res.returncode == 0, res.stderr.decode()
        digest = image.manifest["layers"][index]["digest"]
        print(f"\n[realworld] layer {index}: tar {layer.tar_size / 1e6:.1f} MB, blob {layer.blob_size / 1e6:.1f} MB; "
              f"first open (fetch + index + mount) {first_open:.1f} s, daemon's indexing {_indexing_seconds(digest)}; "
              f"walk + sha256 of the mount: {len(ours.stats)} entries, {ours.bytes / 1e6:.1f} MB in {walked:.1f} s "
              f"({ours.bytes / 1e6 / max(walked, 1e-3):.0f} MB/s; the source tree: {hashed_src:.1f} s); "
              f"{len(layer.unstable)} paths left out as changed/unreadable")
        assert len(layer.unstable) < len(layer.before) // 10 + 5, sorted(layer.unstable)[:20]
        assert bad == [], f"{len(bad)} differences, first: " + "\n".join(bad[:30])
        assert len(ours.stats) >= len(layer.before) - len(layer.unstable)
    finally:
        mounts.cleanup()


def test_ls_lists_usr_share_doc(image, tmp_path):
    base = image.layers[0]
    cache = tmp_path / "cache"
    res = run_cli("ls", "-o", _opts(0, cache), image.ref, "/usr/share/doc", env=_env(cache), timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr.decode()
    got = set(os.fsdecode(n) for n in res.stdout.splitlines())
    want = {rel.rsplit("/", 1)[1] for rel in base.before if rel.startswith("usr/share/doc/") and rel.count("/") == 3}
    unstable = base.unstable | changed_since(base)
    skip = skip_names(unstable, "usr/share/doc")
    assert got - skip == want - skip, (sorted(got - want)[:20], sorted(want - got)[:20])
    assert len(want) > 50
