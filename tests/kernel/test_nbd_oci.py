"""NBD mode from a registry layer (a real docker-registry inside the guest): the record pins the
digest, so a reattach after the tag moved still serves the same image."""

from __future__ import annotations


import pytest

from erofs_mount.backends.nbd import lifecycle, sysfs
from erofs_mount.backends.nbd.recovery import parse_record
from tests import corpuslib

from .helpers import CHECK_TREE, check_tree, drop_caches, kill_daemon, nothing_left, options, registry_fixture, wait_until

from tests.oci._servers import sha256


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    yield from registry_fixture(tmp_path_factory)


def test_oci_layer_through_nbd_pinned_across_reattach(registry, tmp_path):
    if not CHECK_TREE.exists():
        pytest.skip("the shared corpus is not here")
    from erofs_mount.sources.oci.options import OciOptions

    reg, pusher, _storage = registry
    plain, other = corpuslib.image("plain-inline-4k"), corpuslib.image("lz4")
    blob = plain.path.read_bytes()
    pusher.image("nbd/app", "v1", [("application/vnd.erofs", blob)])
    ref = f"{reg.host}/nbd/app:v1"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = options(tmp_path)
    assert lifecycle.mount_oci(ref, str(mnt), opts, OciOptions(insecure=True)) == 0
    index = sysfs.index_of(sysfs.mount_at(str(mnt)).source)
    ident = sysfs.backend(index)
    with open(ident) as f:
        text = f.read()
    rec = parse_record(text)
    assert text.startswith("OCI_NATIVE_BLOB ") and rec.digest == sha256(blob) and rec.ref == ref
    assert dict(rec.options)["manifest"].startswith("sha256:")   # the first line is erofs-utils' (no @digest)
    assert ("insecure", "1") in rec.options and rec.password is None
    res = check_tree(plain.manifest, mnt)
    assert res.returncode == 0, res.stdout[-3000:]

    # move the tag to another image, kill the daemon, reattach: still the pinned image
    pusher.image("nbd/app", "v1", [("application/vnd.erofs", other.path.read_bytes())])
    kill_daemon(index)
    assert lifecycle.reattach(sysfs.device_path(index), opts) == 0
    drop_caches()
    res = check_tree(plain.manifest, mnt)
    assert res.returncode == 0, res.stdout[-3000:]
    lifecycle.status()
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
