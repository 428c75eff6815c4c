"""Rootless FUSE: a normal user mounts an image they can read (fusermount3 is setuid), checks it, unmounts it.

Needs root only to create the test user (``useradd``) and to switch to it
(``setpriv``); the mount, the checks and ``-u`` all run as that user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest

from tests import corpuslib
from erofs_mount.backends.fuse.mountinfo import find_mount

from .conftest import (CHECK_TREE, LIFECYCLE, REPO, find_pids, fuse_unavailable_reason, have_check_tree, system_user,
                       wait_for, zdata_available)

USER = "erofs-fuse-test"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create and switch to a test user"
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return fuse_unavailable_reason()


@pytest.fixture(scope="module")
def user():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with system_user(USER) as pw:
        yield pw


@pytest.fixture(scope="module", autouse=True)
def dev_fuse_for_users():
    """/dev/fuse is 0666 on a udev system (Debian's rule); fusermount3 opens it with the user's rights.

    On a host without udev (devtmpfs creates it 0600) no user can use FUSE at all, so the mode udev
    would set is applied for the duration of these tests and restored afterwards.
    """
    if _skip_reason():
        yield
        return
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    if mode & 0o666 != 0o666:
        os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield
    finally:
        if mode & 0o666 != 0o666:
            os.chmod("/dev/fuse", mode)


def _as_user(pw) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--reset-env")


@pytest.fixture(scope="module")
def user_python(user):
    """An interpreter (and environment) with which the test user can import erofs_mount and pyfuse3."""
    site = sysconfig.get_paths()["purelib"]
    base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    candidates = [(sys.executable, {**base_env, "PYTHONPATH": str(REPO)})]
    system = shutil.which("python3", path="/usr/bin")
    if system:  # the venv's interpreter may live under a home the user cannot enter (e.g. /root)
        candidates.append((system, {**base_env, "PYTHONPATH": f"{REPO}:{site}"}))
    errors = []
    for python, env in candidates:
        res = subprocess.run([*_as_user(user), "env", *(f"{k}={v}" for k, v in env.items()), python, "-c",
                              "import pyfuse3, trio, erofs_mount.backends.fuse.lifecycle"],
                             capture_output=True, text=True, timeout=60, cwd="/")
        if res.returncode == 0:
            return python, env
        errors.append(f"{python}: {res.stderr.strip().splitlines()[-1:] or res.returncode}")
    pytest.skip("the test user cannot run erofs_mount (is the checkout readable?): " + "; ".join(errors))


@pytest.fixture
def user_dir(user):
    d = tempfile.mkdtemp(prefix="erofs-fuse-user-", dir="/tmp")
    os.chmod(d, 0o755)
    os.makedirs(os.path.join(d, "mnt"))
    os.makedirs(os.path.join(d, "home"))
    for sub in ("mnt", "home"):
        os.chown(os.path.join(d, sub), user.pw_uid, user.pw_gid)
    try:
        yield d
    finally:
        mnt = os.path.join(d, "mnt")
        if find_mount(mnt) is not None:
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
        for pid in find_pids(mnt):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def _run(user, user_python, args, user_dir, timeout=120):
    python, env = user_python
    env = {**env, "HOME": os.path.join(user_dir, "home")}
    return subprocess.run([*_as_user(user), "env", *(f"{k}={v}" for k, v in env.items()), python, *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.mark.parametrize("name", ["plain-inline-4k", "lz4"])
def test_user_mounts_checks_and_unmounts(name, user, user_python, user_dir):
    img = corpuslib.image(name)
    if img.compressed and not zdata_available():
        pytest.xfail("compressed data support (erofs_mount.erofs.zdata) not present yet")
    image = os.path.join(user_dir, f"{name}.erofs")
    shutil.copyfile(img.path, image)
    os.chmod(image, 0o644)
    mnt = os.path.join(user_dir, "mnt")

    # default options: default_permissions is on for a non-root user, the log goes to the XDG state dir
    res = _run(user, user_python, [*LIFECYCLE, image, mnt], user_dir)
    assert res.returncode == 0, res.stderr
    entry = find_mount(mnt)
    assert entry is not None and f"user_id={user.pw_uid}" in entry.super_options.split(",")
    assert "default_permissions" in entry.super_options.split(",")
    pids = find_pids(mnt)
    assert len(pids) == 1 and os.stat(f"/proc/{pids[0]}").st_uid == user.pw_uid
    assert os.path.exists(os.path.join(user_dir, "home", ".local", "state", "erofs-mount", "fuse.log"))
    probe = _run(user, user_python, ["-c", f"""
import errno, os
assert open({mnt!r} + '/README.txt', 'rb').read()
try:
    open({mnt!r} + '/modes/file-0640', 'rb')
except PermissionError:
    pass
else:
    raise SystemExit('a 0640 root file was readable by another user')
print('ok')
"""], user_dir)
    assert probe.returncode == 0 and "ok" in probe.stdout, probe.stderr
    res = _run(user, user_python, [*LIFECYCLE, "-u", mnt], user_dir)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    assert wait_for(lambda: not find_pids(mnt), timeout=30)

    # without permission checks the owner sees the whole tree: everything but trusted.* (which the
    # kernel shows to CAP_SYS_ADMIN only) must match the kernel's manifest
    res = _run(user, user_python, [*LIFECYCLE, "-o", "no_default_permissions", image, mnt], user_dir)
    assert res.returncode == 0, res.stderr
    if have_check_tree():
        check = subprocess.run([*_as_user(user), "/usr/bin/python3", str(CHECK_TREE), "--no-xattrs",
                                str(img.manifest), mnt], capture_output=True, text=True, timeout=300, cwd="/")
        assert check.returncode == 0, "\n".join(check.stdout.strip().splitlines()[-12:])
    # xattrs as the user sees them on a kernel mount: all but trusted.* (CAP_SYS_ADMIN only)
    manifest = corpuslib.load_manifest(img.manifest)
    want = {p: {n: v for n, v in r["xattrs"].items() if not n.startswith("trusted.")}
            for p, r in manifest["entries"].items() if "xattrs" in r and "error" not in r}
    expected = os.path.join(user_dir, "xattrs.json")
    with open(expected, "w") as f:
        json.dump(want, f)
    os.chmod(expected, 0o644)
    got = _run(user, user_python, ["-c", f"""
import json, os
want = json.load(open({expected!r}))
bad = []
for path, xs in want.items():
    full = os.fsencode({mnt!r} + path)
    got = {{n: os.getxattr(full, n, follow_symlinks=False).hex() for n in os.listxattr(full, follow_symlinks=False)}}
    if got != xs:
        bad.append((path, xs, got))
print(len(want), bad[:5])
"""], user_dir)
    assert got.returncode == 0 and got.stdout.strip().endswith(" []"), got.stdout + got.stderr
    res = _run(user, user_python, [*LIFECYCLE, "-u", mnt], user_dir)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    assert wait_for(lambda: not find_pids(mnt), timeout=30)


def test_user_cannot_unmount_someone_elses_mount(user, user_python, user_dir, fuse):
    img = corpuslib.image("plain-inline-4k")
    mnt = fuse.mountpoint()
    assert fuse.mount(img.path, mnt).returncode == 0  # root's mount
    res = _run(user, user_python, [*LIFECYCLE, "-u", mnt], user_dir)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erofs-mount: "), res.stderr
    assert find_mount(mnt) is not None
    # without allow_other, root's mount is private to root
    probe = _run(user, user_python, ["-c", f"""
import os
try:
    os.listdir({mnt!r})
except PermissionError:
    print('denied')
"""], user_dir)
    assert probe.stdout.strip() == "denied", probe.stdout + probe.stderr
