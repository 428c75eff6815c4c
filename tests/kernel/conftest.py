"""Kernel tests: they need a real kernel with the nbd driver and take over its devices, so they run
inside user-mode Linux (tests/nbd/test_uml.py sets EROFS_MOUNT_KERNEL_TESTS=required: a missing
driver is then a failure, so CI cannot silently skip them).  On any other machine they skip
unless EROFS_MOUNT_KERNEL_TESTS=1 asks for them explicitly."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

REQUIRED = os.environ.get("EROFS_MOUNT_KERNEL_TESTS") == "required"
WANTED = REQUIRED or os.environ.get("EROFS_MOUNT_KERNEL_TESTS") == "1"
MNT_DETACH = 2


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"kernel tests required but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def nbd_kernel():
    if not WANTED:
        pytest.skip("kernel tests take over nbd devices: they run in UML (tests/nbd/test_uml.py), "
                    "or here with EROFS_MOUNT_KERNEL_TESTS=1")
    if os.geteuid() != 0:
        _unavailable("not root")
    try:
        from erofs_mount.backends.nbd import netlink
    except ImportError as exc:  # pragma: no cover
        _unavailable(f"pyroute2 missing: {exc}")
    if not netlink.family_available():
        _unavailable("no 'nbd' generic netlink family (these tests run inside UML: tests/nbd/test_uml.py)")
    if not os.path.isdir("/sys/module/erofs"):
        _unavailable("no erofs filesystem in this kernel")
    yield


def _force_cleanup() -> list[str]:
    """Leave no mount, device, daemon or record behind (and nothing stuck in D state)."""
    from erofs_mount.backends.nbd import netlink, state, sysfs
    from erofs_mount.backends.nbd.recovery import NBD_RUN_DIR

    libc = ctypes.CDLL(None, use_errno=True)
    leftovers = []
    for index in sysfs.indexes():
        backend = sysfs.backend(index)
        if backend and not backend.startswith(NBD_RUN_DIR + "/"):
            continue  # not ours (another NBD user on a real machine)
        for mp in sysfs.mountpoints_of(index):
            leftovers.append(f"mount {mp}")
            libc.umount2(mp.encode(), MNT_DETACH)
        from erofs_mount.verity import dm

        if os.path.exists(f"/dev/mapper/{dm.name_for(index)}") or dm.table(dm.name_for(index)) is not None:
            leftovers.append(f"dm device {dm.name_for(index)}")
            dm.remove(dm.name_for(index), quiet=True)
        if sysfs.size_bytes(index):
            leftovers.append(f"nbd{index} connected")
            try:
                netlink.disconnect(index)
            except Exception:  # noqa: BLE001
                pass
    if os.path.isdir(NBD_RUN_DIR):
        for name in os.listdir(NBD_RUN_DIR):
            path = os.path.join(NBD_RUN_DIR, name)
            if name.endswith(".pid") and state.daemon_alive(path):
                pid = state.read_pid(path)
                leftovers.append(f"daemon {pid}")
                if pid:
                    os.kill(pid, signal.SIGKILL)
            if not name.startswith("."):
                leftovers.append(f"file {name}")
            os.unlink(path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(sysfs.size_bytes(i) for i in sysfs.indexes()):
        time.sleep(0.05)
    return leftovers


@pytest.fixture(autouse=True)
def nbd_cleanup():
    _force_cleanup()
    yield
    _force_cleanup()
