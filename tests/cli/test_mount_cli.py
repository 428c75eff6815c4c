"""The mount.erofs-style command line end to end: auto mode, -t, pipes, -u (FUSE on this host)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli

DEMO = os.path.join(REPO, "demo", "demo.erofs")

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
                                reason="/dev/fuse or fusermount3 missing")


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.abspath(path) for line in f)


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    if mounted(str(path)):
        subprocess.run(["umount", "-l", str(path)], timeout=30)


@needs_fuse
def test_auto_mode_mounts_and_unmounts(mnt):
    r = run_cli(DEMO, mnt, timeout=60)
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    if os.geteuid() == 0:
        assert "FUSE mode (" in err or "NBD mode (" in err or "FANOTIFY mode (" in err
    assert mounted(mnt)
    cat = run_cli("cat", DEMO, "/docs/lorem.txt").stdout
    with open(os.path.join(mnt, "docs", "lorem.txt"), "rb") as f:
        assert f.read() == cat
    st = os.lstat(os.path.join(mnt, "docs", "lorem-hardlink.txt"))
    assert st.st_nlink == 2 and st.st_ino == os.lstat(os.path.join(mnt, "docs", "lorem.txt")).st_ino
    assert os.readlink(os.path.join(mnt, "docs", "README-link")) == "../README.txt"
    r = run_cli("-u", mnt, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not mounted(mnt)


@needs_fuse
def test_pipe_returns_once_mounted(mnt):
    """A detached daemon must not keep the caller's stdout: `erofs-mount ... | cat` returns at once."""
    t0 = time.monotonic()
    p = subprocess.run(f"{sys.executable} -m erofs_mount -t erofs.fuse {DEMO} {mnt} 2>&1 | cat",
                       shell=True, cwd=REPO, capture_output=True, timeout=60)
    assert p.returncode == 0
    assert time.monotonic() - t0 < 55
    assert mounted(mnt)
    assert run_cli("-u", mnt, timeout=60).returncode == 0


@pytest.mark.parametrize("args, message, status", [
    (["-o", "rw"], "read-only", 2),
    (["-o", "nonsense"], "unknown option 'nonsense'", 2),
    (["-t", "ext4"], "unknown filesystem type", 2),
])
def test_bad_mount_options_one_line(mnt, args, message, status):
    r = run_cli(*args, DEMO, mnt, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == status and message in err and err.count("\n") == 1
    assert not mounted(mnt)


@needs_fuse
def test_bad_image_refused_nothing_mounted(mnt, tmp_path):
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(b"\0" * 8192)
    r = run_cli("-t", "erofs.fuse", str(bad), mnt, timeout=60)
    err = r.stderr.decode()
    assert r.returncode != 0 and "not an EROFS image" in err and "Traceback" not in err
    assert not mounted(mnt)
