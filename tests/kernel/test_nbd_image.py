"""Whole images in NBD mode on a real kernel (inside UML): every layer on its own NBD device, the
kernel's overlayfs on top; the tree equals the layers unpacked by the reference applier; a SIGKILL
of one layer's daemon is recovered by --reattach with no reader error; -u leaves nothing."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_mount.backends.fuse.mountinfo import find_mount
from erofs_mount.backends.nbd import state, sysfs
from erofs_mount.backends.nbd.image import IMAGES_DIR, lower_dirs
from tests.merge.layers import MKFS, make_tar, materialize, unpack, walk_tree

from .helpers import Readers, daemon_pid, drop_caches, wait_for_blocked_reader, wait_until

try:
    from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

REPO = str(Path(__file__).resolve().parents[2])
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
EROFS = "application/vnd.erofs"


def _scenario():
    """The merge scenario, less the OCI-style ``.wh.*`` files inside EROFS layers: the kernel's
    overlayfs knows only overlayfs whiteouts (which EROFS layers made by mkfs.erofs --aufs/--oci
    carry, and tar indexes are written with); erofs-mount's FUSE merge honours both forms."""
    from tests.unit.test_merge import scenario

    return [(kind, [e for e in ents if not (kind == "erofs" and e.path.rsplit("/", 1)[-1].startswith(".wh."))])
            for kind, ents in scenario()]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    if not os.access(MKFS, os.X_OK):
        pytest.skip(f"{MKFS} is not installed")
    root = tmp_path_factory.mktemp("nbd-image")
    scratch = _xattr_capable(root)
    layers = _scenario()
    oracle = scratch / "oracle"
    oracle.mkdir()
    for _kind, ents in layers:
        unpack(ents, oracle)
    blobs = []
    for i, (kind, ents) in enumerate(layers):
        if kind == "erofs":
            src, img = scratch / f"e{i}" / "src", scratch / f"e{i}" / "layer.erofs"
            materialize(ents, src)
            r = subprocess.run([MKFS, "--quiet", str(img), str(src)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            blobs.append((EROFS, img.read_bytes()))
        else:
            blobs.append((TAR_GZ, gzip.compress(make_tar(ents), mtime=0)))
    reg = start_registry(root / "reg", root / "storage")
    p = Pusher(reg.url)
    try:
        p.image("whole/app", "v1", blobs)
    finally:
        p.close()
    try:
        yield {"ref": f"{reg.host}/whole/app:v1", "oracle": oracle, "n": len(blobs)}
    finally:
        reg.stop()
        if scratch != root:
            subprocess.run(["umount", "-l", str(scratch)], capture_output=True, timeout=60)


def _xattr_capable(root: Path) -> Path:
    """A directory where user.*/trusted.* xattrs and devices can be made (the layers and the oracle):
    ``root`` itself, or else (UML 6.1's tmpfs has no user xattrs) a loop-mounted ext4 under it."""
    probe = root / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, b"user.probe", b"1")
        return root
    except OSError:
        pass
    img, mnt = root / "scratch.ext4", root / "scratch"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    for cmd in (["mkfs.ext4", "-q", "-F", str(img)], ["mount", "-o", "loop", str(img), str(mnt)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            pytest.skip(f"no filesystem with xattrs for the layers here: {' '.join(cmd)}: {r.stderr.strip()}")
    return mnt


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_mount", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def _same(got_root: Path, want_root: Path) -> None:
    got, got_links = walk_tree(got_root)
    want, want_links = walk_tree(want_root)
    assert sorted(got) == sorted(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for path in want:
        for k in want[path]:
            assert got[path].get(k) == want[path][k], (path, k, got[path].get(k), want[path][k])
    assert got_links == want_links


def test_whole_image_over_nbd_and_overlayfs(image, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli("--mode", "nbd", "-o", f"oci.insecure,oci.cache={tmp_path / 'c'},nbd.io_timeout=1", image["ref"], str(mnt))
    assert res.returncode == 0, res.stderr
    m = find_mount(str(mnt))
    assert m is not None and m.fstype == "overlay", m
    lowers = lower_dirs(m.super_options)
    assert len(lowers) == image["n"] and all(d.startswith(IMAGES_DIR) for d in lowers)
    indexes = [sysfs.index_of(sysfs.mount_at(d).source) for d in lowers]
    try:
        _same(mnt, image["oracle"])
        # SIGKILL the daemon of one layer under read load; --reattach; no reader error
        files = []
        for dirpath, _dirs, names in os.walk(image["oracle"]):
            for n in names:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p) and not os.path.islink(p) and os.access(p, os.R_OK):
                    import hashlib
                    rel = "/" + os.path.relpath(p, image["oracle"])
                    files.append((rel, hashlib.sha256(open(p, "rb").read()).hexdigest()))
        assert files
        victim = indexes[0]                    # the bottom layer: most of the tree comes from it
        ident = sysfs.backend(victim)
        readers = Readers(mnt, files, tmp_path, n=2, max_seconds=120)
        try:
            time.sleep(0.3)
            os.kill(daemon_pid(victim), signal.SIGKILL)
            wait_until(lambda: not state.daemon_alive(state.pid_path(ident)), 10, "the daemon to die")
            drop_caches()
            wait_for_blocked_reader(readers)
            res = cli("--reattach", f"/dev/nbd{victim}", timeout=120)
            assert res.returncode == 0, res.stderr
        finally:
            results = readers.finish(timeout=120)
        for r in results:
            assert r["errors"] == [] and r["bad"] == [], r
        drop_caches()
        _same(mnt, image["oracle"])
    finally:
        res = cli("-u", str(mnt))
        assert res.returncode == 0, res.stderr
    assert find_mount(str(mnt)) is None
    wait_until(lambda: not any(sysfs.size_bytes(i) for i in indexes), 15, "the layers' devices to go")
    assert not os.path.exists(os.path.dirname(lowers[0]))
