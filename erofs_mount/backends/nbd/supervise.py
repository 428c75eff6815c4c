"""Automatic reattach: listen for NBD_CMD_LINK_DEAD and start a new daemon for our devices.

The kernel multicasts LINK_DEAD (group "nbd_mc_group") when a device's server socket dies.
For every such device that has a recovery record (ours or erofs-utils') and no live daemon,
``supervise`` runs the same ``lifecycle.reattach`` a person would.  It polls as well (every
``poll`` seconds), so a death that happened before it subscribed is also repaired.

    supervise(opts, stop_after=None) -> int     blocking loop; run it detached:
    run_detached(lambda ready: (ready.ok(), supervise(opts))[1], log_file=...)
"""

from __future__ import annotations

import errno
import logging
import os
import time

from ...errors import ErofsMountError
from . import netlink, state, sysfs
from .config import NbdOptions
from .recovery import record_path

log = logging.getLogger("erofs_mount.nbd.supervise")


def orphaned_devices(run_dir: str) -> list[int]:
    """Configured devices with a record but no live daemon."""
    out = []
    for index in sysfs.indexes():
        if not sysfs.size_bytes(index):
            continue
        ident = sysfs.backend(index) or record_path(index, run_dir)
        if os.path.exists(ident) and not state.daemon_alive(state.pid_path(ident)):
            out.append(index)
    return out


def repair(index: int, opts: NbdOptions) -> bool:
    from .lifecycle import reattach

    ident = sysfs.backend(index) or record_path(index, opts.run_dir)
    if state.daemon_alive(state.pid_path(ident)) or not os.path.exists(ident):
        return False
    try:
        reattach(sysfs.device_path(index), opts)
    except ErofsMountError as exc:
        log.error("nbd%d: automatic reattach failed: %s", index, exc)
        return exc.errno != errno.EBUSY  # EBUSY: the old daemon is still exiting, try again
    log.info("nbd%d: reattached automatically", index)
    return True


def supervise(opts: NbdOptions, *, poll: float = 5.0, stop_after: float | None = None) -> int:
    """Repair dead links until ``stop_after`` seconds have passed (None: forever)."""
    deadline = None if stop_after is None else time.monotonic() + stop_after
    for index in orphaned_devices(opts.run_dir):
        repair(index, opts)
    while deadline is None or time.monotonic() < deadline:
        wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
        try:
            dead = netlink.wait_link_dead(wait)
        except ErofsMountError as exc:
            log.error("supervisor: %s", exc)
            return 1
        for index in sorted(set(dead) | set(orphaned_devices(opts.run_dir))):
            # the dying daemon may still hold its lock for a moment: retry briefly
            for _ in range(20):
                if repair(index, opts) or not sysfs.size_bytes(index):
                    break
                ident = sysfs.backend(index) or record_path(index, opts.run_dir)
                if not os.path.exists(ident):
                    break
                time.sleep(0.05)
    return 0
