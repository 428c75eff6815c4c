"""Helpers for the kernel tests: mounting through the lifecycle API, readers as child processes."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from dataclasses import replace
from pathlib import Path

from erofs_mount.backends.nbd import lifecycle, state, sysfs
from erofs_mount.backends.nbd.config import NbdOptions
from erofs_mount.backends.nbd.recovery import record_path

def _check_tree() -> Path:
    """The corpus' own verifier: next to the checkout (../shared/corpus) or at /work/shared."""
    from tests import corpuslib

    for root in (os.environ.get("EROFS_CORPUS_DIR"), corpuslib.SHARED, "/work/shared/corpus"):
        if root and (Path(root) / "check_tree.py").exists():
            return Path(root) / "check_tree.py"
    return corpuslib.SHARED / "check_tree.py"  # absent: the corpus tests skip


CHECK_TREE = _check_tree()


def options(tmp_path: Path, **kw) -> NbdOptions:
    logdir = Path(os.environ.get("RUNDIR") or tmp_path)  # RUNDIR: kept on the host for post-mortems
    return replace(NbdOptions(io_timeout=1, log_file=str(logdir / "nbd-daemon.log")), **kw)


def mount(image, mnt: Path, opts: NbdOptions) -> int:
    """Mount through NBD; return the device index."""
    assert lifecycle.mount(str(image), str(mnt), opts) == 0
    m = sysfs.mount_at(str(mnt))
    assert m is not None and m.source.startswith("/dev/nbd"), m
    assert m.fstype == "erofs"
    return sysfs.index_of(m.source)


def _pid_file(index: int) -> str:
    return state.pid_path(sysfs.backend(index) or record_path(index))


def daemon_pid(index: int) -> int | None:
    path = _pid_file(index)
    return state.read_pid(path) if state.daemon_alive(path) else None


def kill_daemon(index: int) -> None:
    """SIGKILL the daemon serving nbd``index`` and wait until it is gone (reaped, its pid file free):
    a reattach straight after os.kill can still see it alive and is refused, rightly."""
    path = _pid_file(index)
    pid = daemon_pid(index)
    assert pid, f"no live daemon serves nbd{index}"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not state.daemon_alive(path), 10, "the daemon to die")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def nothing_left(index: int) -> list[str]:
    """Everything a finished NBD mount could leave behind."""
    left = []
    if sysfs.size_bytes(index):
        left.append(f"nbd{index} still connected")
    if sysfs.mountpoints_of(index):
        left.append(f"nbd{index} still mounted")
    ident = record_path(index)
    if os.path.exists(ident):
        left.append(f"record {ident}")
    if state.daemon_alive(state.pid_path(ident)):
        left.append("daemon alive")
    if os.path.exists(state.pid_path(ident)):
        left.append("pid file")
    return left


def proc_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (``D``: blocked in the kernel), ``?`` when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def wait_for_blocked_reader(readers, timeout: float = 20) -> None:
    """Until one of ``readers`` waits in D state: it needs the device whose server is dead."""
    wait_until(lambda: any(proc_state(pid) == "D" for pid in readers.pids), timeout, "a reader blocked on the device")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def check_tree(manifest: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK_TREE), *extra, str(manifest), str(root)],
                          capture_output=True, text=True, timeout=300)


def umount2(path: str, flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), flags) != 0:
        raise OSError(ctypes.get_errno(), f"umount {path}")


# ------------------------------------------------------------------ readers (forked children)
def _reader_loop(root: str, files: list[tuple[str, str]], stop: str, out: str, max_seconds: float) -> None:
    rounds, errors, bad = 0, [], []
    deadline = time.monotonic() + max_seconds
    while not os.path.exists(stop) and time.monotonic() < deadline and len(errors) < 50:
        for rel, sha in files:
            try:
                with open(root + rel, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            except OSError as exc:
                errors.append(f"{rel}: {exc}")
                continue
            if digest != sha:
                bad.append(rel)
        rounds += 1
    with open(out + ".tmp", "w") as f:
        json.dump({"rounds": rounds, "errors": errors, "bad": bad}, f)
    os.rename(out + ".tmp", out)


class Readers:
    """N child processes hashing files in a loop until told to stop (bounded in time)."""

    def __init__(self, root: Path, files: list[tuple[str, str]], workdir: Path, n: int = 4,
                 max_seconds: float = 240) -> None:
        self.stop = str(workdir / "stop-readers")
        self.outs = [str(workdir / f"reader{i}.json") for i in range(n)]
        self.pids = []
        for i, out in enumerate(self.outs):
            mine = files[i::n] + files[: max(1, len(files) // 4)]
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _reader_loop(str(root), mine, self.stop, out, max_seconds)
                    code = 0
                finally:
                    os._exit(code)
            self.pids.append(pid)

    def finish(self, timeout: float = 60) -> list[dict]:
        Path(self.stop).touch()
        deadline = time.monotonic() + timeout
        pending = set(self.pids)
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pending.discard(pid)
            time.sleep(0.05)
        assert not pending, f"readers {pending} did not finish in {timeout}s"
        return [json.load(open(o)) for o in self.outs]


def registry_fixture(tmp_path_factory):
    """(a docker-registry inside the guest, a Pusher to it, its storage directory); ``yield from``
    it in a module fixture (skipped where docker-registry is not installed)."""
    try:
        from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry
    except ImportError:  # pragma: no cover
        REGISTRY_BIN = None
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("registry")
    reg = start_registry(root / "anon", root / "storage")
    pusher = Pusher(reg.url)
    try:
        yield reg, pusher, root / "storage"
    finally:
        pusher.close()
        reg.stop()
