"""Tar layers from a real docker-registry: every media type (OCI tar, tar+gzip, tar+zstd, Docker's
rootfs.diff.tar.gzip) through the tools and FUSE (root and an unprivileged user), the index kept in
the blob's cache entry and reused with no blob bytes fetched, and a blob whose content does not
match its digest refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from erofs_mount.errors import CorruptedError
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions
from tests import corpuslib
from tests.conftest import run_cli
from tests.fuse.conftest import FuseMounts, find_pids, fuse_unavailable_reason
from tests.fuse.test_oci_user_fuse import _run, session, user  # noqa: F401 (fixtures)
from tests.fuse.test_unprivileged_fuse import dev_fuse_for_users, user_python  # noqa: F401 (fixtures)
from tests.oci._servers import REGISTRY_BIN, Pusher, sha256, start_registry

from .conftest import VARIANTS, oracle

OCI = "application/vnd.oci.image.layer.v1.tar"
# tag → (layer file made by conftest.Layers, media type, Docker manifest?)
TAGS = {
    "tar": ("gnutar.tar", OCI, False),
    "gzip": ("gnutar.tar.gz", OCI + "+gzip", False),
    "gzip-members": ("pymembers.tar.gz", OCI + "+gzip", False),
    "docker-pax": ("pax.tar.gz", "application/vnd.docker.image.rootfs.diff.tar.gzip", True),
    "zstd": ("one-frame.tar.zst", OCI + "+zstd", False),
    "zstd-frames": ("frames.tar.zst", OCI + "+zstd", False),
}
REPO = "layers/tree"


@pytest.fixture(scope="module")
def reg(tmp_path_factory, layers):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("tarreg")
    r = start_registry(root / "anon", root / "storage")
    p = Pusher(r.url)
    try:
        for tag, (name, mt, docker) in TAGS.items():
            p.image(REPO, tag, [(mt, layers.path(name).read_bytes())], docker=docker)
        # the corpus' own tar.gz, for erofs-utils' index and zinfo of it (oci.tarindex=, oci.zinfo=)
        p.image(REPO, "corpus-gz", [(OCI + "+gzip", (corpuslib.DATA / "images" / "tree.tar.gz").read_bytes())])
        # content that does not match its digest: a plain tar whose stored bytes are changed afterwards
        # (a blob no other tag uses: the registry stores a digest once, so tampering would reach them too)
        tar = layers.path("gnu.tar").read_bytes()
        assert all(TAGS[t][0] != "gnu.tar" for t in TAGS)
        p.image("layers/tampered", "v1", [(OCI, tar)])
        r.storage = root / "storage"
        r.tampered_digest = sha256(tar)
        yield r
    finally:
        p.close()
        r.stop()


def _cli_env(cache: Path) -> dict:
    return {**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)}


@pytest.mark.parametrize("tag", list(TAGS))
def test_extract_every_media_type(reg, tag, tmp_path):
    ref = f"{reg.host}/{REPO}:{tag}"
    dest = tmp_path / "out"
    res = run_cli("extract", "-o", f"oci.layer=0,oci.insecure,oci.cache={tmp_path / 'c'}", ref, str(dest),
                  env=_cli_env(tmp_path / "c"), timeout=300)
    assert res.returncode == 0, res.stderr
    bad = corpuslib.compare_tree(oracle(), dest, dir_size=False, skip=VARIANTS[TAGS[tag][0]])
    assert bad == [], bad[:10]


@pytest.mark.parametrize("tag", list(TAGS))
def test_fuse_mount_as_root(reg, tag, tmp_path):
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mounts = FuseMounts(tmp_path)
    mnt = mounts.mountpoint()
    try:
        res = run_cli("--mode", "fuse", "-o", f"oci.layer=0,oci.insecure,oci.cache={tmp_path / 'c'}",
                      f"{reg.host}/{REPO}:{tag}", mnt, timeout=300)
        assert res.returncode == 0, res.stderr
        bad = corpuslib.compare_tree(oracle(), mnt, skip=VARIANTS[TAGS[tag][0]])
        assert bad == [], bad[:10]
    finally:
        run_cli("-u", mnt)
        mounts.cleanup()


def _open_twice(ref: str, cache: Path) -> tuple[dict, dict, bytes, bytes]:
    opts = OciOptions(insecure=True, layer=0, cache=str(cache))

    async def once():
        src = await open_oci_source(ref, options=opts)
        try:
            before = dict(src.stats())
            head = await src.read_at(0, 4096)
            return before, head
        finally:
            await src.aclose()

    async def main():
        b1, h1 = await once()
        b2, h2 = await once()
        return b1, b2, h1, h2
    return trio.run(main)


def test_second_open_reuses_the_index_with_no_blob_bytes(reg, tmp_path):
    b1, b2, h1, h2 = _open_twice(f"{reg.host}/{REPO}:gzip", tmp_path / "c")
    assert b1["bytes_fetched"] > 0            # the first open read the whole blob once
    assert b2["bytes_fetched"] == 0, b2        # the second: index from the cache, nothing from the registry
    assert h1 == h2 and h1[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little")
    entries = list((tmp_path / "c").glob("sha256/*/tarindex.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["kind"] == "gzip"


def test_content_not_matching_its_digest(reg, tmp_path):
    hexd = reg.tampered_digest.split(":")[1]
    data = reg.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01               # inside some file's data: the tar still parses
    data.write_bytes(bytes(raw))
    res = run_cli("ls", "-o", f"oci.layer=0,oci.insecure,oci.cache={tmp_path / 'c'}",
                  f"{reg.host}/layers/tampered:v1", "/", env=_cli_env(tmp_path / "c"), timeout=120)
    err = res.stderr.decode()
    assert res.returncode != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    assert reg.tampered_digest in err and "digest" in err, err
    assert not list((tmp_path / "c").glob("sha256/*/tarindex.*")), "an index of bad content was kept"


@pytest.mark.parametrize("tag", ["tar", "gzip-members", "zstd"])
def test_rootless_fuse_mount(reg, tag, user, user_python, session):  # noqa: F811
    """An unprivileged user mounts a tar layer from the registry (index in the user's XDG cache)."""
    mnt = session["mnt"]
    env = {"HOME": session["home"], "XDG_RUNTIME_DIR": session["runtime"]}
    ref = f"{reg.host}/{REPO}:{tag}"
    res = _run(user, user_python, ["-m", "erofs_mount", "--mode", "fuse", "-o", "oci.layer=0,oci.insecure,oci.cache",
                                   ref, mnt], env, timeout=300)
    assert res.returncode == 0, res.stderr
    try:
        pids = find_pids(mnt)
        assert len(pids) == 1 and os.stat(f"/proc/{pids[0]}").st_uid == user.pw_uid
        scan = _run(user, user_python, ["-c", "import json,sys; from tests.corpuslib import scan_tree; "
                                        "print(json.dumps(scan_tree(sys.argv[1])))", mnt], env, timeout=300)
        assert scan.returncode == 0, scan.stderr[-2000:]
        ours = json.loads(scan.stdout)
        manifest = oracle()["entries"]
        assert set(ours) <= set(manifest) and len(ours) > len(manifest) * 0.9
        for p, r in ours.items():      # what the user may read equals the kernel's view
            if "error" in r or "error" in manifest[p]:
                continue
            for field in ("type", "mode", "uid", "gid", "size", "nlink", "mtime", "target", "sha256"):
                if field in manifest[p]:
                    assert r.get(field) == manifest[p][field], (p, field)
        cache = Path(session["home"]) / ".cache" / "erofs-mount" / "blobs"
        assert list(cache.glob("sha256/*/tarindex.erofs")), "the index is not in the user's cache"
    finally:
        res = _run(user, user_python, ["-m", "erofs_mount", "-u", mnt], env)
        assert res.returncode == 0, res.stderr


def test_erofs_utils_tarindex_and_zinfo(reg, tmp_path):
    """-o oci.tarindex=,oci.zinfo= take the files `mkfs.erofs --tar=i --gzinfo` made (erofs-utils 1.9.3,
    the corpus' tar-index-gzinfo): no indexing pass, the tree equals the kernel's view."""
    index = corpuslib.image("tar-index-gzinfo").path
    zinfo = corpuslib._materialise("images/tar-index-gzinfo.zinfo")
    ref = f"{reg.host}/{REPO}:corpus-gz"
    dest = tmp_path / "out"
    res = run_cli("extract", "-o", f"oci.layer=0,oci.insecure,oci.tarindex={index},oci.zinfo={zinfo}", ref, str(dest),
                  env=_cli_env(tmp_path / "c"), timeout=300)
    assert res.returncode == 0, res.stderr
    bad = corpuslib.compare_tree(oracle(), dest, dir_size=False)
    assert bad == [], bad[:10]
    assert not (tmp_path / "c").exists(), "no index of our own was made"
    # a tar+gzip layer needs the zinfo with the index; a zinfo alone is refused
    for opts, needle in ((f"oci.tarindex={index}", "oci.zinfo"), (f"oci.zinfo={zinfo}", "needs oci.tarindex")):
        res = run_cli("ls", "-o", f"oci.layer=0,oci.insecure,{opts}", ref, "/", env=_cli_env(tmp_path / "c"))
        err = res.stderr.decode()
        assert res.returncode != 0 and needle in err and err.count("\n") == 1, err
