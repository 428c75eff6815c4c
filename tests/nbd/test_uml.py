"""Host side of the kernel tests: boot user-mode Linux and run tests/kernel inside it.

The guest uses the host's / through hostfs (the same checkout, venv and corpus), loads
nbd/erofs/fuse/loop from /usr/lib/uml/modules, runs the kernel suite with
EROFS_MOUNT_KERNEL_TESTS=required (so a missing driver fails instead of skipping), and
reports its exit status through RUNDIR/rc.  See ../shared/docs/testing.md section 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GUEST_TIMEOUT = int(os.environ.get("EROFS_MOUNT_UML_TIMEOUT", "900"))  # the suite takes 2-6 min


def uml_available() -> str | None:
    if shutil.which("linux.uml") is None:
        return "user-mode-linux is not installed (apt-get install user-mode-linux)"
    if not Path("/usr/lib/uml/modules").is_dir():
        return "no UML modules under /usr/lib/uml/modules"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


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
    with open(rundir / "console.log", "wb") as console:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                       timeout=timeout + 90)
    rc_file = rundir / "rc"
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
