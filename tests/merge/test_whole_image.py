"""Whole images from a real registry: `erofs-mount REF MNT` with no oci.layer mounts all the layers
merged (FUSE, as root and as an unprivileged user), and the tools read the merged image; the
oracle is the same layers unpacked in order by the reference applier (tests/merge/layers.py).

The 5-layer scenario of tests/unit/test_merge.py (adds, modifications, `.wh.` and `.wh..wh..opq`
whiteouts, overlayfs char-device whiteouts and opaque xattrs, file <-> directory, re-creation after
an opaque whiteout, hard links) is pushed three ways: every layer as tar+gzip, every layer as EROFS,
and mixed (as the unit test builds it)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fuse.conftest import FuseMounts, find_pids, fuse_unavailable_reason
from tests.fuse.test_oci_user_fuse import _run, session, user  # noqa: F401 (fixtures)
from tests.fuse.test_unprivileged_fuse import dev_fuse_for_users, user_python  # noqa: F401 (fixtures)
from tests.merge.layers import MKFS, make_tar, materialize, unpack, walk_tree
from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry
from tests.unit.test_merge import scenario

TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
EROFS = "application/vnd.erofs"


def _skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the layers hold devices, owners and trusted.* xattrs)"
    if REGISTRY_BIN is None:
        return "docker-registry is not installed"
    if not os.access(MKFS, os.X_OK):
        return f"{MKFS} is not installed"
    return None


def _erofs_blob(ents, work: Path) -> bytes:
    src, img = work / "src", work / "layer.erofs"
    materialize(ents, src)
    r = subprocess.run([MKFS, "--quiet", str(img), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return img.read_bytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    reason = _skip()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("whole")
    layers = scenario()
    # every layer as a tar: Python's tarfile writes whole-second mtimes here (tests/merge/layers.py)
    tar_layers = [(k, [dataclasses.replace(e, mtime_ns=e.mtime_ns - e.mtime_ns % 10 ** 9) for e in ents])
                  for k, ents in layers]
    oracles = {}
    for name, ls in (("tar", tar_layers), ("erofs", layers)):
        oracles[name] = root / f"oracle-{name}"
        oracles[name].mkdir()
        for _kind, ents in ls:
            unpack(ents, oracles[name])
    oracles["mixed"] = oracles["erofs"]      # its tar layers have whole seconds already
    reg = start_registry(root / "reg", root / "storage")
    p = Pusher(reg.url)
    try:
        tars = [(TAR_GZ, gzip.compress(make_tar(ents), mtime=0)) for _k, ents in tar_layers]
        erofs = [(EROFS, _erofs_blob(ents, root / f"e{i}")) for i, (_k, ents) in enumerate(layers)]
        mixed = [erofs[i] if kind == "erofs" else tars[i] for i, (kind, _e) in enumerate(layers)]
        for tag, blobs in (("tar", tars), ("erofs", erofs), ("mixed", mixed)):
            p.image("whole/app", tag, blobs)
        p.image("whole/one", "v1", [tars[0]])
        # for an unprivileged user: the first four layers (the fifth makes the root 0700)
        p.image("whole/app", "user", tars[:4])
        oracles["user"] = root / "oracle-user"
        oracles["user"].mkdir()
        for _kind, ents in tar_layers[:4]:
            unpack(ents, oracles["user"])
        yield {"reg": reg, "oracles": oracles, "oracle": oracles["mixed"], "host": reg.host}
    finally:
        p.close()
        reg.stop()


def _same(got_root, want_root) -> None:
    got, got_links = walk_tree(Path(got_root))
    want, want_links = walk_tree(Path(want_root))
    assert sorted(got) == sorted(want)
    for path in want:
        for k in want[path]:
            assert got[path].get(k) == want[path][k], (path, k, got[path].get(k), want[path][k])
    assert got_links == want_links


@pytest.mark.parametrize("tag", ["tar", "erofs", "mixed"])
def test_fuse_mounts_the_merged_image(images, tag, tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mounts = FuseMounts(tmp_path)
    mnt = mounts.mountpoint()
    ref = f"{images['host']}/whole/app:{tag}"
    try:
        # no oci.layer: a reference names the whole image (item 4: no oci.* needed to say it is one)
        res = run_cli("--mode", "fuse", "-o", f"oci.insecure,oci.cache={tmp_path / 'c'}", ref, mnt, timeout=300)
        assert res.returncode == 0, res.stderr
        assert b"not a local path: the image reference" in res.stderr, res.stderr
        _same(mnt, images["oracles"][tag])
        st = os.statvfs(mnt)
        assert st.f_blocks > 0 and st.f_bsize > 0
    finally:
        run_cli("-u", mnt)
        mounts.cleanup()


def test_tools_and_extract_on_the_merged_image(images, tmp_path):
    ref = f"{images['host']}/whole/app:mixed"
    env = {**os.environ, "EROFS_MOUNT_CACHE_DIR": str(tmp_path / "c")}
    res = run_cli("ls", "-o", "oci.insecure", ref, "/", env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    want = sorted(n for n in os.listdir(images["oracle"]))
    assert sorted(res.stdout.decode().split()) == want
    dest = tmp_path / "out" / "rootfs"
    dest.parent.mkdir()
    sentinel = tmp_path / "out" / "sentinel"
    sentinel.write_bytes(b"untouched")
    res = run_cli("extract", "-o", "oci.insecure", ref, str(dest), env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    _same(dest, images["oracle"])
    # the layers' symlinks pointing outside were written as symlinks, never followed
    assert sorted(os.listdir(tmp_path / "out")) == ["rootfs", "sentinel"] and sentinel.read_bytes() == b"untouched"
    # a one-layer image needs no merge; oci-inspect says what each layer is
    res = run_cli("ls", "-o", "oci.insecure", f"{images['host']}/whole/one:v1", "/", env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    res = run_cli("oci-inspect", "-o", "oci.insecure", ref, env=env, timeout=120)
    out = res.stdout.decode()
    assert res.returncode == 0 and out.count(" erofs\n") == 3 and out.count(" tar+gzip\n") == 2, out


def test_a_missing_local_path_that_is_not_a_reference(tmp_path):
    res = run_cli("ls", str(tmp_path / "NO SUCH.erofs"), "/")
    err = res.stderr.decode()
    assert res.returncode != 0 and "no such file" in err and err.count("\n") == 1, err


def test_rootless_whole_image(images, user, user_python, session):  # noqa: F811
    mnt = session["mnt"]
    env = {"HOME": session["home"], "XDG_RUNTIME_DIR": session["runtime"]}
    ref = f"{images['host']}/whole/app:user"
    res = _run(user, user_python, ["-m", "erofs_mount", "--mode", "fuse", "-o", "oci.insecure,oci.cache", ref, mnt],
               env, timeout=300)
    assert res.returncode == 0, res.stderr
    try:
        pids = find_pids(mnt)
        assert len(pids) == 1 and os.stat(f"/proc/{pids[0]}").st_uid == user.pw_uid
        res = _run(user, user_python, ["-c", "import os,sys,json; print(json.dumps(sorted(os.listdir(sys.argv[1]))))",
                                       mnt], env)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == sorted(os.listdir(images["oracles"]["user"]))
    finally:
        res = _run(user, user_python, ["-m", "erofs_mount", "-u", mnt], env)
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("layer", [None, "0"])
def test_warm_registry_mounts_with_and_without_accelerators(images, layer, tmp_path):
    """A registry image whose blobs are in the persistent cache is answered inline from the cache file
    (backends/fuse/accel/inline.py ResidentReader over pread_cached(nowait=True)); the merged image
    and a single layer give the same tree cold, warm, and warm with -o accel=none."""
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mounts = FuseMounts(tmp_path)
    ref = f"{images['host']}/whole/app:erofs"
    base = f"oci.insecure,oci.cache={tmp_path / 'c'}" + (f",oci.layer={layer}" if layer else "")
    want = images["oracles"]["erofs"]
    if layer is not None:      # the bottom layer alone
        want = tmp_path / "oracle-0"
        want.mkdir()
        unpack(scenario()[0][1], want)
    try:
        for extra in ("", "", ",accel=none"):       # cold, warm, warm without accelerators
            mnt = mounts.mountpoint()
            res = run_cli("--mode", "fuse", "-o", base + extra, ref, mnt, timeout=300)
            assert res.returncode == 0, res.stderr
            try:
                _same(mnt, want)
            finally:
                assert run_cli("-u", mnt).returncode == 0
    finally:
        mounts.cleanup()
