"""The supervisor reattaches on NBD_CMD_LINK_DEAD: readers under load see no error."""

from __future__ import annotations

import os
import signal
import time

from erofs_mount.backends.nbd import lifecycle, state, sysfs

from .helpers import Readers, daemon_pid, drop_caches, mount, nothing_left, options, wait_until
from .test_nbd_lifecycle import image, mnt, regular_files  # noqa: F401 - fixtures


def test_supervisor_reattaches_on_link_dead(image, mnt, tmp_path):  # noqa: F811
    from erofs_mount.backends.nbd.supervise import supervise

    img, manifest = image
    opts = options(tmp_path)
    index = mount(img, mnt, opts)
    ident = sysfs.backend(index)
    sup = os.fork()
    if sup == 0:
        code = 1
        try:
            from erofs_mount.daemon import setup_logging

            setup_logging(open(opts.log_file, "a", buffering=1))
            code = supervise(opts, poll=1.0, stop_after=120)
        finally:
            os._exit(code)
    readers = Readers(mnt, regular_files(manifest, min_size=4096, limit=40), tmp_path, n=3)
    try:
        time.sleep(1.0)  # the supervisor subscribes
        for _ in range(3):
            drop_caches()
            time.sleep(0.2)
            old = daemon_pid(index)
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: (daemon_pid(index) or old) != old, 20, "an automatic reattach")
    finally:
        results = readers.finish(timeout=90)
        os.kill(sup, signal.SIGKILL)
        os.waitpid(sup, 0)
    for r in results:
        assert r["errors"] == [] and r["bad"] == [] and r["rounds"] >= 1, r
    assert state.daemon_alive(state.pid_path(ident))
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
