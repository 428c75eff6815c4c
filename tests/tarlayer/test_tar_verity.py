"""Tar layers read lazily from a real docker-registry are checked block by block against the dm-verity
tree their indexing pass made of the blob (verity/blobtree.py, verity/anchored.py): a byte changed
in transit AFTER the pass (when the layer digest no longer covers the ranged GETs) reaches no reader,
through the real kernel's FUSE; the tree is kept in the layer's cache entry; the options."""

from __future__ import annotations

import errno
import json
import re
import time

import pytest
import trio

from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions
from erofs_mount.verity.blobtree import BlobTree
from erofs_mount.verity.tree import Params, build
from tests import corpuslib
from tests.conftest import run_cli
from tests.fanotify.conftest import fan  # noqa: F401 (fixture)
from tests.fuse.conftest import cli_mounts
from tests.oci._faultproxy import Fault, proxy_thread
from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry

from .conftest import oracle

OCI = "application/vnd.oci.image.layer.v1.tar"
KINDS = {"tar": ("gnutar.tar", OCI), "gzip": ("gnutar.tar.gz", OCI + "+gzip")}
REPO = "verity/tarlayer"


class World:
    def __init__(self, registry) -> None:
        self.registry = registry
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, str] = {}

    def ref(self, kind: str, host: str | None = None, *, pinned: bool = True) -> str:
        base = f"{host or self.registry.host}/{REPO}"
        return f"{base}@{self.manifests[kind]}" if pinned else f"{base}:{kind}"


@pytest.fixture(scope="module")
def tworld(tmp_path_factory, layers):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("tarverity")
    r = start_registry(root / "reg", root / "storage")
    p = Pusher(r.url)
    w = World(r)
    try:
        for kind, (name, mt) in KINDS.items():
            raw = layers.path(name).read_bytes()
            w.blobs[kind] = raw
            w.manifests[kind], _ = p.image(REPO, kind, [(mt, raw)])
        yield w
    finally:
        p.close()
        r.stop()


@pytest.fixture
def proxy(tworld):
    yield from proxy_thread(tworld.registry.port)


@pytest.fixture
def mounts(tmp_path):
    yield from cli_mounts(tmp_path)


def file_in_tar(tar: bytes, past: int = 0) -> tuple[str, int]:
    """(a regular file of at least 64 KiB whose data starts *past* bytes into the tar, the tar offset
    of its byte 5000)."""
    for path in sorted(corpuslib.source_files()):
        rec = oracle()["entries"].get(path, {})
        if rec.get("type") == "reg" and rec.get("size", 0) >= 64 << 10:
            head = corpuslib.source_bytes(path, 0, 4096)
            at = tar.find(head)
            if at >= past and tar.find(head, at + 1) < 0:
                return path, at + 5000
    raise AssertionError("no large file with unique contents")


def files_between(tar: bytes, lo: int, hi: int) -> set[str]:
    """The regular files of *tar* with data bytes in [lo, hi)."""
    import io
    import tarfile

    out = set()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isreg() and m.size and m.offset_data < hi and lo < m.offset_data + m.size:
                out.add("/" + m.name.lstrip("./"))
    return out


def status_line(mnt: str) -> str:
    time.sleep(1.5)     # the status document is rewritten every second
    out = run_cli("status").stdout.decode()
    return next(ln for ln in out.splitlines() if f" {mnt} " in ln)


def verity_counts(mnt: str) -> tuple[int, int]:
    m = re.search(r"verity=verified:(\d+),failed:(\d+)", status_line(mnt))
    assert m, status_line(mnt)
    return int(m.group(1)), int(m.group(2))


def mount(mounts, ref: str, extra: str = ""):
    mnt = mounts.mountpoint()
    res = run_cli("--mode", "fuse", "-o", f"oci.layer=0,oci.insecure,oci.cache=none{extra}", ref, mnt, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    return mnt


def damage_at(tworld, kind: str) -> tuple[str | None, int]:
    """(the file a changed byte lands in, or None for a gzip blob: its whole span; the blob offset)."""
    if kind == "tar":
        return file_in_tar(tworld.blobs["tar"])
    return None, len(tworld.blobs[kind]) // 3


# -- the tree itself --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1, 300 * 4096 + 17])
def test_blob_tree_is_dm_verity_over_the_zero_padded_blob(size):
    data = bytes((i * 7 + i // 4096) & 0xFF for i in range(size))
    t = BlobTree(size)
    pieces = [1, 4095, 3, 8192, 5000, 1 << 20]
    pos, k = 0, 0
    while pos < size:
        n = pieces[k % len(pieces)]
        t.feed(data[pos:pos + n])
        pos, k = pos + n, k + 1
    root, area = t.finish()
    padded = data + bytes(-size % 4096)
    p = Params(data_blocks=len(padded) // 4096)
    want_root, levels = build(p, (padded[i:i + 4096] for i in range(0, len(padded), 4096)))
    assert root == want_root
    assert area[4096:] == b"".join(reversed(levels))
    with pytest.raises(ValueError):
        short = BlobTree(size + 1)
        short.feed(data)
        short.finish()


# -- FUSE over a real registry, bytes changed after the indexing pass -------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_byte_changed_in_transit_after_the_pass_is_fetched_again(tworld, proxy, mounts, kind):
    mnt = mount(mounts, tworld.ref(kind, proxy.host))
    _, at = damage_at(tworld, kind)
    proxy.always = Fault("corrupt", offset=at, times=1)     # the pass is over: only lazy reads see it
    assert corpuslib.compare_tree(oracle(), mnt) == []
    assert proxy.corrupted == 1
    verified, failed = verity_counts(mnt)
    assert verified > 0 and failed == 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_byte_always_changed_in_transit_gives_eio_and_never_a_wrong_byte(tworld, proxy, mounts, kind):
    mnt = mount(mounts, tworld.ref(kind, proxy.host))
    path, at = damage_at(tworld, kind)
    proxy.always = Fault("corrupt", offset=at)
    bad = corpuslib.compare_tree(oracle(), mnt)
    assert bad, "the damaged block reached no reader and failed no read"
    assert all("EIO" in b for b in bad), bad[:10]            # an error, never a wrong byte
    if path is not None:                                     # a plain tar: only the file holding the byte
        assert corpuslib.read_errno(mnt + path) == errno.EIO
        assert [b for b in bad if not b.startswith(path + " ")] == [], bad[:10]
    assert proxy.corrupted >= 2                              # fetched, then fetched again
    verified, failed = verity_counts(mnt)
    assert verified > 0 and failed >= 1


def test_with_verity_off_the_changed_byte_reaches_the_reader(tworld, proxy, mounts):
    """What the check prevents: the same damage with the check off is read as data (a memory cache
    too small to keep what the pass read: the file is fetched again)."""
    mnt = mount(mounts, tworld.ref("tar", proxy.host), ",verity=off,oci.memory_limit=1m")
    path, at = damage_at(tworld, "tar")
    proxy.always = Fault("corrupt", offset=at)
    with open(mnt + path, "rb") as f:
        got = f.read()
    want = corpuslib.source_bytes(path, 0, 1 << 30)
    assert len(got) == len(want) and got != want
    assert "verity=verified:" not in status_line(mnt)


# -- the tree in the cache entry ------------------------------------------------------------------
def _open(ref: str, cache) -> tuple[dict, bytes]:
    async def main():
        src = await open_oci_source(ref, options=OciOptions(insecure=True, layer=0, cache=str(cache)))
        try:
            data = await src.read_at(src.index_size, 1 << 20)    # tar bytes: through the blob
            if src.kind == "tar":   # now in the blob's memory cache: answered at once (FUSE's inline path), checked
                gated = src.stats()["verity_gated_reads"]
                assert src.read_cached(src.index_size + 4096, 65536) == data[4096:4096 + 65536]
                assert src.stats()["verity_gated_reads"] == gated + 1
            return dict(src.stats()), data
        finally:
            await src.aclose()
    return trio.run(main)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_tree_is_kept_with_the_index_and_checked_on_reuse(tworld, tmp_path, kind, caplog):
    cache = tmp_path / "c"
    s1, d1 = _open(tworld.ref(kind), cache)
    meta = next(cache.glob("sha256/*/tarindex.json"))
    root = json.loads(meta.read_text())["tree_root"]
    assert s1["verity_root"] == root and s1["verity_blocks_failed"] == 0
    s2, d2 = _open(tworld.ref(kind), cache)
    assert s2["verity_root"] == root and d2 == d1
    # the entry came complete and checked against the digest from the pass: marked, not hashed again
    assert s2["verity_gated_reads"] >= 1 and s2["bytes_fetched"] == 0, s2
    tree = meta.parent / "tarindex.verity"
    raw = bytearray(tree.read_bytes())
    raw[-1] ^= 0x01
    tree.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        s3, d3 = _open(tworld.ref(kind), cache)
    assert "dm-verity tree does not match its checksum" in caplog.text
    assert s3["verity_root"] == root and d3 == d1


# -- options ---------------------------------------------------------------------------------------
def test_options_for_a_tar_layer(tworld, tmp_path):
    opts = "oci.layer=0,oci.insecure,oci.cache=none"
    for extra, ref, words in (
            (",verity.roothash=" + "ab" * 32, tworld.ref("tar"), "are for EROFS layers"),
            (",verity=require", tworld.ref("tar", pinned=False), "pin the reference by digest")):
        res = run_cli("ls", "-o", opts + extra, ref, "/", timeout=120)
        err = res.stderr.decode()
        assert res.returncode != 0 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    res = run_cli("ls", "-o", opts + ",verity=require", tworld.ref("gzip"), "/", timeout=120)
    assert res.returncode == 0, res.stderr.decode()


# -- fanotify mode: the window around the damaged block is narrowed down ----------------------------
def test_fanotify_a_byte_always_changed_after_the_pass_fails_only_its_file(tworld, proxy, fan):
    """cache_limit below the blob's size keeps the blob off the disk cache: its reads go to the registry."""
    res, mnt = fan.mount(tworld.ref("tar", proxy.host), "oci.layer=0", "oci.insecure", "cache_limit=4m")
    assert res.returncode == 0, res.stderr
    path, at = file_in_tar(tworld.blobs["tar"], past=2 << 20)   # not in the window the mount made local
    proxy.always = Fault("corrupt", offset=at)
    assert corpuslib.read_errno(mnt + path) == errno.EIO
    bad = corpuslib.compare_tree(oracle(), mnt, dir_size=False)
    # the kernel reads the sparse file in 4 KiB pages, and the index before the tar need not end on
    # one: the damaged 4 KiB block of the blob spoils at most the two pages it straddles, so only the
    # files with bytes within 4 KiB of it may fail too
    block = at // 4096 * 4096
    near = files_between(tworld.blobs["tar"], block - 4096, block + 8192)
    failed = {b.split(" ")[0] for b in bad}
    assert path in failed and failed <= near and all("EIO" in b for b in bad), (bad[:10], near)
    assert len(near) < 10 and proxy.corrupted >= 2
