"""NBD mode from an S3 object (a real moto_server inside the guest, signatures checked): erofs-utils'
S3_OBJECT record pinned to the ETag, a reattach after SIGKILL, and an object replaced under the
mount: EIO and a log line, never the other object's bytes; a reattach to a replaced object refused."""

from __future__ import annotations

import errno

import pytest

from erofs_mount.backends.nbd import lifecycle, sysfs
from erofs_mount.backends.nbd.recovery import S3ObjectRecord, parse_record
from erofs_mount.errors import ErofsMountError
from tests import corpuslib
from tests.s3.conftest import s3  # noqa: F401 - the fixture: a moto_server in the guest

from .helpers import CHECK_TREE, check_tree, drop_caches, kill_daemon, nothing_left, options, wait_until


def test_s3_object_through_nbd_pinned_across_reattach_and_replaced(s3, tmp_path, monkeypatch):  # noqa: F811
    if not CHECK_TREE.exists():
        pytest.skip("the shared corpus is not here")
    from erofs_mount.sources.s3.options import S3Options

    for k, v in s3.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    img = corpuslib.image("lz4")
    data = img.path.read_bytes()
    s3.put("nbd", "images/lz4.erofs", data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = options(tmp_path)
    # a small memory cache: after the page cache is dropped, reads reach the server again
    s3opts = S3Options.from_mount_options({"s3.endpoint": s3.url, "s3.chunk_size": "16K", "s3.memory_limit": "64K",
                                           "s3.readahead": "0"})
    assert lifecycle.mount_s3("s3://nbd/images/lz4.erofs", str(mnt), opts, s3opts) == 0
    index = sysfs.index_of(sysfs.mount_at(str(mnt)).source)
    ident = sysfs.backend(index)
    with open(ident) as f:
        text = f.read()
    rec = parse_record(text)
    # erofs-utils' first line: path style (0, an IP endpoint), SigV4 (1), the region, the env's keys
    assert isinstance(rec, S3ObjectRecord), text
    assert text.startswith(f"S3_OBJECT nbd/images/lz4.erofs {s3.url} 0 1 us-east-1 "), text
    assert (rec.access_key, rec.secret_key) == (s3.access_key, s3.secret_key)
    etag = dict(rec.options)["s3.etag"]
    assert len(etag) == 32 and dict(rec.options)["s3.memory_limit"] == str(64 << 10)
    res = check_tree(img.manifest, mnt)
    assert res.returncode == 0, res.stdout[-3000:]
    entry = next(e for e in lifecycle.status_entries() if e["index"] == index)
    assert (entry["kind"], entry["source"], entry["digest"]) == ("s3", "s3://nbd/images/lz4.erofs", f"etag:{etag}")
    assert f"pinned=etag:{etag}" in lifecycle.status_line(entry)

    # SIGKILL, reattach (with no AWS variables: the record's keys), the same bytes
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    kill_daemon(index)
    assert lifecycle.reattach(sysfs.device_path(index), opts) == 0
    drop_caches()
    res = check_tree(img.manifest, mnt)
    assert res.returncode == 0, res.stdout[-3000:]

    # the object replaced under the mount: every read that reaches the server is EIO, never new bytes
    log_file = opts.log_file
    s3.put("nbd", "images/lz4.erofs", bytes(b ^ 0x5A for b in data))
    drop_caches()
    problems = corpuslib.compare_tree(corpuslib.load_manifest(img.manifest), mnt)
    assert problems, "every read succeeded after the object was replaced"
    # read errors (and what an unreadable directory hides), never a field or a content that differs
    wrong = [p for p in problems if not ("EIO" in p or " presence: expected present, got absent" in p
                                         or " children: missing" in p)]
    assert wrong == [], wrong[:5]
    with open(log_file, errors="replace") as f:
        assert "changed since it was mounted" in f.read()

    # a reattach to the replaced object is refused in one error (the record pins the old ETag)
    kill_daemon(index)
    with pytest.raises(ErofsMountError) as info:
        lifecycle.reattach(sysfs.device_path(index), opts)
    assert "changed since it was mounted" in str(info.value)
    assert info.value.errno == errno.EIO

    # the object put back: the pinned ETag matches again, the device serves again
    s3.put("nbd", "images/lz4.erofs", data)
    assert lifecycle.reattach(sysfs.device_path(index), opts) == 0
    drop_caches()
    res = check_tree(img.manifest, mnt)
    assert res.returncode == 0, res.stdout[-3000:]
    assert lifecycle.unmount(str(mnt)) == 0
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
