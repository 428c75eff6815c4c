"""S3 reads through the fault proxy (tests/oci/_faultproxy.py) in front of a real moto_server: the
registry blobs' retry layer (sources/httpblob.py) serves S3 objects too — every read returns the right
bytes after transient faults, and a server that ignores Range is handled (the pin included)."""

from __future__ import annotations

import pytest
import trio

from erofs_mount.sources.s3.options import S3Options
from erofs_mount.sources.s3.source import open_s3_source
from tests.oci._faultproxy import Fault, FaultProxy

from .conftest import clean_aws_env, put_image

pytestmark = pytest.mark.trio
KiB = 1024
LIMIT = 30

FAULTS = {
    "503": Fault("status", status=503),
    "429-retry-after": Fault("status", status=429, retry_after="1"),
    "reset-before-response": Fault("reset"),
    "reset-mid-body": Fault("reset_mid_body", fraction=0.3),
    "truncated-body": Fault("truncate", fraction=0.6),
    "stalled-body": Fault("stall_body", fraction=0.5, seconds=5),
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    clean_aws_env(tmp_path, monkeypatch)
    return monkeypatch


async def start_proxy(nursery, srv) -> FaultProxy:
    port = int(srv.url.rsplit(":", 1)[1])
    p = FaultProxy("127.0.0.1", port, match=lambda method, target: method == "GET")
    await nursery.start(p.serve)
    return p


def options(proxy: FaultProxy) -> S3Options:
    return S3Options.from_mount_options({"s3.endpoint": f"http://{proxy.host}", "s3.chunk_size": "64K",
                                         "s3.readahead": "0", "s3.timeout": "0.5", "s3.retries": "6",
                                         "s3.retry_time": "8"})


@pytest.mark.parametrize("name", list(FAULTS))
async def test_transient_fault_recovers(s3, env, nursery, name):
    """Signed requests pass the proxy unchanged (moto checks them); the next two GETs fail."""
    env.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    env.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    source, data = put_image(s3, "lz4", f"faults/{name}.erofs")
    proxy = await start_proxy(nursery, s3)
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=options(proxy))
        try:
            proxy.faults.extend([FAULTS[name], FAULTS[name]])
            off = 512 * KiB + 123
            assert await src.read_at(off, 300 * KiB) == data[off:off + 300 * KiB]
            assert src.stats()["retries"] >= 1
        finally:
            await src.aclose()


async def test_a_server_that_ignores_range_is_read_right_pin_included(s3_open, env, nursery):
    """Every GET answered 200 with the whole object (Range dropped on the way: moto then checks no
    signature, so the unsigned server): the size comes from Content-Length, bytes from the offset."""
    env.setenv("AWS_ACCESS_KEY_ID", s3_open.access_key)
    env.setenv("AWS_SECRET_ACCESS_KEY", s3_open.secret_key)
    source, data = put_image(s3_open, "lz4", "faults/norange.erofs")
    proxy = await start_proxy(nursery, s3_open)
    proxy.always = Fault("drop_range")
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=options(proxy))
        try:
            assert src.size == len(data)
            off = 700 * KiB + 5
            assert await src.read_at(off, 100 * KiB) == data[off:off + 100 * KiB]
            assert src.stats()["range_ignored"] >= 1
        finally:
            await src.aclose()
    assert proxy.ranges and all(r is not None for r in proxy.ranges)   # asked: the proxy dropped them
