"""open_s3_source against a real S3 server (moto_server, tests/s3/_moto.py): credentials from every
place they come from, S3's error answers, a pinned object replaced under a reader, versions, the
persistent cache, SigV2 and unsigned requests."""

from __future__ import annotations

import os
import random

import pytest
import trio

from erofs_mount.errors import (
    AuthError,
    NotErofsError,
    NotFoundError,
    ObjectChangedError,
    ObjectStoreError,
    UsageError,
)
from erofs_mount.sources.s3.options import S3Options
from erofs_mount.sources.s3.source import S3ObjectSource, open_s3_source
from tests import corpuslib

from .conftest import BUCKET, clean_aws_env, put_image

pytestmark = pytest.mark.trio
KiB, MiB = 1 << 10, 1 << 20
LIMIT = 20   # seconds: a bound on every test's waits (each takes well under it)


@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """An environment with no AWS variable of this machine and AWS config files of the test's own
    (none: no ~/.aws is read); ``aws_env(srv)`` puts *srv*'s valid key in AWS_ACCESS_KEY_ID/SECRET."""
    clean_aws_env(tmp_path, monkeypatch)

    def with_keys(srv=None, access_key=None, secret_key=None):
        if srv is not None or access_key:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key or srv.access_key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key or srv.secret_key)

    return with_keys


def s3opts(srv, **extra: str | None) -> S3Options:
    return S3Options.from_mount_options({"s3.endpoint": srv.url, **extra})


async def read_all(src, piece: int = 256 * KiB) -> bytes:
    out = bytearray()
    for off in range(0, src.size, piece):
        out += await src.read_at(off, piece)
    return bytes(out)


async def open_read(source: str, options: S3Options) -> tuple[bytes, dict, S3ObjectSource]:
    """Open, read the whole object, close: (bytes, stats once closed, the closed source)."""
    src = await open_s3_source(source, options=options)
    try:
        data = await read_all(src)
    finally:
        await src.aclose()     # waits for the persistent cache writes
    return data, src.stats(), src


def object_gets(srv, path: str) -> int:
    """GETs of ``/BUCKET/KEY`` the server logged so far, every one of them: a sentinel request is
    sent and awaited in the log first (the log line of a request is written after its answer).
    (``S3Server.requests_logged`` misses the colored lines werkzeug writes for 206 answers.)"""
    import time
    import urllib.request
    import uuid

    mark = uuid.uuid4().hex
    urllib.request.urlopen(f"{srv.url}/moto-api/?sentinel={mark}", timeout=5).read()
    deadline = time.monotonic() + 5
    while True:
        with open(srv.log_path, errors="replace") as f:
            text = f.read()
        if mark in text or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert mark in text, "the server log lags"
    return sum(f"GET {path} " in line or f"GET {path}?" in line for line in text.splitlines())


def make_public(srv, source: str) -> None:
    """moto refuses unsigned requests for private objects even with its checks off: a public one."""
    bucket, _, key = source.removeprefix("s3://").partition("/")
    srv.client().put_object_acl(Bucket=bucket, Key=key, ACL="public-read")


def image_bytes(name: str) -> bytes:
    return corpuslib.image(name).path.read_bytes()


# -- reading --------------------------------------------------------------------------------------

async def test_whole_image_byte_identical(s3, aws_env):
    aws_env(s3)
    source, data = put_image(s3, "lz4")
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=s3opts(s3))
        try:
            assert isinstance(src, S3ObjectSource)
            assert src.size == len(data)
            assert src.etag and not src.etag.startswith('"') and src.version_id is None
            assert str(src.location) == source
            assert src.credentials_origin == "env"
            assert src.static_credentials == (s3.access_key, s3.secret_key)
            assert src.path_style is True and src.region == "us-east-1"
            assert await read_all(src) == data
            # random reads, across chunk boundaries, past the end
            rng = random.Random(7)
            for _ in range(40):
                off = rng.randrange(0, len(data))
                n = rng.randrange(1, 300 * KiB)
                assert await src.read_at(off, n) == data[off:off + n]
            assert await src.read_at(len(data) - 10, 100) == data[-10:]
            assert await src.read_at(len(data), 100) == b""
            st = src.stats()
            assert st["digest"] == f"etag:{src.etag}" and st["size"] == len(data)
            assert st["bytes_fetched"] >= len(data) and st["retries"] == 0 and st["failures"] == 0
        finally:
            await src.aclose()


async def test_pinned_options_reopen_the_same_object(s3, aws_env):
    aws_env(s3)
    source, data = put_image(s3, "zstd", "pinned/zstd.erofs")
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=s3opts(s3))
        await src.aclose()
        pinned = src.pinned_options()
        assert pinned.etag == src.etag and pinned.endpoint == s3.url and pinned.path_style is True
        # a recovery record keeps its mount options: they reopen the same object
        again = S3Options.from_mount_options(pinned.as_mount_options())
        assert again == pinned
        got, _, src2 = await open_read(source, again)
        assert got == data and src2.etag == src.etag and src2.digest == src.digest


async def test_endpoint_from_environment(s3, aws_env, monkeypatch):
    aws_env(s3)
    source, data = put_image(s3, "deflate")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    with trio.fail_after(LIMIT):
        got, _, src = await open_read(source, S3Options())
    assert got == data and src.endpoint == s3.url


async def test_erofs_utils_source_spelling(s3, aws_env):
    aws_env(s3)
    source, data = put_image(s3, "lz4hc-pcluster-64k")
    with trio.fail_after(LIMIT):
        got, _, _ = await open_read(source.removeprefix("s3://"), s3opts(s3))
    assert got == data


async def test_key_that_needs_encoding(s3, aws_env):
    aws_env(s3)
    key = "odd keys/a b+c~d=é.erofs"
    source, data = put_image(s3, "lz4", key)
    with trio.fail_after(LIMIT):
        got, _, _ = await open_read(source, s3opts(s3))
    assert got == data


# -- credentials ----------------------------------------------------------------------------------

async def test_credentials_from_passwd_file(s3, aws_env, tmp_path):
    aws_env()   # nothing in the environment
    source, data = put_image(s3, "lz4", "passwd/lz4.erofs")
    pw = s3.passwd_file(tmp_path / "passwd-s3fs",
                        f"# s3fs style\nother:AKIAWRONG:wrong\n{BUCKET}:{s3.access_key}:{s3.secret_key}\n")
    with trio.fail_after(LIMIT):
        got, _, src = await open_read(source, s3opts(s3, **{"s3.passwd_file": str(pw)}))
    assert got == data
    assert src.credentials_origin == "s3.passwd_file"
    assert src.static_credentials == (s3.access_key, s3.secret_key)
    # erofs-utils' one-line form
    pw.write_text(f"{s3.access_key}:{s3.secret_key}\n")
    with trio.fail_after(LIMIT):
        got, _, _ = await open_read(source, s3opts(s3, **{"s3.passwd_file": str(pw)}))
    assert got == data


async def test_passwd_file_wins_over_environment(s3, aws_env, tmp_path):
    aws_env(access_key="AKIAENVWRONG", secret_key="wrong")
    source, data = put_image(s3, "lz4", "passwd/lz4.erofs")
    pw = s3.passwd_file(tmp_path / "passwd-s3fs")
    with trio.fail_after(LIMIT):
        got, _, _ = await open_read(source, s3opts(s3, **{"s3.passwd_file": str(pw)}))
    assert got == data


async def test_credentials_from_profile(s3, aws_env, tmp_path):
    aws_env()
    source, data = put_image(s3, "lz4", "profile/lz4.erofs")
    (tmp_path / "aws-credentials").write_text(
        "[default]\naws_access_key_id = AKIADEFAULTWRONG\naws_secret_access_key = wrong\n"
        f"[p]\naws_access_key_id={s3.access_key}\naws_secret_access_key={s3.secret_key}\n")
    with trio.fail_after(LIMIT):
        got, _, src = await open_read(source, s3opts(s3, **{"s3.profile": "p"}))
        assert got == data
        assert src.credentials_origin == "shared-credentials-file"
        assert src.static_credentials is None      # read from the file again, not kept
        # the default profile's keys are not the server's
        with pytest.raises(AuthError, match="InvalidAccessKeyId"):
            await open_s3_source(source, options=s3opts(s3))
        with pytest.raises(UsageError, match="s3.profile=nope: no such profile"):
            await open_s3_source(source, options=s3opts(s3, **{"s3.profile": "nope"}))


async def test_wrong_secret(s3, aws_env):
    aws_env(access_key=s3.access_key, secret_key="not-the-secret")
    source, _ = put_image(s3, "lz4")
    with trio.fail_after(LIMIT):
        with pytest.raises(AuthError, match="SignatureDoesNotMatch") as info:
            await open_s3_source(source, options=s3opts(s3))
    msg = str(info.value)
    assert msg.startswith(source) and "HTTP 403" in msg and "credentials from env" in msg


async def test_unknown_access_key(s3, aws_env):
    aws_env(access_key="AKIAUNKNOWNKEY000000", secret_key=s3.secret_key)
    source, _ = put_image(s3, "lz4")
    with trio.fail_after(LIMIT):
        with pytest.raises(AuthError, match="InvalidAccessKeyId") as info:
            await open_s3_source(source, options=s3opts(s3))
    assert "HTTP 403" in str(info.value)


async def test_unsigned_request_refused(s3, aws_env):
    aws_env()
    source, _ = put_image(s3, "lz4")
    with trio.fail_after(LIMIT):
        for o in (s3opts(s3), s3opts(s3, **{"s3.anonymous": None})):
            with pytest.raises(AuthError, match="unsigned request") as info:
                await open_s3_source(source, options=o)
            assert "HTTP 403" in str(info.value)


# -- what is not there, what is no image ----------------------------------------------------------

async def test_missing_key(s3, aws_env):
    aws_env(s3)
    put_image(s3, "lz4")    # the bucket exists
    with trio.fail_after(LIMIT):
        with pytest.raises(NotFoundError, match="NoSuchKey") as info:
            await open_s3_source(f"s3://{BUCKET}/no/such/key.erofs", options=s3opts(s3))
    assert "no such object" in str(info.value) and "HTTP 404" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


async def test_missing_bucket(s3, aws_env):
    aws_env(s3)
    with trio.fail_after(LIMIT):
        with pytest.raises(NotFoundError, match="no bucket 'no-such-bucket'") as info:
            await open_s3_source("s3://no-such-bucket/x.erofs", options=s3opts(s3))
    assert "NoSuchBucket" in str(info.value)


async def test_missing_version(s3, aws_env):
    aws_env(s3)
    s3.put("versions-missing", "x.erofs", image_bytes("lz4"), versioned=True)
    with trio.fail_after(LIMIT):
        with pytest.raises(NotFoundError, match=r"no version nosuchversion \(HTTP 404 NoSuchVersion\)"):
            await open_s3_source("s3://versions-missing/x.erofs?versionId=nosuchversion", options=s3opts(s3))
        with pytest.raises(NotFoundError, match="NoSuchVersion"):
            await open_s3_source("s3://versions-missing/x.erofs", options=s3opts(s3, **{"s3.version_id": "v0"}))


async def test_not_erofs(s3, aws_env):
    aws_env(s3)
    junk = random.Random(1).randbytes(64 * KiB)
    s3.put(BUCKET, "junk/random.bin", junk)
    s3.put(BUCKET, "junk/tiny.bin", b"x" * 100)
    with trio.fail_after(LIMIT):
        with pytest.raises(NotErofsError, match="no EROFS superblock magic at offset 1024"):
            await open_s3_source(f"s3://{BUCKET}/junk/random.bin", options=s3opts(s3))
        with pytest.raises(NotErofsError, match="100 bytes, too small"):
            await open_s3_source(f"s3://{BUCKET}/junk/tiny.bin", options=s3opts(s3))
        # without the check the bytes are served as they are
        src = await open_s3_source(f"s3://{BUCKET}/junk/random.bin", options=s3opts(s3), check_magic=False)
        try:
            assert await read_all(src) == junk
        finally:
            await src.aclose()


async def test_empty_object(s3, aws_env):
    aws_env(s3)
    s3.put(BUCKET, "junk/empty.bin", b"")
    with trio.fail_after(LIMIT):
        # S3 answers a Range GET of an empty object 416 InvalidRange
        with pytest.raises(ObjectStoreError, match=r"junk/empty.bin: the object is empty \(HTTP 416"):
            await open_s3_source(f"s3://{BUCKET}/junk/empty.bin", options=s3opts(s3))


# -- a pinned object replaced under its reader --------------------------------------------------

async def test_replaced_object_is_never_served(s3, aws_env, caplog):
    aws_env(s3)
    source, data = put_image(s3, "lz4", "changing/lz4.erofs")
    # same size, the same superblock, every byte after the first 4 KiB other
    new = data[:4 * KiB] + bytes(b ^ 0x5A for b in data[4 * KiB:])
    opts = s3opts(s3, **{"s3.chunk_size": "4K", "s3.memory_limit": "64K", "s3.readahead": "8K"})
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=opts)
        try:
            pinned = src.etag
            assert await src.read_at(0, 4 * KiB) == data[:4 * KiB]
            s3.put(BUCKET, "changing/lz4.erofs", new)
            with caplog.at_level("ERROR", logger="erofs_mount.sources.s3"):
                with pytest.raises(ObjectChangedError, match="the object changed since it was mounted") as info:
                    await src.read_at(MiB, 8 * KiB)
            assert pinned in str(info.value) and source in str(info.value)
            assert "changed since it was mounted" in caplog.text
            # every later read: the old bytes (cached) or the same refusal, never the new bytes
            refused = 0
            for off in (0, 100, MiB, 512 * KiB, len(data) - 4 * KiB):
                try:
                    got = await src.read_at(off, 4 * KiB)
                except ObjectChangedError:
                    refused += 1
                else:
                    assert got == data[off:off + 4 * KiB]
            assert refused >= 3
            st = src.stats()
            assert st["fetch_failures"] >= 1 and st["retries"] == 0   # a 412 is no reason to retry
        finally:
            await src.aclose()
        # opening it again reads the new object
        got, _, src2 = await open_read(source, s3opts(s3))
        assert got == new and src2.etag != pinned
        # and a reopen pinned to the old ETag (a recovery record's) is refused at once
        with pytest.raises(ObjectChangedError, match="changed since it was mounted"):
            await open_s3_source(source, options=src.pinned_options())


# -- versions -------------------------------------------------------------------------------------

async def test_versioned_bucket_pins_the_version(s3, aws_env):
    aws_env(s3)
    bucket, key = "versioned", "img.erofs"
    old, new = image_bytes("lz4"), image_bytes("zstd")
    v1 = s3.put(bucket, key, old, versioned=True)["VersionId"]
    source = f"s3://{bucket}/{key}"
    opts = s3opts(s3, **{"s3.chunk_size": "4K", "s3.memory_limit": "256K"})
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=opts)
        try:
            assert src.version_id == v1
            assert src.stats()["digest"] == f"etag:{src.etag},version:{v1}"
            head = await src.read_at(0, 4 * KiB)
            v2 = s3.put(bucket, key, new, versioned=True)["VersionId"]
            assert v2 != v1
            # the pinned version is still there: read in full, no error
            assert head + await src.read_at(4 * KiB, len(old)) == old
            assert src.stats()["fetch_failures"] == 0
        finally:
            await src.aclose()
        # no version asked: the latest
        got, _, latest = await open_read(source, s3opts(s3))
        assert got == new and latest.version_id == v2 and latest.digest != src.digest
        # the first version, by ?versionId= and by s3.version_id=
        got, _, first = await open_read(f"{source}?versionId={v1}", s3opts(s3))
        assert got == old and first.version_id == v1 and first.etag == src.etag
        got, _, first = await open_read(source, s3opts(s3, **{"s3.version_id": v1}))
        assert got == old and first.version_id == v1


async def test_nbd_record_pins_version_and_etag_and_reopens_them(s3, aws_env):
    """The recovery record (NBD mode) of a versioned object: erofs-utils' S3_OBJECT line, and
    s3.etag/s3.version_id lines that reopen exactly that version after the key was overwritten
    (the record reopened with the keys it kept: none of the environment's)."""
    from erofs_mount.backends.nbd.recovery import format_record, parse_record
    from erofs_mount.backends.nbd.source import open_source, record_for_s3

    aws_env(s3)
    bucket, key = "versioned-record", "img.erofs"
    old, new = image_bytes("lz4"), image_bytes("zstd")
    v1 = s3.put(bucket, key, old, versioned=True)["VersionId"]
    with trio.fail_after(LIMIT):
        src = await open_s3_source(f"s3://{bucket}/{key}", options=s3opts(s3))
        try:
            rec = record_for_s3(src)
        finally:
            await src.aclose()
        text = format_record(rec)
        assert text.startswith(f"S3_OBJECT {bucket}/{key} {s3.url} 0 1 us-east-1 "), text
        lines = dict(parse_record(text).options)
        assert lines["s3.version_id"] == v1 and lines["s3.etag"] == src.etag
        s3.put(bucket, key, new, versioned=True)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(name, None)
        again = await open_source(parse_record(text))
        try:
            assert (again.version_id, again.etag) == (v1, src.etag)
            assert await read_all(again) == old
        finally:
            await again.aclose()


# -- the persistent cache ------------------------------------------------------------------------

async def test_persistent_cache(s3, aws_env, tmp_path):
    aws_env(s3)
    cache = tmp_path / "cache"
    source, data = put_image(s3, "lz4", "cached/img.erofs")
    opts = s3opts(s3, **{"s3.cache": str(cache)})
    with trio.fail_after(LIMIT):
        got, st1, src1 = await open_read(source, opts)
        assert got == data and st1["requests"] >= 2 and st1["disk_bytes_written"] >= len(data)
        assert src1.digest.startswith("s3obj:")
        # warm: the pinning GET only, everything else from the cache entry
        before = object_gets(s3, "/images/cached/img.erofs")
        assert before == st1["requests"]
        got, st2, src2 = await open_read(source, opts)
        assert got == data
        assert src2.digest == src1.digest and src2.etag == src1.etag
        assert st2["requests"] == 1 and st2["bytes_fetched"] == 0 and st2["disk_hits"] > 0
        assert object_gets(s3, "/images/cached/img.erofs") - before == 1
        # the object replaced: another entry, its own bytes (none of the old entry's)
        other = image_bytes("deflate")
        s3.put(BUCKET, "cached/img.erofs", other)
        got, st3, src3 = await open_read(source, opts)
        assert got == other
        assert src3.digest != src1.digest and st3["digest"] != st1["digest"]
        assert st3["requests"] >= 2 and st3["bytes_fetched"] >= len(other)
    entries = sorted(p.name for p in (cache / "s3obj").iterdir())
    assert entries == sorted({src1.digest.partition(":")[2], src3.digest.partition(":")[2]})


# -- SigV2 and unsigned requests ----------------------------------------------------------------

async def test_sigv2(s3_open, aws_env, signed):
    aws_env(s3_open)
    source, data = put_image(s3_open, "lz4")
    with trio.fail_after(LIMIT):
        got, _, _ = await open_read(source, s3opts(s3_open, **{"s3.sig": "2"}))
    assert got == data
    assert signed, "no request went through the signer"
    for headers in signed:
        auth = headers.get("authorization", "")
        assert auth.startswith(f"AWS {s3_open.access_key}:"), auth
        assert "x-amz-date" not in headers and "date" in headers


async def test_sigv4_header(s3_open, aws_env, signed):
    aws_env(s3_open)
    source, data = put_image(s3_open, "lz4")
    with trio.fail_after(LIMIT):
        got, _, _ = await open_read(source, s3opts(s3_open))
    assert got == data and signed
    for headers in signed:
        assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={s3_open.access_key}/")
        # every GET but the pinning one is conditional on the pinned ETag
        assert headers.get("if-match", "").strip('"') or headers["range"] == "bytes=0-0"


async def test_anonymous(s3_open, aws_env, signed):
    aws_env(s3_open)      # keys in the environment: s3.anonymous does not use them
    source, data = put_image(s3_open, "lz4", "public/lz4.erofs")
    make_public(s3_open, source)
    with trio.fail_after(LIMIT):
        got, _, src = await open_read(source, s3opts(s3_open, **{"s3.anonymous": None}))
    assert got == data and src.credentials_origin is None and src.static_credentials is None
    assert signed and not any("authorization" in h for h in signed)


async def test_no_credentials_anywhere_is_unsigned(s3_open, aws_env, signed):
    aws_env()
    source, data = put_image(s3_open, "deflate", "public/deflate.erofs")
    make_public(s3_open, source)
    with trio.fail_after(LIMIT):
        got, _, src = await open_read(source, s3opts(s3_open))
    assert got == data and src.credentials_origin is None
    assert signed and not any("authorization" in h for h in signed)
