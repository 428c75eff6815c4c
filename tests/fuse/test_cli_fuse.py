"""The real command line in FUSE mode: `erofs-mount --mode fuse [-o …] SOURCE MNT`, `-u`, and OCI layers."""

from __future__ import annotations

import subprocess
import sys

from tests import corpuslib
from tests.oci.conftest import world  # noqa: F401 - the session's real registry (skips without docker-registry)
from erofs_mount.backends.fuse.mountinfo import find_mount

from .conftest import REPO, find_pids, have_check_tree, is_live, run_check_tree, wait_for


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_mount", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_mount_options_reach_the_mount(fuse):
    img = corpuslib.image("plain-inline-4k")
    mnt = fuse.mountpoint()
    res = cli("--mode", "fuse", "-o", "ro,noexec,nodev,fsname=corpus-plain,default_permissions", str(img.path), mnt)
    assert res.returncode == 0, res.stderr
    entry = find_mount(mnt)
    assert entry.fstype == "fuse.erofs" and entry.source == "corpus-plain"
    assert {"ro", "noexec", "nodev"} <= set(entry.options.split(","))
    assert "default_permissions" in entry.super_options.split(",")
    assert is_live(mnt)
    res = cli("-u", mnt)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    assert wait_for(lambda: not find_pids(mnt), timeout=30)


def test_cli_t_erofs_fuse_and_uid_override(fuse):
    img = corpuslib.image("plain-inline-4k")
    mnt = fuse.mountpoint()
    res = cli("-t", "erofs.fuse", "-o", "uid=1234,gid=4321", str(img.path), mnt)
    assert res.returncode == 0, res.stderr
    import os

    st = os.lstat(mnt + "/README.txt")
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert cli("-u", mnt).returncode == 0


def test_cli_rw_is_refused_in_one_line(fuse):
    img = corpuslib.image("plain-inline-4k")
    mnt = fuse.mountpoint()
    res = cli("--mode", "fuse", "-o", "rw", str(img.path), mnt)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert find_mount(mnt) is None


def test_oci_layer_mount_matches_kernel(world, fuse):  # noqa: F811
    name = "plain-inline-4k"
    mnt = fuse.mountpoint()
    res = cli("--mode", "fuse", "-o", "oci.layer=0,oci.insecure", world.ref(f"corpus/{name}:v1"), mnt, timeout=180)
    assert res.returncode == 0, res.stderr
    img = corpuslib.image(name)
    if have_check_tree():
        check = run_check_tree(img.manifest, mnt)
        assert check.returncode == 0, "\n".join(check.stdout.strip().splitlines()[-12:])
    else:
        bad = corpuslib.compare_tree(corpuslib.load_manifest(img.manifest), mnt)
        assert not bad, bad[:10]
    assert cli("-u", mnt).returncode == 0
    assert find_mount(mnt) is None
    assert wait_for(lambda: not find_pids(mnt), timeout=30)
