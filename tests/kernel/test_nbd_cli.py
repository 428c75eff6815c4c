"""The real command line, as a user runs it: `erofs-mount --mode nbd SRC MNT | cat` returns as soon
as the mount is live (the daemon keeps no pipe open); status, --reattach, -u; -t erofs.nbd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from erofs_mount.backends.nbd import sysfs
from tests import corpuslib

from .helpers import daemon_pid, nothing_left, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    shell = " ".join([sys.executable, "-m", "erofs_mount", *args]) + " | cat"  # a pipe, like `| tee log`
    return subprocess.run(["bash", "-c", "set -o pipefail; " + shell], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("how", [("--mode", "nbd"), ("-t", "erofs.nbd")])
def test_cli_mount_status_reattach_unmount(how, tmp_path):
    img = corpuslib.image("lz4").path
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli(*how, "-o", "nbd.io_timeout=1,nosuid", str(img), str(mnt))
    assert res.returncode == 0, res.stderr
    m = sysfs.mount_at(str(mnt))
    assert m is not None and m.source.startswith("/dev/nbd") and "nosuid" in m.options.split(",")
    index = sysfs.index_of(m.source)
    res = cli("status")
    assert res.returncode == 0 and f"nbd{index} " in res.stdout and "daemon=alive" in res.stdout, res
    # `kill -9` and --reattach at once, as a user types them: the reattach waits out the dying daemon
    os.kill(daemon_pid(index), signal.SIGKILL)
    res = cli("--reattach", m.source)
    assert res.returncode == 0, res.stderr
    assert daemon_pid(index)
    assert len(os.listdir(mnt)) > 0
    res = cli("-u", str(mnt))
    assert res.returncode == 0, res.stderr
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_cli_errors_are_one_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli("--mode", "nbd", str(corpuslib.image("corrupt-bad-magic").path), str(mnt))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erofs-mount") and "EROFS" in lines[0], res.stderr
    res = cli("--mode", "nbd", "-o", "rw", str(corpuslib.image("lz4").path), str(mnt))
    assert res.returncode != 0 and "rw" in res.stderr
