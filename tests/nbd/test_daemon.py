"""erofs_mount.daemon: double fork, readiness pipe, detached stdio, log file (host-side, no kernel)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest

from erofs_mount.daemon import log_dir, log_path, run_detached
from erofs_mount.errors import ErofsMountError


def wait_for(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            return open(path).read()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear in {timeout}s")


def test_ok_returns_while_the_worker_keeps_running(tmp_path):
    done = tmp_path / "done"
    log = tmp_path / "logs" / "w.log"

    def worker(ready):
        print("worker started")
        ready.ok()
        time.sleep(0.3)
        done.write_text(f"{os.getpid()} {os.getppid()} {os.getsid(0)}")
        return 0

    t0 = time.monotonic()
    assert run_detached(worker, log_file=str(log)) == 0
    assert time.monotonic() - t0 < 5
    assert not done.exists()  # the caller did not wait for the worker to end
    pid, ppid, sid = map(int, wait_for(done).split())
    assert pid != os.getpid() and ppid != os.getpid()  # not our child: double fork
    assert sid != os.getsid(0) and sid != pid  # a new session, and not its leader (no controlling tty)
    assert "worker started" in log.read_text()
    assert oct(os.stat(log.parent).st_mode & 0o777) == "0o700"


def test_fail_raises_the_workers_one_line_error(tmp_path):
    def worker(ready):
        ready.fail("nbd0 is busy\nsecond line", errno.EBUSY)
        return 1

    with pytest.raises(ErofsMountError) as info:
        run_detached(worker, log_file=str(tmp_path / "w.log"))
    assert info.value.errno == errno.EBUSY
    assert "\n" not in str(info.value) and str(info.value).startswith("nbd0 is busy")


def test_worker_exception_is_reported(tmp_path):
    def worker(ready):
        raise ErofsMountError("no such image", errno=errno.ENOENT)

    with pytest.raises(ErofsMountError) as info:
        run_detached(worker, log_file=str(tmp_path / "w.log"))
    assert str(info.value) == "no such image" and info.value.errno == errno.ENOENT


def test_unexpected_exception_and_exception_groups(tmp_path):
    def worker(ready):
        raise ExceptionGroup("nursery", [ValueError("x"), ErofsMountError("the real reason")])

    with pytest.raises(ErofsMountError) as info:
        run_detached(worker, log_file=str(tmp_path / "w.log"))
    assert str(info.value) == "the real reason"

    def worker2(ready):
        raise ZeroDivisionError("boom")

    with pytest.raises(ErofsMountError) as info:
        run_detached(worker2, log_file=str(tmp_path / "w.log"))
    assert "ZeroDivisionError" in str(info.value)
    assert "Traceback" in (tmp_path / "w.log").read_text()


def test_worker_dying_silently(tmp_path):
    def worker(ready):
        os._exit(3)

    with pytest.raises(ErofsMountError) as info:
        run_detached(worker, log_file=str(tmp_path / "w.log"))
    assert "before it was ready" in str(info.value) and str(tmp_path / "w.log") in str(info.value)


def test_returning_without_report(tmp_path):
    with pytest.raises(ErofsMountError) as info:
        run_detached(lambda ready: 0, log_file=str(tmp_path / "w.log"))
    assert "before it was ready" in str(info.value)


def test_foreground_runs_in_this_process(tmp_path):
    seen = []

    def worker(ready):
        ready.ok()
        seen.append(os.getpid())
        return 7

    assert run_detached(worker, log_file=str(tmp_path / "w.log"), foreground=True) == 7
    assert seen == [os.getpid()]


def test_stdio_detached_a_pipe_reader_returns_at_once(tmp_path):
    """`cmd | cat` must return when the worker is ready, not when it exits."""
    marker = tmp_path / "still-running"
    script = textwrap.dedent(f"""
        import time, sys
        from erofs_mount.daemon import run_detached
        def worker(ready):
            print("to the log, not the pipe"); sys.stderr.write("err too\\n")
            ready.ok()
            time.sleep(4)
            open({str(marker)!r}, "w").write("x")
        print("parent says", run_detached(worker, log_file={str(tmp_path / 'w.log')!r}))
    """)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t0 < 3.5, "the pipe stayed open until the worker ended"
    assert res.returncode == 0 and res.stdout.strip() == "parent says 0", res
    assert not marker.exists()
    log = wait_for(marker, 10) and (tmp_path / "w.log").read_text()
    assert "to the log, not the pipe" in log and "err too" in log


def test_log_locations():
    assert log_path("nbd").endswith("/erofs-mount/nbd.log")
    if os.geteuid() == 0:
        assert log_dir() == "/var/log/erofs-mount"
