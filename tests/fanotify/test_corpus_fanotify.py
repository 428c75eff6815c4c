"""Every valid corpus image through a real fanotify mount — the kernel's own erofs driver over a
sparse file filled on demand — from a local file and from a registry, each starting from an empty
cache: only what the kernel reads without raising events (erofs/metaranges.py) is made local
before mount(2), and the whole tree must still equal the kernel's manifest (no zeros anywhere)."""

from __future__ import annotations

import gzip
import os

import pytest

from tests import corpuslib
from tests.fuse.test_corpus_fuse import _check

try:
    from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

VALID = corpuslib.names(expect="ok")
EROFS = "application/vnd.erofs"


def _image(name):
    img = corpuslib.image(name)
    if img.devices:
        pytest.skip("multi-device images are not served in fanotify mode (one sparse file per mount)")
    return img


@pytest.mark.parametrize("name", VALID)
def test_local_image_from_an_empty_cache(name, fan):
    img = _image(name)
    res, mnt = fan.mount(str(img.path))
    assert res.returncode == 0, res.stderr
    doc = fan.doc(mnt)
    data_size = img.path.stat().st_size
    assert doc["size"] == data_size
    _check(img.manifest, mnt)
    assert fan.unmount(mnt).returncode == 0


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("fanreg")
    reg = start_registry(root / "reg", root / "storage")
    p = Pusher(reg.url)
    try:
        for name in VALID:
            img = corpuslib.image(name)
            if not img.devices:
                p.image("corpus/" + name, "v1", [(EROFS, img.path.read_bytes())])
    finally:
        p.close()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.mark.parametrize("name", VALID)
def test_registry_layer_from_an_empty_cache(name, fan, registry):
    img = _image(name)
    res, mnt = fan.mount(f"{registry.host}/corpus/{name}:v1", "oci.layer=0", "oci.insecure")
    assert res.returncode == 0, res.stderr
    _check(img.manifest, mnt)
    assert fan.unmount(mnt).returncode == 0


def test_the_cache_entry_is_the_blobs_and_a_second_mount_fetches_nothing(fan, registry):
    name = "lz4"
    img = _image(name)
    ref = f"{registry.host}/corpus/{name}:v1"
    res, mnt = fan.mount(ref, "oci.layer=0", "oci.insecure")
    assert res.returncode == 0, res.stderr
    doc = fan.doc(mnt)
    # the sparse file is the blob's own persistent cache entry (digest-named, shared with FUSE/NBD)
    assert doc["key"].startswith("sha256:") and doc["data"].endswith(doc["key"].split(":")[1] + "/data")
    _check(img.manifest, mnt)
    assert fan.unmount(mnt).returncode == 0
    # complete, hashed against the blob digest (the map's header flag, sources/diskcache.py)
    with open(os.path.join(os.path.dirname(doc["data"]), "map"), "rb") as f:
        head = f.read(64)
    assert int.from_bytes(head[28:32], "little") & 1, "the complete entry was not verified"
    res, mnt2 = fan.mount(ref, "oci.layer=0", "oci.insecure")
    assert res.returncode == 0, res.stderr
    _check(img.manifest, mnt2)
    import time

    time.sleep(2.5)   # one publishing interval
    st = fan.doc(mnt2)["stats"]
    assert st["fetches"] == 0 and st["requests"] == 0, st
    assert not fan.doc(mnt2)["pids"].get("holder")      # complete: no marks, no holder
    assert fan.unmount(mnt2).returncode == 0


def test_a_tar_layer_in_fanotify_mode(fan, registry, tmp_path):
    """A tar+gzip layer: the sparse file holds its EROFS index + the tar (a derived cache key)."""
    from tests.oci._servers import Pusher

    p = Pusher(registry.url)
    try:
        p.image("corpus/tar", "v1", [("application/vnd.oci.image.layer.v1.tar+gzip",
                                      (corpuslib.DATA / "images" / "tree.tar.gz").read_bytes())])
    finally:
        p.close()
    res, mnt = fan.mount(f"{registry.host}/corpus/tar:v1", "oci.layer=0", "oci.insecure")
    assert res.returncode == 0, res.stderr
    from tests.tarlayer.conftest import oracle

    bad = corpuslib.compare_tree(oracle(), mnt, dir_size=False)
    assert bad == [], bad[:10]
    assert fan.unmount(mnt).returncode == 0


def test_gz_image_file_is_not_an_image(fan, tmp_path):
    bad = tmp_path / "x.erofs"
    bad.write_bytes(gzip.compress(b"not erofs" * 1000))
    res, _mnt = fan.mount(str(bad))
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr


def test_not_root_is_one_line(tmp_path):
    """fanotify permission events need CAP_SYS_ADMIN: an unprivileged user gets one line, no traceback."""
    import os
    import subprocess
    import sys

    from tests.fanotify.conftest import REPO

    img = corpuslib.image("lz4").path
    mnt = tmp_path / "m"
    mnt.mkdir()
    os.chmod(tmp_path, 0o755)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "erofs_mount", "--mode", "fanotify", str(img), str(mnt)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HOME": "/nonexistent"}, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "needs root" in r.stderr, r.stderr


def _random_image(tmp_path, seed: int) -> tuple[bytes, dict]:
    import hashlib
    import random
    import subprocess

    src = tmp_path / f"src{seed}"
    src.mkdir()
    rng, want = random.Random(seed), {}
    for i in range(8):
        data = rng.randbytes(1 << 20)
        (src / f"f{i}").write_bytes(data)
        want[f"f{i}"] = hashlib.sha256(data).hexdigest()
    img = tmp_path / f"img{seed}.erofs"
    r = subprocess.run(["mkfs.erofs", "--quiet", str(img), str(src)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"mkfs.erofs: {r.stderr.strip()}")
    return img.read_bytes(), want


def test_reattach_keeps_the_blob_the_tag_named_at_mount(fan, registry, tmp_path):
    """The record pins the manifest and blob digests: after the tag moves, a reattached daemon still
    serves the mounted image."""
    import hashlib
    import signal
    import time

    from erofs_mount.backends.fanotify import record
    from tests.fanotify.conftest import cli

    (first, want), (second, _) = _random_image(tmp_path, 1), _random_image(tmp_path, 2)
    p = Pusher(registry.url)
    try:
        p.image("corpus/moving", "v1", [(EROFS, first)])
    finally:
        p.close()
    res, mnt = fan.mount(f"{registry.host}/corpus/moving:v1", "oci.layer=0", "oci.insecure")
    assert res.returncode == 0, res.stderr
    doc = fan.doc(mnt)
    assert "@sha256:" in doc["spec"]["source"] and doc["spec"]["oci"]["oci.blob"].startswith("sha256:")
    assert doc["pids"].get("holder"), "the image was complete at mount: nothing left to fetch"
    p = Pusher(registry.url)
    try:
        p.image("corpus/moving", "v1", [(EROFS, second)])
    finally:
        p.close()
    os.kill(doc["pids"]["daemon"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while record.alive(doc["pids"]["daemon"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = cli("--reattach", mnt, env=fan.env)
    assert r.returncode == 0, r.stderr
    for name, sha in want.items():
        with open(os.path.join(mnt, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, name
    assert fan.unmount(mnt).returncode == 0


def test_mount_flags_and_erofs_options_reach_the_mount(fan):
    from erofs_mount.backends.fuse.mountinfo import find_mount

    img = _image("lz4")
    res, mnt = fan.mount(str(img.path), "nosuid,nodev,noatime")
    assert res.returncode == 0, res.stderr
    m = find_mount(mnt)
    assert m.fstype == "erofs" and {"ro", "nosuid", "nodev", "noatime"} <= set(m.options.split(",")), m
    assert fan.unmount(mnt).returncode == 0
