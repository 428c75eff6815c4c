"""NBD mode with dm-verity (issue 22): the daemon serves the raw blob (image + appended tree), the
filesystem is mounted on a dm-verity device over /dev/nbdN made with device-mapper ioctls, and the
kernel checks every block.  Inside UML (dm-mod, dm-bufio, dm-verity loaded by guest-init.sh)."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from erofs_mount.backends.nbd import lifecycle, sysfs
from erofs_mount.backends.nbd.recovery import parse_record
from erofs_mount.errors import ErofsMountError
from erofs_mount.verity import dm
from erofs_mount.verity.format import ANNOTATION_ROOT, format_image
from erofs_mount.verity.options import Choice
from tests import corpuslib

from .helpers import drop_caches, kill_daemon, nothing_left, options, registry_fixture, wait_until

from tests.oci._servers import sha256


@pytest.fixture(autouse=True)
def dm_verity():
    if not os.path.exists(dm.CONTROL) and not os.path.isdir("/sys/module/dm_mod"):
        pytest.skip("device-mapper is not loaded in this kernel")
    if not os.path.isdir("/sys/module/dm_verity"):
        pytest.skip("dm-verity is not loaded in this kernel")


def _formatted(tmp_path, name="plain-inline-4k"):
    img = tmp_path / f"{name}.erofs"
    shutil.copyfile(corpuslib.image(name).path, img)
    root, offset, _ = format_image(str(img), salt=b"nbd")
    return img, root, offset


def _damaged_file(img, manifest) -> tuple[str, int]:
    from tests.verity.conftest import file_offset

    raw = img.read_bytes()
    path, at = file_offset(raw, manifest)
    data = bytearray(raw)
    data[at] ^= 0x20
    return path, at, bytes(data)


def _index(mnt) -> int:
    m = sysfs.mount_at(str(mnt))
    assert m is not None and m.source.startswith("/dev/mapper/erofs-nbd"), m
    return dm.nbd_index_of(m.source)


def test_local_image_on_a_dm_verity_device(tmp_path):
    img, root, offset = _formatted(tmp_path, "lz4")
    manifest = corpuslib.load_manifest(corpuslib.image("lz4").manifest)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = options(tmp_path)
    assert lifecycle.mount(str(img), str(mnt), opts, verity=Choice(root, None, "test")) == 0
    index = _index(mnt)
    table = dm.table(dm.name_for(index))
    assert table.startswith("verity 1 43:") and root.hex() in table, table
    with open(sysfs.backend(index)) as f:
        rec = parse_record(f.read())
    assert ("verity.roothash", root.hex()) in rec.options and ("verity.hashoffset", str(offset)) in rec.options
    assert corpuslib.compare_tree(manifest, mnt) == []
    assert dm.status(dm.name_for(index)) == "V"
    # the daemon dies; a reattach serves the same device; the dm device stayed
    kill_daemon(index)
    assert lifecycle.reattach(sysfs.device_path(index), opts) == 0
    drop_caches()
    assert corpuslib.compare_tree(manifest, mnt) == []
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
    assert dm.table(dm.name_for(index)) is None and not os.path.exists(f"/dev/mapper/{dm.name_for(index)}")


def test_a_flipped_byte_is_eio_for_its_file_only(tmp_path):
    img, root, _ = _formatted(tmp_path)
    manifest = corpuslib.load_manifest(corpuslib.image("plain-inline-4k").manifest)
    path, _at, data = _damaged_file(img, manifest)
    img.write_bytes(data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert lifecycle.mount(str(img), str(mnt), options(tmp_path), verity=Choice(root, None, "test")) == 0
    index = _index(mnt)
    assert corpuslib.read_errno(str(mnt) + path) == errno.EIO
    bad = corpuslib.compare_tree(manifest, mnt)
    assert [b for b in bad if not b.startswith(path + " ")] == []
    assert dm.status(dm.name_for(index)) == "C"
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")


def test_a_wrong_root_hash_fails_before_any_device_exists(tmp_path):
    img, root, _ = _formatted(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = set(sysfs.indexes())
    with pytest.raises(ErofsMountError, match="root hash"):
        rc = lifecycle.mount(str(img), str(mnt), options(tmp_path), verity=Choice(bytes(32), None, "test"))
        assert rc != 0
    assert not os.path.ismount(mnt)
    assert all(not sysfs.size_bytes(i) for i in set(sysfs.indexes()) - before or sysfs.indexes())


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    yield from registry_fixture(tmp_path_factory)


def test_registry_layer_verified_by_its_annotation_and_a_damaged_blob(registry, tmp_path):
    from erofs_mount.sources.oci.options import OciOptions

    reg, pusher, storage = registry
    img, root, _ = _formatted(tmp_path)
    manifest = corpuslib.load_manifest(corpuslib.image("plain-inline-4k").manifest)
    blob = img.read_bytes()
    digest, _ = pusher.image("nbd/verity", "v1", [("application/vnd.erofs", blob, {ANNOTATION_ROOT: root.hex()})])
    ref = f"{reg.host}/nbd/verity@{digest}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = options(tmp_path)
    assert lifecycle.mount_oci(ref, str(mnt), opts, OciOptions(insecure=True, layer=0)) == 0
    index = _index(mnt)
    assert corpuslib.compare_tree(manifest, mnt) == []
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
    # one byte flipped in the registry's storage: EIO for that file, every other file intact
    path, _at, damaged = _damaged_file(img, manifest)
    hexd = sha256(blob).split(":")[1]
    stored = storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    stored.write_bytes(damaged)
    try:
        assert lifecycle.mount_oci(ref, str(mnt), opts, OciOptions(insecure=True, layer=0)) == 0
        index = _index(mnt)
        assert corpuslib.read_errno(str(mnt) + path) == errno.EIO
        bad = corpuslib.compare_tree(manifest, mnt)
        assert [b for b in bad if not b.startswith(path + " ")] == []
        assert lifecycle.unmount(str(mnt)) == 0
        wait_until(lambda: not nothing_left(index), 10, "nothing left")
    finally:
        stored.write_bytes(blob)
