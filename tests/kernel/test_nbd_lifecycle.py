"""NBD mode on a real kernel: reattach under load, recovery records, read errors, ioctl mode,
failed mounts, forced disconnect, status, a detached daemon."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

from erofs_mount.backends.nbd import lifecycle, state, sysfs
from erofs_mount.backends.nbd.recovery import record_path
from erofs_mount.errors import ErofsMountError
from tests import corpuslib

from .helpers import (
    Readers,
    daemon_pid,
    drop_caches,
    kill_daemon,
    mount,
    nothing_left,
    options,
    umount2,
    wait_until,
)

IMAGE = "plain-inline-4k"  # uncompressed: every read is a device read


@pytest.fixture
def image(tmp_path):
    """A private copy of the image (tests truncate or move it)."""
    src = corpuslib.image(IMAGE)
    dst = tmp_path / "img.erofs"
    shutil.copyfile(src.path, dst)
    return dst, corpuslib.load_manifest(src.manifest)


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def regular_files(manifest: dict, min_size: int = 1, limit: int = 1000) -> list[tuple[str, str]]:
    files = [(p, e["sha256"]) for p, e in sorted(manifest["entries"].items())
             if e["type"] == "reg" and e["size"] >= min_size and "error" not in e]
    return files[:limit]


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_reattach_under_read_load_ten_times(image, mnt, tmp_path):
    img, manifest = image
    opts = options(tmp_path)
    index = mount(img, mnt, opts)
    dev = sysfs.device_path(index)
    files = regular_files(manifest, min_size=4096, limit=60)
    readers = Readers(mnt, files, tmp_path, n=4)
    timings = []
    try:
        for _ in range(10):
            drop_caches()
            time.sleep(0.2)  # readers are now waiting on the device
            kill_daemon(index)
            time.sleep(0.1)
            t0 = time.monotonic()
            assert lifecycle.reattach(dev, opts) == 0
            probe, sha = files[len(timings) % len(files)]
            drop_caches()
            assert __import__("hashlib").sha256(read_file(f"{mnt}{probe}")).hexdigest() == sha
            timings.append(time.monotonic() - t0)
    finally:
        results = readers.finish(timeout=90)
    for r in results:
        assert r["errors"] == [] and r["bad"] == [], r
        assert r["rounds"] >= 1
    print(f"reattach to first good read: {', '.join(f'{t:.2f}' for t in timings)} s")
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_reattach_refused_while_daemon_alive(image, mnt, tmp_path):
    img, _ = image
    index = mount(img, mnt, options(tmp_path))
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(sysfs.device_path(index), options(tmp_path))
    assert info.value.errno == errno.EBUSY and "live" in str(info.value)
    assert daemon_pid(index)
    lifecycle.unmount(str(mnt))


def test_reattach_missing_record_or_vanished_source_leaves_mount(image, mnt, tmp_path):
    img, manifest = image
    opts = options(tmp_path)
    index = mount(img, mnt, opts)
    dev = sysfs.device_path(index)
    ident = sysfs.backend(index)
    assert ident == record_path(index)
    kill_daemon(index)

    os.rename(ident, ident + ".away")
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(dev, opts)
    assert "missing" in str(info.value)
    os.rename(ident + ".away", ident)

    os.rename(img, str(img) + ".away")
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(dev, opts)
    assert "gone" in str(info.value)
    os.rename(str(img) + ".away", img)

    with open(ident, "w") as f:
        f.write("NFS server:/x\n")
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(dev, opts)
    assert "unknown recovery record type" in str(info.value)

    # a source larger than the device is another image: refused after the new daemon claimed the
    # device, and that attempt leaves no file of its own behind
    bigger = tmp_path / "bigger.erofs"
    bigger.write_bytes(img.read_bytes() + bytes(1 << 20))
    with open(ident, "w") as f:
        f.write(f"LOCAL {bigger}\n")
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(dev, opts)
    assert "not the image" in str(info.value)
    assert not os.path.exists(state.pid_path(ident))

    # the mount is as it was: still there, and it serves again after a good reattach
    assert sysfs.mount_at(str(mnt)) is not None and sysfs.size_bytes(index)
    with open(ident, "w") as f:  # erofs-utils' own format, by hand (mount/main.c: "LOCAL %s\n")
        f.write(f"LOCAL {os.path.realpath(img)}\n")
    assert lifecycle.reattach(dev, opts) == 0
    rel, sha = regular_files(manifest, min_size=4096)[0]
    drop_caches()
    assert __import__("hashlib").sha256(read_file(f"{mnt}{rel}")).hexdigest() == sha
    lifecycle.unmount(str(mnt))
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_source_read_error_gives_eio_and_daemon_keeps_serving(image, mnt, tmp_path):
    img, manifest = image
    opts = options(tmp_path)
    index = mount(img, mnt, opts)
    files = regular_files(manifest, min_size=1)
    read_file(f"{mnt}{files[0][0]}")
    os.truncate(img, os.path.getsize(img) // 2)
    drop_caches()
    outcomes = []
    for rel, sha in files:
        try:
            data = read_file(f"{mnt}{rel}")
            outcomes.append("ok" if __import__("hashlib").sha256(data).hexdigest() == sha else "bad")
        except OSError as exc:
            outcomes.append(errno.errorcode.get(exc.errno, str(exc.errno)))
    assert "bad" not in outcomes  # never made-up data
    assert "EIO" in outcomes, outcomes[:50]
    first_eio = outcomes.index("EIO")
    assert "ok" in outcomes[first_eio:], "nothing could be read after the first EIO"
    assert daemon_pid(index), "the daemon died"
    with open(opts.log_file) as f:
        assert "failed" in f.read()
    lifecycle.unmount(str(mnt))
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_ioctl_fallback_forced(image, mnt, tmp_path, monkeypatch, how):
    img, manifest = image
    if how == "environment":
        monkeypatch.setenv(lifecycle.IOCTL_ENV, "1")
        opts = options(tmp_path)
    else:
        opts = options(tmp_path, mode="ioctl")
    assert lifecycle.choose_mode(opts) == "ioctl"
    index = mount(img, mnt, opts)
    assert sysfs.backend(index) is None  # no netlink: no backend identifier
    with open(record_path(index)) as f:
        assert "mode=ioctl" in f.read()
    for rel, sha in regular_files(manifest, min_size=4096, limit=20):
        assert __import__("hashlib").sha256(read_file(f"{mnt}{rel}")).hexdigest() == sha
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(sysfs.device_path(index), opts)
    assert "reattach unavailable in ioctl mode" in str(info.value)
    with open(opts.log_file) as f:
        assert "reattach unavailable in ioctl mode" in f.read()
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


@pytest.mark.parametrize("name,needle", [("corrupt-bad-magic", "not an EROFS image"),
                                         ("corrupt-sb-checksum", "Bad message")])
def test_failed_mount_leaves_nothing(name, needle, mnt, tmp_path):
    before = set(sysfs.indexes())
    with pytest.raises(ErofsMountError) as info:
        lifecycle.mount(str(corpuslib.image(name).path), str(mnt), options(tmp_path))
    assert needle in str(info.value)
    assert sysfs.mount_at(str(mnt)) is None or sysfs.mount_at(str(mnt)).fstype != "erofs"
    for index in set(sysfs.indexes()) | before:
        assert not nothing_left(index), nothing_left(index)


def test_rw_and_missing_mountpoint_refused(image, tmp_path):
    img, _ = image
    from erofs_mount.backends.nbd.config import nbd_options_from

    with pytest.raises(ErofsMountError):
        nbd_options_from(["rw"])
    with pytest.raises(ErofsMountError):
        lifecycle.mount(str(img), str(tmp_path / "nope"), options(tmp_path))


def test_mount_flags_reach_mount(image, mnt, tmp_path):
    img, _ = image
    from erofs_mount.backends.nbd.config import nbd_options_from

    opts = nbd_options_from(["nosuid", "nodev", "noexec", "noatime"], options(tmp_path))
    mount(img, mnt, opts)
    flags = set(sysfs.mount_at(str(mnt)).options.split(","))
    assert {"ro", "nosuid", "nodev", "noexec", "noatime"} <= flags
    lifecycle.unmount(str(mnt))


def test_forced_disconnect(image, mnt, tmp_path):
    img, manifest = image
    index = mount(img, mnt, options(tmp_path))
    assert lifecycle.disconnect(sysfs.device_path(index)) == 0
    drop_caches()
    rel, _ = regular_files(manifest, min_size=4096)[0]
    with pytest.raises(OSError) as info:
        read_file(f"{mnt}{rel}")
    assert info.value.errno == errno.EIO
    assert not os.path.exists(record_path(index))
    umount2(str(mnt))
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_status_lists_devices_daemons_and_mounts(image, mnt, tmp_path, capsys):
    img, _ = image
    index = mount(img, mnt, options(tmp_path))
    lifecycle.status()
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(f"nbd{index} "))
    assert f"source={os.path.realpath(img)}" in line and "daemon=alive" in line and f"mount={mnt}" in line
    kill_daemon(index)
    lifecycle.status()
    assert "daemon=dead" in capsys.readouterr().out
    assert lifecycle.reattach(sysfs.device_path(index), options(tmp_path)) == 0
    lifecycle.unmount(str(mnt))


def test_command_returns_while_daemon_keeps_running(image, mnt, tmp_path):
    """The daemon detaches its stdio: `erofs-mount … | cat` returns as soon as the mount is live."""
    img, _ = image
    res = subprocess.run(
        [sys.executable, "-m", "erofs_mount.backends.nbd.lifecycle", "mount", str(img), str(mnt),
         "-o", "nbd.io_timeout=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert res.returncode == 0, res.stderr
    m = sysfs.mount_at(str(mnt))
    assert m is not None and m.source.startswith("/dev/nbd")
    index = sysfs.index_of(m.source)
    assert daemon_pid(index)
    lifecycle.unmount(str(mnt))
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
