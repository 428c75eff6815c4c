"""fanotify mode through a registry mirror (this host's kernel, 6.14+): the daemon fills the sparse file
from the mirror; the origin's access log shows no blob byte; a damaged mirror's block is refetched
from the origin (dm-verity by the digest-pinned layer's annotation) before it is written."""

from __future__ import annotations

from tests import corpuslib
from tests.fanotify.conftest import fan  # noqa: F401 - the fixture
from tests.oci._servers import blob_bytes


def test_fanotify_through_a_mirror_and_past_a_damaged_one(mworld, tmp_path, fan):  # noqa: F811
    w = mworld
    m = corpuslib.load_manifest(corpuslib.image("plain-inline-4k").manifest)
    fan.env.update(w.env(tmp_path, w.conf(tmp_path / "r.conf", w.mirror.host)))
    before = w.origin_blob_bytes()
    res, mnt = fan.mount(w.ref("plain-inline-4k"), f"oci.layer=0,{w.origin_opts(tmp_path)}")
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(m, mnt) == []
    assert w.origin_blob_bytes() == before
    assert blob_bytes(w.mirror, w.images["plain-inline-4k"].digest) > 0
    assert fan.unmount(mnt).returncode == 0
    # the damaged mirror first, a cold sparse file: every byte right, the origin serves the bad block's blob
    fan.cache = tmp_path / "cache2"
    fan.cache.mkdir()
    fan.env["EROFS_MOUNT_CACHE_DIR"] = str(fan.cache)
    fan.env["CONTAINERS_REGISTRIES_CONF"] = str(w.conf(tmp_path / "bad.conf", w.bad.host))
    res, mnt = fan.mount(w.ref("plain-inline-4k"), f"oci.layer=0,{w.origin_opts(tmp_path)}")
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(m, mnt) == []
    assert w.origin_blob_bytes() > before
    assert fan.unmount(mnt).returncode == 0
