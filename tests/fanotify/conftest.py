"""fanotify-mode fixtures: real mounts on this host's kernel (Linux 6.14+ with pre-content events and
erofs file-backed mounts), each with its own cache directory on a filesystem that takes pre-content
marks; every mount is unmounted and every daemon, holder and guard killed in teardown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from erofs_mount.backends.fanotify import kernel, record

REPO = Path(__file__).resolve().parents[2]


def cli_argv() -> list[str]:
    return [sys.executable, "-m", "erofs_mount"]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


class Fan:
    def __init__(self, tmp_path: Path, cache: Path) -> None:
        self.tmp = tmp_path
        self.cache = cache
        self.env = {"EROFS_MOUNT_CACHE_DIR": str(self.cache)}
        self.mounted: list[str] = []
        self._n = 0

    def mountpoint(self) -> str:
        self._n += 1
        d = self.tmp / f"mnt{self._n}"
        d.mkdir()
        return str(d)

    def mount(self, source: str, *opts: str, mnt: str | None = None, timeout: float = 120):
        mnt = mnt or self.mountpoint()
        args = ["--mode", "fanotify", *(("-o", ",".join(opts)) if opts else ()), source, mnt]
        res = cli(*args, env=self.env, timeout=timeout)
        if res.returncode == 0:
            self.mounted.append(mnt)
        return res, mnt

    def unmount(self, mnt: str):
        res = cli("-u", mnt, env=self.env)
        if res.returncode == 0 and mnt in self.mounted:
            self.mounted.remove(mnt)
        return res

    def doc(self, mnt: str) -> dict:
        doc = record.read(mnt)
        assert doc is not None, f"no fanotify record for {mnt}"
        return doc

    def cleanup(self) -> None:
        for mnt in list(self.mounted):
            doc = record.read(mnt)
            if cli("-u", mnt, env=self.env).returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
            for pid in ((doc or {}).get("pids") or {}).values():
                if record.alive(pid):
                    os.kill(pid, signal.SIGKILL)
            record.remove(mnt)


def _cache_dirs(tmp_path: Path):
    """Where the sparse files may live: pre-content marks need ext4, xfs or btrfs, and /tmp may be a
    tmpfs on another machine; so pytest's directory first, then /var/tmp, then the checkout."""
    yield tmp_path / "cache"
    for base in ("/var/tmp", str(REPO)):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            yield Path(tempfile.mkdtemp(prefix=".fanotify-cache-", dir=base))


@pytest.fixture
def fan(tmp_path):
    reasons, made = [], []
    for cache in _cache_dirs(tmp_path):
        if cache.parent != tmp_path:
            made.append(cache)
        reason = kernel.unsupported_reason(str(cache))
        if reason is None:
            break
        reasons.append(reason)
    else:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"fanotify mode cannot run here: {'; '.join(reasons)}")
    f = Fan(tmp_path, cache)
    try:
        yield f
    finally:
        f.cleanup()
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
