"""Run-directory state (host-side, tmp dirs): atomic 0600 records in 0700 dirs, pid locks."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from erofs_mount.backends.nbd import state
from erofs_mount.backends.nbd.recovery import LocalRecord, record_path
from erofs_mount.errors import ErofsMountError


def test_record_written_atomically_with_modes(tmp_path):
    run = tmp_path / "erofsmount" / "nbd"
    path = record_path(0, str(run))
    state.write_record(path, LocalRecord("/images/a.erofs"))
    assert open(path).read() == "LOCAL /images/a.erofs\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run.parent).st_mode) == 0o700
    assert os.listdir(run) == ["mountnbd_nbd0"]  # no temp file left
    assert state.read_record(path) == LocalRecord("/images/a.erofs")


def test_read_record_errors_name_the_file(tmp_path):
    with pytest.raises(ErofsMountError) as info:
        state.read_record(str(tmp_path / "missing"))
    assert "missing" in str(info.value) and info.value.errno == errno.ENOENT
    bad = tmp_path / "bad"
    bad.write_text("GOPHER x\n")
    with pytest.raises(ErofsMountError) as info:
        state.read_record(str(bad))
    assert str(bad) in str(info.value)


def test_pid_lock_means_alive(tmp_path):
    path = str(tmp_path / "nbd" / "mountnbd_nbd1.pid")
    assert not state.daemon_alive(path)
    lock = state.PidLock(path)
    lock.acquire()
    assert state.read_pid(path) == os.getpid()
    pid = os.fork()
    if pid == 0:  # another process sees the lock held, and cannot take it
        ok = state.daemon_alive(path)
        try:
            state.PidLock(path).acquire()
            ok = False
        except ErofsMountError as exc:
            ok = ok and exc.errno == errno.EBUSY
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    lock.release(remove=True)
    assert not os.path.exists(path) and not state.daemon_alive(path)


def test_allocation_lock_can_be_taken_again(tmp_path):
    with state.allocation_lock(str(tmp_path / "nbd")):
        pass
    with state.allocation_lock(str(tmp_path / "nbd")):
        pass
