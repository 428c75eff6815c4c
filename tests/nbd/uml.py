"""Booting user-mode Linux for the kernel tests and benchmarks: which way works on THIS machine.

UML 6.1 boots one of two ways, and which one works depends on the host CPU and kernel:

* ``plain``: ``linux.uml`` as it is.  On some hosts (CPUs whose XSAVE area is larger than the
  832-byte ``struct _xstate`` UML 6.1 restores, host kernel >= 5.14) its first process dies with the
  panic "ptrace set fp regs failed", or the guest never reports.
* ``fxsave``: ``linux.uml`` under the seccomp filter of ``uml_boot.py``, which hides
  PTRACE_GETREGSET(NT_X86_XSTATE) so UML falls back to FXSAVE; guest-init.sh then (and only then,
  ``UML_BOOT=fxsave`` on the kernel command line) keeps glibc/OpenSSL/Go off AVX code.  On other
  hosts (seen: AMD EPYC with AVX-512, host 6.18) every Python in such a guest dies at start.

So nothing is assumed: :func:`boot_mode` boots a tiny probe guest plainly that runs this venv's
Python and checks its answer; only when that fails in the known way (the panic, or no exit status)
does it probe the fallback.  The decision is made once per process (a pytest session, a benchmark
run) and logged; when neither way works, one message names both attempts.
:func:`choose_boot_mode` is the decision alone (pure; tests/nbd/test_uml_decision.py fakes the boots).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
PLAIN, FXSAVE = "plain", "fxsave"
PANIC = "ptrace set fp regs failed"     # arch/x86/um/os-Linux/registers.c (UML 6.1)
SHUTDOWN_GRACE = 30                     # seconds from the guest's exit status to UML's exit
PROBE_TIMEOUT = 60                      # a probe guest takes ~4 s
PROBE_DATA = bytes(range(256)) * 4096   # 1 MiB hashed inside the guest (SIMD code paths of libcrypto/hashlib)
PROBE_MARK = "uml-probe-ok"


def uml_available() -> str | None:
    """None when UML can be tried here, else why not (a skip reason)."""
    if shutil.which("linux.uml") is None:
        return "user-mode-linux is not installed (apt-get install user-mode-linux)"
    if not Path("/usr/lib/uml/modules").is_dir():
        return "no UML modules under /usr/lib/uml/modules"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


# ---- the decision (pure) ------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """What one probe boot showed: the guest's exit status (None: it never reported) and its output
    (the guest's stdout/stderr, then the tail of UML's console)."""
    mode: str
    rc: int | None
    output: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0 and expected_probe_line() in self.output

    @property
    def known_failure(self) -> bool:
        """The failure that the fxsave path exists for: UML's panic, or a guest that never reported."""
        return PANIC in self.output or self.rc is None

    def summary(self) -> str:
        if self.ok:
            return f"{self.mode} boot: the guest ran {sys.executable} ({self.seconds:.1f} s)"
        if PANIC in self.output:
            what = f"UML panicked ({_line_with(self.output, PANIC)})"
        elif self.rc is None:
            what = "the guest reported no exit status (crash or timeout)"
        else:
            detail = _first_error_line(self.output)
            what = f"the probe failed in the guest (rc={self.rc}{': ' + detail if detail else ''})"
        return f"{self.mode} boot: {what}"


@dataclass(frozen=True)
class Decision:
    mode: str
    attempts: tuple[Attempt, ...]

    def log_line(self) -> str:
        why = "; ".join(a.summary() for a in self.attempts) or "forced by EROFS_MOUNT_UML_BOOT, not probed"
        return f"UML boot path: {self.mode} ({why})"


class UmlUnusable(Exception):
    """Neither way boots a guest that runs Python here; the message names every attempt."""


def choose_boot_mode(probe: Callable[[str], Attempt]) -> Decision:
    """Plain first; the fxsave fallback only after plain failed in the known way."""
    plain = probe(PLAIN)
    if plain.ok:
        return Decision(PLAIN, (plain,))
    if not plain.known_failure:
        raise UmlUnusable(f"UML cannot run the guest here: {plain.summary()}; the fxsave fallback was not "
                          f"tried (it is for the panic {PANIC!r} or a guest that never reports)")
    fx = probe(FXSAVE)
    if fx.ok:
        return Decision(FXSAVE, (plain, fx))
    raise UmlUnusable(f"UML cannot run the guest here either way: {plain.summary()}; {fx.summary()}")


def expected_probe_line() -> str:
    return f"{PROBE_MARK} {hashlib.sha256(PROBE_DATA).hexdigest()}"


def _line_with(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return line.strip()[:200]
    return needle


def _first_error_line(text: str) -> str:
    for key in ("Fatal Python error", "Segmentation fault", "Error", "error"):
        for line in text.splitlines():
            if key in line:
                return line.strip()[:200]
    return ""


# ---- booting (I/O) ------------------------------------------------------------------------

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


def boot_with(mode: str, rundir: Path, script: str, timeout: int, mem: str = "1G",
              grace: float = SHUTDOWN_GRACE) -> tuple[int | None, str]:
    """Boot UML the given way with ``script`` (sh) as the guest's workload; return (guest exit
    status or None, its output; the console's tail is appended when there is no status)."""
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "uml").mkdir(exist_ok=True)
    (rundir / "cmd.sh").write_text(script)
    assert " " not in str(rundir), "kernel command line words cannot contain spaces"
    wrapper = [sys.executable, str(HERE / "uml_boot.py")] if mode == FXSAVE else []
    cmd = [
        "timeout", "-k", "10", str(timeout + 60),
        "unshare", "--pid", "--fork", "--kill-child", *wrapper,
        "linux.uml", f"mem={mem}", "rootfstype=hostfs", "rootflags=/", "rw",
        f"init={HERE / 'guest-init.sh'}", f"RUNDIR={rundir}", f"GUEST_TIMEOUT={timeout}", f"UML_BOOT={mode}",
        "con=null", "con0=null,fd:1", "quiet", f"uml_dir={rundir / 'uml'}", "umid=guest",
    ]
    rc_file = rundir / "rc"
    with open(rundir / "console.log", "ab") as console:
        run_until_reported(cmd, rc_file, console, timeout + 90, grace)
    out = (rundir / "guest.log").read_text(errors="replace") if (rundir / "guest.log").exists() else ""
    if not rc_file.exists():
        console_tail = (rundir / "console.log").read_text(errors="replace")[-3000:]
        return None, out + "\n--- console ---\n" + console_tail
    return int(rc_file.read_text().strip() or "1"), out


def probe(mode: str, workdir: Path) -> Attempt:
    """Boot a tiny guest the given way that runs this venv's Python and hashes PROBE_DATA."""
    rundir = workdir / f"probe-{mode}"
    shutil.rmtree(rundir, ignore_errors=True)
    code = ("import hashlib,sys; d=bytes(range(256))*4096; "
            f"print('{PROBE_MARK}', hashlib.sha256(d).hexdigest()); sys.stdout.flush()")
    script = f"{sys.executable} -c \"{code}\"\n"
    start = time.monotonic()
    rc, out = boot_with(mode, rundir, script, PROBE_TIMEOUT, mem="256M", grace=5)
    if rc is not None and PANIC not in out:
        # the panic shows on the console, not in guest.log: look there too
        out += "\n--- console ---\n" + (rundir / "console.log").read_text(errors="replace")[-3000:]
    return Attempt(mode, rc, out, time.monotonic() - start)


_decision: Decision | None = None
_failure: str | None = None


def boot_mode() -> Decision:
    """The way to boot UML on this machine, probed once per process; raises UmlUnusable (again,
    with the same message) when neither way works."""
    global _decision, _failure
    if _decision is not None:
        return _decision
    if _failure is not None:
        raise UmlUnusable(_failure)
    forced = os.environ.get("EROFS_MOUNT_UML_BOOT")      # plain|fxsave: skip the probe (debugging)
    workdir = Path(tempfile.mkdtemp(prefix="uml-probe-"))
    try:
        if forced in (PLAIN, FXSAVE):
            _decision = Decision(forced, ())
        else:
            _decision = choose_boot_mode(lambda mode: probe(mode, workdir))
    except UmlUnusable as e:
        _failure = str(e)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(_decision.log_line(), file=sys.stderr)
    return _decision


def boot(rundir: Path, script: str, timeout: int) -> tuple[int | None, str]:
    """Boot UML the way that works on this machine (see :func:`boot_mode`) with ``script`` as the workload."""
    return boot_with(boot_mode().mode, rundir, script, timeout)
