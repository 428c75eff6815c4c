"""A real-shaped image through a 20 ms proxy: a base layer of >= 100 MB from this machine's /usr and
three small layers that modify a file, delete one and make a directory opaque.  Once the layers'
tar indexes are cached (a first mount builds them), a FUSE mount of the whole image and the first
``ls /`` take at most 3 registry round trips per layer, counted at the proxy; the merged tree shows
the three changes."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fuse.conftest import FuseMounts, fuse_unavailable_reason
from tests.oci._faultproxy import ProxyThread

try:
    from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
BASE_MIN = 100 << 20
CANDIDATES = ("usr/lib/python3.11", "usr/share/locale", "usr/share/doc", "usr/share/perl", "usr/share/man",
              "usr/include", "usr/lib/x86_64-linux-gnu", "usr/bin")


def _base_files() -> list[str]:
    """Regular files and directories under /usr until >= 110 MB of file data (sorted: deterministic
    for one machine)."""
    out, total = [], 0
    for top in CANDIDATES:
        if not os.path.isdir("/" + top):
            continue
        for dirpath, dirs, names in os.walk("/" + top):
            dirs.sort()
            rel = dirpath[1:]
            out.append(rel)
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                if os.path.islink(p) or not os.path.isfile(p) or not os.access(p, os.R_OK):
                    continue
                out.append(p[1:])
                total += os.path.getsize(p)
            if total >= 110 << 20:
                return out if total >= BASE_MIN else []
    return out if total >= BASE_MIN else []


def _tar_gz(add) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf)
    r = subprocess.run(["gzip", "-1", "-n"], input=raw.getvalue(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _small(entries: dict[str, bytes | None]) -> bytes:
    """A small layer: path -> bytes (a file) or None (a directory)."""
    def add(tf):
        for path, data in entries.items():
            ti = tarfile.TarInfo(path)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return _tar_gz(add)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    files = _base_files()
    if not files:
        pytest.skip("this machine's /usr has less than 100 MB of readable files for the base layer")
    regular = [f for f in files if os.path.isfile("/" + f)]
    dirs = [f for f in files if os.path.isdir("/" + f)]
    modified, deleted = regular[0], regular[1]
    opaque = next(d for d in dirs[1:] if any(f.startswith(d + "/") for f in regular[2:]))

    def add_base(tf):
        for f in files:
            tf.add("/" + f, arcname=f, recursive=False)
    base = _tar_gz(add_base)
    parent, name = deleted.rsplit("/", 1)
    layers = [base,
              _small({os.path.dirname(modified): None, modified: b"modified by layer 1\n"}),
              _small({parent: None, f"{parent}/.wh.{name}": b""}),
              _small({opaque: None, f"{opaque}/.wh..wh..opq": b"", f"{opaque}/only-new": b"new\n"})]
    root = tmp_path_factory.mktemp("realshaped")
    reg = start_registry(root / "reg", root / "storage")
    p = Pusher(reg.url)
    try:
        p.image("real/app", "v1", [(TAR_GZ, data) for data in layers])
    finally:
        p.close()
    proxy = ProxyThread(reg.port, 0.02)
    try:
        yield {"ref": f"{proxy.proxy.host}/real/app:v1", "proxy": proxy.proxy, "modified": modified,
               "deleted": deleted, "opaque": opaque, "base_bytes": len(base), "n": len(layers)}
    finally:
        proxy.stop()
        reg.stop()


def test_first_ls_of_a_real_shaped_image_in_few_round_trips(image, tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cache = tmp_path / "c"
    opts = f"oci.insecure,oci.cache={cache}"
    env = {**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)}
    # first: the tar indexes are built (every blob read once) and kept in the blob cache entries
    res = run_cli("ls", "-o", opts, image["ref"], "/", env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    mounts = FuseMounts(tmp_path)
    mnt = mounts.mountpoint()
    proxy = image["proxy"]
    try:
        before = len(proxy.log)
        t0 = time.monotonic()
        res = run_cli("--mode", "fuse", "-o", opts, image["ref"], mnt, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        listing = os.listdir(mnt)
        elapsed = time.monotonic() - t0
        seen = proxy.log[before:]
        print(f"mount + first ls /: {len(seen)} requests for {image['n']} layers, {elapsed:.2f} s: {seen}")
        assert listing == ["usr"], listing
        assert len(seen) <= 3 * image["n"], seen
        assert not [e for e in seen if "/blobs/" in e[1] and e[0] == "GET"], seen   # no blob bytes at all
        # the three small layers did what they say
        assert Path(mnt, image["modified"]).read_bytes() == b"modified by layer 1\n"
        assert not os.path.lexists(os.path.join(mnt, image["deleted"]))
        assert os.path.exists("/" + image["deleted"])
        assert os.listdir(os.path.join(mnt, image["opaque"])) == ["only-new"]
    finally:
        run_cli("-u", mnt)
        mounts.cleanup()
