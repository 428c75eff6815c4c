"""The decoder process (backends/fuse/accel/decoder.py): big READs of a compressed file decoded by a forked
second process, byte for byte what the daemon would read, and the daemon carrying on alone when
the process fails or dies.

The image is built here by mkfs.erofs (lz4hc, 4 KiB pclusters) from a generated 6 MiB file; the
oracle is that file.  The first tests drive ``Decoder`` directly (no mount); the last ones mount
the image and read it through the kernel.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess

import pytest

from erofs_mount.backends.fuse.accel import decoder as D
from erofs_mount.backends.fuse.source import open_image

from .conftest import decoder_pids, find_pids, wait_for

MKFS = shutil.which("mkfs.erofs")
MiB = 1 << 20
SIZE = 6 * MiB + 12345
pytestmark = pytest.mark.skipif(not MKFS, reason="mkfs.erofs (erofs-utils) not installed")


def _content() -> bytes:
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < SIZE:
        out += b" ".join(rng.choice(words) for _ in range(64)) + b"\n"
    return bytes(out[:SIZE])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder")
    (d / "tree").mkdir()
    data = _content()
    (d / "tree" / "big.txt").write_bytes(data)
    (d / "tree" / "small.txt").write_bytes(b"small\n")
    img = d / "lz4hc.erofs"
    subprocess.run([MKFS, "--quiet", "-T1700000000", "-zlz4hc", "-C4096", str(img), str(d / "tree")],
                   check=True, capture_output=True, timeout=120)
    return img, data


@pytest.fixture
def opened(built):
    img, data = built
    image, sources = open_image(str(img))
    nid = image.resolve(b"/big.txt")
    assert image.inode(nid).is_compressed
    dec = D.Decoder(image, [s.fileno() for s in sources])
    try:
        yield image, nid, dec, data
    finally:
        dec.close()
        for s in sources:
            s.close()


def _ready(dec) -> bool:
    """Wait (bounded) for the process's first answer: it has closed what it must not hold by then."""
    return wait_for(lambda: dec.answer(1, 0, 0, 0) is None and dec.ready, timeout=10)


def _read_all(image, nid, dec, size: int, chunk: int = MiB) -> tuple[bytes, int]:
    """Read the file in order as the kernel's read-ahead would: (bytes, READs the process answered)."""
    out, answered = [], 0
    for off in range(0, size, chunk):
        got = dec.answer(nid, off, chunk, size)
        if got is not None:
            answered += 1
            got = bytes(got)
            dec.plan.release_lent()
        else:
            got = image.read(nid, off, chunk)
        out.append(got)
    return b"".join(out), answered


def test_the_process_answers_two_reads_in_three_byte_for_byte(opened):
    image, nid, dec, data = opened
    assert _ready(dec)
    got, answered = _read_all(image, nid, dec, len(data))
    assert got == data
    assert answered == 4        # chunks 1, 2, 4, 5 of 0..6; the daemon reads 0, 3 and 6 itself
    got, answered = _read_all(image, nid, dec, len(data), chunk=256 * 1024)   # a 128 KiB read-ahead
    # 25 chunks: 0 (not the full size: the window may still grow), 1, 3, 6, ... 24 are the daemon's
    assert got == data and answered == 15
    assert dec.waits >= 1 and dec.late == 0


def test_a_read_the_process_cannot_do_is_left_to_the_daemon(opened, caplog):
    image, nid, dec, data = opened
    assert _ready(dec)
    bogus = nid + 1 << 20       # no inode there: the process's read fails
    assert dec.answer(bogus, 0, MiB, 10 * MiB) is None
    assert dec.answer(bogus, MiB, MiB, 10 * MiB) is None    # waited for: it failed
    assert dec.plan.dropped >= 1 and dec.alive
    got, answered = _read_all(image, nid, dec, len(data))
    assert got == data and answered == 4


def test_a_dead_process_leaves_the_daemon_alone_and_correct(opened, caplog):
    image, nid, dec, data = opened
    assert _ready(dec)
    os.kill(dec.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger=D.__name__):
        got, answered = _read_all(image, nid, dec, len(data))
    assert got == data
    assert not dec.alive and answered <= 1
    assert "the daemon decodes everything itself" in caplog.text


def test_the_process_holds_only_its_socket_and_the_image(built):
    img, _ = built
    r, w = os.pipe()        # a descriptor of the daemon's own (like its ready pipe): not inherited
    image, sources = open_image(str(img))
    dec = D.Decoder(image, [s.fileno() for s in sources])
    try:
        assert _ready(dec)
        fds = {int(fd): os.readlink(f"/proc/{dec.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{dec.pid}/fd")}
        high = {fd: target for fd, target in fds.items() if fd > 2}
        assert sorted(t for t in high.values() if not t.startswith("socket:")) == [str(img)]
        assert len(high) == 2
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""     # end of file: the process does not hold the write end
        with open(f"/proc/{dec.pid}/comm") as f:
            assert f.read().strip() == "erofs-decoder"
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        pid = dec.pid
        dec.close()
        for s in sources:
            s.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)     # reaped by close()


def test_why_not_says_when_there_is_no_process(built):
    img, _ = built
    image, sources = open_image(str(img))
    try:
        sb = image.sb
        assert D.why_not(sb, None, 2) is None and D.why_not(sb, 1, 1) is None
        assert D.why_not(sb, None, 1) == "one CPU"
        assert D.why_not(sb, 0, 2) == "decoder=0"
    finally:
        for s in sources:
            s.close()


def test_no_process_when_fork_fails(built, monkeypatch, caplog):
    img, _ = built
    image, sources = open_image(str(img))

    def no_fork():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(D.os, "fork", no_fork)
    try:
        with caplog.at_level(logging.WARNING, logger=D.__name__):
            assert D.start(image, [s.fileno() for s in sources], 1) is None
        assert "no decoder process (Resource temporarily unavailable)" in caplog.text
    finally:
        for s in sources:
            s.close()


# ---------------------------------------------------------------------------- through a mount
def _sha(path: str, bufsize: int = MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("bufsize", [MiB, 128 * 1024], ids=["1M-reads", "cat-reads"])
def test_a_mounted_big_file_reads_right_with_the_process(built, fuse, bufsize):
    """cat's 128 KiB reads make the kernel send READs off the 1 MiB grid (256K, 512K, then 1 MiB at
    768K + k MiB on 6.18): the process must serve those too (it served none before)."""
    img, data = built
    mnt = fuse.mountpoint()
    assert fuse.mount(img, mnt, opts=["decoder=1"]).returncode == 0
    (dec,) = decoder_pids(mnt)
    (daemon,) = find_pids(mnt)
    assert _sha(mnt + "/big.txt", bufsize) == hashlib.sha256(data).hexdigest()
    assert fuse.unmount(mnt).returncode == 0
    assert wait_for(lambda: not os.path.exists(f"/proc/{dec}") and not os.path.exists(f"/proc/{daemon}"))
    with open(fuse.log_file) as f:
        line = [ln for ln in f if "decoder process:" in ln][-1]
    answered = int(re.search(r"(\d+) READs answered", line)[1])
    assert answered >= 2, line


def test_without_the_process_and_after_the_daemon_is_killed(built, fuse):
    img, data = built
    mnt = fuse.mountpoint()
    assert fuse.mount(img, mnt, opts=["decoder=0"]).returncode == 0
    assert find_pids(mnt) and not decoder_pids(mnt)
    assert _sha(mnt + "/big.txt") == hashlib.sha256(data).hexdigest()
    assert fuse.unmount(mnt).returncode == 0
    mnt2 = fuse.mountpoint("mnt2")
    assert fuse.mount(img, mnt2, opts=["decoder=1"]).returncode == 0
    (dec,) = decoder_pids(mnt2)
    (daemon,) = find_pids(mnt2)
    os.kill(daemon, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{dec}") or _zombie(dec), timeout=10)
    assert fuse.unmount(mnt2).returncode == 0       # -u still cleans up the dead mount


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1][:1] == b"Z"
    except OSError:
        return True


@pytest.mark.parametrize("name", ["lzma-pcluster-1m", "deflate", "zstd", "48bit-zstd", "metabox-lzma-lz4hc"])
def test_every_codec_is_decoded_by_the_process_byte_for_byte(name, monkeypatch):
    """lzma, deflate and zstd images get the process too (two rounds ahead): the corpus image's
    3 MB file read in 1 MiB and 256 KiB READs, each answer compared with the daemon's own read and the
    source tree's bytes."""
    from tests import corpuslib

    monkeypatch.setattr(D, "WAIT", 5.0)     # a loaded machine must not turn an answer into a miss
    img = corpuslib.image(name)
    image, sources = open_image(str(img.path))
    try:
        nid = image.resolve(b"/big/little-big.dat")
        size = image.inode(nid).size
        assert image.inode(nid).is_compressed
        want = image.read(nid, 0, size)
        assert D.why_not(image.sb, None, 2) is None
        for chunk in (MiB, 256 * 1024):
            dec = D.Decoder(image, [s.fileno() for s in sources], every=3, ahead=2)
            try:
                assert _ready(dec)
                got, answered = _read_all(image, nid, dec, size, chunk)
                assert got == want
                assert answered >= 1 and dec.alive
            finally:
                dec.close()
        if corpuslib.source_files():
            assert want == corpuslib.source_bytes("/big/little-big.dat", 0, size)
    finally:
        for s in sources:
            s.close()
