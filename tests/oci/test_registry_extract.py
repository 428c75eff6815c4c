"""Every valid corpus image, read lazily from the registry by the pure reader (through SyncReadAt in a
worker thread, as the FUSE backend does) and extracted, passes the corpus' check_tree.py."""

import sys

import pytest
import trio

from erofs_mount.sources.bridge import SyncReadAt
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions
from tests import corpuslib
from tests.conftest import zdata_available

pytestmark = pytest.mark.trio
CHECK_TREE = corpuslib.SHARED / "check_tree.py"  # the corpus verifier, when ../shared exists


@pytest.mark.parametrize("name", corpuslib.names(expect="ok"))
async def test_extract_from_registry_passes_check_tree(world, name, tmp_path):
    from erofs_mount.erofs.image import Image
    from erofs_mount.extract import Extractor

    ci = world.corpus[name]
    if ci.compressed and not zdata_available():
        pytest.skip("compressed data support not present")
    opts = OciOptions(insecure=True, chunk_size=256 * 1024)
    ref = world.ref(f"corpus/{name}:v1")
    primary = await open_oci_source(ref, options=opts, layer=0)
    # extra devices are the next layers (no superblock of their own: no magic check)
    devices = [await open_oci_source(ref, options=opts, layer=i + 1, check_magic=False) for i in range(len(ci.devices))]
    try:
        bridges = [SyncReadAt.here(s) for s in (primary, *devices)]

        def extract():
            img = Image(bridges[0], size=primary.size, devices=bridges[1:])
            return Extractor(img, str(tmp_path / "out")).run()

        with trio.fail_after(120):
            report = await trio.to_thread.run_sync(extract)
        assert not report.errors, report.errors[:5]
        s = primary.stats()
        assert s["bytes_fetched"] <= 2 * primary.size + opts.chunk_size  # lazily read, not refetched
    finally:
        for s in (primary, *devices):
            await s.aclose()
    if not CHECK_TREE.exists():  # no ../shared: the project's own comparison with the same fields
        bad = corpuslib.compare_tree(corpuslib.load_manifest(ci.manifest), tmp_path / "out", dir_size=False,
                                     dir_nlink=False)
        assert not bad, bad[:10]
        return
    r = await trio.run_process(
        [sys.executable, str(CHECK_TREE), "--no-dir-size", "--no-dir-nlink", str(ci.manifest), str(tmp_path / "out")],
        capture_stdout=True, check=False)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out[-2000:]
    assert out.strip().endswith(" 0 failed")
