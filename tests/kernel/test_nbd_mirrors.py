"""NBD mode through a registry mirror (issue 20), inside UML: real docker-registry processes in the
guest (an origin and two mirrors, each with its access log); the kernel's erofs driver over
/dev/nbdN; a SIGKILLed daemon's --reattach reads the mirror configuration again."""

from __future__ import annotations


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
        manifest = None
        for reg in started:
            p = Pusher(reg.url)
            manifest, _ = p.image("nbd/mirrored", "v1", [(MT, blob)])
            p.close()
        yield started, blob, manifest
    finally:
        for reg in started:
            reg.stop()


def _conf(path, origin, mirror) -> str:
    path.write_text(f'[[registry]]\nlocation = "{origin.host}"\n'
                    f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n')
    return str(path)


def test_nbd_through_a_mirror_and_a_reattach_that_reads_the_configuration_again(regs, tmp_path):
    from erofs_mount.sources.oci.options import OciOptions

    (origin, a, b), blob, manifest = regs
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
