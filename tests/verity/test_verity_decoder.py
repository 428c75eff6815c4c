"""A verified local image keeps the FUSE decoder process (backends/fuse/accel/decoder.py): the process
forks with the image, so its reads go through the same dm-verity check (its own copy of the tree)
and it takes big READs of uncompressed files too (the hashing is the cost it takes off the daemon).

The image is built here by mkfs.erofs (uncompressed) from a generated 6 MiB file; the oracle is
that file.  Driven directly (no mount), then through the kernel's FUSE."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import subprocess
from contextlib import contextmanager

import pytest
import trio

from erofs_mount.backends.fuse.accel import decoder as D
from erofs_mount.backends.fuse.openers import local_opener
from erofs_mount.errors import IntegrityError, UsageError
from erofs_mount.verity.format import format_image
from erofs_mount.verity.options import Choice
from tests.conftest import run_cli
from tests.fuse.conftest import wait_for
from tests.verity.test_verity_fuse import FUSE_LOG, LogTail, mounts, status_verity  # noqa: F401 - the fixture

MKFS = shutil.which("mkfs.erofs")
MiB = 1 << 20
SIZE = 6 * MiB + 12345
DAMAGED = 4 * MiB + 777     # the byte flipped: its 5th MiB fails, no other (a READ the process takes: 1 in 3 is the daemon's)
pytestmark = pytest.mark.skipif(not MKFS, reason="mkfs.erofs (erofs-utils) not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(intact image, damaged image, root hash, the file's bytes, the image offset of the damaged
    byte); both images share one tree."""
    d = tmp_path_factory.mktemp("vdecoder")
    (d / "tree").mkdir()
    data = random.Random(7).randbytes(SIZE)
    (d / "tree" / "big.bin").write_bytes(data)
    (d / "tree" / "small.txt").write_bytes(b"small\n")
    img = d / "plain.erofs"
    subprocess.run([MKFS, "--quiet", "-T1700000000", str(img), str(d / "tree")],
                   check=True, capture_output=True, timeout=120)
    root, _offset, _ = format_image(str(img), salt=b"decoder")
    raw = bytearray(img.read_bytes())
    at = raw.find(data[:4096])
    whole = SIZE // 4096 * 4096     # the tail may be stored inline, elsewhere
    assert at >= 0 and raw[at:at + whole] == data[:whole]
    raw[at + DAMAGED] ^= 0x01
    bad = d / "damaged.erofs"
    bad.write_bytes(bytes(raw))
    return img, bad, root.hex(), data, at + DAMAGED


def _open(path):
    choice = Choice(bytes.fromhex(path[1]), None, "verity.roothash")
    return trio.run(local_opener(str(path[0]), (), choice))


def _read_all(image, nid, dec, size: int) -> tuple[list, int]:
    """Each 1 MiB READ in order (bytes, or the exception the daemon's own read raised), and how
    many the process answered."""
    out, answered = [], 0
    for off in range(0, size, MiB):
        got = dec.answer(nid, off, MiB, size)
        if got is not None:
            answered += 1
            got = bytes(got)
            dec.plan.release_lent()
        else:
            try:
                got = image.read(nid, off, MiB)
            except IntegrityError as exc:
                got = exc
        out.append(got)
    return out, answered


@contextmanager
def _with_decoder(path, root, monkeypatch):
    """(image, decoder, verified source) of a verified local image with its decoder process running."""
    monkeypatch.setattr(D, "WAIT", 5.0)     # a loaded machine must not turn an answer into a miss
    image, closers, fds, src, _inline = _open((path, root))
    dec = None
    try:
        assert fds, "a verified local image hands its descriptor to the decoder process"
        assert D.why_not(image.sb, None, 2, verified=True) is None
        assert D.why_not(image.sb, None, 2) == "no compressed data"
        dec = D.start(image, fds, 1, verified=src.state)
        assert dec is not None
        assert wait_for(lambda: dec.answer(1, 0, 0, 0) is None and dec.ready, timeout=10)
        yield image, dec, src
    finally:
        if dec is not None:
            dec.close()
        for c in closers:
            c()


def test_the_process_reads_and_verifies_uncompressed_reads(built, monkeypatch):
    img, _bad, root, data, _at = built
    with _with_decoder(img, root, monkeypatch) as (image, dec, src):
        nid = image.resolve(b"/big.bin")
        before = src.state.counts["blocks_verified"]
        got, answered = _read_all(image, nid, dec, SIZE)
        assert b"".join(got) == data
        assert answered >= 2
        # every whole block counted in the daemon's counters: its own reads and the process's answers
        # (the inline tail is metadata, read with the inode)
        assert src.state.counts["blocks_verified"] - before >= SIZE // 4096


def test_a_damaged_block_is_never_answered_by_the_process(built, monkeypatch):
    _img, bad, root, data, _at = built
    with _with_decoder(bad, root, monkeypatch) as (image, dec, src):
        nid = image.resolve(b"/big.bin")
        got, answered = _read_all(image, nid, dec, SIZE)
        assert answered >= 2
        for i, chunk in enumerate(got):
            if i == DAMAGED // MiB:
                assert isinstance(chunk, IntegrityError), "the damaged MiB must fail"
            else:
                assert chunk == data[i * MiB:(i + 1) * MiB], f"MiB {i}"
        assert src.counts["verity_failures"] >= 1
        assert dec.plan.dropped >= 1, "the process failed that READ (it checks too), the daemon redid it"


def test_extra_devices_cannot_be_verified():
    choice = Choice(bytes(32), None, "verity.roothash")
    with pytest.raises(UsageError, match="extra devices"):
        local_opener("/nonexistent.erofs", ("/dev/null",), choice)


# ---------------------------------------------------------------------------- through a mount
def _decoder_answered(log: LogTail) -> int:
    lines = [ln for ln in log.text().splitlines() if "decoder process:" in ln]
    assert lines, "the daemon logs what its decoder process did when it ends"
    return int(re.search(r"(\d+) READs answered", lines[-1])[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="1 MiB READs need the mount's read_ahead_kb (root)")
def test_a_mounted_verified_image_uses_the_process(built, mounts):  # noqa: F811
    img, bad, root, data, at = built
    mnt = mounts.mountpoint()
    log = LogTail()
    res = run_cli("--mode", "fuse", "-o", f"verity.roothash={root},decoder=1", str(img), mnt)
    assert res.returncode == 0, res.stderr
    with open(mnt + "/big.bin", "rb", buffering=0) as f:
        h = hashlib.sha256()
        while chunk := f.read(MiB):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert wait_for(lambda: status_verity(mnt)[0] >= SIZE // 4096, timeout=5)
    assert run_cli("-u", mnt, timeout=60).returncode == 0
    if FUSE_LOG:
        assert _decoder_answered(log) >= 2

    # the damaged copy: EIO for the MiB that holds the flipped byte, the right bytes elsewhere
    mnt2 = mounts.mountpoint("mnt2")
    log = LogTail()
    res = run_cli("--mode", "fuse", "-o", f"verity.roothash={root},decoder=1", str(bad), mnt2)
    assert res.returncode == 0, res.stderr
    fd = os.open(mnt2 + "/big.bin", os.O_RDONLY)
    try:
        for i in range(-(-SIZE // MiB)):
            if i == DAMAGED // MiB:
                with pytest.raises(OSError) as exc:
                    os.pread(fd, MiB, i * MiB)
                assert exc.value.errno == errno.EIO
            else:
                assert os.pread(fd, MiB, i * MiB) == data[i * MiB:(i + 1) * MiB], f"MiB {i}"
    finally:
        os.close(fd)
    assert run_cli("-u", mnt2, timeout=60).returncode == 0
    if FUSE_LOG:
        assert f"data block {at // 4096} " in log.text()
        assert _decoder_answered(log) >= 1


def test_a_registry_layer_with_extra_devices_is_refused_in_one_line(vworld, tmp_path, mounts):  # noqa: F811
    mnt = mounts.mountpoint()
    dev = tmp_path / "extra.img"
    dev.write_bytes(bytes(4096))
    res = run_cli("--mode", "fuse", "--device", str(dev), "-o", "oci.layer=0,oci.insecure,oci.cache=none",
                  vworld.ref("plain-inline-4k"), mnt, timeout=120)
    err = res.stderr.decode().strip()
    assert res.returncode != 0 and len(err.splitlines()) == 1 and "extra devices" in err, err
    assert not os.path.ismount(mnt)
