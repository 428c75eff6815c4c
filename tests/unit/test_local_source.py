import os
import subprocess

import pytest
import trio

from erofs_mount.errors import NotFoundError, SourceError, UsageError
from erofs_mount.sources import Source
from erofs_mount.sources.bridge import SyncReadAt
from erofs_mount.sources.local import LocalSource


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(300_000)
    p = tmp_path / "img"
    p.write_bytes(data)
    return p, data


def test_pread(blob):
    p, data = blob
    with LocalSource.open(p) as src:
        assert isinstance(src, Source) and src.size == len(data) and not src.is_block
        assert src.pread(0, 10) == data[:10]
        assert src.pread(299_990, 100) == data[299_990:]
        assert src.pread(len(data), 5) == b"" and src.pread(10**9, 5) == b""
        assert src.pread(5, 0) == b""
        assert os.pread(src.fileno(), 4, 8) == data[8:12]
        with pytest.raises(ValueError):
            src.pread(-1, 1)
        assert src.stats()["bytes_read"] == 20
    with pytest.raises(SourceError):
        src.fileno()


@pytest.mark.trio
async def test_read_at(blob):
    p, data = blob
    src = LocalSource.open(p)
    try:
        for off, n in [(0, 4096), (1, 200_000), (250_000, 100_000), (300_000, 1)]:
            assert await src.read_at(off, n) == data[off:off + n]
        s = src.stats()
        assert s["inline_reads"] + s["thread_reads"] >= 3
    finally:
        await src.aclose()
        await src.aclose()  # idempotent


@pytest.mark.trio
async def test_sync_bridge_from_thread(blob):
    p, data = blob
    src = LocalSource.open(p)
    bridge = SyncReadAt.here(src)
    assert await trio.to_thread.run_sync(bridge.read_at, 7, 70) == data[7:77]
    await src.aclose()


def test_errors(tmp_path):
    with pytest.raises(NotFoundError):
        LocalSource.open(tmp_path / "missing")
    with pytest.raises(UsageError, match="not a regular file"):
        LocalSource.open(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # so opening the FIFO read-only does not block
    try:
        with pytest.raises(UsageError):
            LocalSource.open(fifo)
    finally:
        os.close(fd)


def test_block_device(tmp_path, blob):
    """BLKGETSIZE64 on a real loop device (skipped where loop devices are unavailable)."""
    p, data = blob
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup")
    r = subprocess.run(["losetup", "--find", "--show", "--read-only", str(p)], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        with LocalSource.open(dev) as src:
            assert src.is_block and src.size == 299_520  # loop devices round down to 512 bytes
            assert src.pread(512, 100) == data[512:612]
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=20)
