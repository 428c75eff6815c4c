"""Mount lifecycle: detach after the mount is live, signals, lost mounts, -u (also of a dead mount)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from tests import corpuslib
from erofs_mount.backends.fuse.mountinfo import find_mount, parse_mountinfo

from .conftest import REPO, find_pids, is_live, wait_for


@pytest.fixture(scope="module")
def plain():
    return corpuslib.image("plain-inline-4k")


def _one_line_error(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("erofs-mount: "), res.stderr
    return lines[0]


def test_detached_mount_is_live_and_releases_the_callers_pipes(fuse, plain):
    mnt = fuse.mountpoint()
    # `... | cat`: the pipeline ends only when every holder of the pipe closed it; the
    # daemon must not be one of them (the timeout only bounds a failure)
    cmd = " ".join(map(str, fuse.command(plain.path, mnt))) + " | cat"
    res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert is_live(mnt)
    pids = find_pids(mnt)
    assert len(pids) == 1
    for fd in (0, 1, 2):
        target = os.readlink(f"/proc/{pids[0]}/fd/{fd}")
        assert not target.startswith("pipe:"), (fd, target)
    entry = find_mount(mnt)
    assert entry.fstype == "fuse.erofs"
    assert entry.source == str(plain.path)
    assert "ro" in entry.options.split(",")
    with open(fuse.log_file) as f:
        log = f.read()
    assert "ready" in log and mnt in log
    assert fuse.unmount(mnt).returncode == 0
    assert find_mount(mnt) is None
    assert wait_for(lambda: not find_pids(mnt))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_signal_unmounts_cleanly(fuse, plain, signum):
    mnt = fuse.mountpoint()
    out = open(fuse.workdir / "fg.out", "w")
    proc = subprocess.Popen(fuse.command(plain.path, mnt, foreground=True), stdout=out, stderr=subprocess.STDOUT,
                            cwd=REPO)
    try:
        assert wait_for(lambda: is_live(mnt), timeout=30), "foreground mount never became live"
        assert os.listdir(mnt)
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        out.close()
    assert find_mount(mnt) is None
    text = (fuse.workdir / "fg.out").read_text()
    assert signal.Signals(signum).name in text  # foreground logs go to stderr too


def test_sigterm_to_detached_daemon_unmounts(fuse, plain):
    res = fuse.mount(plain.path)
    assert res.returncode == 0, res.stderr
    mnt = fuse.mountpoints[-1]
    (pid,) = find_pids(mnt)
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30)
    assert find_mount(mnt) is None


def test_lost_mount_ends_the_daemon(fuse, plain):
    res = fuse.mount(plain.path)
    assert res.returncode == 0, res.stderr
    mnt = fuse.mountpoints[-1]
    (pid,) = find_pids(mnt)
    cmd = ["umount", "-l", mnt] if os.geteuid() == 0 else ["fusermount3", "-u", "-z", mnt]
    subprocess.run(cmd, check=True, timeout=30)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30), "daemon outlived its mount"
    assert find_mount(mnt) is None


def test_sigkill_leaves_a_dead_mount_that_unmount_cleans(fuse, plain):
    res = fuse.mount(plain.path)
    assert res.returncode == 0, res.stderr
    mnt = fuse.mountpoints[-1]
    (pid,) = find_pids(mnt)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30)
    with pytest.raises(OSError) as info:  # (stat may still answer from the kernel's attribute cache)
        os.listdir(mnt)
    assert info.value.errno == errno.ENOTCONN
    assert find_mount(mnt) is not None
    res = fuse.unmount(mnt)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    assert os.stat(mnt).st_ino != 1


def test_unmount_of_a_plain_directory_fails_in_one_line(fuse):
    mnt = fuse.mountpoint()
    assert "not mounted" in _one_line_error(fuse.unmount(mnt))


def test_mount_errors_are_one_line(fuse, plain, tmp_path):
    line = _one_line_error(fuse.mount(plain.path, str(tmp_path / "missing")))
    assert "not a directory" in line
    line = _one_line_error(fuse.mount(tmp_path / "no-such.erofs"))
    assert "no-such.erofs" in line
    assert find_mount(fuse.mountpoints[-1]) is None


def test_second_mount_on_top_and_remount_keep_inode_numbers(fuse, plain):
    a = fuse.mountpoint("a")
    assert fuse.mount(plain.path, a).returncode == 0
    ino_a = {n: os.lstat(os.path.join(a, n)).st_ino for n in os.listdir(a)}
    assert fuse.unmount(a).returncode == 0
    assert fuse.mount(plain.path, a).returncode == 0
    assert {n: os.lstat(os.path.join(a, n)).st_ino for n in os.listdir(a)} == ino_a


def test_mountinfo_parsing_unescapes_paths():
    text = ("36 35 0:39 / /tmp/with\\040space rw,nosuid - fuse.erofs /img\\040x.erofs ro,user_id=0\n"
            "37 35 8:1 / /mnt rw - ext4 /dev/sda1 rw\n")
    entries = parse_mountinfo(text)
    assert entries[0].mountpoint == "/tmp/with space"
    assert entries[0].source == "/img x.erofs"
    assert entries[0].fstype == "fuse.erofs"
    assert entries[0].super_options == "ro,user_id=0"
    assert entries[1].mountpoint == "/mnt"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_read_ahead_window_of_compressed_images(fuse, plain):
    """Root mounts of compressed images get a 1 MiB read-ahead window (1 MiB READs); uncompressed
    ones keep the kernel's; ``-o read_ahead_kb=N`` sets it, 0 leaves the kernel's."""
    from erofs_mount.backends.fuse.config import COMPRESSED_READ_AHEAD_KB
    from erofs_mount.backends.fuse.accel.readahead import bdi_setting

    def read_ahead_kb(st_dev: int) -> int:
        with open(bdi_setting(st_dev)) as f:
            return int(f.read())

    if os.geteuid() != 0:
        pytest.skip("the read-ahead window is root's to set")
    lz4 = corpuslib.image("lz4")

    def window(image, opts=()):
        mnt = fuse.mountpoint("ra")
        res = fuse.mount(image.path, mnt, opts=opts)
        assert res.returncode == 0, res.stderr
        try:
            return read_ahead_kb(os.stat(mnt).st_dev)
        finally:
            assert fuse.unmount(mnt).returncode == 0

    default = window(lz4, ["read_ahead_kb=0"])
    assert default is not None and default != COMPRESSED_READ_AHEAD_KB
    assert window(lz4) == COMPRESSED_READ_AHEAD_KB
    assert window(plain) == default
    assert window(plain, ["read_ahead_kb=512"]) == 512
    res = fuse.mount(plain.path, fuse.mountpoint("ra2"), opts=["read_ahead_kb=99999999"])
    assert "read_ahead_kb" in _one_line_error(res)
