"""Issue 7 on the host: an unprivileged user mounts a layer straight from a registry that requires
credentials, with `erofs-mount --mode fuse -o oci.layer=0 REF MNT`, compares the tree with the kernel's
view of the same image AS THAT USER (every field a user can see: trusted.* hidden, permission errors
where the kernel gives them), reads `status`, and unmounts with `-u`.

Credentials live only where the user keeps them: ``~/.docker/config.json`` (Bearer-token registry) or
a ``docker-credential-<name>`` executable on the user's PATH named by ``credHelpers`` (htpasswd
registry).  Root only creates the user, the registries, and the kernel loop mount of the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from tests import corpuslib
from tests.oci._servers import (REGISTRY_BIN, USERS, Pusher, TokenIssuer, docker_auth, sha256, start_registry,
                                write_credential_helper, write_htpasswd)
from erofs_mount.backends.fuse.mountinfo import find_mount

from .conftest import REPO, find_pids, system_user, wait_for, zdata_available
from .test_unprivileged_fuse import _as_user, _skip_reason, dev_fuse_for_users, user_python  # noqa: F401

USER = "erofs-oci-fuse-test"
IMAGES = ("plain-inline-4k", "lz4")
TOKEN_USERS = {"bob": "builder"}


@pytest.fixture(scope="module")
def user():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with system_user(USER) as pw:
        yield pw


@pytest.fixture(scope="module")
def registries(tmp_path_factory):
    """Two registries over one storage: Bearer tokens (user bob) and htpasswd (user alice); no anonymous pull."""
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("fuse-oci")
    storage = root / "storage"
    seed = start_registry(root / "seed", storage)
    pusher = Pusher(seed.url)
    try:
        for name in IMAGES:
            pusher.image(f"corpus/{name}", "v1", [("application/vnd.erofs", corpuslib.image(name).path.read_bytes())])
    finally:
        pusher.close()
        seed.stop()
    issuer = TokenIssuer(root / "issuer", anonymous=False, users=dict(TOKEN_USERS)).start()
    token = start_registry(root / "token", storage, auth=issuer.registry_auth())
    hp = write_htpasswd(root / "htpasswd", USERS)
    basic = start_registry(root / "basic", storage, auth={"htpasswd": {"realm": "test", "path": str(hp)}})
    try:
        yield {"token": token, "basic": basic, "issuer": issuer}
    finally:
        basic.stop()
        token.stop()
        issuer.stop()


@pytest.fixture
def session(user):
    """The user's HOME, a mount point, a kernel reference mount point, and (like a login session) an
    XDG_RUNTIME_DIR at /run/user/UID when none exists; all removed afterwards."""
    d = tempfile.mkdtemp(prefix="erofs-oci-user-", dir="/tmp")
    os.chmod(d, 0o755)
    for sub in ("mnt", "home", "kmnt"):
        os.makedirs(os.path.join(d, sub))
    for sub in ("mnt", "home"):
        os.chown(os.path.join(d, sub), user.pw_uid, user.pw_gid)
    runtime = f"/run/user/{user.pw_uid}"
    made_parent = not os.path.exists("/run/user")
    made_runtime = not os.path.exists(runtime)
    if made_runtime:
        os.makedirs(runtime, mode=0o700)
        os.chown(runtime, user.pw_uid, user.pw_gid)
    try:
        yield {"dir": d, "home": os.path.join(d, "home"), "mnt": os.path.join(d, "mnt"),
               "kmnt": os.path.join(d, "kmnt"), "runtime": runtime}
    finally:
        for mnt in (os.path.join(d, "mnt"), os.path.join(d, "kmnt")):
            for _ in range(3):
                if find_mount(mnt) is None:
                    break
                subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
            for pid in find_pids(mnt):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        shutil.rmtree(d, ignore_errors=True)
        if made_runtime:
            shutil.rmtree(runtime, ignore_errors=True)
        if made_parent:
            shutil.rmtree("/run/user", ignore_errors=True)


def _put(path: str, text: str, pw, mode: int = 0o600) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    d = os.path.dirname(path)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _run(user, user_python, args, env_extra, timeout=120):  # noqa: F811
    python, env = user_python
    env = {**env, **env_extra}
    return subprocess.run([*_as_user(user), "env", *(f"{k}={v}" for k, v in env.items()), python, *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


SCAN = """
import json, sys
from tests.corpuslib import scan_tree
print(json.dumps([scan_tree(sys.argv[1]), scan_tree(sys.argv[2])]))
"""


def _user_view_matches_kernel(user, user_python, env, image, fuse_mnt: str, kmnt: str) -> dict:  # noqa: F811
    """Scan the FUSE mount and the kernel's loop mount of the same image as the user; equal in every field."""
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image.path), kmnt], check=True,
                   capture_output=True, timeout=60)
    try:
        res = _run(user, user_python, ["-c", SCAN, fuse_mnt, kmnt], env, timeout=300)
    finally:
        subprocess.run(["umount", kmnt], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    ours, kernel = json.loads(res.stdout)
    assert set(ours) == set(kernel)
    bad = [(p, ours[p], kernel[p]) for p in kernel if ours[p] != kernel[p]]
    assert not bad, bad[:5]
    # the view is the restricted one: permission errors where the kernel gives them, trusted.* hidden
    denied = [p for p, r in kernel.items() if r.get("error", {}).get("errno") == "EACCES"]
    assert "/modes/file-0640" in denied
    manifest = corpuslib.load_manifest(image.manifest)["entries"]
    assert any(n.startswith("trusted.") for r in manifest.values() for n in r.get("xattrs", {}))
    assert not any(n.startswith("trusted.") for r in ours.values() for n in r.get("xattrs", {}))
    # and everything the user may read is the kernel's manifest, field by field
    for p, r in ours.items():
        if "error" in r or p not in manifest or "error" in manifest[p]:
            continue
        for field in ("type", "mode", "uid", "gid", "size", "nlink", "mtime", "target", "sha256"):
            if field in manifest[p]:
                assert r.get(field) == manifest[p][field], (p, field)
    return ours


def _status(user, user_python, env) -> list[dict]:  # noqa: F811
    res = _run(user, user_python, ["-m", "erofs_mount.backends.fuse.status", "--json"], env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _mount_check_unmount(user, user_python, session, env, ref, image, *, cache_dir, secret, doc_dir):  # noqa: F811
    mnt = session["mnt"]
    res = _run(user, user_python, ["-m", "erofs_mount", "--mode", "fuse", "-o", "oci.layer=0,oci.insecure,oci.cache",
                                   ref, mnt], env, timeout=180)
    assert res.returncode == 0, res.stderr
    entry = find_mount(mnt)
    assert entry is not None and entry.fstype == "fuse.erofs"
    assert f"user_id={user.pw_uid}" in entry.super_options.split(",")
    pids = find_pids(mnt)
    assert len(pids) == 1 and os.stat(f"/proc/{pids[0]}").st_uid == user.pw_uid

    _user_view_matches_kernel(user, user_python, env, image, mnt, session["kmnt"])

    # status, as the user: ref, platform, pinned digest, figures, the live daemon
    digest = sha256(image.path.read_bytes())
    entries = [e for e in _status(user, user_python, env) if e["mountpoint"] == mnt]
    assert len(entries) == 1, entries
    e = entries[0]
    assert (e["kind"], e["ref"], e["digest"], e["pid"], e["alive"]) == ("oci", ref, digest, pids[0], True)
    assert e["pinned_ref"] == f"{ref}@{e['manifest_digest']}" and e["manifest_digest"].startswith("sha256:")
    assert e["platform"] and e["published"] and e["bytes_fetched"] > 0 and e["retries"] == 0
    assert e["cache_hit_ratio"] is not None and 0 <= e["cache_hit_ratio"] <= 1
    # root sees the user's mount; with the same figures when the document is under /run/user/UID
    from erofs_mount.backends.fuse import status as fuse_status
    mine = [x for x in fuse_status.status_entries() if x["mountpoint"] == mnt]
    assert len(mine) == 1 and mine[0]["uid"] == user.pw_uid
    if doc_dir == session["runtime"]:
        assert (mine[0]["digest"], mine[0]["alive"], mine[0]["pid"]) == (digest, True, pids[0])
    else:  # a state dir under a HOME that is not the account's: the mount without figures
        assert (mine[0]["published"], mine[0]["source"]) == (False, ref)
    line = subprocess.run(["python3", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from erofs_mount.backends.fuse.status import status_line, status_entries; "
                           "[print(status_line(x)) for x in status_entries()]", str(REPO)],
                          capture_output=True, text=True, timeout=60)
    # the published document: private, no secret
    docs = [os.path.join(root, f) for root, _, files in os.walk(doc_dir) for f in files]
    assert len(docs) == 1, docs
    assert stat.S_IMODE(os.stat(docs[0]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(docs[0])).st_mode) == 0o700
    text = open(docs[0]).read()
    assert secret not in text and "Authorization" not in text

    # the persistent blob cache is the user's own, in their XDG cache dir
    cached = [os.path.join(root, f) for root, _, files in os.walk(cache_dir) for f in files]
    assert cached, f"nothing cached under {cache_dir}"
    assert all(os.stat(p).st_uid == user.pw_uid for p in cached)

    res = _run(user, user_python, ["-m", "erofs_mount", "-u", mnt], env)
    assert res.returncode == 0, res.stderr
    assert find_mount(mnt) is None
    assert wait_for(lambda: not find_pids(mnt), timeout=30)
    assert wait_for(lambda: not os.path.exists(docs[0]), timeout=10)
    assert not [x for x in _status(user, user_python, env) if x["mountpoint"] == mnt]
    return line.stdout, digest


def test_user_mounts_with_docker_config_from_token_registry(user, user_python, session, registries):  # noqa: F811
    reg = registries["token"]
    image = corpuslib.image("plain-inline-4k")
    ref = f"{reg.host}/corpus/plain-inline-4k:v1"
    env = {"HOME": session["home"], "XDG_RUNTIME_DIR": session["runtime"]}
    # without credentials the registry refuses: a one-line error, nothing mounted, nothing left running
    res = _run(user, user_python, ["-m", "erofs_mount", "--mode", "fuse", "-o", "oci.layer=0,oci.insecure", ref,
                                   session["mnt"]], env, timeout=180)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert find_mount(session["mnt"]) is None and not find_pids(session["mnt"])
    _put(os.path.join(session["home"], ".docker", "config.json"),
         json.dumps({"auths": {reg.host: docker_auth("bob", TOKEN_USERS["bob"])}}), user)
    before = len(registries["issuer"].issued)
    line, digest = _mount_check_unmount(user, user_python, session, env, ref, image,
                                        cache_dir=os.path.join(session["home"], ".cache", "erofs-mount"),
                                        secret="builder", doc_dir=session["runtime"])
    assert any(subject == "bob" for subject, _ in registries["issuer"].issued[before:])
    # the printed line (root's `status`): ref, platform, digest, figures, pid and liveness
    mine = [x for x in line.splitlines() if session["mnt"] in x]
    assert len(mine) == 1 and f"ref={ref} " in mine[0] and f"digest={digest} " in mine[0], line
    for word in ("platform=linux/", "daemon=alive", "bytes_fetched=", "cache_hit_ratio=0.", "retries=0"):
        assert word in mine[0], mine[0]


def test_user_mounts_with_credential_helper_from_htpasswd_registry(user, user_python, session, registries):  # noqa: F811
    if not zdata_available():
        pytest.xfail("compressed data support (erofs_mount.erofs.zdata) not present yet")
    reg = registries["basic"]
    image = corpuslib.image("lz4")
    ref = f"{reg.host}/corpus/lz4:v1"
    home = session["home"]
    bindir = os.path.join(home, "bin")
    write_credential_helper(__import__("pathlib").Path(bindir), "erofstest", reg.host, "alice", USERS["alice"])
    for p in (bindir, *[os.path.join(bindir, f) for f in os.listdir(bindir)]):
        os.chown(p, user.pw_uid, user.pw_gid)
    _put(os.path.join(home, ".docker", "config.json"), json.dumps({"credHelpers": {reg.host: "erofstest"}}), user)
    xdg_cache = os.path.join(home, "xdg-cache")
    # no XDG_RUNTIME_DIR (no login session): the status document goes to the XDG state dir
    env = {"HOME": home, "XDG_CACHE_HOME": xdg_cache, "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"}
    _mount_check_unmount(user, user_python, session, env, ref, image, cache_dir=os.path.join(xdg_cache, "erofs-mount"),
                         secret=USERS["alice"], doc_dir=os.path.join(home, ".local", "state", "erofs-mount", "fuse"))
    calls = open(os.path.join(bindir, "erofstest.calls")).read().split()
    assert calls and set(calls) == {reg.host}
