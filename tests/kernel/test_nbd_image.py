"""Whole images in NBD mode on a real kernel (inside UML): every layer on its own NBD device, the
kernel's overlayfs on top; the tree equals the layers unpacked by the reference applier; a SIGKILL
of one layer's daemon is recovered by --reattach with no reader error; -u leaves nothing.  Two
images of one repository share their common layers (one device each), a layer given twice is
stacked once, status groups the devices under the images, and -u of one leaves the other whole."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_mount.backends.fuse.mountinfo import find_mount
from erofs_mount.backends.nbd import sysfs
from erofs_mount.backends.image import LAYERS_DIR, image_doc_path, lower_dirs
from tests.merge.layers import MKFS, D, F, make_tar, materialize, unpack, walk_tree

from .helpers import Readers, drop_caches, kill_daemon, wait_for_blocked_reader, wait_until

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
    # v2: the first three layers of v1, one of its own, and v1's layer 1 again on top
    extra = [D("", 0o755), F("v2.txt", b"only in v2\n"), D("etc"), F("etc/v2", b"v2")]
    v2_layers = layers[:3] + [("tar", extra), layers[1]]
    oracle2 = scratch / "oracle2"
    oracle2.mkdir()
    for _kind, ents in v2_layers:
        unpack(ents, oracle2)
    blobs2 = blobs[:3] + [(TAR_GZ, gzip.compress(make_tar(extra), mtime=0)), blobs[1]]
    reg = start_registry(root / "reg", root / "storage")
    p = Pusher(reg.url)
    try:
        p.image("whole/app", "v1", blobs)
        p.image("whole/app", "v2", blobs2)
    finally:
        p.close()
    try:
        yield {"ref": f"{reg.host}/whole/app:v1", "oracle": oracle, "n": len(blobs),
               "ref2": f"{reg.host}/whole/app:v2", "oracle2": oracle2}
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
    assert len(lowers) == image["n"] and all(d.startswith(LAYERS_DIR + "/") for d in lowers)
    assert os.path.exists(image_doc_path(str(mnt)))
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
        readers = Readers(mnt, files, tmp_path, n=2, max_seconds=120)
        try:
            time.sleep(0.3)
            kill_daemon(victim)
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
    assert not any(os.path.exists(d) for d in lowers) and not os.path.exists(image_doc_path(str(mnt)))


def _devices() -> set[int]:
    return {i for i in sysfs.indexes() if sysfs.size_bytes(i)}


def test_two_images_share_their_common_layers(image, tmp_path):
    m1, m2 = tmp_path / "one", tmp_path / "two"
    m1.mkdir()
    m2.mkdir()
    before = _devices()
    opts = f"oci.insecure,oci.cache={tmp_path / 'c'}"
    res = cli("--mode", "nbd", "-o", opts, image["ref"], str(m1))
    assert res.returncode == 0, res.stderr
    mounted = [str(m1)]
    try:
        after_one = _devices() - before
        assert len(after_one) == image["n"]
        res = cli("--mode", "nbd", "-o", opts, image["ref2"], str(m2))
        assert res.returncode == 0, res.stderr
        mounted.append(str(m2))
        # v2 = v1's layers 0..2 (shared), a layer of its own, v1's layer 1 again (stacked once, shared)
        assert len(_devices() - before) == image["n"] + 1
        lowers1 = lower_dirs(find_mount(str(m1)).super_options)
        lowers2 = lower_dirs(find_mount(str(m2)).super_options)
        assert len(lowers2) == 4 and len(set(lowers1) & set(lowers2)) == 3
        assert lowers2[0] == lowers1[-2]          # the top of v2 is v1's layer 1
        _same(m2, image["oracle2"])
        res = cli("status")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        heads = [i for i, line in enumerate(lines) if line.startswith("image ")]
        assert len(heads) == 2, res.stdout
        for h, mnt, n in ((heads[0], m1, image["n"]), (heads[1], m2, 5)):
            assert str(mnt) in lines[h] and f"layers={n}" in lines[h], lines[h]
            assert all(line.startswith(f"  L{i} sha256:") and " nbd" in line
                       for i, line in enumerate(lines[h + 1:h + 1 + n])), res.stdout
        assert "shared_when_mounted=4" in lines[heads[1]], lines[heads[1]]
        # -u of the first image leaves the second whole: its layers stay mounted and read fine
        res = cli("-u", str(m1))
        assert res.returncode == 0, res.stderr
        mounted.remove(str(m1))
        assert find_mount(str(m1)) is None
        assert not os.path.exists(lowers1[0]) and not os.path.exists(lowers1[1])   # v1 alone had them
        assert len(_devices() - before) == 4
        drop_caches()
        _same(m2, image["oracle2"])
    finally:
        for mnt in reversed(mounted):
            res = cli("-u", mnt)
            assert res.returncode == 0, res.stderr
    wait_until(lambda: not (_devices() - before), 15, "the layers' devices to go")
    assert not [d for d in os.listdir(LAYERS_DIR) if d in {os.path.basename(x) for x in lowers1 + lowers2}]
