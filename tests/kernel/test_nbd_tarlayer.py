"""Tar layers in NBD mode on a real kernel (inside UML): the device exports index + uncompressed
tar, the kernel's erofs driver mounts it (512-byte blocks), the tree equals the kernel's manifest
of the same tar; a registry tar+gzip layer survives a SIGKILL of its daemon under read load, the
new daemon taking the index from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_mount.backends.nbd import lifecycle, state, sysfs
from erofs_mount.backends.nbd.recovery import parse_record
from tests import corpuslib
from tests.tarlayer.conftest import Layers, oracle

from .helpers import daemon_pid, drop_caches, kill_daemon, mount, nothing_left, options, Readers, wait_for_blocked_reader, wait_until

try:
    from tests.oci._servers import REGISTRY_BIN, Pusher, sha256, start_registry
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

REPO = str(Path(__file__).resolve().parents[2])


OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    return Layers(tmp_path_factory.mktemp("nbd-layers"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["gnutar.tar", "gnutar.tar.gz", "pymembers.tar.gz", "pax.tar.gz",
                                  "one-frame.tar.zst", "frames.tar.zst"])
def test_local_layer_over_nbd(layers, name, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    index = mount(layers.path(name), mnt, options(tmp_path))
    try:
        assert Path(f"/sys/block/nbd{index}/queue/logical_block_size").read_text().strip() in ("512", "4096")
        bad = corpuslib.compare_tree(oracle(), mnt)
        assert bad == [], bad[:10]
    finally:
        lifecycle.unmount(str(mnt))
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_registry_gzip_layer_kill_and_reattach(layers, tmp_path):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    reg = start_registry(tmp_path / "reg", tmp_path / "storage")
    try:
        blob = layers.path("gnutar.tar.gz").read_bytes()
        p = Pusher(reg.url)
        try:
            p.image("nbd/layer", "v1", [(OCI_GZIP, blob)])
        finally:
            p.close()
        ref = f"{reg.host}/nbd/layer:v1"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cache = tmp_path / "blobcache"
        env = {**os.environ, "PYTHONPATH": REPO}
        cmd = [sys.executable, "-m", "erofs_mount", "--mode", "nbd", "-o",
               f"oci.layer=0,oci.insecure,oci.cache={cache},nbd.io_timeout=1", ref, str(mnt)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert res.returncode == 0, res.stderr
        m = sysfs.mount_at(str(mnt))
        index = sysfs.index_of(m.source)
        ident = sysfs.backend(index)
        rec = parse_record(Path(ident).read_text())
        assert rec.digest == sha256(blob)      # the record names the layer's digest
        assert list(cache.glob("sha256/*/tarindex.json")), "no index in the blob's cache entry"
        manifest = oracle()
        files = [(p_, e["sha256"]) for p_, e in sorted(manifest["entries"].items())
                 if e["type"] == "reg" and e["size"] >= 4096][:60]
        readers = Readers(mnt, files, tmp_path, n=3, max_seconds=150)
        try:
            time.sleep(0.3)
            kill_daemon(index)
            drop_caches()
            wait_for_blocked_reader(readers)
            res = subprocess.run([sys.executable, "-m", "erofs_mount", "--reattach", f"/dev/nbd{index}"],
                                 capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
            assert res.returncode == 0, res.stderr
            new_pid = daemon_pid(index)
            assert new_pid
        finally:
            results = readers.finish(timeout=120)
        for r in results:
            assert r["errors"] == [] and r["bad"] == [], r
        drop_caches()
        bad = corpuslib.compare_tree(manifest, mnt)
        assert bad == [], bad[:10]
        # the new daemon took the index from the cache and every byte from the blob cache
        wait_until(lambda: (state.read_json(state.stats_path(ident)) or {}).get("pid") == new_pid, 15,
                   "the new daemon's statistics")
        doc = state.read_json(state.stats_path(ident))
        assert doc["stats"]["bytes_fetched"] == 0, doc["stats"]
        lifecycle.unmount(str(mnt))
        wait_until(lambda: not nothing_left(index), 10, "nothing left")
    finally:
        reg.stop()
