"""FUSE-mode fixtures: real mounts on this host's kernel, always cleaned up.

Mounts run ``python -m erofs_mount.backends.fuse.lifecycle`` in a separate
process (pyfuse3 holds one session per process); the daemon detaches as it
would under ``erofs-mount --mode fuse``.  Every mount a test makes is
unmounted in teardown (``umount -l`` / ``fusermount3 -u -z``) and any daemon
left for it is killed by pid, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_mount.backends.fuse import publish
from erofs_mount.backends.fuse.mountinfo import find_mount
from tests import corpuslib

REPO = Path(__file__).resolve().parents[2]
CHECK_TREE = REPO.parent / "shared" / "corpus" / "check_tree.py"
LIFECYCLE = ("-m", "erofs_mount.backends.fuse.lifecycle")


@contextlib.contextmanager
def system_user(name: str):
    """A system user for unprivileged tests: created (and deleted afterwards) unless it exists."""
    created = False
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True, timeout=60)
        created = True
        pw = pwd.getpwnam(name)
    try:
        yield pw
    finally:
        if created:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)


def fuse_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if os.geteuid() != 0:
        st = os.stat(shutil.which("fusermount3"))
        if not st.st_mode & stat.S_ISUID:
            return "not root and fusermount3 is not setuid"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


def zdata_available() -> bool:
    try:
        import erofs_mount.erofs.zdata  # noqa: F401
    except ImportError:
        return False
    return True


def find_pids(mountpoint: str) -> list[int]:
    """Processes whose command line names ``mountpoint`` (our daemons for it), without the decoder
    process a daemon forks (same command line, its parent among them: decoder_pids finds those)."""
    pids = _named(mountpoint)
    return [p for p in pids if _ppid(p) not in pids]


def decoder_pids(mountpoint: str) -> list[int]:
    """The decoder processes (backends/fuse/accel/decoder.py) of the daemons for ``mountpoint``."""
    pids = _named(mountpoint)
    return [p for p in pids if _ppid(p) in pids]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _named(mountpoint: str) -> list[int]:
    want = os.fsencode(mountpoint)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().split(b") ", 1)[1][:1] == b"Z":
                    continue
        except (OSError, IndexError):
            continue
        if want in args:
            pids.append(int(entry))
    return pids


def wait_for(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``pred`` (bounded in time and count); True once it holds."""
    for _ in range(int(timeout / step) + 1):
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def is_live(mnt: str) -> bool:
    try:
        return os.stat(mnt).st_ino == 1 and find_mount(mnt) is not None
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class FuseMounts:
    """Mounts made by one test; ``cleanup`` unmounts and reaps them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mountpoints: list[str] = []
        self.log_file = str(workdir / "fuse.log")

    def mountpoint(self, name: str = "mnt", mode: int = 0o755) -> str:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        path.chmod(mode)
        self.mountpoints.append(str(path))
        return str(path)

    def command(self, image, mnt: str, *, devices=(), opts=(), foreground=False,
                python: str = sys.executable) -> list[str]:
        cmd = [python, *LIFECYCLE, "--log-file", self.log_file]
        for d in devices:
            cmd += ["--device", str(d)]
        for o in opts:
            cmd += ["-o", o]
        if foreground:
            cmd.append("-f")
        return cmd + [str(image), mnt]

    def mount(self, image, mnt: str | None = None, *, devices=(), opts=(), timeout: float = 60,
              prefix: tuple[str, ...] = (), env=None, python: str = sys.executable) -> subprocess.CompletedProcess:
        mnt = mnt or self.mountpoint()
        if mnt not in self.mountpoints:
            self.mountpoints.append(mnt)
        cmd = [*prefix, *self.command(image, mnt, devices=devices, opts=opts, python=python)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)

    def unmount(self, mnt: str, *, prefix: tuple[str, ...] = (), env=None,
                python: str = sys.executable) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, python, *LIFECYCLE, "-u", mnt], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env=env)

    def cleanup(self) -> None:
        for mnt in self.mountpoints:
            for _ in range(5):  # stacked mounts: bounded
                if find_mount(mnt) is None:
                    break
                if os.geteuid() == 0:
                    subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
                else:
                    subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
            for pid in find_pids(mnt):
                wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            publish.forget(mnt)  # the status document of a daemon killed here


def cli_mounts(tmp_path):
    """Mounts made with ``erofs-mount`` itself (run_cli): each unmounted with ``-u`` at the end,
    then reaped as ``FuseMounts.cleanup`` does.  ``yield from`` it in a fixture."""
    from tests.conftest import run_cli

    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE tests need a usable FUSE: {reason}")
    m = FuseMounts(tmp_path)
    try:
        yield m
    finally:
        for mnt in m.mountpoints:
            run_cli("-u", mnt, timeout=60)
        m.cleanup()


@pytest.fixture
def fuse(tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE tests need a usable FUSE: {reason}")
    mounts = FuseMounts(tmp_path)
    try:
        yield mounts
    finally:
        mounts.cleanup()


def run_check_tree(manifest, root: str, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The corpus' own verifier, as a subprocess (stdlib only, so the system python3 runs it)."""
    py = shutil.which("python3") or sys.executable
    return subprocess.run([*prefix, py, str(CHECK_TREE), *extra, str(manifest), root], capture_output=True,
                          text=True, timeout=300)


def have_check_tree() -> bool:
    return CHECK_TREE.exists()


def errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def oracle_files(manifest) -> list[str]:
    """Regular files of a corpus manifest whose bytes the source tree holds (same sha256): the byte oracle."""
    files = corpuslib.source_files()
    out = []
    for path, rec in manifest["entries"].items():
        if rec.get("type") == "reg" and path in files and "sha256" in rec:
            if hashlib.sha256(corpuslib.source_bytes(path, 0, rec["size"])).hexdigest() == rec["sha256"]:
                out.append(path)
    return out


def mount_corpus(fuse, name: str) -> tuple[dict, list[str], str]:
    """Mount corpus image ``name``: (manifest entries, oracle files, mount point); xfail when the
    image is compressed and compressed data support is absent."""
    img = corpuslib.image(name)
    if img.compressed and not zdata_available():
        pytest.xfail("compressed data support (erofs_mount.erofs.zdata) not present")
    manifest = corpuslib.load_manifest(img.manifest)
    res = fuse.mount(img.path, devices=img.devices)
    assert res.returncode == 0, res.stderr
    return manifest["entries"], oracle_files(manifest), fuse.mountpoints[-1]
