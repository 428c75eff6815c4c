"""NBD mode through a registry mirror (issue 20), inside UML: real docker-registry processes in the
guest (an origin and two mirrors, each with its access log); the kernel's erofs driver over
/dev/nbdN; a SIGKILLed daemon's --reattach reads the mirror configuration again; a mirror killed
in the middle of the reads leaves the rest to the origin, with no error for the reader."""

from __future__ import annotations


import signal

import pytest

from erofs_mount.backends.nbd import lifecycle, sysfs
from erofs_mount.backends.nbd.recovery import parse_record
from tests import corpuslib

from .helpers import drop_caches, kill_daemon, nothing_left, options, wait_until

try:
    from tests.oci._servers import REGISTRY_BIN, Pusher, blob_bytes, sha256, start_registry
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

MT = "application/vnd.erofs"


@pytest.fixture(scope="module")
def regs(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("mirrors")
    started = []
    try:
        for name in ("origin", "a", "b"):
            started.append(start_registry(root / name, root / f"{name}-storage", access_log=True))
        blob = corpuslib.image("lz4").path.read_bytes()
        plain = corpuslib.image("plain-inline-4k").path.read_bytes()
        manifest = plain_manifest = None
        for reg in started:
            p = Pusher(reg.url)
            manifest, _ = p.image("nbd/mirrored", "v1", [(MT, blob)])
            plain_manifest, _ = p.image("nbd/plain", "v1", [(MT, plain)])
            p.close()
        yield started, blob, manifest, (root, plain, plain_manifest)
    finally:
        for reg in started:
            reg.stop()


def _conf(path, origin, mirror) -> str:
    path.write_text(f'[[registry]]\nlocation = "{origin.host}"\n'
                    f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n')
    return str(path)


def test_nbd_through_a_mirror_and_a_reattach_that_reads_the_configuration_again(regs, tmp_path):
    from erofs_mount.sources.oci.options import OciOptions

    (origin, a, b), blob, manifest, _ = regs
    digest = sha256(blob)
    tree = corpuslib.load_manifest(corpuslib.image("lz4").manifest)
    conf = tmp_path / "registries.conf"
    ref = f"{origin.host}/nbd/mirrored@{manifest}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = options(tmp_path)
    oci = OciOptions(insecure=True, layer=0, registries_conf=_conf(conf, origin, a))
    assert lifecycle.mount_oci(ref, str(mnt), opts, oci) == 0
    index = sysfs.index_of(sysfs.mount_at(str(mnt)).source)
    try:
        with open(sysfs.backend(index)) as f:
            rec = parse_record(f.read())
        assert ("registries_conf", str(conf)) in rec.options and rec.ref.startswith(origin.host)   # the origin's
        assert corpuslib.compare_tree(tree, mnt) == []
        assert blob_bytes(origin, digest) == 0 and blob_bytes(a, digest) > 0
        # the daemon dies; the configuration now names mirror b, and mirror a is gone
        kill_daemon(index)
        _conf(conf, origin, b)
        a.stop()
        assert lifecycle.reattach(sysfs.device_path(index), opts) == 0
        drop_caches()
        assert corpuslib.compare_tree(tree, mnt) == []
        assert blob_bytes(origin, digest) == 0 and blob_bytes(b, digest) > 0
    finally:
        assert lifecycle.unmount(str(mnt)) == 0
        wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_nbd_mirror_stopped_mid_read_leaves_the_rest_to_the_origin(regs, tmp_path):
    """A mirror of our own (a registry process on mirror a's storage) SIGKILLed after half the files
    were read through the kernel: the other half comes from the origin, and no read fails."""
    from erofs_mount.sources.oci.options import OciOptions
    from tests.oci._servers import start_registry

    (origin, _a, _b), _blob, _manifest, (root, plain, plain_manifest) = regs
    digest = sha256(plain)
    tree = corpuslib.load_manifest(corpuslib.image("plain-inline-4k").manifest)
    mine = start_registry(tmp_path / "mine", root / "a-storage", access_log=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = blob_bytes(origin, digest)
    # small chunks and no read-ahead of our own: what the kernel has not asked for is not fetched
    oci = OciOptions(insecure=True, layer=0, chunk_size=16 * 1024, readahead=0, memory_limit=64 * 1024,
                     registries_conf=_conf(tmp_path / "registries.conf", origin, mine))
    try:
        assert lifecycle.mount_oci(f"{origin.host}/nbd/plain@{plain_manifest}", str(mnt), options(tmp_path), oci) == 0
        index = sysfs.index_of(sysfs.mount_at(str(mnt)).source)
        try:
            files = sorted(p for p, e in tree["entries"].items() if e.get("type") == "reg" and e.get("size", 0) > 0)
            for p in files[: len(files) // 2]:
                (mnt / p.lstrip("/")).read_bytes()
            assert blob_bytes(origin, digest) == before and blob_bytes(mine, digest) > 0
            mine.proc.send_signal(signal.SIGKILL)
            mine.proc.wait(timeout=10)
            assert corpuslib.compare_tree(tree, mnt) == []      # every file: the rest from the origin
            assert blob_bytes(origin, digest) > before
        finally:
            assert lifecycle.unmount(str(mnt)) == 0
            wait_until(lambda: not nothing_left(index), 10, "nothing left")
    finally:
        mine.stop()
