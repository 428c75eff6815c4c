"""Host side of the kernel tests: boot user-mode Linux and run tests/kernel inside it.

The guest uses the host's / through hostfs (the same checkout, venv and corpus), loads
nbd/erofs/fuse/loop from /usr/lib/uml/modules, runs the kernel suite with
EROFS_MOUNT_KERNEL_TESTS=required (so a missing driver fails instead of skipping), and
reports its exit status through RUNDIR/rc.  See ../shared/docs/testing.md section 2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GUEST_TIMEOUT = int(os.environ.get("EROFS_MOUNT_UML_TIMEOUT", "900"))  # the suite takes 2-6 min
SHUTDOWN_GRACE = 30     # seconds from the guest's exit status to UML's exit


def uml_available() -> str | None:
    if shutil.which("linux.uml") is None:
        return "user-mode-linux is not installed (apt-get install user-mode-linux)"
    if not Path("/usr/lib/uml/modules").is_dir():
        return "no UML modules under /usr/lib/uml/modules"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


def run_until_reported(cmd: list[str], rc_file: Path, console, timeout: float,
                       grace: float = SHUTDOWN_GRACE) -> None:
    """Run ``cmd`` (its own process group) until it exits, or until ``grace`` seconds after
    ``rc_file`` appeared, or ``timeout``: then kill the whole group.  Once the guest has reported,
    powering off takes a second; a UML that halts and then spins instead (seen once: "reboot:
    System halted", then 11 minutes at 80% CPU until the outer timeout) is stopped, not waited for."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    reported = None
    while proc.poll() is None:
        now = time.monotonic()
        if reported is None and rc_file.exists():
            reported = now
        if now > deadline or (reported is not None and now - reported > grace):
            console.write(f"\nhost: stopping the guest ({'no power-off' if reported else 'timeout'})\n".encode())
            console.flush()
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(timeout=60)


def boot(rundir: Path, script: str, timeout: int) -> tuple[int | None, str]:
    """Run ``script`` (sh) as the guest's workload; return (guest exit status or None, its output)."""
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "uml").mkdir(exist_ok=True)
    (rundir / "cmd.sh").write_text(script)
    assert " " not in str(rundir), "kernel command line words cannot contain spaces"
    cmd = [
        "timeout", "-k", "10", str(timeout + 60),
        "unshare", "--pid", "--fork", "--kill-child",
        "python3", str(HERE / "uml_boot.py"),
        "linux.uml", "mem=1G", "rootfstype=hostfs", "rootflags=/", "rw",
        f"init={HERE / 'guest-init.sh'}", f"RUNDIR={rundir}", f"GUEST_TIMEOUT={timeout}",
        "con=null", "con0=null,fd:1", "quiet", f"uml_dir={rundir / 'uml'}", "umid=guest",
    ]
    rc_file = rundir / "rc"
    with open(rundir / "console.log", "ab") as console:
        run_until_reported(cmd, rc_file, console, timeout + 90)
    out = (rundir / "guest.log").read_text(errors="replace") if (rundir / "guest.log").exists() else ""
    if not rc_file.exists():
        console = (rundir / "console.log").read_text(errors="replace")[-3000:]
        return None, out + "\n--- console ---\n" + console
    return int(rc_file.read_text().strip() or "1"), out


def test_kernel_suite_in_uml(tmp_path):
    reason = uml_available()
    if reason:
        pytest.skip(reason)
    script = f"""cd {REPO}
export EROFS_MOUNT_KERNEL_TESTS=required PYTHONDONTWRITEBYTECODE=1
{sys.executable} -m pytest -p no:cacheprovider -q -rA --durations=10 tests/kernel
"""
    rc, out = boot(tmp_path, script, GUEST_TIMEOUT)
    print(out[-20000:])
    assert rc is not None, "the guest did not report an exit status (timeout or crash)"
    assert rc == 0, f"kernel suite failed in UML (rc={rc}):\n{out[-8000:]}"
    # a missing nbd driver already fails inside (EROFS_MOUNT_KERNEL_TESTS=required); the corpus
    # tests may skip only where the shared corpus (check_tree.py) is absent
    assert " passed" in out, out[-3000:]


def test_a_guest_that_reports_but_never_exits_is_stopped(tmp_path):
    """The watchdog of ``boot``: the status file appears, the process group lingers, it is killed."""
    rc_file = tmp_path / "rc"
    pid_file = tmp_path / "pid"
    script = f"sh -c 'sleep 600 & echo $! > {pid_file}; echo 0 > {rc_file}; wait'"
    start = time.monotonic()
    with open(tmp_path / "console.log", "ab") as console:
        run_until_reported(["sh", "-c", script], rc_file, console, timeout=120, grace=1)
    assert time.monotonic() - start < 60
    child = int(pid_file.read_text())
    for _ in range(50):       # SIGKILL is delivered at once; reaping by init may lag a moment
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{child}/stat") as f:
            assert f.read().split()[2] == "Z", "the guest's process group outlived the watchdog"
    assert "no power-off" in (tmp_path / "console.log").read_text()
