"""`erofs-mount status` for FUSE mounts: the published document (publish.py) and what status makes of it
(status.py), for a local image on a real mount, through SIGKILL and `-u`; plus the pure parts."""

from __future__ import annotations

import io
import json
import os
import signal
import stat

from tests import corpuslib
from erofs_mount.backends.fuse import publish
from erofs_mount.backends.fuse import status as fuse_status
from erofs_mount.status import summary

from .conftest import find_pids, wait_for


def _mine(mnt: str) -> list[dict]:
    return [e for e in fuse_status.status_entries() if e["mountpoint"] == mnt]


def test_local_mount_status_through_sigkill_and_unmount(fuse):
    img = corpuslib.image("plain-inline-4k")
    mnt = fuse.mountpoint()
    res = fuse.mount(img.path, mnt)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(mnt, "README.txt"), "rb") as f:
        assert f.read()
    pids = find_pids(mnt)
    assert len(pids) == 1
    path = os.path.join(publish.stats_dir(), publish.key(mnt))
    assert wait_for(lambda: os.path.exists(path), timeout=10)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    [e] = _mine(mnt)
    assert (e["kind"], e["source"], e["pid"], e["alive"], e["digest"]) == ("local", str(img.path), pids[0], True, None)
    assert wait_for(lambda: _mine(mnt)[0]["bytes_fetched"] > 0, timeout=10)
    out = io.StringIO()
    assert fuse_status.status(out) == 0
    line = [x for x in out.getvalue().splitlines() if x.startswith(f"fuse {mnt} ")]
    assert len(line) == 1 and f"source={img.path}" in line[0] and f"pid={pids[0]} daemon=alive" in line[0]

    # a killed daemon: the mount stays (dead), status says so
    os.kill(pids[0], signal.SIGKILL)
    assert wait_for(lambda: not find_pids(mnt), timeout=10)
    # (a process in the middle of exiting still shows its start time for a moment)
    assert wait_for(lambda: _mine(mnt)[0]["alive"] is False, timeout=10)
    [e] = _mine(mnt)
    assert (e["pid"], e["alive"]) == (pids[0], False)
    # -u cleans the mount and the dead daemon's document
    res = fuse.unmount(mnt)
    assert res.returncode == 0, res.stderr
    assert not _mine(mnt) and not os.path.exists(path)


def test_clean_unmount_removes_the_document(fuse):
    img = corpuslib.image("plain-inline-4k")
    mnt = fuse.mountpoint()
    assert fuse.mount(img.path, mnt).returncode == 0
    path = os.path.join(publish.stats_dir(), publish.key(mnt))
    assert wait_for(lambda: os.path.exists(path), timeout=10)
    assert fuse.unmount(mnt).returncode == 0
    assert wait_for(lambda: not find_pids(mnt), timeout=30)
    assert not os.path.exists(path) and not _mine(mnt)


class FakeOci:  # only what publish reads
    ref, platform, digest, manifest_digest = "reg/app:v1@sha256:" + "ef" * 32, "linux/amd64", "sha256:" + "cd" * 32, \
        "sha256:" + "ef" * 32

    def stats(self):
        return {"bytes_fetched": 5000, "retries": 3, "cache_hits": 3, "cache_misses": 1, "disk_hits": 0,
                "digest": self.digest, "token": "not-a-counter"}


def test_document_is_secret_free_and_summarised(tmp_path):
    pub = publish.Publisher("reg/app:v1", "/mnt/x", FakeOci(), directory=str(tmp_path / "d"))
    pub.publish()
    doc = json.loads(open(pub.path).read())
    assert (doc["kind"], doc["ref"], doc["pinned_ref"], doc["digest"]) == (
        "oci", "reg/app:v1", FakeOci.ref, FakeOci.digest)
    assert "not-a-counter" not in json.dumps(doc) and doc["pid"] == os.getpid()
    assert publish.daemon_alive(doc)
    assert not publish.daemon_alive({**doc, "pid_start": doc["pid_start"] + 1})  # a reused pid is not ours
    s = summary(doc)
    assert (s["bytes_fetched"], s["retries"], s["cache_hit_ratio"]) == (5000, 3, 0.75)
    pub.remove()
    assert not os.path.exists(pub.path)


def test_where_documents_go():
    assert publish.user_dirs({"XDG_RUNTIME_DIR": "/run/user/7"}, "/home/u", 7) == [
        "/run/user/7/erofs-mount/fuse", "/home/u/.local/state/erofs-mount/fuse"]
    assert publish.user_dirs({"XDG_STATE_HOME": "/s"}, "/home/u", 7) == [
        "/s/erofs-mount/fuse", "/run/user/7/erofs-mount/fuse"]
    if os.geteuid() == 0:
        assert publish.stats_dir() == publish.ROOT_DIR


def test_a_new_daemon_prunes_documents_of_dead_unmounted_daemons(tmp_path):
    d = str(tmp_path / "docs")
    stale = publish.Publisher("/img", "/nowhere/mounted", object(), directory=d)
    stale.base.update(pid=2**22 + 7, pid_start=1)  # no such process
    stale.publish()
    live = publish.Publisher("/img", "/also/not/mounted", object(), directory=d)
    live.publish()  # this process: alive
    publish.Publisher("/img", "/third", object(), directory=d)
    assert not os.path.exists(stale.path) and os.path.exists(live.path)
