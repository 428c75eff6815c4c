"""Host side of the kernel tests: boot user-mode Linux and run tests/kernel inside it.

The guest uses the host's / through hostfs (the same checkout, venv and corpus), loads
nbd/erofs/fuse/loop from /usr/lib/uml/modules, runs the kernel suite with
EROFS_MOUNT_KERNEL_TESTS=required (so a missing driver fails instead of skipping), and
reports its exit status through RUNDIR/rc.  How UML is booted on this machine is probed first
(tests/nbd/uml.py).  See ../shared/docs/testing.md section 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.nbd.uml import UmlUnusable, boot, boot_mode, run_until_reported, uml_available

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GUEST_TIMEOUT = int(os.environ.get("EROFS_MOUNT_UML_TIMEOUT", "900"))  # the suite takes 2-6 min


def test_kernel_suite_in_uml(tmp_path):
    reason = uml_available()
    if reason:
        pytest.skip(reason)
    try:
        decision = boot_mode()      # probes this machine once: plain, or the fxsave fallback
    except UmlUnusable as e:
        pytest.fail(str(e), pytrace=False)
    print(decision.log_line())
    eu = os.environ.get("EROFS_UTILS_MOUNT")  # erofs-utils' mount.erofs for the interop tests (optional)
    script = f"""cd {REPO}
export EROFS_MOUNT_KERNEL_TESTS=required PYTHONDONTWRITEBYTECODE=1
{f"export EROFS_UTILS_MOUNT={eu}" if eu and " " not in eu else ""}
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
